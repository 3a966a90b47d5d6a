"""``offramp eval``: the exits file's thresholds on the held-out *test* half.

Per task type: greedy agreement of the exited path with full depth, perplexity of the
exited path (the exit head's distribution where a token exits, the full model's
elsewhere) against full depth, mean fraction of layers executed, and the histogram of
exits per layer. Calibration used the other half, so these figures are out of sample.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from offramp.training.calibrate import _cat, task_stats
from offramp.training.teacher import exit_layer_per_token, summarize


def evaluate(model_dir: Path, data_dir: Path, max_tokens: int = 20_000, seq_len: int = 256,
             threads: int = 1, tasks: list[str] | None = None) -> dict:
    torch.set_num_threads(threads)
    from offramp.ops.exits import load_exits_config

    metric = load_exits_config(model_dir).metric if (Path(model_dir) / "offramp_exits.json").is_file() else "max_prob"
    cfg, stats, has_gate = task_stats(model_dir, data_dir, "test", max_tokens, seq_len, metric, tasks)
    gate_thr = cfg.gate_threshold if has_gate else 0.0
    out_tasks, thr_used = {}, {}
    firsts = []
    for task, st in stats.items():
        ts = [cfg.threshold(L, task) if L >= cfg.min_layers else math.inf for L in cfg.exit_layers]
        thr_used[task] = [t if math.isfinite(t) else None for t in ts]
        first = exit_layer_per_token(st, ts, gate_thr)
        firsts.append(first)
        out_tasks[task] = summarize(st, first)
    overall = summarize(_cat(list(stats.values())), torch.cat(firsts))
    fl = {t: r["frac_layers"] for t, r in out_tasks.items()}
    return {
        "model": str(model_dir),
        "split": "heldout/test",
        "metric": metric,
        "gate_threshold": gate_thr,
        "exit_layers": cfg.exit_layers,
        "num_layers": next(iter(stats.values())).num_layers,
        "calibration": cfg.calibration.model_dump() if cfg.calibration else None,
        "thresholds": thr_used,
        "tasks": out_tasks,
        "overall": overall,
        "math_exits_earlier_than_qa": (fl["math"] < fl["qa"]) if {"math", "qa"} <= fl.keys() else None,
    }


def format_table(res: dict) -> str:
    layers = res["exit_layers"]
    head = (f"{'task':8} {'tokens':>7} {'agree':>7} {'exited':>7} {'layers%':>8} "
            f"{'ppl_exit':>9} {'ppl_full':>9}  exits " + " ".join(f"L{L}" for L in layers) + " full")
    lines = [head]
    for task, r in [*res["tasks"].items(), ("overall", res["overall"])]:
        ea = r["exited_agreement"]
        hist = " ".join(str(r["exit_histogram"][str(L)]) for L in layers)
        lines.append(
            f"{task:8} {r['tokens']:7d} {r['agreement']:7.4f} "
            f"{'-' if ea is None else f'{ea:.4f}':>7} {100 * r['frac_layers']:7.1f}% "
            f"{r['ppl_exit']:9.3f} {r['ppl_full']:9.3f}  {hist} {r['exit_histogram']['full']}")
    lines.append(f"math exits earlier than qa: {res['math_exits_earlier_than_qa']}")
    return "\n".join(lines)
