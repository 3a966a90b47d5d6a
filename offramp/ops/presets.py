"""Tiny random checkpoints: the fallback model until the embedded one exists, and the
fixtures of tests and benchmarks. Written with ``transformers`` itself, so they are real
Hugging Face directories (config.json + model.safetensors + tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

PRESETS = {
    # name: (family, hidden, layers, heads, kv_heads, intermediate, vocab, context)
    "tiny": ("llama", 64, 4, 4, 2, 128, 512, 256),
    "bench-20m": ("llama", 384, 8, 6, 6, 1024, 16384, 1024),
}


def byte_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + bos/eos/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{n}>": i for i, n in enumerate(("bos", "eos", "pad"))}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def make_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, family: str | None = None,
                    with_tokenizer: bool = True, **overrides) -> Path:
    """Write a random checkpoint of ``preset`` (``family`` may be llama, qwen2, mistral, gpt2)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    fam, d, layers, heads, kv, inter, vocab, ctx = PRESETS[preset]
    family = family or fam
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, n_positions=ctx, **common)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
        cfg = cls(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  intermediate_size=inter, max_position_embeddings=ctx, tie_word_embeddings=family != "llama",
                  **common)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if with_tokenizer:
        byte_tokenizer(vocab).save_pretrained(path)
    return path


def tiny_model_dir() -> Path:
    """The tiny preset, created once under the user's cache directory."""
    root = Path(os.environ.get("OFFRAMP_CACHE", Path.home() / ".cache" / "offramp"))
    path = root / "tiny"
    if not (path / "config.json").is_file():
        make_checkpoint(path, "tiny")
    return path
