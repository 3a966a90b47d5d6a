"""``offramp calibrate-draft``: draft thresholds of speculative exits, chosen for speed.

A speculative round (docs/speculative.md) drafts at the exit head after layer ``L`` while
its confidence is at least the draft threshold ``t`` (at most ``max_draft`` tokens), then
visits the deep stages once. Agreement does not need a guarantee here (verification makes
the output exact); what ``t`` trades is wasted work: a low ``t`` drafts tokens the full
model rejects, a high ``t`` stops drafts that would have been accepted and pays a deep
visit more often.

For each exit layer (a possible end of stage 0) and task, this replays rounds over what a
decoding server drafts against: held-out prompts and the full model's own greedy
continuations of them (teacher-forced text would understate acceptance: a model agrees
with its shallow layers more on its own output than on human text). Per continuation
position it takes the exit head's confidence and whether its argmax equals the full
model's (the statistics ``offramp calibrate`` uses); from position ``s`` the draft is the run of confident positions from ``s``
(capped at ``max_draft``), the accepted drafts the run of agreeing positions within it,
and the next round starts after the accepted drafts and the full model's token. Each
round's work, in multiply-accumulates of the checkpoint's shapes:
``(k + 1)`` passes of layers ``1..L`` (each with the exit head but a budget-capped last),
one pass of layers ``L+1..n`` over the chunk plus the LM head, plus ``visit_overhead`` x
one full-depth token for the round trip (hops, ingress, per-visit costs of a served
pipeline; 0 in one process). The threshold with the most tokens per unit of work wins;
ties go to the higher threshold (less wasted drafting). Candidates: forced drafts
(``-inf``) and the confidence quantiles 5%..95%.

The chosen thresholds go to ``draft_thresholds`` in ``offramp_exits.json`` (the
agreement thresholds are untouched), with the expected speedup over exits off under the
same cost model in ``draft_calibration``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from offramp.ops.checkpoint import ModelSpec, load_spec
from offramp.ops.exits import save_exits
from offramp.training.heads import load_exit_tensors

QUANTILES = tuple(q / 100 for q in range(5, 100, 5))
FORCED = -1e9  # the stored threshold of forced drafting (below any confidence of every metric)


@dataclass
class DraftSpec:
    max_draft: int = 6
    visit_overhead: float = 0.5  # a round trip's cost in full-depth tokens (served 2-stage c1 on CPU: ~0.5)
    max_tokens: int = 4_000  # held-out prompt tokens per task (max_tokens / prompt_tokens prompts)
    prompt_tokens: int = 32
    new_tokens: int = 64
    threads: int = 1


def layer_macs(spec: ModelSpec) -> tuple[float, float]:
    """(one decoder layer, the LM head) multiply-accumulates per position."""
    d, inter = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attn = d * (q + 2 * kv) + q * d
    mlp = (3 if spec.act == "silu" else 2) * d * inter
    return float(attn + mlp), float(spec.vocab_size * d)


def _runs(flags: list[bool]) -> list[int]:
    """Length of the run of True starting at each index (within one window)."""
    out = [0] * (len(flags) + 1)
    for i in range(len(flags) - 1, -1, -1):
        out[i] = out[i + 1] + 1 if flags[i] else 0
    return out[:-1]


def simulate(conf: torch.Tensor, agree: torch.Tensor, threshold: float, max_draft: int, layers: int,
             num_layers: int, layer_cost: float, head_cost: float, visit: float) -> dict:
    """Replay speculative rounds over windows ``conf``/``agree`` (W, T) of one exit layer."""
    return _replay([_runs((c >= threshold).tolist()) for c in conf], [_runs(a.tolist()) for a in agree],
                   max_draft, layers, num_layers, layer_cost, head_cost, visit)


def _replay(confident: list[list[int]], agreeing: list[list[int]], max_draft: int, layers: int, num_layers: int,
            layer_cost: float, head_cost: float, visit: float) -> dict:
    """Rounds over windows given, per position, the run of confident and of agreeing
    positions starting there."""
    tokens = rounds = drafted = accepted = 0
    work = 0.0
    deep = (num_layers - layers) * layer_cost + head_cost + visit
    for conf_runs, agree_runs in zip(confident, agreeing):
        T, s = len(conf_runs), 0
        while s < T:
            k = min(conf_runs[s], max_draft, T - s - 1)
            a = min(agree_runs[s], k)
            heads = k + 1 if k < max_draft else k
            work += (k + 1) * layers * layer_cost + heads * head_cost + deep
            rounds += 1
            drafted += k
            accepted += a
            tokens += a + 1
            s += a + 1
    return {"tokens": tokens, "work": work, "rounds": rounds, "drafted": drafted, "accepted": accepted}


def choose(conf: torch.Tensor, agree: torch.Tensor, layers: int, num_layers: int, layer_cost: float,
           head_cost: float, spec: DraftSpec) -> dict:
    """The draft threshold with the most tokens per unit of work for one exit layer."""
    token = num_layers * layer_cost + head_cost  # one full-depth token's work
    visit = spec.visit_overhead * token
    agreeing = [_runs(a.tolist()) for a in agree]  # does not depend on the threshold
    cands = [-math.inf] + sorted({float(torch.quantile(conf.flatten(), q)) for q in QUANTILES})
    best = None
    for t in cands:
        r = _replay([_runs((c >= t).tolist()) for c in conf], agreeing, spec.max_draft, layers, num_layers,
                    layer_cost, head_cost, visit)
        speedup = r["tokens"] / r["work"] * (token + visit)
        if best is None or speedup >= best["speedup"] - 1e-12:
            best = {"threshold": t, "speedup": speedup, **r}
    best["mean_accepted"] = best["accepted"] / best["rounds"]
    return best


def continuation_stats(model_dir: Path, data_dir: Path, spec: DraftSpec):
    """(exits config, {task: (conf, agree)}) with conf/agree (E, W, new_tokens): each window
    is a held-out prompt of ``prompt_tokens`` and the full model's own greedy continuation,
    scored at the continuation's positions (what a decoding server's drafts meet)."""
    from offramp.training.calibrate import task_stats

    P, G = spec.prompt_tokens, spec.new_tokens

    def continued(model, wins: torch.Tensor) -> torch.Tensor:  # (W, P + 1) windows -> (W, P + G)
        with torch.inference_mode():
            return torch.cat([model.generate(wins[i:i + 16, :P], max_new_tokens=G, min_new_tokens=G,
                                             do_sample=False, pad_token_id=0, eos_token_id=None)
                              for i in range(0, len(wins), 16)])

    cfg, stats, _ = task_stats(model_dir, data_dir, "calib", spec.max_tokens, P, None, prepare=continued)
    E, T = len(cfg.exit_layers), P + G - 1
    # position P-1 predicts the first continuation token; keep the G positions from there
    return cfg, {task: (st.conf.reshape(E, -1, T)[:, :, P - 1: P - 1 + G],
                        st.agree.reshape(E, -1, T)[:, :, P - 1: P - 1 + G]) for task, st in stats.items()}


def calibrate_draft(model_dir: Path, data_dir: Path, spec: DraftSpec) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(spec.threads)
    cfg, stats = continuation_stats(model_dir, data_dir, spec)
    mspec = load_spec(model_dir)
    layer_cost, head_cost = layer_macs(mspec)
    n = mspec.num_layers
    groups = {**stats, "default": (torch.cat([c for c, _ in stats.values()], 1),
                                   torch.cat([a for _, a in stats.values()], 1))}
    chosen: dict[str, dict[str, float]] = {}
    report: dict[str, dict[str, dict]] = {}
    with tqdm(total=len(cfg.exit_layers) * len(groups), desc="calibrate-draft") as bar:
        for e, L in enumerate(cfg.exit_layers):
            for task, (conf, agree) in groups.items():
                best = choose(conf[e], agree[e], L, n, layer_cost, head_cost, spec)
                chosen.setdefault(str(L), {})[task] = best["threshold"]
                report.setdefault(str(L), {})[task] = {k: round(v, 4) if isinstance(v, float) else v
                                                       for k, v in best.items()}
                bar.update()
    # JSON has no -inf: forced drafting is a threshold below any confidence of the metric
    cfg.draft_thresholds = {L: {t: (v if math.isfinite(v) else FORCED) for t, v in per.items()}
                            for L, per in chosen.items()}
    cfg.draft_calibration = {"max_draft": spec.max_draft, "visit_overhead": spec.visit_overhead,
                             "metric": cfg.metric, "prompt_tokens": spec.prompt_tokens,
                             "new_tokens": spec.new_tokens, "prompt_tokens_per_task": spec.max_tokens,
                             "data": str(data_dir),
                             "expected_speedup": {L: {t: r["speedup"] for t, r in per.items()} for L, per in report.items()},
                             "expected_mean_accepted": {L: {t: round(r["mean_accepted"], 3) for t, r in per.items()}
                                                        for L, per in report.items()}}
    save_exits(model_dir, cfg, load_exit_tensors(model_dir))
    return {"thresholds": cfg.draft_thresholds, "report": report}


def format_report(report: dict[str, dict[str, dict]]) -> str:
    lines = [f"{'layer':>5} {'task':<8} {'threshold':>10} {'speedup':>8} {'accepted/round':>15} {'drafted':>8}"]
    for L, per in report.items():
        for task, r in per.items():
            t = r["threshold"]
            lines.append(f"{L:>5} {task:<8} {('forced' if not math.isfinite(t) else f'{t:.4f}'):>10} "
                         f"{r['speedup']:>8.3f} {r['mean_accepted']:>15.2f} {r['drafted']:>8}")
    return "\n".join(lines)
