"""``offramp generate``: in-process staged generation, the reference every served path is
checked against."""
from __future__ import annotations

import argparse
import json
import sys

from offramp.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 4,8, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text in-process over the staged model (no Ray)",
        description="Generate in one process over the model split into stages. Exits off reproduces "
        "the unsplit model's greedy output exactly; exits on shows where each token left the pipeline.",
    )
    p.add_argument("--model", help="local Hugging Face checkpoint dir (default: the embedded model, "
                   "or a tiny random preset while none is embedded)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, help="split the layers evenly into N stages (default 1)")
    g.add_argument("--split", type=_int_list, help="explicit split points, e.g. 4,8 (layers where stages start)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument("--prompt-ids", type=_int_list, help="prompt as token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--exit", choices=("off", "on", "speculative"), default="on",
                   help="early exits: 'on' uses calibrated thresholds (or --threshold), 'off' runs full depth, "
                   "'speculative' drafts with the first stage's exit head and verifies each draft in one deep "
                   "visit (greedy output equals 'off')")
    p.add_argument("--max-draft", type=int, help="--exit speculative: most tokens drafted per deep visit "
                   "(1..32, default 6)")
    p.add_argument("--threshold", type=float, help="confidence threshold at every gate (0..1); with --exit "
                   "speculative the draft threshold (default: the exits file's)")
    p.add_argument("--task", choices=("qa", "math", "coding"), help="task type for the gates")
    p.add_argument("--kv-fill", choices=("exact", "propagate"), default="exact",
                   help="KV of skipped layers: exact deferred backfill (default) or approximate propagation")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="precision of every stage")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--json", action="store_true", help='print {"token_ids", "text", "exit_stages", ...} as JSON '
                   '(with --exit speculative also "speculative": drafted, accepted, verify_rounds)')
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from offramp.ops.engine import StagedModel, resolve_model_dir
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import DEFAULT_MAX_DRAFT, MAX_DRAFT_LIMIT, SamplingParams

    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold}: must be between 0 and 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0")
    if args.max_draft is not None and args.exit != "speculative":
        raise ConfigError(f"--max-draft {args.max_draft}: only with --exit speculative")
    if args.max_draft is not None and not 1 <= args.max_draft <= MAX_DRAFT_LIMIT:
        raise ConfigError(f"--max-draft {args.max_draft}: must be 1..{MAX_DRAFT_LIMIT}")
    if args.exit == "speculative" and (args.stages or (len(args.split) + 1 if args.split else 1)) < 2:
        raise ConfigError("--exit speculative needs at least 2 stages (the first drafts, the rest verify); "
                          "pass --stages 2 or --split")
    if args.exit == "speculative" and args.kv_fill == "propagate":
        raise ConfigError("--exit speculative needs --kv-fill exact (propagated K/V is approximate, speculative "
                          "output is exact)")
    model_dir = resolve_model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    else:
        if tokenizer is None:
            raise ConfigError(f"{model_dir} has no tokenizer files; pass --prompt-ids 1,2,3 instead of --prompt")
        prompt = tokenizer(args.prompt if args.prompt is not None else "The", add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            prompt = [tokenizer.bos_token_id, *prompt]
    model = StagedModel(model_dir, num_stages=args.stages, split=args.split, dtypes=args.dtype,
                        max_seq=None, max_slots=1, kv_fill=args.kv_fill)
    if args.exit == "off":
        policy = ExitPolicy("off")
    elif args.exit == "speculative":
        policy = ExitPolicy("speculative", args.threshold, args.task,
                            max_draft=DEFAULT_MAX_DRAFT if args.max_draft is None else args.max_draft)
    elif args.threshold is not None:
        policy = ExitPolicy("threshold", args.threshold, args.task)
    else:
        policy = ExitPolicy("calibrated", None, args.task)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    (seq,) = model.generate([prompt], sampling, policy)
    text = tokenizer.decode(seq.generated, skip_special_tokens=True) if tokenizer is not None else None
    spec = seq.draft_counts.report(len(seq.generated)) if policy.speculative else None
    if args.json:
        out = {"token_ids": seq.generated, "text": text, "exit_stages": seq.exit_stages,
               "finish_reason": seq.finish_reason, "num_stages": model.num_stages}
        if spec is not None:
            out["speculative"] = spec
        print(json.dumps(out))
    else:
        print(text if text is not None else " ".join(map(str, seq.generated)))
        n = model.num_stages
        hist = [seq.exit_stages.count(k) for k in range(n)]
        what = f"exits per stage {hist}"
        if spec is not None:
            what = (f"drafted {spec['drafted']}, accepted {spec['accepted']}, {spec['verify_rounds']} verify rounds, "
                    f"mean accepted {spec['mean_accepted']:.2f}, deep visits per token "
                    f"{spec['deep_visits_per_token']:.2f}")
        print(f"[{len(seq.generated)} tokens, {n} stages, {what}, finish={seq.finish_reason}]", file=sys.stderr)
    return 0


def _load_tokenizer(model_dir):
    from pathlib import Path

    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
