"""``offramp bench core``: transformers ``generate`` against the staged model in one process;
``--exits``: the exit modes side by side against transformers' ``assistant_early_exit``."""
from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time

from offramp.bench.common import json_stdout, peak_rss_mb


def register(bsub) -> None:
    c = bsub.add_parser("core", help="transformers generate vs Offramp staged in-process (1 and 4 stages)")
    c.add_argument("--model", help="checkpoint dir (default: a random ~20M-parameter Llama-style model)")
    c.add_argument("--prompt-len", type=int, default=32)
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--batches", default="1,16", help="batch sizes, comma separated")
    c.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--exits", action="store_true",
                   help="exit modes instead: off, calibrated and speculative side by side on a checkpoint with "
                        "exit heads (default: the embedded model) over held-out text prompts, against "
                        "transformers generate and transformers assistant_early_exit (self-speculative, batch 1) "
                        "at the draft layer; --stages sets the split (default 2)")
    c.add_argument("--stages", type=int, default=2, help="with --exits: pipeline stages (stage 0 drafts)")
    c.add_argument("--prompts-per-task", type=int, default=2, help="with --exits: held-out prompts per task")
    c.set_defaults(func=run_core)


def run_core(args) -> int:
    with json_stdout(args.json) as emit:
        return (_run_exits if args.exits else _run_core)(args, emit)


def _median_rows(times: dict[tuple[str, int], list[float]], new_tokens: int,
                 sequences: int | None = None) -> list[dict]:
    """One row per (contender, batch) from its repeats' times, median: tokens/s, and ms per
    token of one sequence. A timed run generates ``new_tokens`` for each of ``sequences``
    prompts (default: the batch) in batches of ``batch``."""
    rows = []
    for (name, b), ts in times.items():
        t, n = statistics.median(ts), (sequences or b) * new_tokens
        rows.append({"contender": name, "batch": b, "tokens_per_s": round(n / t, 1),
                     "ms_per_token": round(1000 * t / n * b, 2)})
    return rows


def _report(args, emit, report: dict, headline: str, width: int, notes: list[str] = ()) -> int:
    """The run's report: JSON with ``--json``, else the headline, a table of
    ``report["results"]`` (contender, batch, tokens/s, ms/token), the ratios and ``notes``."""
    if args.json:
        emit(report)
        return 0
    print(headline)
    print(f"{'contender':<{width}}{'batch':>6}{'tok/s':>10}{'ms/token':>10}")
    for r in sorted(report["results"], key=lambda r: (r["batch"], r["contender"])):
        print(f"{r['contender']:<{width}}{r['batch']:>6}{r['tokens_per_s']:>10}{r['ms_per_token']:>10}")
    for k, v in report["ratios"].items():
        print(f"{k}: {v}x")
    for line in notes:
        print(line)
    return 0


def _run_core(args, emit) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from offramp.ops.engine import StagedModel
    from offramp.ops.presets import make_checkpoint
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    model_dir = args.model or make_checkpoint(tempfile.mkdtemp(prefix="offramp-bench-"), "bench-20m",
                                              with_tokenizer=False, tie_word_embeddings=True)
    batches = [int(b) for b in args.batches.split(",")]
    n_new, plen = args.new_tokens, args.prompt_len
    rss0 = peak_rss_mb()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    vocab = hf.config.vocab_size
    rss_hf = peak_rss_mb()
    staged = {n: StagedModel(model_dir, num_stages=n, max_slots=max(batches), max_seq=plen + n_new + 1)
              for n in (1, 4)}
    bf16 = StagedModel(model_dir, num_stages=1, dtypes="bf16", max_slots=max(batches), max_seq=plen + n_new + 1)
    rss_staged = peak_rss_mb()
    stage_mb = {n: [round((w.stage.layer_bytes() + sum(p.numel() * p.element_size() for name, p in
                w.stage.named_parameters() if not name.startswith("layers.")) + w.cache.bytes) / 2**20, 1)
                    for w in m.workers] for n, m in staged.items()}

    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=n_new, ignore_eos=True)
    times: dict[tuple[str, int], list[float]] = {}

    def run_hf(prompts):
        hf.generate(prompts, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                    pad_token_id=0, eos_token_id=None)

    contenders = {"transformers": None, "offramp-1stage": staged[1], "offramp-4stage": staged[4],
                  "offramp-1stage-bf16": bf16}
    total = args.repeats * len(batches) * len(contenders)
    with tqdm(total=total, desc="bench core", file=sys.stderr, disable=args.json) as bar, torch.inference_mode():
        for _ in range(args.repeats):
            for b in batches:
                prompts = torch.randint(3, vocab, (b, plen), generator=g)
                for name, m in contenders.items():
                    t0 = time.perf_counter()
                    if m is None:
                        run_hf(prompts)
                    else:
                        m.generate(prompts.tolist(), sp, ExitPolicy("off"))
                    times.setdefault((name, b), []).append(time.perf_counter() - t0)
                    bar.update()

    rows = _median_rows(times, n_new)
    tps = {(r["contender"], r["batch"]): r["tokens_per_s"] for r in rows}
    ratios = {}
    for b in batches:
        ratios[f"offramp_1stage_vs_transformers_b{b}"] = round(tps[("offramp-1stage", b)] / tps[("transformers", b)], 2)
        ratios[f"offramp_4stage_vs_1stage_b{b}"] = round(tps[("offramp-4stage", b)] / tps[("offramp-1stage", b)], 2)
        ratios[f"offramp_1stage_bf16_vs_transformers_fp32_b{b}"] = round(
            tps[("offramp-1stage-bf16", b)] / tps[("transformers", b)], 2)
    report = {
        "model": str(model_dir) if args.model else "random Llama-style (bench-20m preset)",
        "params_m": round(n_params / 1e6, 1), "prompt_len": plen, "new_tokens": n_new,
        "threads": torch.get_num_threads(), "results": rows, "ratios": ratios,
        "memory_mb": {"process_peak_rss_before": round(rss0), "after_transformers": round(rss_hf),
                      "after_offramp_models": round(rss_staged), "per_stage_weights_plus_kv": stage_mb},
        "targets": {"offramp_1stage_vs_transformers_b1": ">= 1.2", "offramp_1stage_vs_transformers_b16": ">= 1.5",
                    "offramp_4stage_vs_1stage": ">= 0.9"},
    }
    return _report(args, emit, report, f"model: {report['model']}, {report['params_m']}M params, prompt {plen}, "
                   f"{n_new} new tokens, {report['threads']} threads", 18, [f"memory (MB): {report['memory_mb']}"])


def _run_exits(args, emit) -> int:
    """``offramp bench core --exits``: exit modes side by side in one process (docs/benchmarks.md)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from offramp.api.text import load_tokenizer
    from offramp.bench.serve import TASKS, build_prompts
    from offramp.ops.engine import StagedModel, resolve_model_dir
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import DraftCounts, SamplingParams
    from offramp.training.data import DataSpec, build_corpus

    model_dir = resolve_model_dir(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    n_new, plen = args.new_tokens, args.prompt_len
    tok = load_tokenizer(model_dir)
    heldout = build_corpus(DataSpec(), None)[1]
    prompts = build_prompts(heldout, lambda t: tok.encode(t, add_special_tokens=True, verbose=False),
                            args.prompts_per_task * len(TASKS), plen)
    staged = StagedModel(model_dir, num_stages=args.stages, max_slots=max(batches), max_seq=plen + n_new + 8)
    if not staged.workers[0].drafts:
        raise ValueError(f"{model_dir}: no exit head where stage 0 ends (layer {staged.ranges[0][1]}); "
                         "speculative cannot run with this split (try --stages 2)")
    draft_layer = staged.ranges[0][1]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    sp = SamplingParams(max_tokens=n_new, ignore_eos=True)
    modes = {"offramp-off": ExitPolicy("off"), "offramp-calibrated": ExitPolicy("calibrated"),
             "offramp-speculative": ExitPolicy("speculative")}
    times: dict[tuple[str, int], list[float]] = {}
    accept = {t: DraftCounts() for t in TASKS}  # speculative, batch 1, per task
    generated = dict.fromkeys(TASKS, 0)

    def hf_generate(group, early_exit: int | None) -> None:
        ids = torch.tensor([p for _, p in group])  # prompts are all plen long: no padding
        kw = {"assistant_early_exit": early_exit} if early_exit else {}
        hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                    eos_token_id=None, **kw)

    def contenders(b: int) -> list[str]:
        names = ["transformers", *modes]
        return names + ["transformers-early-exit"] if b == 1 else names  # assistant_early_exit: batch 1 only

    total = args.repeats * sum(len(contenders(b)) for b in batches)
    with tqdm(total=total, desc="bench core --exits", file=sys.stderr, disable=args.json) as bar, \
            torch.inference_mode():
        for r in range(args.repeats + 1):  # repeat 0 warms every contender up, discarded
            for b in batches:
                for name in contenders(b):
                    t0 = time.perf_counter()
                    for i in range(0, len(prompts), b):
                        group = prompts[i:i + b]
                        if name == "transformers":
                            hf_generate(group, None)
                        elif name == "transformers-early-exit":
                            hf_generate(group, draft_layer)
                        else:
                            # batch 1: the prompt's task hint (per-task thresholds); a mixed group: none
                            policy = dataclasses.replace(modes[name], task=group[0][0]) if b == 1 else modes[name]
                            seqs = staged.generate([p for _, p in group], sp, policy)
                            if name == "offramp-speculative" and r > 0 and b == 1:
                                for (task, _), s in zip(group, seqs):
                                    accept[task] += s.draft_counts
                                    generated[task] += len(s.generated)
                    if r > 0:
                        times.setdefault((name, b), []).append(time.perf_counter() - t0)
                        bar.update()

    rows = _median_rows(times, n_new, len(prompts))
    tps = {(r["contender"], r["batch"]): r["tokens_per_s"] for r in rows}
    ratios = {}
    for b in batches:
        ratios[f"speculative_vs_off_b{b}"] = round(tps[("offramp-speculative", b)] / tps[("offramp-off", b)], 2)
        ratios[f"calibrated_vs_off_b{b}"] = round(tps[("offramp-calibrated", b)] / tps[("offramp-off", b)], 2)
        ratios[f"off_vs_transformers_b{b}"] = round(tps[("offramp-off", b)] / tps[("transformers", b)], 2)
    if 1 in batches:
        ratios["speculative_vs_transformers_early_exit_b1"] = round(
            tps[("offramp-speculative", 1)] / tps[("transformers-early-exit", 1)], 2)
        ratios["transformers_early_exit_vs_transformers_b1"] = round(
            tps[("transformers-early-exit", 1)] / tps[("transformers", 1)], 2)
    acceptance = {t: counts.report(generated[t]) for t, counts in accept.items()}
    report = {"model": str(model_dir), "stages": args.stages, "draft_layer": draft_layer, "prompt_len": plen,
              "new_tokens": n_new, "prompts": len(prompts), "threads": torch.get_num_threads(),
              "results": rows, "ratios": ratios, "speculative_acceptance_b1": acceptance,
              "targets": {"speculative_vs_transformers_early_exit_b1": "> 1"}}
    return _report(args, emit, report, f"model: {model_dir}, {args.stages} stages (drafts after layer {draft_layer}), "
                   f"{len(prompts)} held-out prompts of {plen} tokens, {n_new} new tokens, {report['threads']} threads",
                   26, [f"speculative acceptance ({t}): {a}" for t, a in acceptance.items()])
