"""``offramp prepare-data | train | train-gates | calibrate | eval``."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from offramp.errors import ConfigError


def _model_dir(path: str | None) -> Path:
    if path is None:
        from offramp.models import default_model_dir

        d = default_model_dir()
        if d is None:
            raise ConfigError("no --model given and the embedded default model is not "
                              "present; pass --model DIR (a Hugging Face checkpoint directory)")
        return d
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(f"model directory {d} has no config.json; pass --model DIR of a "
                          "Hugging Face checkpoint (Llama, Qwen2 or GPT-2)")
    return d


def _data_dir(path: str) -> Path:
    d = Path(path)
    if not (d / "heldout.jsonl").is_file():
        raise ConfigError(f"data directory {d} has no heldout.jsonl; run "
                          f"`offramp prepare-data --out {d}` first or pass --data DIR")
    return d


def _tasks(s: str | None) -> list[str] | None:
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


def cmd_prepare(args) -> int:
    from offramp.training.data import DataSpec, prepare

    spec = DataSpec(seed=args.seed, vocab_size=args.vocab_size,
                    heldout_frac=args.heldout_frac, math_problems=args.math_problems,
                    math_docs=args.math_docs,
                    coding_max_bytes=args.coding_max_bytes, qa_max_bytes=args.qa_max_bytes)
    cache = None if args.no_fetch else Path(args.cache)
    m = prepare(args.out, spec, cache, tokenizer=args.tokenizer)
    print(json.dumps({"out": args.out, "sources": m["sources"], "docs": m["docs"]}, indent=2))
    return 0


def _mix(s: str | None) -> dict:
    from offramp.training.data import TASKS
    from offramp.training.pretrain import TrainSpec

    if not s:
        return TrainSpec().mix
    mix = {}
    for part in s.split(","):
        task, _, w = part.partition("=")
        try:
            mix[task.strip()] = float(w)
        except ValueError:
            raise ConfigError(f"--mix {s!r}: write task=weight pairs, e.g. qa=0.3,math=0.35,coding=0.35")
    if set(mix) - set(TASKS) or not all(v >= 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(f"--mix {s!r}: tasks are {', '.join(TASKS)}, weights >= 0, not all 0")
    return mix


def cmd_train(args) -> int:
    from offramp.training.pretrain import TrainSpec, train

    _data_dir(args.data)
    spec = TrainSpec(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                     heads=args.heads, kv_heads=args.heads, steps=args.steps,
                     batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                     threads=args.threads, time_budget_min=args.time_budget_min,
                     exits_per_step=args.exits_per_step, exit_weight=args.exit_weight,
                     exit_kd=args.exit_kd, exit_token_frac=args.exit_token_frac,
                     layer_drop_max=args.layer_drop_max, init=args.init or "",
                     mix=_mix(args.mix))
    print(json.dumps(train(args.data, args.out, spec), indent=2))
    return 0


def cmd_train_gates(args) -> int:
    from offramp.training.gates import GateSpec, train_gates

    model_dir = _model_dir(args.model)
    spec = GateSpec(steps=args.steps, joint_steps=args.joint_steps if args.joint else 0,
                    gate_lr=args.gate_lr, head_lr=args.head_lr, seed=args.seed,
                    threads=args.threads, seq_len=args.seq_len, batch=args.batch)
    layers = [int(x) for x in args.exit_layers.split(",")] if args.exit_layers else None
    out = train_gates(model_dir, _data_dir(args.data), spec, exit_layers=layers,
                      joint_out=Path(args.joint_out) if args.joint_out else None)
    print(json.dumps(out, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    from offramp.training.calibrate import CalibSpec, calibrate

    model_dir = _model_dir(args.model)
    spec = CalibSpec(target=args.target, delta=args.delta, max_tokens=args.max_tokens,
                     metric=args.metric, threads=args.threads, seed=args.seed)
    res = calibrate(model_dir, _data_dir(args.data), spec, plot=args.plot)
    print(res["table"])
    return 0


def cmd_calibrate_draft(args) -> int:
    from offramp.training.draft import DraftSpec, calibrate_draft, format_report

    model_dir = _model_dir(args.model)
    spec = DraftSpec(max_draft=args.max_draft, visit_overhead=args.visit_overhead, max_tokens=args.max_tokens,
                     prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads)
    res = calibrate_draft(model_dir, _data_dir(args.data), spec)
    print(format_report(res["report"]))
    return 0


def cmd_eval(args) -> int:
    from offramp.training.evaluate import evaluate, format_table

    model_dir = _model_dir(args.model)
    data_dir = _data_dir(args.data)
    server = None
    if args.url:
        import httpx

        from offramp.training.tasks import Served

        try:
            server = Served(args.url, os.environ.get(args.api_key_env) if args.api_key_env else None,
                            concurrency=args.concurrency)
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--url {args.url}: no Offramp server answered GET /v1/models ({e}); start one "
                              "(`serve run configs/local.yaml`) or fix the address / --api-key-env") from None
    # teacher-forced agreement and perplexity run in this process; with --url only the
    # generated task metrics are the server's
    res = {} if server else evaluate(model_dir, data_dir, max_tokens=args.max_tokens,
                                     threads=args.threads, tasks=_tasks(args.tasks))
    if args.task_accuracy or server:
        from offramp.training.tasks import format_report, task_accuracy

        res["task_accuracy"] = task_accuracy(
            model_dir, data_dir, modes=_tasks(args.modes), num_stages=args.stages,
            math_per_level=args.samples, code_items_n=args.samples // 2, prose_n=args.samples // 5,
            threads=args.threads, progress=not args.json, server=server)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        if not server:
            print(format_table(res))
        if args.task_accuracy or server:
            print(format_report(res["task_accuracy"]))
    return 0


def _command(sub: argparse._SubParsersAction, name: str, func, shared: str, **kw) -> argparse.ArgumentParser:
    """A subcommand with the options its family shares, named in ``shared`` (any of
    ``model data seed threads``), declared the same way everywhere."""
    p = sub.add_parser(name, **kw)
    if "model" in shared.split():
        p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    if "data" in shared.split():
        p.add_argument("--data", default="data/offramp", help="`offramp prepare-data` output (default data/offramp)")
    if "seed" in shared.split():
        p.add_argument("--seed", type=int, default=0)
    if "threads" in shared.split():
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(func=func)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "prepare-data", cmd_prepare, "seed",
                 help="build the offline corpus, held-out splits and tokenizer")
    p.add_argument("--out", default="data/offramp", help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--heldout-frac", type=float, default=0.05)
    p.add_argument("--math-problems", type=int, default=30_000,
                   help="sampled three-digit and multi-step problems (one- and two-digit sums, "
                   "differences and products are enumerated)")
    p.add_argument("--math-docs", type=int, default=400_000,
                   help="training documents drawn, one problem each, weighted toward two digits")
    p.add_argument("--tokenizer", help="reuse this checkpoint's tokenizer instead of training one "
                   "(needed to continue training it with `offramp train --init`)")
    p.add_argument("--coding-max-bytes", type=int, default=4_000_000)
    p.add_argument("--qa-max-bytes", type=int, default=4_500_000)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "offramp"),
                   help="where the Debian bible-kjv(-text) packages are unpacked (apt-get download)")
    p.add_argument("--no-fetch", action="store_true",
                   help="never call apt-get; prose falls back to pydoc topics if the Bible is not installed")

    p = _command(sub, "train", cmd_train, "data seed threads",
                 help="train the small default model from scratch (LayerSkip recipe)")
    p.add_argument("--out", required=True, help="output checkpoint directory (resumes from its ckpt.pt)")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--time-budget-min", type=float, default=0.0,
                   help="stop (and finish the lr schedule) after this much training wall time")
    from offramp.training.pretrain import TrainSpec

    d = TrainSpec()
    p.add_argument("--exits-per-step", type=int, default=d.exits_per_step,
                   help="exit heads trained each step, rotating over layers 1..n-1 (>= n-1: all)")
    p.add_argument("--exit-weight", type=float, default=d.exit_weight,
                   help="loss weight of each exit head")
    p.add_argument("--exit-kd", type=float, default=d.exit_kd,
                   help="share of an exit's loss that is KL toward the final layer (0: CE only)")
    p.add_argument("--exit-token-frac", type=float, default=d.exit_token_frac,
                   help="share of positions an exit loss is taken on (cost vs signal)")
    p.add_argument("--layer-drop-max", type=float, default=d.layer_drop_max,
                   help="probability of skipping the last layer; rises linearly from 0 at layer 0")
    p.add_argument("--init", help="continue from this checkpoint (same shape; prepare the data with "
                   "--tokenizer of it) instead of random weights")
    p.add_argument("--mix", help="task sampling weights, e.g. qa=0.3,math=0.35,coding=0.35 "
                   f"(default {','.join(f'{k}={v}' for k, v in d.mix.items())})")

    p = _command(sub, "train-gates", cmd_train_gates, "model data seed threads",
                 help="train exit heads and gates on a frozen backbone")
    p.add_argument("--exit-layers", help="comma list, e.g. 2,4,6 (default: every layer 1..n-1)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gate-lr", type=float, default=1e-3,
                   help="gate learning rate (seed recipe 3e-5 barely moves a zero-init gate in a few hundred steps)")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--joint", action="store_true", help="stage 2: unfreeze the backbone (early-exit loss)")
    p.add_argument("--joint-steps", type=int, default=200)
    p.add_argument("--joint-out", help="where stage 2 writes the fine-tuned backbone (required with --joint)")

    p = _command(sub, "calibrate", cmd_calibrate, "model data seed threads",
                 help="choose exit thresholds with a Learn-then-Test guarantee")
    p.add_argument("--target", type=float, default=0.98, help="agreement of exited tokens with full depth")
    p.add_argument("--delta", type=float, default=0.1, help="allowed failure probability of the guarantee")
    p.add_argument("--metric", default="margin", choices=["max_prob", "margin", "entropy"],
                   help="exit-head confidence the thresholds apply to (default margin = p1 - p2: on the "
                        "embedded model it lets 0.78 of layers run at the 0.98 target vs 0.85 for max_prob; "
                        "docs/training.md)")
    p.add_argument("--max-tokens", type=int, default=20_000, help="held-out tokens per task")
    p.add_argument("--plot", default=None, help="PNG path (default: calibration.png in the model dir)")

    p = _command(sub, "calibrate-draft", cmd_calibrate_draft, "model data threads",
                 help="choose speculative draft thresholds for expected speed",
                 description="Replays speculative rounds over held-out text (teacher forcing) per exit "
                 "layer and task, and keeps the draft threshold with the most tokens per unit of work "
                 "(docs/speculative.md). Writes draft_thresholds into offramp_exits.json.")
    p.add_argument("--max-draft", type=int, default=6, help="the max_draft the server runs with (default 6)")
    p.add_argument("--visit-overhead", type=float, default=0.5,
                   help="cost of one pipeline round trip in full-depth tokens: ~0.5 for the 2-stage CPU "
                        "pipeline served (docs/benchmarks.md), 0 in one process")
    p.add_argument("--max-tokens", type=int, default=4_000,
                   help="held-out prompt tokens per task (prompts of --prompt-tokens each)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="greedy continuation scored per prompt")

    p = _command(sub, "eval", cmd_eval, "model data threads",
                 help="held-out agreement, perplexity and exit histogram per task")
    p.add_argument("--max-tokens", type=int, default=20_000, help="held-out tokens per task")
    p.add_argument("--tasks", help="comma list (default: all)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--task-accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="also generate on held-out problems, functions and prose: math exact match per "
                   "level, code that parses with a body, speculative acceptance, per exit mode")
    p.add_argument("--modes", default="off,calibrated,speculative",
                   help="exit modes for --task-accuracy (comma list)")
    p.add_argument("--samples", type=int, default=200,
                   help="math problems per level (code: half as many functions, prose: a fifth)")
    p.add_argument("--stages", type=int, default=2,
                   help="pipeline stages, split as served (2: the default config's split)")
    p.add_argument("--url", help="generate the task metrics through a running Offramp server instead "
                   "(e.g. http://127.0.0.1:8000, as `serve run configs/local.yaml` serves it): its split, its "
                   "exit settings, its speculative acceptance; --model must be the served model (its tokenizer)")
    p.add_argument("--api-key-env", default="OFFRAMP_API_KEY",
                   help="environment variable holding the server's API key, if it needs one")
    p.add_argument("--concurrency", type=int, default=1,
                   help="--url: requests in flight at once (1: a default server drafts, which it does only "
                   "while one request is active)")
