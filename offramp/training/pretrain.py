"""``offramp train``: the embedded default model, from scratch, trained for early exit.

LayerSkip recipe, scaled down:

* early-exit loss: besides the final cross-entropy, each step adds the loss of
  ``exits_per_step`` exit heads (rotating over layers 1..n-1; all of them by default),
  each exit head being a per-layer copy of the final norm in front of the shared (tied)
  LM head. An exit's loss is ``(1 - exit_kd) * CE(exit, next token) + exit_kd *
  KL(final.detach() || exit)``: the distillation term trains the exit toward what the
  full model will say, which is what serving measures (agreement with full depth). It is
  taken on a random ``exit_token_frac`` of the positions, so training every exit every
  step costs about one extra LM-head pass instead of n-1;
* layer dropout rising with depth: layer ``l`` (0-based) is skipped for a row with
  probability ``p_max * l / (n - 1)`` (stochastic depth, residual kept), so later
  layers learn to refine rather than rewrite.

Resumable: ``ckpt.pt`` in the output directory is rewritten every ``ckpt_every`` steps
and a rerun of the same command continues from it. Batches are a pure function of
``(seed, step)``, so a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.training.data import TASKS, read_docs
from offramp.training.heads import ExitHeads, backbone, load_exit_tensors, use_bf16


@dataclass
class TrainSpec:
    hidden: int = 192
    layers: int = 8
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 512
    context: int = 512  # max_position_embeddings
    seq_len: int = 256  # training window (shorter than context: cheaper on one core)
    batch: int = 16
    steps: int = 1400
    lr: float = 2.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    exits_per_step: int = 7  # exit heads trained each step (rotating; >= n-1: all)
    exit_weight: float = 0.15  # loss weight of each exit head
    exit_kd: float = 0.5  # share of the exit loss that is KL toward the (detached) final layer
    exit_token_frac: float = 0.25  # share of positions an exit loss is taken on
    layer_drop_max: float = 0.2  # p of skipping the last layer; rises linearly with depth
    mix: dict = field(default_factory=lambda: {"qa": 0.35, "math": 0.3, "coding": 0.35})
    seed: int = 0
    ckpt_every: int = 100
    threads: int = 1
    bf16: bool | None = None  # CPU bf16 autocast (fp32 master weights); None: only where the CPU has native bf16
    time_budget_min: float = 0.0  # >0: schedule on max(step/steps, time/budget); stop at 1
    init: str = ""  # checkpoint directory to continue from (same shape and tokenizer); "": from scratch


def build_model(spec: TrainSpec, vocab: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.context,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        rms_norm_eps=1e-5, rope_theta=10000.0, attn_implementation="sdpa")
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(cfg)


def load_init(model, heads: ExitHeads, init_dir: str, tok) -> None:
    """Start from a trained checkpoint instead of random weights: its backbone, and its
    exit norms where it has an exits file. Shapes and vocabulary must match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(init_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"--init {src}: no config.json there; pass a checkpoint directory")
    if AutoTokenizer.from_pretrained(str(src)).get_vocab() != tok.get_vocab():
        raise ValueError(f"--init {src} has another vocabulary than the data's tokenizer; run "
                         f"`offramp prepare-data --tokenizer {src}` so both share it")
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    theirs, ours = ref.state_dict(), model.state_dict()
    bad = [k for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape]
    if bad:
        raise ValueError(f"--init {src} does not match the model's shape ({bad[0]}); use the "
                         "same --hidden/--layers/--heads/--intermediate as that checkpoint")
    model.load_state_dict({k: theirs[k] for k in ours})
    heads.load_tensors(load_exit_tensors(src))


def prompt_cut(doc: dict) -> int | None:
    """Where a prompt for this document ends, if it has one: after a function's signature
    line (``def area(width, height):\n``), after an arithmetic problem's first ``=``
    (``6-13=``). See :func:`docs_ids`."""
    if doc.get("task") == "math":
        eq = doc["text"].find("=")
        return eq + 1 if eq >= 0 else None
    if doc.get("unit") != "function":
        return None
    from offramp.training.tasks import function_header

    head = function_header(doc["text"])
    return len(head) if head else None


def docs_ids(tok, docs: list[dict]) -> list[list[int]]:
    """``bos text`` token ids per document. A document with a prompt (:func:`prompt_cut`)
    is tokenized as its prompt and its continuation apart, as a served prompt and the
    model's continuation are. Byte-level BPE merges across that boundary: a newline with
    the next line's indentation (``):`` ``\n    ``), ``=`` with a minus sign (``=-``). A
    prompt ``def f(x):\n`` or ``6-13=`` would otherwise end in a token that running text
    never shows there, and the model never learns what follows it (before this cut it
    closed the function and wrote another ``def``; it never answered a negative result)."""
    cuts = [prompt_cut(d) for d in docs]
    heads = [d["text"] if c is None else d["text"][:c] for d, c in zip(docs, cuts)]
    split = [i for i, c in enumerate(cuts) if c is not None and c < len(docs[i]["text"])]
    ids = tok(heads, add_special_tokens=True)["input_ids"] if docs else []
    if split:
        tails = tok([docs[i]["text"][cuts[i]:] for i in split], add_special_tokens=False)
        for i, tail in zip(split, tails["input_ids"]):
            ids[i] = ids[i] + tail
    return ids


# The tokenized training streams, cached beside the data; the name changes whenever
# docs_ids tokenizes differently (v2: arithmetic cut after its first ``=``), so a cache
# written by an older version is never read.
STREAMS_CACHE = "train_tokens.v2.pt"


def token_streams(data_dir: Path, tok, cache: Path) -> dict[str, torch.Tensor]:
    """Per task, every training document as ``bos text eos`` concatenated (int32)."""
    if cache.is_file():
        return torch.load(cache)
    docs = read_docs(data_dir, "train")
    streams = {}
    for task in TASKS:
        ids = docs_ids(tok, [d for d in docs if d["task"] == task])
        flat = [t for seq in ids for t in (*seq, tok.eos_token_id)]
        streams[task] = torch.tensor(flat, dtype=torch.int32)
    torch.save(streams, cache)
    return streams


def sample_batch(streams: dict[str, torch.Tensor], spec: TrainSpec, step: int) -> torch.Tensor:
    """(B, T+1) windows; a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    tasks = list(spec.mix)
    w = torch.tensor([spec.mix[t] for t in tasks])
    rows = []
    for i in torch.multinomial(w, spec.batch, replacement=True, generator=g).tolist():
        s = streams[tasks[i]]
        off = int(torch.randint(0, len(s) - spec.seq_len - 1, (1,), generator=g))
        rows.append(s[off:off + spec.seq_len + 1])
    return torch.stack(rows).long()


def layer_states(model, ids: torch.Tensor, drop_max: float = 0.0,
                 g: torch.Generator | None = None) -> list[torch.Tensor]:
    """Raw hidden states [embeddings, after layer 1, ..., after layer n] (no final norm),
    with depth-rising stochastic layer dropout when ``drop_max > 0``."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    B, T = ids.shape
    h = inner.embed_tokens(ids)  # (B, T, H)
    pos = torch.arange(T).unsqueeze(0)  # (1, T)
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    pe = inner.rotary_emb(h, position_ids=pos)
    n = len(inner.layers)
    out = [h]
    for i, layer in enumerate(inner.layers):
        nh = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        nh = nh[0] if isinstance(nh, tuple) else nh
        p = drop_max * i / max(n - 1, 1)
        if p > 0:
            keep = torch.rand(B, 1, 1, generator=g) >= p  # (B, 1, 1)
            nh = torch.where(keep, nh, h)
        h = nh
        out.append(h)
    return out


def progress_at(spec: TrainSpec, step: int, elapsed_s: float) -> float:
    """Share of the run done: steps, or wall time when a budget is set (one shared
    machine's speed varies; the budget keeps the run's length, the schedule follows)."""
    p = step / spec.steps
    if spec.time_budget_min > 0:
        p = max(p, elapsed_s / (60 * spec.time_budget_min))
    return min(p, 1.0)


def lr_at(spec: TrainSpec, step: int, progress: float) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    w = spec.warmup / spec.steps
    t = min(max((progress - w) / max(1 - w, 1e-6), 0.0), 1.0)
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


RESUME_MAY_CHANGE = ("threads", "time_budget_min")  # no effect on the data or the model


def _resume_key(spec: dict) -> dict:
    """The settings a checkpoint must match to be resumed: all but the thread count and
    the wall-time budget (a shorter budget on resume moves the lr schedule on at once)."""
    return {k: v for k, v in spec.items() if k not in RESUME_MAY_CHANGE}


def exit_loss_terms(spec: TrainSpec, bb, heads: ExitHeads, hs: list[torch.Tensor],
                    final: torch.Tensor, y: torch.Tensor, step: int,
                    bf16: bool) -> dict[int, torch.Tensor]:
    """Per chosen exit layer: CE toward the next token mixed with KL toward the final
    layer's (detached) distribution, on a random share of the positions."""
    exit_layers = heads.exit_layers
    n_exit = len(exit_layers)
    k = min(spec.exits_per_step, n_exit)
    chosen = [exit_layers[(step * k + j) % n_exit] for j in range(k)]
    B, T = y.shape
    n_pos = B * T
    if spec.exit_token_frac < 1.0:
        g = torch.Generator().manual_seed(spec.seed * 104_729 + step)
        m = max(1, int(round(spec.exit_token_frac * n_pos)))
        idx = torch.randperm(n_pos, generator=g)[:m]  # (m,)
    else:
        idx = torch.arange(n_pos)
    target = y.flatten()[idx]  # (m,)
    teacher = None
    if spec.exit_kd > 0:
        teacher = F.log_softmax(final.detach().flatten(0, 1)[idx], dim=-1)  # (m, V)
    out = {}
    for L in chosen:
        h = hs[L].flatten(0, 1)[idx]  # (m, H)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = bb.lm_head(heads.norms[str(L)](h)).float()  # (m, V)
        el = F.cross_entropy(logits, target)
        if teacher is not None:
            kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True,
                          reduction="batchmean")
            el = (1 - spec.exit_kd) * el + spec.exit_kd * kl
        out[L] = el
    return out


def train(data_dir: str | Path, out_dir: str | Path, spec: TrainSpec,
          progress: bool = True) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(spec.threads)
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    streams = token_streams(data_dir, tok, data_dir / STREAMS_CACHE)
    model = build_model(spec, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    bb = backbone(model)
    exit_layers = list(range(1, spec.layers))
    heads = ExitHeads(bb, exit_layers)
    if spec.init:
        load_init(model, heads, spec.init, tok)
    params = list(model.parameters()) + list(heads.norms.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    ckpt_path = out / "ckpt.pt"
    step, log, elapsed = 0, [], 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        if _resume_key(ck["spec"]) != _resume_key(asdict(spec)):
            raise ValueError(f"{ckpt_path} was written with other settings; use the same "
                             "flags to resume, or another --out to start over")
        model.load_state_dict(ck["model"])
        heads.norms.load_state_dict(ck["norms"])
        opt.load_state_dict(ck["opt"])
        step, log, elapsed = ck["step"], ck["log"], ck.get("elapsed_s", 0.0)
    model.train()
    bf16 = use_bf16(spec.bf16)
    bar = tqdm(total=spec.steps, initial=step, disable=not progress, desc="train",
               dynamic_ncols=True, mininterval=5)
    t0, tokens0, elapsed0 = time.time(), step, elapsed
    while progress_at(spec, step, elapsed) < 1.0:
        batch = sample_batch(streams, spec, step)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T)
        g = torch.Generator().manual_seed(spec.seed * 7919 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hs = layer_states(model, x, spec.layer_drop_max, g)
            final = bb.lm_head(bb.final_norm(hs[-1])).float()  # (B, T, V)
        loss_final = F.cross_entropy(final.flatten(0, 1), y.flatten())
        loss = loss_final
        exit_losses = {}
        for L, el in exit_loss_terms(spec, bb, heads, hs, final, y, step, bf16).items():
            exit_losses[L] = el.item()
            loss = loss + spec.exit_weight * el
        for group in opt.param_groups:
            group["lr"] = lr_at(spec, step, progress_at(spec, step, elapsed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed = elapsed0 + time.time() - t0
        rec = {"step": step, "elapsed_s": round(elapsed, 1), "loss": round(loss_final.item(), 4),
               **{f"exit{L}": round(v, 4) for L, v in exit_losses.items()}}
        log.append(rec)
        tps = (step - tokens0) * spec.batch * spec.seq_len / max(time.time() - t0, 1e-6)
        bar.set_postfix(loss=f"{loss_final.item():.3f}", tok_s=f"{tps:.0f}", refresh=False)
        bar.update(1)
        done = progress_at(spec, step, elapsed) >= 1.0
        if step % spec.ckpt_every == 0 or done:
            tmp = out / "ckpt.pt.tmp"
            torch.save({"spec": asdict(spec), "model": model.state_dict(),
                        "norms": heads.norms.state_dict(), "opt": opt.state_dict(),
                        "step": step, "log": log, "elapsed_s": elapsed}, tmp)
            tmp.replace(ckpt_path)
    bar.close()
    return export(model, heads, tok, out, spec, log)


def export(model, heads: ExitHeads, tok, out: Path, spec: TrainSpec, log: list[dict]) -> dict:
    """HF checkpoint (bf16 safetensors) + exits file holding the trained exit norms."""
    from offramp.ops.exits import ExitsConfig, save_exits

    model.eval()
    model.config.use_cache = True
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    model.float()
    tok.save_pretrained(str(out))
    tail = log[-50:]
    summary = {
        "recipe": "layerskip: early-exit loss (CE + KL to final) + depth-rising layer dropout",
        "spec": asdict(spec),
        "steps_done": len(log),
        "wall_s": log[-1]["elapsed_s"] if log else 0.0,
        "final_loss_last50": round(sum(r["loss"] for r in tail) / max(len(tail), 1), 4),
    }
    cfg = ExitsConfig(exit_layers=heads.exit_layers, gate_enabled=False,
                      training={"backbone": summary})
    save_exits(out, cfg, heads.to_tensors(with_gates=False))
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    return summary
