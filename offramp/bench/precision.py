"""``offramp bench precision``: what each stage precision costs in quality (and time here).

The placement planner may serve a stage in bf16 or fp16 instead of fp32 (fewer bytes per
step, so faster where decode is bandwidth-bound). This measures the price on held-out
text of each task type, teacher-forced, the whole model in one precision (the worst case
of any per-stage choice): greedy agreement of each next-token prediction with fp32, and
perplexity of each precision against the true next tokens. Wall time per precision is
measured in the same run (interleaved repeats, median) and printed as a ratio to fp32 -
on CPUs without native bf16/fp16 (this project's AVX2 machines) the half precisions are
*slower*; the ratio is the machine's, not the planner's assumption.

int8 is the planner's weight-only option for CPU pools, as a stage serves it
(``offramp.ops.quant``): the decoder blocks' linear weights in int8 with one fp32 scale
per output row, embedding, LM head, activations and KV in fp32.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from offramp.bench.common import json_stdout
from offramp.deployments.config import PRECISIONS  # a stage's precisions, the ones compared


def register(bsub) -> None:
    p = bsub.add_parser("precision", help="quality (agreement with fp32, perplexity) and time of bf16/fp16/int8 stages",
                        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir (default: the embedded model)")
    p.add_argument("--data", type=Path, required=True, help="data dir from `offramp prepare-data` (held-out split)")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per task type")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma separated, from " + ",".join(PRECISIONS))
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (interleaved); median reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def measure(model_dir: Path, data_dir: Path, precisions: list[str], max_tokens: int = 8192, seq_len: int = 256,
            repeats: int = 3, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from offramp.training.teacher import heldout_docs, load_model, token_windows

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or "fp32" not in precisions:
        raise ValueError(f"--precisions must include fp32 (the reference) and only {', '.join(PRECISIONS)}; got "
                         f"{','.join(precisions)}")
    base, tok = load_model(model_dir)
    models = {p: (base if p == "fp32" else _in_precision(load_model(model_dir)[0], p)) for p in precisions}
    docs = heldout_docs(data_dir, "test")
    tasks = sorted({d["task"] for d in docs})
    out: dict = {"model": str(model_dir), "data": str(data_dir), "tokens_per_task": max_tokens, "tasks": {}}
    times: dict[str, list[float]] = {p: [] for p in precisions}
    totals = {p: [0, 0.0, 0] for p in precisions}  # agreed, nll, tokens
    bar = tqdm(total=len(tasks) * len(precisions) * repeats, desc="precision", disable=not progress)
    with torch.inference_mode():
        for task in tasks:
            wins = token_windows(docs, tok, task, seq_len, max_tokens)
            if len(wins) == 0:
                continue
            x, y = wins[:, :-1], wins[:, 1:]
            logits: dict = {}
            for r in range(repeats):  # interleaved: every precision once per repeat
                for p in precisions:
                    t0 = time.perf_counter()
                    lg = models[p](x).logits.float()
                    times[p].append(time.perf_counter() - t0)
                    logits[p] = lg
                    bar.update()
            ref = logits["fp32"].argmax(-1)
            row = {}
            for p in precisions:
                nll = torch.nn.functional.cross_entropy(logits[p].reshape(-1, logits[p].shape[-1]), y.reshape(-1),
                                                        reduction="sum").item()
                agreed = int((logits[p].argmax(-1) == ref).sum())
                n = y.numel()
                row[p] = {"agreement_with_fp32": round(agreed / n, 5), "ppl": round(math.exp(nll / n), 3)}
                totals[p][0] += agreed
                totals[p][1] += nll
                totals[p][2] += n
            out["tasks"][task] = row
    bar.close()
    out["overall"] = {p: {"agreement_with_fp32": round(a / n, 5), "ppl": round(math.exp(nll / n), 3)}
                      for p, (a, nll, n) in totals.items() if n}
    t32 = statistics.median(times["fp32"])
    out["time_ratio_to_fp32"] = {p: round(statistics.median(times[p]) / t32, 3) for p in precisions}
    return out


def _in_precision(model, precision: str):
    """The whole HF model as a stage of that precision would hold it."""
    import torch

    if precision == "int8":
        from offramp.ops.quant import quantize_linears_int8
        from offramp.training.heads import backbone

        quantize_linears_int8(backbone(model).layers)  # heads and embedding stay fp32
        return model
    return model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def run(args: argparse.Namespace) -> int:
    import torch

    from offramp.ops.engine import resolve_model_dir

    torch.set_num_threads(args.threads)
    with json_stdout(args.json) as emit:
        res = measure(resolve_model_dir(args.model), args.data, [p.strip() for p in args.precisions.split(",")],
                      args.max_tokens, args.seq_len, args.repeats, progress=not args.json)
        if args.json:
            emit(res)
            return 0
    precs = list(res["overall"])
    print(f"{'task':8} " + " ".join(f"{p + ' agree':>11} {p + ' ppl':>9}" for p in precs))
    for task, row in [*res["tasks"].items(), ("overall", res["overall"])]:
        print(f"{task:8} " + " ".join(f"{row[p]['agreement_with_fp32']:11.4f} {row[p]['ppl']:9.3f}" for p in precs))
    print("time / fp32: " + ", ".join(f"{p} {r:.2f}x" for p, r in res["time_ratio_to_fp32"].items()))
    return 0
