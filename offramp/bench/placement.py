"""``offramp bench placement``: the controller under a load shift, end to end.

Starts its own small local cluster (head + one GPU-pool node + two CPU-pool nodes, all on
127.0.0.1), serves the tiny 4-layer model in 4 stages from a Serve config, starts the
placement controller (detached actor, short interval, low breach threshold so a laptop's
load counts as saturation), then drives greedy streaming requests:

* ``before``: 1 stream for ``--before-s`` seconds;
* ``shift``: ``--streams`` streams until the controller has acted and ``--after-s`` more.

TPOT is measured client-side (gaps between streamed chunks, divided over the tokens each
chunk carries). Reported: p99 TPOT before the
shift, during it (before the first move completed), after the last move; time from the
shift to the first completed move (``time_to_act_s``) and to the first 5-s window whose p99
is back within ``--recover-factor`` (1.5x) the ``before`` p99 and stays there
(``time_to_recover_s``, None if never); moves made; failed requests. A timeline PNG shows
per-token TPOT, rolling p99 and the moves.

Device speed. On one machine an extra replica adds no cores, so a real CPU-bound stage
cannot recover by scaling out here. By default (``--emulate``) the CPU pool is therefore
a *modelled* slow device (``AppArgs.emulate_pools``: each forward pass of a CPU-pool
replica takes at least ``--cpu-step-ms + --cpu-token-ms x positions``, waited out with an
asyncio sleep that holds the replica but no core): Stage2 alone sits in that pool, the
shift saturates it, and a second replica genuinely adds capacity - the situation the
controller is for. ``--no-emulate`` runs the raw model (stages 2 and 3 on the CPU pool,
low busy threshold): it shows the mechanism (act, zero failures) but not a recovery.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from offramp.bench import placement_exits
from offramp.bench.common import APP, json_stdout, local_serve_config, percentile


def register(bsub) -> None:
    p = bsub.add_parser("placement", help="placement controller under a load shift (own local cluster)")
    p.add_argument("--streams", type=int, default=4, help="concurrent greedy streams after the shift")
    p.add_argument("--before-s", type=float, default=15.0, help="seconds of light load before the shift")
    p.add_argument("--after-s", type=float, default=20.0, help="seconds of load after the controller acted")
    p.add_argument("--max-shift-s", type=float, default=150.0, help="end the shifted phase after this even if moves continue")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--busy-threshold", type=float, default=None,
                   help="replica busy fraction counted as saturation, between the light and heavy load's "
                        "(default 0.97 emulated: the queue-wait rule decides there; 0.2 raw)")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="longest queue wait of a replica counted as saturation (default 50 emulated, 1000 raw)")
    p.add_argument("--emulate", action=argparse.BooleanOptionalAction, default=True,
                   help="model the CPU pool as a slow device (see module doc); --no-emulate: raw model speed")
    p.add_argument("--cpu-step-ms", type=float, default=60.0, help="emulated CPU pool: fixed ms per forward pass")
    p.add_argument("--cpu-token-ms", type=float, default=40.0, help="emulated CPU pool: ms per position in a pass")
    p.add_argument("--cooldown-s", type=float, default=15.0,
                   help="controller's per-stage cool-down (closed-loop load may need a second step up)")
    p.add_argument("--settle-s", type=float, default=25.0,
                   help="after a move, keep the shifted load until no further move for this long")
    p.add_argument("--max-replicas", type=int, default=4, help="controller's cap on replicas per stage")
    p.add_argument("--target-utilisation", type=float, default=None,
                   help="busy fraction the controller sizes replicas for (default 0.4 emulated, threshold/2 raw): "
                        "closed-loop streams send more once served faster, so leave headroom")
    p.add_argument("--recover-factor", type=float, default=1.5,
                   help="recovered = rolling p99 TPOT back within this factor of the pre-shift p99")
    p.add_argument("--oscillate-cycles", type=int, default=0,
                   help="then alternate 1 and --streams streams this many times (hysteresis check)")
    p.add_argument("--oscillate-period-s", type=float, default=20.0, help="length of each half of a cycle")
    p.add_argument("--pool-move", action="store_true",
                   help="then move Stage3 to the other pool under the same load (mover, 3 steps)")
    p.add_argument("--png", type=Path, default=Path("placement-timeline.png"), help="timeline figure")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    placement_exits.add_arguments(p)
    p.set_defaults(func=run)


def _pools(emulate: bool) -> list[str]:
    return ["gpu", "gpu", "cpu", "gpu"] if emulate else ["gpu", "gpu", "cpu", "cpu"]


def _config(model_dir: Path, port: int, args) -> dict:
    pools = _pools(args.emulate)
    emulate = {"cpu": {"step_s": args.cpu_step_ms / 1000, "per_token_s": args.cpu_token_ms / 1000}} if args.emulate else {}
    return local_serve_config(port, pools, {
        "model": str(model_dir), "stages": [{"pool": p, "dtype": "fp32"} for p in pools], "exit": {"mode": "off"},
        "api_key_env": "", "request_timeout_s": 30.0, "emulate_pools": emulate})


class _Load:
    def __init__(self, base_url: str, max_tokens: int):
        self.base_url, self.max_tokens = base_url, max_tokens
        self.tokens: list[tuple[float, float]] = []  # (time, gap seconds)
        self.ok, self.failed = 0, []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def add_stream(self, seed: int) -> None:
        stop = threading.Event()
        t = threading.Thread(target=self._run, args=(seed, stop), daemon=True)
        self.threads.append((t, stop))
        t.start()

    def _run(self, seed: int, stop: threading.Event) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=60)
        prompts = ["The quick brown fox", "Pipeline stages", "Hello there", "0 1 2 3"]
        n = seed
        while not stop.is_set():
            try:
                last = None
                for chunk in client.completions.create(model="offramp-default", prompt=prompts[n % 4], stream=True,
                                                       max_tokens=self.max_tokens, temperature=0,
                                                       extra_body={"ignore_eos": True}):
                    now = time.monotonic()
                    # A chunk carries every token since the last one (text is held back while
                    # it ends inside a UTF-8 sequence): one TPOT sample of gap/k per token.
                    extra = (chunk.choices[0].model_extra or {}).get("offramp") if chunk.choices else None
                    k = len(extra.get("exit_stages") or ()) if isinstance(extra, dict) else 1
                    if last is not None and k > 0:
                        self.tokens.extend([(now, (now - last) / k)] * k)
                    if k > 0:
                        last = now
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.failed.append(f"{type(e).__name__}: {e}")
            n += 1

    def set_streams(self, n: int) -> None:
        """Grow to ``n`` streams, or ask the newest ones to stop after their current request."""
        live = [(t, ev) for t, ev in self.threads if not ev.is_set()]
        for _, ev in live[n:]:
            ev.set()
        for _ in range(len(live), n):
            self.add_stream(len(self.threads))

    def stop(self) -> None:
        for _, ev in self.threads:
            ev.set()
        for t, _ in self.threads:
            t.join(timeout=60)


def _p99(xs: list[float]) -> float | None:
    """p99 of TPOT samples (seconds) in ms, None without samples."""
    return round(1000 * percentile(xs, 0.99), 2) if xs else None


def run(args) -> int:
    if args.exit_aware:
        return placement_exits.run(args)
    with json_stdout(args.json) as emit:
        return _run(args, emit)


def _run(args, emit) -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from offramp.cluster import rayops
    from offramp.cluster.local import deploy_config, free_port, pool_cluster
    from offramp.ops.presets import make_checkpoint
    from offramp.placement.controller import ControllerActor, ControllerConfig, controller_name

    t_start = time.monotonic()
    if args.busy_threshold is None:
        args.busy_threshold = 0.97 if args.emulate else 0.2
    if args.max_wait_ms is None:
        args.max_wait_ms = 50.0 if args.emulate else 1000.0
    if args.target_utilisation is None:  # raw CPU: busy fractions are low and noisy
        args.target_utilisation = 0.4 if args.emulate else args.busy_threshold / 2
    model_dir = make_checkpoint(tempfile.mkdtemp(prefix="offramp-bench-placement-"), "tiny", seed=11)
    port = free_port()
    boot = contextlib.ExitStack()
    load = None
    try:
        boot.enter_context(pool_cluster(gpu_nodes=1, cpu_nodes=2, cpus_per_node=4, head_cpus=2))
        deploy_config(_config(model_dir, port, args), APP, wait_s=180)
        ccfg = ControllerConfig(app=APP, interval_s=2.0, max_replicas_per_stage=args.max_replicas,
                                target_utilisation=args.target_utilisation,
                                pins=[{"stage": 0, "replicas": 1}, {"stage": 3, "replicas": 1}],
                                policy={"sustain_intervals": 2, "cooldown_s": args.cooldown_s,
                                        "max_busy_fraction": args.busy_threshold,
                                        "max_oldest_wait_s": args.max_wait_ms / 1000, "min_gain": 10.0})
        load = _Load(f"http://127.0.0.1:{port}/v1", args.max_tokens)
        load.add_stream(0)
        time.sleep(2)  # first tokens, then start the controller on a warm app
        actor = rayops.start_detached(ControllerActor, controller_name(APP), ccfg.model_dump(mode="json"))
        rayops.call(actor, "status", 1)  # the controller's process is up before the baseline starts
        time.sleep(2 * ccfg.interval_s)
        t0 = time.monotonic()
        time.sleep(args.before_s)
        busy = {"before": _busy(rayops.call(actor, "status", 1))}
        t_shift = time.monotonic()
        for i in range(1, args.streams):
            load.add_stream(i)
        first_move, last_move, made = None, None, 0
        while time.monotonic() - t_shift < args.max_shift_s:
            st = rayops.call(actor, "status", 200)
            if first_move is None:
                busy["during"] = _busy(st)
            if st["moves_made"] > made:
                made, last_move = st["moves_made"], time.monotonic()
                first_move = first_move or last_move
            if last_move and time.monotonic() - last_move > args.settle_s:
                break  # the controller has settled
            time.sleep(1)
        t_acted = time.monotonic()
        time.sleep(args.after_s)
        t_end = time.monotonic()
        st = rayops.call(actor, "status", 200)
        busy["after"] = _busy(st)
        osc = None
        if args.oscillate_cycles > 0:
            t_osc = time.monotonic()
            for _ in range(args.oscillate_cycles):
                for n in (1, args.streams):
                    load.set_streams(n)
                    time.sleep(args.oscillate_period_s)
            st = rayops.call(actor, "status", 200)
            osc = {"t0": t_osc, "t1": time.monotonic()}
        rayops.kill_actor(actor)  # no controller racing the operator's pool move
        pool_move = None
        if args.pool_move:
            pool_move = _pool_move(load, "cpu" if args.emulate else "gpu")
        load.stop()
    finally:
        if load is not None:
            load.stop()
        try:
            rayops.shutdown_serve()
        except Exception:  # noqa: BLE001 - tearing down anyway
            pass
        boot.close()  # leaves and removes the cluster

    wall_off = time.time() - time.monotonic()  # decision times are wall clock
    moves = [(d["time"] - wall_off, d) for d in st["decisions"] if d["outcome"] == "apply"]
    toks = load.tokens
    before = [g for t, g in toks if t0 <= t < t_shift]
    during = [g for t, g in toks if t_shift <= t < (first_move or t_acted)]
    last_move_end = max([t + _secs(d) for t, d in moves], default=t_acted)
    after = [g for t, g in toks if last_move_end + 2 <= t <= t_end]
    base = _p99(before)
    recover = None
    if base:
        windows = [(w, _p99([g for t, g in toks if w <= t < w + 5])) for w in _frange(t_shift, t_end - 5, 1.0)]
        ok = [w for w, p in windows if p is not None and p <= args.recover_factor * base]
        for w, _ in windows:  # first window from which every later one is within bound
            if all(x in ok for x, _ in windows if x >= w):
                recover = round(w - t_shift, 1)
                break
    oscillation = None
    if osc is not None:
        om = [t for t, _ in moves if osc["t0"] <= t <= osc["t1"]]
        oscillation = {"cycles": args.oscillate_cycles, "period_s": args.oscillate_period_s, "moves": len(om),
                       "max_moves_per_cooldown_window": max((sum(1 for u in om if t <= u < t + args.cooldown_s)
                                                             for t in om), default=0),
                       "requests_failed_total": len(load.failed)}
    out = {
        "tpot_ms_p99_before": base, "tpot_ms_p99_during": _p99(during), "tpot_ms_p99_after": _p99(after),
        "tokens": {"before": len(before), "during": len(during), "after": len(after)},
        "time_to_act_s": None if first_move is None else round(first_move - t_shift, 1),
        "time_to_recover_s": recover,
        "moves": [{"at_s": round(t - t_shift, 1), "reason": d["reason"], "result": d.get("result")} for t, d in moves],
        "busy_by_stage": busy, "busy_threshold": args.busy_threshold, "max_wait_ms": args.max_wait_ms,
        "target_utilisation": args.target_utilisation, "cooldown_s": args.cooldown_s, "recover_factor": args.recover_factor,
        "device": ({"emulated_cpu_pool": {"step_ms": args.cpu_step_ms, "token_ms": args.cpu_token_ms},
                    "pools": _pools(True)} if args.emulate else {"emulated_cpu_pool": None, "pools": _pools(False)}),
        "moves_made": st["moves_made"], "oscillation": oscillation,
        "pool_move": None if pool_move is None else {k: v for k, v in pool_move.items() if k != "t"}, "requests_ok": load.ok, "requests_failed": len(load.failed),
        "failures": load.failed[:5], "final_placement": st["placement"], "png": str(args.png),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    _plot(args.png, toks, t_shift, moves, t0, pool_move)
    if args.json:
        emit(out)
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0 if not load.failed else 1


def _busy(st: dict) -> list[list[float]] | None:
    """Busy fraction of each replica of each stage in the controller's last interval."""
    sig = st.get("signals")
    return None if not sig else [[round(v, 2) for v in s["busy"].values()] for s in sig["stages"]]


def _secs(d: dict) -> float:
    try:
        return float(d.get("result", "").split(" in ")[1].split("s")[0])
    except (IndexError, ValueError):
        return 0.0


def _frange(a: float, b: float, step: float):
    while a <= b:
        yield a
        a += step


def _pool_move(load: _Load, to: str) -> dict:
    """Stage3 (layers 3-3) to pool ``to`` through the mover, under load."""
    from offramp.placement.mover import Mover, MoveFailed, RayOps
    from offramp.placement.planner import StagePlacement
    from offramp.placement.policy import Move

    failed0, t = len(load.failed), time.monotonic()
    move = Move(action="add", knob="pool", deployment=StagePlacement(start=3, end=4, pool=to, replicas=1),
                replicas_to=1, reason="bench: pool move under load")
    try:
        res = Mover(APP, RayOps(), [(0, 1), (1, 2), (2, 3), (3, 4)], deadline_s=120).apply(move)
        outcome = f"{res.outcome} ({len(res.steps)} steps)"
    except MoveFailed as e:
        outcome = f"failed: {e}"
    time.sleep(3)
    return {"t": t, "to": to, "seconds": round(time.monotonic() - 3 - t, 1), "outcome": outcome,
            "requests_failed_during": len(load.failed) - failed0}


def _plot(path: Path, toks, t_shift, moves, t0, pool_move=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [t - t_shift for t, _ in toks if t >= t0]
    ys = [g * 1000 for t, g in toks if t >= t0]
    ax.scatter(xs, ys, s=2, alpha=0.3, label="TPOT per token")
    roll = [(w - t_shift, _p99([g for t, g in toks if w <= t < w + 5])) for w in _frange(t0, max(xs, default=0) + t_shift - 5, 1.0)]
    ax.plot([w + 2.5 for w, p in roll if p], [p for w, p in roll if p], color="k", label="rolling p99 (5 s)")
    ax.axvline(0, color="tab:orange", ls="--", label="load shift")
    if pool_move:
        a = pool_move["t"] - t_shift
        ax.axvspan(a, a + pool_move["seconds"], color="tab:purple", alpha=0.25, label=f"pool move Stage3 -> {pool_move['to']}")
    for i, (t, d) in enumerate(moves):
        ax.axvspan(t - t_shift, t - t_shift + _secs(d), color="tab:green", alpha=0.3,
                   label="move (start..healthy)" if i == 0 else None)
    ax.set_xlabel("seconds from the load shift")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("placement controller: TPOT under a load shift (client side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    a = ap.parse_args(["placement", *sys.argv[1:]])
    sys.exit(a.func(a))
