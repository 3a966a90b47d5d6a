"""``offramp bench soak``: a long steady load at 60% of the measured knee.

Starts the same local cluster and two-stage app as ``offramp bench faults``, then:

1. **Knee.** Closed-loop greedy streams at concurrency 1, 2, 4, ... ``--max-streams``, each
   level ``--level-s`` seconds; the knee is the level after which requests/s grows by
   less than 10% (or the best level).
2. **Soak.** For ``--minutes``, the knee's streams each pace their requests so the total
   rate is ``--load`` (0.6) times the knee's requests/s. Every ``--sample-s`` seconds it
   records errors (failed, wrong against the prompt's reference, hung), the p99 TPOT of
   the requests that ended in the window (client clock), and the RSS of every Ray process
   of the cluster (GCS, raylets, Serve controller and proxy, each replica).

Reported: requests and errors, p99 TPOT of the first and last windows and their ratio
(drift), and per process its RSS at the start and end of the soak and the growth.
"""
from __future__ import annotations

import time

from offramp.bench.common import json_stdout, percentile
from offramp.bench.faults import APP, Load, _config

KNEE_GAIN = 1.10  # a level that adds less than 10% requests/s is past the knee


def register(bsub) -> None:
    p = bsub.add_parser("soak", help="a long load at 60%% of the knee: errors, p99 drift, RSS growth",
                        description="Measure the knee, then hold a paced load at a share of it for "
                        "--minutes: errors, p99 TPOT drift and RSS growth per Ray process.")
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--load", type=float, default=0.6, help="share of the knee's requests/s to hold (default 0.6)")
    p.add_argument("--max-streams", type=int, default=16, help="largest concurrency tried for the knee")
    p.add_argument("--level-s", type=float, default=20.0, help="seconds per concurrency level (default 20)")
    p.add_argument("--sample-s", type=float, default=30.0, help="seconds per soak window (default 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--kv-lease-s", type=float, default=30.0, help="the app's kv_lease_s (default 30)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="the app's request deadline (default 60)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="one JSON report on stdout")
    p.set_defaults(func=run)


def run(args) -> int:
    if not (0 < args.load <= 1 and args.minutes > 0 and args.max_streams >= 1):
        print("offramp bench soak: --load must be in (0, 1], --minutes > 0, --max-streams >= 1")
        return 2
    with json_stdout(args.json) as emit:
        return _run(args, emit)


def ray_rss() -> dict[str, int]:
    """RSS bytes of every Ray process on this machine, by a stable name (process title,
    plus the pid where titles repeat)."""
    import psutil

    out: dict[str, int] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            title = cmd.split(" ")[0] if cmd.startswith("ray::") else p.info["name"]
            if not (title.startswith("ray::") or title in ("gcs_server", "raylet")):
                continue
            key = f"{title}[{p.info['pid']}]"
            out[key] = p.info["memory_info"].rss
        except (psutil.Error, AttributeError, TypeError):
            continue
    return out


def window_stats(outcomes, t0: float, t1: float) -> dict:
    done = [o for o in outcomes if t0 <= o.end < t1]
    tp = [o.tpot_s for o in done if o.status == "ok" and o.tpot_s is not None]
    return {"requests": len(done), "errors": sum(o.status != "ok" for o in done),
            "tpot_ms_p99": round(1000 * percentile(tp, 0.99), 2) if tp else None}


def knee(levels: list[tuple[int, float]]) -> tuple[int, float]:
    """(streams, requests/s) at the knee of measured (streams, requests/s) levels."""
    best = levels[0]
    for lv in levels[1:]:
        if lv[1] < best[1] * KNEE_GAIN:
            break
        best = lv
    return best


def _run(args, emit) -> int:
    from tqdm import tqdm

    from offramp.cluster.local import deploy_config, free_port, pool_cluster

    t_start = time.monotonic()
    port = free_port()
    load = Load(f"http://127.0.0.1:{port}", args.max_tokens, args.request_timeout_s + 15)
    conc = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= args.max_streams]
    n_windows = max(1, int(args.minutes * 60 // args.sample_s))
    bar = tqdm(total=len(conc) + n_windows, desc="soak", disable=args.json, dynamic_ncols=True)
    report: dict = {"minutes": args.minutes, "load": args.load, "max_tokens": args.max_tokens}
    try:
        with pool_cluster(gpu_nodes=1, cpu_nodes=2, cpus_per_node=2):
            deploy_config(_config(args.model, port, args), APP)
            load.take_references()
            levels = []
            for c in conc:
                load.outcomes = []
                t0 = time.monotonic()
                load.start(c)
                time.sleep(args.level_s)
                load.stop()
                ok = [o for o in load.outcomes if o.status == "ok"]
                levels.append((c, len(ok) / (time.monotonic() - t0)))
                bar.update(1)
            k_streams, k_rps = knee(levels)
            rate = args.load * k_rps
            report["levels"] = [{"streams": c, "requests_per_s": round(r, 3)} for c, r in levels]
            report["knee"] = {"streams": k_streams, "requests_per_s": round(k_rps, 3)}
            report["soak_requests_per_s"] = round(rate, 3)
            load.outcomes = []
            rss_start = ray_rss()
            t_soak = time.monotonic()
            load.start(k_streams, interval_s=k_streams / rate)
            windows = []
            for w in range(n_windows):
                time.sleep(max(0.0, t_soak + (w + 1) * args.sample_s - time.monotonic()))
                t1 = time.monotonic()
                windows.append({"t_s": round(t1 - t_soak, 1),
                                **window_stats(load.outcomes, t1 - args.sample_s, t1)})
                bar.update(1)
            load.stop()
            rss_end = ray_rss()
    finally:
        bar.close()
        load.stop()
    first, last = windows[0], windows[-1]
    report["windows"] = windows
    report["requests"] = sum(w["requests"] for w in windows)
    report["errors"] = sum(w["errors"] for w in windows)
    report["errors_detail"] = [f"{o.status}: {o.detail}" for o in load.outcomes if o.status != "ok"][:5]
    report["tpot_ms_p99_first"], report["tpot_ms_p99_last"] = first["tpot_ms_p99"], last["tpot_ms_p99"]
    report["p99_drift"] = (round(last["tpot_ms_p99"] / first["tpot_ms_p99"], 3)
                           if first["tpot_ms_p99"] and last["tpot_ms_p99"] else None)
    growth = {k: {"start_mb": round(v / 2**20, 1), "end_mb": round(rss_end[k] / 2**20, 1),
                  "growth": round(rss_end[k] / v - 1, 4)} for k, v in rss_start.items() if k in rss_end and v}
    report["rss"] = growth
    report["max_rss_growth"] = max((g["growth"] for g in growth.values()), default=None)
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    emit(report)
    return 0
