"""``offramp calibrate``: exit thresholds with a Learn-then-Test guarantee.

Risk controlled, per exit layer ``L`` and task type: the share of tokens *exiting at*
``L`` whose exit-head token differs from the full model's greedy token must be at most
``eps = 1 - target``. No labels are needed: the full model is the reference.

Learn-then-Test (Angelopoulos et al.), as CALM uses it:

* candidate thresholds ``t_1 > t_2 > ...`` (strict to loose; quantiles of the observed
  confidences, so the grid is fixed given the confidences we condition on);
* for each ``t`` the null ``H_t: risk(t) > eps`` gets the binomial-tail p-value
  ``P(Bin(n_t, eps) <= k_t)`` (``n_t`` tokens exit, ``k_t`` of them disagree);
* fixed-sequence testing: walk the sequence, reject while ``p <= delta_L``, stop at the
  first non-rejection; the loosest rejected ``t`` is chosen. Thresholds at which fewer
  tokens exit than could ever reject (``(1-eps)^n > delta_L``) are skipped - they are a
  prefix of the sequence and depend only on the confidences.
* ``delta_L = delta / #exit layers`` (Bonferroni), so with probability ``>= 1 - delta``
  every layer of a task meets the target at once - and then so do all exited tokens
  together, and overall agreement is at least ``target``.

Layers are calibrated in order: layer ``L`` is calibrated on the tokens that reach it
(did not exit earlier at the thresholds already chosen) and pass the tier-1 gate. That
is exactly the population that exits at ``L`` in serving. Strictly the earlier
thresholds were picked on the same tokens; the guarantee is exact when they are taken
as given (see docs/training.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from offramp.errors import ConfigError
from offramp.ops.exits import Calibration, exits_present, load_exits_config, save_exits
from offramp.training.heads import load_exit_tensors
from offramp.training.teacher import (ExitStats, collect, exit_layer_per_token, heldout_docs,
                                      load_heads, load_model, summarize, token_windows)

NEVER = 1e9  # a threshold no confidence reaches: the exit never fires for that task
CURVE_TARGETS = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass
class CalibSpec:
    target: float = 0.98
    delta: float = 0.1
    max_tokens: int = 20_000  # held-out tokens per task
    seq_len: int = 256
    metric: str = "margin"  # p1 - p2 separates agreeing tokens better than p1 (docs/training.md)
    grid: int = 200  # candidate thresholds per layer
    threads: int = 1
    seed: int = 0


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (exact, fine for n up to ~1e6)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    logc = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1))
    logt = logc + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(torch.logsumexp(logt, 0).exp().clamp(max=1.0))


def ltt_threshold(conf: torch.Tensor, agree: torch.Tensor, target: float, delta: float,
                  grid: int = 200) -> tuple[float, dict]:
    """Loosest threshold whose exited tokens agree at >= target, by fixed-sequence
    testing from strict to loose. Returns (NEVER, ...) when none is certified."""
    eps = 1.0 - target
    n_all = conf.numel()
    info = {"n": n_all, "tested": 0, "exits": 0, "disagree": 0, "p": None}
    if n_all == 0:
        return NEVER, info
    n_min = math.ceil(math.log(delta) / math.log1p(-eps))  # fewer exits can never reject
    qs = torch.linspace(1.0, 0.0, grid + 1, dtype=torch.float64)[1:]
    cands = torch.quantile(conf.double(), qs).unique().flip(0)  # descending, strict first
    order = torch.argsort(conf, descending=True)
    c_sorted, dis_sorted = conf[order], (~agree[order]).long().cumsum(0)
    chosen = NEVER
    for t in cands.tolist():
        n = int((c_sorted >= t).sum())
        if n < n_min:
            continue
        k = int(dis_sorted[n - 1])
        p = binom_cdf(k, n, eps)
        info["tested"] += 1
        if p > delta:
            break
        chosen, info["exits"], info["disagree"], info["p"] = t, n, k, p
    return chosen, info


def calibrate_stats(stats: ExitStats, gate_threshold: float, target: float, delta: float,
                    min_layers: int = 1, grid: int = 200) -> list[float]:
    """Per exit layer (in order), thresholds chosen on the tokens that reach it."""
    E, N = stats.conf.shape
    delta_l = delta / max(E, 1)
    reach = torch.ones(N, dtype=torch.bool)
    out = []
    for e, L in enumerate(stats.exit_layers):
        if L < min_layers:
            out.append(NEVER)
            continue
        cand = reach & (stats.gate[e] >= gate_threshold)
        t, _ = ltt_threshold(stats.conf[e][cand], stats.agree[e][cand], target, delta_l, grid)
        out.append(t)
        reach &= ~(cand & (stats.conf[e] >= t))
    return out


def _cat(stats: list[ExitStats]) -> ExitStats:
    s0 = stats[0]
    return ExitStats(s0.exit_layers, s0.num_layers,
                     *(torch.cat([getattr(s, f) for s in stats], -1)
                       for f in ("final_pred", "final_nll", "conf", "agree", "gate", "nll")))


def task_stats(model_dir: Path, data_dir: Path, part: str, max_tokens: int, seq_len: int,
               metric: str | None, tasks: list[str] | None = None,
               prepare: Callable[[Any, torch.Tensor], torch.Tensor] | None = None):
    """(exits config, {task: ExitStats}) over one half of the held-out split. ``metric``
    None: the exits file's. ``prepare(model, windows)``, when given, turns each task's
    windows into the sequences scored (``offramp calibrate-draft``: prompts and the
    model's own continuations)."""
    if not exits_present(model_dir):
        raise ConfigError(f"{model_dir} has no exits file; run `offramp train-gates "
                          f"--model {model_dir}` first")
    cfg = load_exits_config(model_dir)
    model, tok = load_model(model_dir)
    heads = load_heads(model, model_dir, cfg)
    has_gate = cfg.gate_enabled and any(".gate." in k for k in load_exit_tensors(model_dir))
    docs = heldout_docs(data_dir, part)
    out = {}
    for task in tasks or cfg.task_types:
        wins = token_windows(docs, tok, task, seq_len, max_tokens)
        if len(wins) == 0:
            continue
        if prepare is not None:
            wins = prepare(model, wins)
        out[task] = collect(model, heads, wins, cfg.task_index(task), metric or cfg.metric, has_gate,
                            progress=True, desc=f"{part}:{task}")
    if not out:
        raise ConfigError(f"no held-out text for tasks {tasks or cfg.task_types} in {data_dir}")
    return cfg, out, has_gate


def _plot(curves: dict[str, list[tuple[float, float, float]]], chosen: dict[str, dict],
          target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for task, pts in curves.items():
        pts = sorted(pts, key=lambda p: (p[1], p[2]))
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=task)
        c = chosen[task]
        ax.scatter([c["frac_layers"]], [c["agreement"]], marker="*", s=140, zorder=3)
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}")
    ax.set_xlabel("fraction of layers executed")
    ax.set_ylabel("agreement with full depth (greedy)")
    ax.set_title("Early-exit speed-quality (held-out calibration half)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_rows(layers: list[int], rows: dict[str, dict], thr: dict[str, list[float]]) -> str:
    head = f"{'task':8} {'tokens':>7} {'agree':>7} {'exit%':>6} {'layers%':>8}  thresholds " + \
        " ".join(f"L{L}" for L in layers)
    lines = [head]
    for task, r in rows.items():
        ts = " ".join("-" if t >= NEVER else f"{t:.3f}" for t in thr[task])
        lines.append(f"{task:8} {r['tokens']:7d} {r['agreement']:7.4f} {100 * r['exit_rate']:5.1f}% "
                     f"{100 * r['frac_layers']:7.1f}%  {ts}")
    return "\n".join(lines)


def calibrate(model_dir: Path, data_dir: Path, spec: CalibSpec, plot: str | None = None) -> dict:
    if not 0.5 <= spec.target < 1.0 or not 0.0 < spec.delta < 1.0:
        raise ConfigError(f"target {spec.target} / delta {spec.delta} out of range; use "
                          "0.5 <= target < 1 and 0 < delta < 1")
    torch.set_num_threads(spec.threads)
    cfg, stats, has_gate = task_stats(model_dir, data_dir, "calib", spec.max_tokens,
                                      spec.seq_len, spec.metric)
    gate_thr = cfg.gate_threshold if has_gate else 0.0
    thr, rows, curves = {}, {}, {}
    for task, st in stats.items():
        thr[task] = calibrate_stats(st, gate_thr, spec.target, spec.delta, cfg.min_layers, spec.grid)
        rows[task] = summarize(st, exit_layer_per_token(st, thr[task], gate_thr))
        curves[task] = [(1.0, 1.0, 1.0)]
        for tg in CURVE_TARGETS:
            ts = calibrate_stats(st, gate_thr, tg, spec.delta, cfg.min_layers, spec.grid)
            s = summarize(st, exit_layer_per_token(st, ts, gate_thr))
            curves[task].append((tg, s["frac_layers"], s["agreement"]))
    pooled = _cat(list(stats.values()))
    thr["default"] = calibrate_stats(pooled, gate_thr, spec.target, spec.delta, cfg.min_layers,
                                     spec.grid)
    thresholds = {}
    for e, L in enumerate(cfg.exit_layers):
        per = {task: ts[e] for task, ts in thr.items()}
        if any(v < NEVER for v in per.values()):
            thresholds[str(L)] = per
    n = min(st.conf.shape[1] for st in stats.values())
    cfg.thresholds = thresholds
    cfg.metric = spec.metric
    cfg.calibration = Calibration(
        target=spec.target, delta=spec.delta, n=n,
        notes=(f"learn-then-test, fixed sequence strict->loose, binomial tail, delta/"
               f"{len(cfg.exit_layers)} per layer (Bonferroni), per task; layers in order on "
               f"tokens reaching them; gate_threshold {gate_thr:.3f}; data {data_dir} "
               f"(held-out calib half), {spec.max_tokens} tokens/task max, metric {spec.metric}"))
    save_exits(model_dir, cfg, load_exit_tensors(model_dir))
    plot_path = Path(plot) if plot else Path(model_dir) / "calibration.png"
    _plot(curves, rows, spec.target, plot_path)
    table = format_rows(cfg.exit_layers, rows, thr)
    return {"thresholds": thresholds, "rows": rows, "curves": curves, "plot": str(plot_path),
            "table": table + f"\nplot: {plot_path}"}
