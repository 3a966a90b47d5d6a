"""Teacher-forced exit statistics: what every exit head and gate would say at every
token, next to the full model's greedy token.

Teacher forcing with exact KV is what the staged engine computes at a boundary (exact
backfill keeps every layer's KV complete), so these per-token statistics are the
engine's, without running the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.ops.exits import ConfidenceMetric, ExitsConfig, confidence
from offramp.training.data import read_docs
from offramp.training.heads import ExitHeads, backbone, load_exit_tensors


def heldout_docs(data_dir: str | Path, part: str) -> list[dict]:
    """Held-out documents split in two disjoint halves per task: ``calib`` (thresholds
    are chosen on it) and ``test`` (eval reports on it)."""
    docs = read_docs(data_dir, "heldout")
    out, seen = [], {}
    for d in docs:
        i = seen.get(d["task"], 0)
        seen[d["task"]] = i + 1
        if (i % 2 == 0) == (part == "calib"):
            out.append(d)
    return out


def token_windows(docs: list[dict], tok, task: str, seq_len: int, max_tokens: int,
                  ) -> torch.Tensor:
    """(N, seq_len + 1) windows cut from ``bos doc eos`` streams of one task."""
    flat: list[int] = []
    for d in docs:
        if d["task"] != task:
            continue
        ids = tok(d["text"], add_special_tokens=True)["input_ids"]
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id, *ids]
        flat += [*ids, tok.eos_token_id]
        if len(flat) >= max_tokens + seq_len:
            break
    step = seq_len + 1
    n = min(len(flat) // step, max(max_tokens // seq_len, 1))
    if n == 0:
        return torch.zeros(0, step, dtype=torch.long)
    return torch.tensor(flat[: n * step], dtype=torch.long).view(n, step)


def load_model(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.model_max_length = 10**9  # we cut windows ourselves; silence the length warning
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {model_dir} has no eos token; set eos_token in "
                         "tokenizer_config.json")
    return model, tok


def load_heads(model, model_dir, cfg: ExitsConfig) -> ExitHeads:
    heads = ExitHeads(backbone(model), cfg.exit_layers, len(cfg.task_types), cfg.task_dim)
    heads.load_tensors(load_exit_tensors(model_dir))
    return heads.eval()


@dataclass
class ExitStats:
    """Per token (flattened over windows) - tensors of shape (N,), or (E, N) per exit."""

    exit_layers: list[int]
    num_layers: int
    final_pred: torch.Tensor  # (N,) full-depth greedy token
    final_nll: torch.Tensor  # (N,) -log p_full(next true token)
    conf: torch.Tensor  # (E, N) exit-head confidence
    agree: torch.Tensor  # (E, N) bool: exit-head argmax == full-depth argmax
    gate: torch.Tensor  # (E, N) gate probability (1.0 where the gate is absent)
    nll: torch.Tensor  # (E, N) -log p_exit(next true token)


@torch.no_grad()
def collect(model, heads: ExitHeads, windows: torch.Tensor, task_idx: int,
            metric: ConfidenceMetric, has_gate: bool, batch: int = 8,
            progress: bool = False, desc: str = "") -> ExitStats:
    from tqdm import tqdm

    bb = backbone(model)
    E = len(heads.exit_layers)
    parts: dict[str, list] = {k: [] for k in ("fp", "fn", "conf", "agree", "gate", "nll")}
    for i in tqdm(range(0, len(windows), batch), disable=not progress, desc=desc,
                  dynamic_ncols=True, mininterval=2):
        w = windows[i:i + batch]
        x, y = w[:, :-1], w[:, 1:].flatten()  # (B, T), (B*T,)
        out = model(input_ids=x, output_hidden_states=True)
        final = out.logits.float().flatten(0, 1)  # (B*T, V)
        fpred = final.argmax(-1)
        parts["fp"].append(fpred)
        parts["fn"].append(F.cross_entropy(final, y, reduction="none"))
        cs, ags, gs, ns = [], [], [], []
        task = torch.full((y.numel(),), task_idx, dtype=torch.long)
        for L in heads.exit_layers:
            h = out.hidden_states[L].float().flatten(0, 1)  # (B*T, H) raw, after L layers
            normed = heads.norms[str(L)](h)
            logits = bb.lm_head(normed).float()  # (B*T, V)
            cs.append(confidence(logits, metric))
            ags.append(logits.argmax(-1) == fpred)
            ns.append(F.cross_entropy(logits, y, reduction="none"))
            gs.append(torch.sigmoid(heads.gates[str(L)](normed, task)) if has_gate
                      else torch.ones(y.numel()))
        for k, v in (("conf", cs), ("agree", ags), ("gate", gs), ("nll", ns)):
            parts[k].append(torch.stack(v))  # (E, B*T)
    if not parts["fp"]:
        z = torch.zeros(E, 0)
        return ExitStats(heads.exit_layers, bb.num_layers, torch.zeros(0, dtype=torch.long),
                         torch.zeros(0), z, z.bool(), z, z)
    return ExitStats(
        heads.exit_layers, bb.num_layers, torch.cat(parts["fp"]), torch.cat(parts["fn"]),
        torch.cat(parts["conf"], 1), torch.cat(parts["agree"], 1), torch.cat(parts["gate"], 1),
        torch.cat(parts["nll"], 1))


def exit_layer_per_token(stats: ExitStats, thresholds: list[float],
                         gate_threshold: float) -> torch.Tensor:
    """(N,) index into exit_layers of the first exit taken, or E for full depth."""
    E, N = stats.conf.shape
    first = torch.full((N,), E, dtype=torch.long)
    for e in range(E - 1, -1, -1):  # reverse so the earliest exit wins
        fire = (stats.gate[e] >= gate_threshold) & (stats.conf[e] >= thresholds[e])
        first[fire] = e
    return first


def summarize(stats: ExitStats, first: torch.Tensor) -> dict:
    """Agreement, layers executed, perplexities and histogram for one exit assignment."""
    E, N = stats.conf.shape
    if N == 0:
        return {"tokens": 0}
    layers = torch.tensor([*stats.exit_layers, stats.num_layers], dtype=torch.float)
    idx = first.clamp(max=E - 1) if E else first
    exited = first < E
    agree_all = torch.ones(N, dtype=torch.bool)
    nll = stats.final_nll.clone()
    if E:
        agree_all[exited] = stats.agree[idx[exited], exited.nonzero().squeeze(-1)]
        nll[exited] = stats.nll[idx[exited], exited.nonzero().squeeze(-1)]
    hist = torch.bincount(first, minlength=E + 1).tolist()
    return {
        "tokens": N,
        "agreement": agree_all.float().mean().item(),
        "exited_agreement": agree_all[exited].float().mean().item() if exited.any() else None,
        "exit_rate": exited.float().mean().item(),
        "frac_layers": (layers[first] / stats.num_layers).mean().item(),
        "ppl_exit": torch.exp(nll.mean()).item(),
        "ppl_full": torch.exp(stats.final_nll.mean()).item(),
        "exit_histogram": {**{str(L): hist[e] for e, L in enumerate(stats.exit_layers)},
                           "full": hist[E]},
    }
