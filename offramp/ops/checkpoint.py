"""Reading Hugging Face checkpoint directories stage by stage.

:class:`ModelSpec` is the architecture in Offramp's own terms (one decoder block type
with switches, covering the Llama family — Llama, Mistral, Qwen2 — and GPT-2).
:class:`WeightReader` reads single tensors lazily from ``model.safetensors`` or a sharded
``model.safetensors.index.json``, so a stage touches only the tensors it owns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from offramp.errors import ConfigError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gpt2")
# RoPE types whose frequencies do not depend on the running sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts a stage needs; derived once from ``config.json``."""

    family: str  # "llama" (Llama/Mistral/Qwen2) or "gpt2"
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 / attention_bias / GPT-2
    out_bias: bool  # o_proj bias (GPT-2 always, Llama with attention_bias)
    mlp_bias: bool
    act: str  # "silu" (gated MLP) or "gelu_tanh" (GPT-2 fc MLP)
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hf_config: object  # the transformers config (RoPE init functions need it)

    @property
    def is_llama(self) -> bool:
        return self.family == "llama"

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer (for memory accounting)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = d * self.intermediate_size * (3 if self.is_llama else 2)
        return attn + mlp + 2 * d


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Parse ``config.json``; errors name the problem and the fix."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist; pass --model with a local checkpoint directory")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory (config.json + *.safetensors)")
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r} in {model_dir}/config.json; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    cfg = AutoConfig.from_pretrained(str(model_dir))
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

    if model_type == "gpt2":
        d = cfg.n_embd
        return ModelSpec(
            family="gpt2", model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=d,
            num_layers=cfg.n_layer, num_heads=cfg.n_head, num_kv_heads=cfg.n_head,
            head_dim=d // cfg.n_head, intermediate_size=cfg.n_inner or 4 * d,
            norm_eps=cfg.layer_norm_epsilon, max_position=cfg.n_positions,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
            qkv_bias=True, out_bias=True, mlp_bias=True, act=_gpt2_act(cfg.activation_function),
            sliding_window=None, bos_token_id=cfg.bos_token_id, eos_token_ids=eos_ids, hf_config=cfg,
        )

    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise ConfigError(
            f"RoPE type {rope_type!r} in {model_dir}/config.json changes with sequence length and is not "
            f"supported; supported types: {', '.join(STATIC_ROPE)}"
        )
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={cfg.hidden_act!r} is not supported for {model_type}; expected 'silu'")
    window = None
    if model_type == "mistral" or getattr(cfg, "use_sliding_window", False):
        window = getattr(cfg, "sliding_window", None)
    n_heads = cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(
        family="llama", model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=n_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        intermediate_size=cfg.intermediate_size, norm_eps=cfg.rms_norm_eps,
        max_position=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias, out_bias=attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)), act="silu", sliding_window=window,
        bos_token_id=cfg.bos_token_id, eos_token_ids=eos_ids, hf_config=cfg,
    )


def _gpt2_act(name: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise ConfigError(f"GPT-2 activation_function={name!r} is not supported; expected gelu_new or gelu")


class WeightReader:
    """Lazy tensor access by name over one or many safetensors files."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            weight_map = None  # filled below
        else:
            bins = list(self.model_dir.glob("*.bin"))
            hint = " (found PyTorch .bin files: re-save with model.save_pretrained(dir, safe_serialization=True))" if bins else ""
            raise ConfigError(f"{self.model_dir} has no model.safetensors or model.safetensors.index.json{hint}")
        self._open: dict[str, object] = {}
        self._safe_open = safe_open
        if weight_map is None:
            with safe_open(str(single), "pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        self.weight_map = weight_map
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConfigError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}; is the checkpoint complete?")
        fname = self.weight_map[name]
        handle = self._open.get(fname)
        if handle is None:
            handle = self._safe_open(str(self.model_dir / fname), "pt")
            self._open[fname] = handle
        t = handle.get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def first_present(self, *names: str) -> str:
        for n in names:
            if n in self.weight_map:
                return n
        raise ConfigError(f"none of {names} found in the checkpoint in {self.model_dir}; is it a supported architecture?")
