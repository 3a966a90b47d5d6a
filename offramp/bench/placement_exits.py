"""``offramp bench placement --exit-aware``: what exit-aware placement saves, in one run.

Three contenders serve the same open-loop load (greedy streamed requests arriving as a
seeded Poisson process at ``--rate`` per second, held-out prompts of ``--tasks``), one
after the other, on one local pool cluster (a head, a GPU-pool node, a CPU-pool node), each
starting from the same placement: the embedded model in ``--stages`` stages (2 by default),
all on the fast pool, speculative exits (Stage0 drafts with its exit head, the deep stages
verify a draft in one visit):

* ``exit_aware``: the placement controller (knobs up to ``pool``, the cost objective, a p99
  TPOT SLO) planning with the measured post-exit traffic: deep visits per stage-0 pass,
  positions per row at each stage, tokens per stage-0 pass;
* ``exit_unaware``: the same controller told every token visits every stage once
  (``ControllerConfig.exit_aware=False``);
* ``static_fast``: no controller, everything on the fast pool (what a user picks for
  latency without a planner).

Each reports cost per hour (time-weighted over its measured window, and at its end), p99
and mean of the requests' TPOT (client side: a request's (last token - first token) /
(tokens - 1)), failed requests, the moves made and deep visits per token. A timeline PNG
shows each contender's placement, cost and rolling p99 over time.

Emulated pools (one machine has one kind of core). The speed of both pools comes from a
start-up profile of this machine's cores: Stage1's layers are timed in this process at a
few batch sizes (``StageWorker.profile``, what every replica runs at start-up), and
:func:`~offramp.placement.cost_model.fit_profile` fits overhead, bandwidth and FLOP rate.
The fast pool is that fit slowed by ``--fast-factor``, the slow pool by ``--slow-factor``:
a replica waits out the fitted roofline times the factor after each pass
(:class:`~offramp.deployments.config.EmulatedDevice`, an asyncio sleep that holds the
replica but no core), so replicas of an emulated pool add capacity as separate devices
would; a stage of other depth than Stage1 waits in proportion to its layers
(``EmulatedDevice.layers``). Each pool has two devices per stage, room to scale both ways.
The controller is given the same pool figures (what an operator would state, or profiles
would fit). Real compute still runs under the sleep; the fast factor keeps it
below the emulated time on this machine's two cores.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import threading
import time
from pathlib import Path

from offramp.bench.common import APP, json_stdout, local_serve_config, percentile
from offramp.cluster.records import IngressTotals

CONTENDERS = ("exit_aware", "exit_unaware", "static_fast")


def add_arguments(p) -> None:
    g = p.add_argument_group("--exit-aware (three contenders: exit-aware vs exit-unaware controller vs static)")
    g.add_argument("--exit-aware", action="store_true",
                   help="compare exit-aware placement, exit-unaware placement and a static all-fast placement "
                        "under one load (see the module doc of offramp.bench.placement_exits)")
    g.add_argument("--exit-mode", choices=("speculative", "calibrated"), default="speculative",
                   help="the load's exit mode (app default)")
    g.add_argument("--stages", type=int, default=2,
                   help="pipeline stages, all starting on the fast pool; Stage0 drafts (speculative) or exits first "
                        "(calibrated), the others are the deep stages exits thin")
    # the run's numbers: load, the two emulated pools, both controllers' SLO and interval
    for flag, default, what in (
            ("--run-s", 120.0, "measured seconds per contender"),
            ("--warm-s", 15.0, "seconds of load before the measured window"),
            ("--rate", 1.5, "requests per second (Poisson arrivals, open loop)"),
            ("--fast-factor", 2.0, "fast (GPU) pool = this machine's fitted speed slowed by this factor"),
            ("--slow-factor", 12.0, "slow (CPU) pool = this machine's fitted speed slowed by this factor"),
            ("--tpot-slo-ms", 35.0, "p99 TPOT SLO of both controllers (over requests)"),
            ("--interval-s", 4.0, "controller interval")):
        g.add_argument(flag, type=float, default=default, help=f"{what} (default {default:g})")
    g.add_argument("--prompt-tokens", type=int, default=24, help="prompt length (held-out text, every task)")
    g.add_argument("--contenders", default=",".join(CONTENDERS), help="subset to run, comma-separated")
    g.add_argument("--replot", type=Path, metavar="JSON", default=None,
                   help="only draw the timeline (--png) again from a run's --json output")
    g.add_argument("--tasks", default="qa,math,coding",
                   help="held-out tasks the prompts come from, comma-separated (how many drafts a deep visit "
                        "accepts depends on it: about 5 on math, 1.6 on coding and prose, embedded model)")


def _emulation(model_dir: Path, factor_fast: float, factor_slow: float, ctx: int, devices: int):
    """Fit this machine's speed from Stage1's start-up profile; the two pools' emulation
    (EmulatedDevice) and the controller's PoolSpecs, each the fit slowed by its factor."""
    from offramp.deployments.config import EmulatedDevice
    from offramp.ops.engine import StagedModel
    from offramp.placement.controller import model_shape
    from offramp.placement.cost_model import DEFAULT_COST_PER_HOUR, PoolSpec, ProfileSample, fit_profile

    staged = StagedModel(model_dir, num_stages=2, max_slots=16, max_seq=256)
    staged.workers[1].profile()  # warm-up: the first timings of a fresh process run slow
    samples = [ProfileSample.model_validate(p) for p in staged.workers[1].profile(repeats=5)]
    model = model_shape(staged.spec)
    fit = fit_profile(model, samples)
    layers = staged.ranges[1][1] - staged.ranges[1][0]
    mem = model.weight_bytes(layers * model.layer_params(), "fp32") / fit.mem_bandwidth
    per_pos = layers * model.layer_flops(ctx) / fit.flops
    emulate, pools = {}, []
    for name, kind, f in (("gpu", "gpu", factor_fast), ("cpu", "cpu", factor_slow)):
        emulate[name] = EmulatedDevice(step_s=f * fit.fixed_overhead_s, mem_s=f * mem, per_token_s=f * per_pos,
                                       layers=layers)  # a stage of other depth scales (for_layers)
        pools.append(PoolSpec(name=name, kind=kind, count=devices, memory_bytes=16e9, mem_bandwidth=fit.mem_bandwidth / f,
                              flops=fit.flops / f, fixed_overhead_s=f * fit.fixed_overhead_s, hop_fixed_s=0.002,
                              cost_per_hour=DEFAULT_COST_PER_HOUR[kind]))
    return fit, samples, emulate, pools


def _config(model_dir: Path, port: int, emulate: dict, exit_mode: str, stages: int) -> dict:
    return local_serve_config(port, ["gpu"] * stages, {
        "model": str(model_dir), "stages": [{"pool": "gpu", "threads": 1} for _ in range(stages)],
        "exit": {"mode": exit_mode, "draft_max_active": None}, "api_key_env": "", "request_timeout_s": 60.0,
        "emulate_pools": {k: v.model_dump() for k, v in emulate.items()}})


class _Requests:
    """Open-loop load: greedy streamed requests arriving as a Poisson process at ``rate``
    per second (seeded), whatever the service does - a production load, not closed-loop
    streams that keep the bottleneck stage busy under any placement. Per request: end
    time, TPOT, error."""

    def __init__(self, base_url: str, prompts: list[list[int]], max_tokens: int, rate: float, seed: int = 0):
        import random
        from concurrent.futures import ThreadPoolExecutor

        self.base_url, self.prompts, self.max_tokens, self.rate = base_url, prompts, max_tokens, rate
        self.done: list[tuple[float, float | None, str | None]] = []  # (end, tpot s, error)
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bench-request")
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._arrivals, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _arrivals(self) -> None:
        n = 0
        while not self._stop.wait(self._rng.expovariate(self.rate)):
            self._pool.submit(self._one, self.prompts[n % len(self.prompts)])
            n += 1

    def _one(self, prompt: list[int]) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=90)
        first = last = None
        tokens, err = 0, None
        try:
            for chunk in client.completions.create(model="offramp-default", prompt=prompt, stream=True,
                                                   max_tokens=self.max_tokens, temperature=0,
                                                   extra_body={"ignore_eos": True}):
                extra = (chunk.choices[0].model_extra or {}).get("offramp") if chunk.choices else None
                k = len(extra.get("exit_stages") or ()) if isinstance(extra, dict) else 0
                if k:
                    now = time.monotonic()
                    first = first or now
                    last, tokens = now, tokens + k
        except Exception as e:  # noqa: BLE001 - counted and reported
            err = f"{type(e).__name__}: {e}"
        tpot = (last - first) / (tokens - 1) if err is None and tokens > 1 and first != last else None
        with self._lock:
            self.done.append((time.monotonic(), tpot, err))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)


def _deep_per_token(passes0, emitted0, passes1, emitted1) -> float | None:
    """Stage1 visits per emitted token between two samples of the ingress counters."""
    if not passes0 or not passes1 or emitted0 is None or emitted1 is None or emitted1 <= emitted0:
        return None
    return (passes1[1] - passes0[1]) / (emitted1 - emitted0)


def _placement_cost(placement: list, pools: dict) -> float:
    return sum(d.replicas * pools[d.pool].cost_per_hour for d in placement)


def _contender(name: str, args, model_dir: Path, emulate: dict, pools: list, prompts: list[list[int]], port: int,
               ctx: int) -> dict:
    from offramp.cluster import rayops
    from offramp.cluster.local import deploy_config
    from offramp.placement.controller import ControllerActor, ControllerConfig, app_facts, controller_name
    from offramp.placement.mover import INTENT_KEY, stage_placement

    by_name = {p.name: p for p in pools}
    deploy_config(_config(model_dir, port, emulate, args.exit_mode, args.stages), APP, wait_s=300)
    ranges = app_facts(rayops.deployed_app_config(APP)).ranges
    load = _Requests(f"http://127.0.0.1:{port}/v1", prompts, args.max_tokens, args.rate, seed=7)
    actor, timeline, st = None, [], None
    try:
        load.start()
        time.sleep(args.warm_s)
        if name != "static_fast":
            cfg = ControllerConfig(app=APP, interval_s=args.interval_s, max_knob="pool", pools=pools,
                                   profile_pools=False, tpot_slo_s=args.tpot_slo_ms / 1000, context_len=ctx,
                                   exit_aware=name == "exit_aware", max_replicas_per_stage=args.max_replicas,
                                   target_utilisation=0.75,
                                   policy={"sustain_intervals": 2, "cooldown_s": args.cooldown_s, "min_gain": 0.25})
            actor = rayops.start_detached(ControllerActor, controller_name(APP), cfg.model_dump(mode="json"))
            rayops.call(actor, "status", 1, timeout=120)
        t0 = time.monotonic()
        ing0 = rayops.registry_ingress(APP) or IngressTotals()
        while time.monotonic() - t0 < args.run_s:
            cur = stage_placement(rayops.deployed_app_config(APP) or {}, ranges)
            ing = rayops.registry_ingress(APP) or IngressTotals()
            timeline.append({"t": time.monotonic() - t0, "cost": _placement_cost(cur, by_name),
                             "stages": [(d.pool, d.replicas) for d in cur],
                             "passes": ing.stage_passes, "emitted": ing.tokens_emitted,
                             "server_p99": ing.request_tpot_ms_p99})
            time.sleep(2.0)
        t1 = time.monotonic()
        ing1 = rayops.registry_ingress(APP) or IngressTotals()
        if actor is not None:
            st = rayops.call(actor, "status", 200)
    finally:
        load.stop()
        if actor is not None:
            rayops.kill_actor(actor)
        rayops.delete_app(APP)
        # The controller persists its cool-downs, decisions and a move's intent per app: the
        # next contender's controller must start from nothing, not inherit this one's.
        for key in (f"state/{APP}", INTENT_KEY.format(app=APP)):
            rayops.kv_del(key)
    reqs = [(t - t0, tp, e) for t, tp, e in load.done if t0 <= t <= t1]
    wall_off = time.time() - time.monotonic()
    moves = [] if st is None else [
        {"at_s": round(d["time"] - wall_off - t0, 1), "reason": d.get("reason"), "result": d.get("result")}
        for d in st["decisions"] if d.get("outcome") == "apply" and d["time"] - wall_off >= t0 - args.warm_s]
    settled = settled_from(moves)
    tp_all = [tp for _, tp, e in reqs if e is None and tp is not None]
    tp_steady = [tp for t, tp, e in reqs if e is None and tp is not None and t >= settled]
    mean_cost = time_weighted([(p["t"], p["cost"]) for p in timeline])
    seen_settled = [v for t, v in _controller_p99(timeline) if t >= settled]
    deep = _deep_per_token(ing0.stage_passes, ing0.tokens_emitted, ing1.stage_passes, ing1.tokens_emitted)
    return {
        "cost_per_hour_mean": round(mean_cost, 3), "cost_per_hour_end": timeline[-1]["cost"] if timeline else None,
        "placement_end": [f"{p} x{r}" for p, r in timeline[-1]["stages"]] if timeline else None,
        "tpot_ms_p99": round(1000 * percentile(tp_all, 0.99), 2) if tp_all else None,
        "tpot_ms_p99_settled": round(1000 * percentile(tp_steady, 0.99), 2) if tp_steady else None,
        "tpot_ms_mean": round(1000 * sum(tp_all) / len(tp_all), 2) if tp_all else None,
        "server_p99_ms_median_settled": round(percentile(seen_settled, 0.5), 2) if seen_settled else None,
        "server_over_slo_settled": round(sum(v > args.tpot_slo_ms for v in seen_settled) / len(seen_settled), 3)
        if seen_settled else None,
        "settled_from_s": settled if math.isfinite(settled) else None, "requests_ok": sum(1 for _, _, e in reqs if e is None),
        "requests_failed": sum(1 for _, _, e in reqs if e is not None),
        "failures": [e for _, _, e in reqs if e is not None][:3],
        "deep_visits_per_token": None if deep is None else round(deep, 3), "moves": moves,
        "plan": None if st is None else st.get("plan"),
        "_timeline": timeline, "_requests": [(t, tp) for t, tp, e in reqs if e is None and tp is not None],
    }


def _controller_p99(timeline: list[dict]) -> list[tuple[float, float]]:
    """(t, ms): what the controller saw, the ingress's p99 over its last 30 s, every 2 s."""
    return [(p["t"], p["server_p99"]) for p in timeline if p.get("server_p99") is not None]


def settled_from(moves: list[dict], warm_s: float = 10.0) -> float:
    """Seconds into the window from which the placement is settled: ``warm_s`` after the
    last move was *done* (decided at ``at_s``, its result says how long it took); never
    (inf) while a move is still in progress at the end."""
    out = warm_s
    for m in moves:
        took = re.match(r"\w+ in ([0-9.]+)s", m.get("result") or "")
        if took is None:
            return math.inf
        out = max(out, m["at_s"] + float(took.group(1)) + warm_s)
    return out


def time_weighted(points: list[tuple[float, float]]) -> float:
    """Mean of a step function sampled as (time, value): each value holds until the next sample."""
    if len(points) < 2:
        return points[0][1] if points else math.nan
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return points[-1][1]
    return sum(v * (b - a) for (a, v), (b, _) in zip(points, points[1:])) / span


def verdict(res: dict, slo_ms: float) -> dict | None:
    """The must-show: the placement exit-aware planning settles on costs >= 30% less per
    hour than exit-unaware's, each meeting the p99 TPOT SLO once settled (requests after the
    last move's replicas are up), with 0 failed requests. The time-weighted cost, which
    also counts the minutes before a controller acted, is reported beside it."""
    a, b = res.get("exit_aware"), res.get("exit_unaware")
    if not a or not b:
        return None
    saving = 1 - a["cost_per_hour_end"] / b["cost_per_hour_end"] if b["cost_per_hour_end"] else None
    mean = 1 - a["cost_per_hour_mean"] / b["cost_per_hour_mean"] if b["cost_per_hour_mean"] else None
    meets = {n: r["tpot_ms_p99_settled"] is not None and r["tpot_ms_p99_settled"] <= slo_ms
             and r["requests_failed"] == 0 for n, r in res.items()}
    return {"saving_vs_exit_unaware": None if saving is None else round(saving, 3),
            "saving_time_weighted": None if mean is None else round(mean, 3),
            "meets_slo_and_0_failed": meets,
            "must_show": "exit-aware >= 30% cheaper than exit-unaware, both at the SLO with 0 failed",
            "met": bool(saving is not None and saving >= 0.30 and meets["exit_aware"] and meets["exit_unaware"])}


def run(args) -> int:
    if args.replot is not None:
        return replot(args.replot, args.png)
    with json_stdout(args.json) as emit:
        return _run(args, emit)


def replot(json_path: Path, png: Path) -> int:
    """Draw the timeline figure again from a run's ``--json`` output (no cluster, no load)."""
    import json

    out = json.loads(Path(json_path).read_text())
    res = {n: {**r, "_timeline": r.get("timeline") or [], "_requests": [tuple(x) for x in r.get("requests_tpot") or []]}
           for n, r in out["contenders"].items()}
    if not any(r["_timeline"] for r in res.values()):
        raise ValueError(f"{json_path}: no timeline in it (written by an older version of this bench); run it again")
    _plot(png, res, out["tpot_slo_ms"])
    print(f"timeline: {png}")
    return 0


def _run(args, emit) -> int:
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: node IP 127.0.0.1
    from tqdm import tqdm

    from offramp.api.text import load_tokenizer
    from offramp.bench.serve import TASKS, build_prompts
    from offramp.cluster import rayops
    from offramp.cluster.local import free_port, pool_cluster
    from offramp.ops.checkpoint import load_spec
    from offramp.ops.engine import resolve_model_dir
    from offramp.training.data import DataSpec, build_corpus

    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDERS]
    if bad or not names:
        raise ValueError(f"--contenders {args.contenders!r}: choose from {','.join(CONTENDERS)}")
    t_start = time.monotonic()
    model_dir = resolve_model_dir(None)
    num_layers = load_spec(model_dir).num_layers
    if not 2 <= args.stages <= num_layers:
        raise ValueError(f"--stages {args.stages}: the embedded model has {num_layers} layers; use 2 to {num_layers}")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"--tasks {args.tasks!r}: choose from {','.join(TASKS)}")
    tok = load_tokenizer(model_dir)
    heldout = build_corpus(DataSpec(), None)[1]
    prompts = [ids for _, ids in build_prompts(heldout, lambda t: tok.encode(t, add_special_tokens=True, verbose=False),
                                               24, args.prompt_tokens, tasks)]
    ctx = args.prompt_tokens + args.max_tokens // 2
    # Room to scale both ways in both pools: two devices per stage in each.
    fit, samples, emulate, pools = _emulation(model_dir, args.fast_factor, args.slow_factor, ctx, 2 * args.stages)
    out: dict = {"contenders": {}}
    bar = tqdm(total=len(names), desc="bench placement --exit-aware", file=sys.stderr, disable=args.json)
    port = free_port()
    with contextlib.ExitStack() as boot:
        boot.enter_context(pool_cluster(gpu_nodes=1, cpu_nodes=1, cpus_per_node=8, head_cpus=2))
        try:
            for name in names:
                out["contenders"][name] = _contender(name, args, model_dir, emulate, pools, prompts, port, ctx)
                bar.update(1)
        finally:
            bar.close()
            with contextlib.suppress(Exception):
                rayops.shutdown_serve()
    res = out["contenders"]
    slo = args.tpot_slo_ms
    out.update({
        "verdict": verdict(res, slo), "tpot_slo_ms": slo, "rate_per_s": args.rate, "max_tokens": args.max_tokens,
        "exit_mode": args.exit_mode, "tasks": list(tasks), "stages": args.stages,
        "emulation": {"fit": {"fixed_overhead_ms": round(1e3 * fit.fixed_overhead_s, 4),
                              "mem_bandwidth_gb_s": round(fit.mem_bandwidth / 1e9, 3),
                              "gflops": round(fit.flops / 1e9, 3), "rms_residual_ms": round(1e3 * fit.rms_residual_s, 4),
                              "samples": len(samples)},
                      "fast_factor": args.fast_factor, "slow_factor": args.slow_factor,
                      "pools": {k: v.model_dump() for k, v in emulate.items()},
                      "cost_per_hour": {p.name: p.cost_per_hour for p in pools}},
        "png": str(args.png), "wall_s": round(time.monotonic() - t_start, 1)})
    _plot(args.png, res, slo)
    for r in res.values():  # kept in the JSON under public names: --replot draws the figure again from it
        r["timeline"], r["requests_tpot"] = r.pop("_timeline", []), r.pop("_requests", [])
    if args.json:
        emit(out)
    else:
        _print(out)
    failed = sum(r["requests_failed"] for r in res.values())
    return 0 if failed == 0 else 1


def _print(out: dict) -> None:
    print(f"{'contender':<14}{'cost/h mean':>12}{'cost/h end':>11}{'p99 ms':>9}{'p99 settled':>12}"
          f"{'mean ms':>9}{'failed':>7}{'moves':>6}{'deep/token':>11}  placement at end")
    for n, r in out["contenders"].items():
        print(f"{n:<14}{r['cost_per_hour_mean']:>12}{r['cost_per_hour_end']:>11}{r['tpot_ms_p99']!s:>9}"
              f"{r['tpot_ms_p99_settled']!s:>12}{r['tpot_ms_mean']!s:>9}{r['requests_failed']:>7}{len(r['moves']):>6}"
              f"{r['deep_visits_per_token']!s:>11}  {', '.join(r['placement_end'] or [])}")
        for m in r["moves"]:
            print(f"    move at {m['at_s']} s: {m['reason']} -> {m['result']}")
    print(f"SLO p99 TPOT {out['tpot_slo_ms']} ms; verdict: {out['verdict']}")
    print(f"emulation: {out['emulation']['fit']}, fast x{out['emulation']['fast_factor']}, "
          f"slow x{out['emulation']['slow_factor']}; timeline: {out['png']}")


def _plot(path: Path, res: dict, slo: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gpu": "tab:orange", "cpu": "tab:blue"}
    fig, axes = plt.subplots(len(res), 1, figsize=(10, 2.8 * len(res)), sharex=True, squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], res.items()):
        tl = r["_timeline"]
        if not tl:
            continue
        ts = [p["t"] for p in tl]
        ax.step(ts, [p["cost"] for p in tl], where="post", color="k", label="cost per hour")
        ax.set_ylabel("cost / h")
        cmax = max(p["cost"] for p in tl) or 1.0
        n = len(tl[0]["stages"])
        top = cmax * (1.1 + 0.2 * n)  # the cost line below, one band per stage above it
        for k in range(n):  # one band per stage: its pool, replicas written on it
            y0, h = cmax * (1.1 + 0.2 * k), cmax * 0.16
            prev = None
            for a, b in zip(tl, tl[1:] + [tl[-1]]):
                pool, reps = a["stages"][k]
                ax.broken_barh([(a["t"], max(b["t"] - a["t"], 0.5))], (y0, h), color=colors.get(pool, "grey"),
                               alpha=0.6, linewidth=0)
                if (pool, reps) != prev:  # the replica count where it changes
                    ax.text(a["t"] + 8, y0 + h / 2, f"x{reps}", va="center", fontsize=7)
                    prev = (pool, reps)
            ax.text(ts[0], y0 + h / 2, "Stage%d " % k, va="center", ha="right", fontsize=7)
        ax.set_ylim(0, top)
        ax2 = ax.twinx()
        reqs = sorted(r["_requests"])
        roll = [(t, percentile([x for u, x in reqs if t - 20 <= u <= t], 0.99) * 1000)
                for t in range(20, int(ts[-1]) + 1, 2) if any(t - 20 <= u <= t for u, _ in reqs)]
        if roll:
            ax2.plot([t for t, _ in roll], [p for _, p in roll], color="tab:red", label="p99 TPOT, client (20 s window)")
        seen = _controller_p99(tl)
        if seen:
            ax2.plot([t for t, _ in seen], [v for _, v in seen], color="tab:purple", lw=0.8,
                     label="p99 the controller sees (ingress, 30 s)")
        ax2.axhline(slo, color="tab:red", ls=":", label=f"SLO {slo:g} ms")
        deep = [(b["t"], d) for a, b in zip(tl, tl[1:])
                if (d := _deep_per_token(a["passes"], a["emitted"], b["passes"], b["emitted"])) is not None]
        ax2.set_ylabel("ms")
        if deep:
            ax3 = ax.twinx()
            ax3.spines["right"].set_position(("axes", 1.08))
            ax3.plot([t for t, _ in deep], [d for _, d in deep], color="tab:green", lw=0.8, label="deep visits / token")
            ax3.set_ylim(0, 1.05)
            ax3.set_ylabel("deep visits / token", color="tab:green")
        ax.set_title(f"{name}: mean {r['cost_per_hour_mean']}/h, p99 {r['tpot_ms_p99']} ms, "
                     f"{r['requests_failed']} failed, {len(r['moves'])} move(s)  (bands: orange = fast pool, blue = slow)",
                     fontsize=9)
        ax2.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds into the measured window")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
