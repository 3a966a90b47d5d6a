"""``offramp bench faults``: kill each part of a serving pipeline under load, one at a time.

Starts its own local cluster (head + one GPU-pool node + two CPU-pool nodes, all on
127.0.0.1), serves the embedded model in two stages (Stage0 on the GPU pool, Stage1 on
the CPU pool, so a CPU node can be lost and Stage1 placed again on the other), and runs
``--streams`` greedy streaming requests in a loop. Each prompt's reference text is its
first answer, taken before any fault. Then, one at a time, with the load running:

* ``stage0`` / ``stage1``: SIGKILL-equivalent of that stage's replica (``ray.kill``; Serve
  starts a new one);
* ``ingress``: the ingress replica (only the streams in flight on it may fail, each with a
  clean error);
* ``registry``: the app's registry actor (restarts with a new epoch);
* ``node``: the whole simulated node hosting Stage1 (``Cluster.remove_node``);
* ``burst``: not a kill: ``--burst`` requests at once on top of the load (default 256, four
  times a stage replica's KV slots): each must end with its reference text, none refused
  (the ingress queues what finds no KV slot, docs/reliability.md);
* ``stall``: not a kill: a Stage1 replica's process frozen ``--stall-s`` seconds (SIGSTOP,
  then SIGCONT), a replica alive and answering nothing. With ``--stage1-replicas 2`` only
  the streams on the frozen replica may pause (docs/reliability.md, "A replica that
  stalls"); with one replica every stream waits, and fails only if the freeze outlasts the
  request deadline.

After each fault the load runs ``--recover-s`` more seconds, stops, and the pipeline sits
idle ``--idle-s`` seconds; then the KV slots every stage replica still holds are read from
the registry's heartbeats (the KV lease must have freed every abandoned sequence).

Per fault it reports requests ok / wrong (text differs from the reference) / failed (an
HTTP or SSE error) / hung (no end within the client's deadline) among the requests that
ended in the fault's window, how many of those paused over 1 s between two streamed
events (and the longest pause), the recovery time (fault to the end of the first request
started after it that came back right), and the KV slots held after idle.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from offramp.bench.common import APP, json_stdout, local_serve_config
from offramp.deployments.config import INGRESS_NAME, stage_name

FAULTS = ("stage0", "stage1", "ingress", "registry", "node", "burst", "stall")
PROMPTS = ("The sun rose over the", "def area(width, height):\n", "12+30=", "In the beginning",
           "Pipeline stages", "import os\n")


def register(bsub) -> None:
    p = bsub.add_parser("faults", help="kill stage replicas, the ingress, the registry and a node, freeze a "
                        "replica, burst requests, under load",
                        description="Kill each part of a serving pipeline under load, one at a time (and freeze "
                        "a replica, and send a burst), and report requests ok / wrong / failed / hung, streams "
                        "that paused, recovery time and KV slots still held after idle (docs/reliability.md).")
    p.add_argument("--streams", type=int, default=6, help="concurrent greedy streams (default 6)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"comma list, in order, from {', '.join(FAULTS)} (default: all)")
    p.add_argument("--stall-s", type=float, default=20.0,
                   help="the stall fault: how long a Stage1 replica's process is frozen (SIGSTOP, then SIGCONT; "
                   "default 20 s)")
    p.add_argument("--stage1-replicas", type=int, default=1,
                   help="Stage1 replicas (default 1; 2 shows a stalled or killed replica beside a healthy one)")
    p.add_argument("--burst", type=int, default=256,
                   help="the burst fault's requests, sent at once (default 256: 4x a stage replica's 64 KV slots)")
    p.add_argument("--recover-s", type=float, default=60.0,
                   help="load kept running after each fault (default 60: a replacement replica loads its "
                   "weights and profiles itself before it serves)")
    p.add_argument("--idle-s", type=float, default=60.0,
                   help="idle time before the KV slots still held are read (default 60; the lease is --kv-lease-s)")
    p.add_argument("--kv-lease-s", type=float, default=30.0, help="the app's kv_lease_s (default 30, as served)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="the app's request deadline (default 60)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="one JSON report on stdout")
    p.set_defaults(func=run)


@dataclass
class Outcome:
    prompt: int
    start: float
    end: float
    status: str  # ok | wrong | failed | hung
    detail: str = ""
    first: float | None = None  # first token's arrival
    chunks: int = 0  # streamed events with text
    max_gap: float = 0.0  # longest pause between two streamed events (or the request and its first)
    last: float | None = None  # the latest event's arrival

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first, from the client's clock."""
        if self.first is None or self.chunks < 2:
            return None
        return (self.end - self.first) / (self.chunks - 1)


@dataclass
class Load:
    """Greedy streaming requests in ``streams`` threads, each classified on its end."""

    base: str
    max_tokens: int
    deadline_s: float
    reference: dict[int, str] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, i: int) -> tuple[str, str, Outcome]:
        """(status, text, outcome) of one streamed request for prompt ``i``."""
        import httpx

        body = {"model": "offramp-default", "prompt": PROMPTS[i], "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True, "offramp": {"exit": "off"}}
        text: list[str] = []
        o = Outcome(i, time.monotonic(), 0.0, "ok")

        def done(status: str, detail: str = "") -> tuple[str, str, Outcome]:
            o.end, o.status, o.detail = time.monotonic(), status, detail
            return status, "".join(text), o

        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=self.deadline_s) as r:
                if r.status_code != 200:
                    r.read()
                    return done("failed", f"HTTP {r.status_code}: {r.text[:120]}")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return done("failed", f"SSE error: {ev['error'].get('message', '')[:120]}")
                    if ev["choices"] and ev["choices"][0]["text"]:
                        now = time.monotonic()
                        o.max_gap = max(o.max_gap, now - (o.last or o.start))
                        o.last = now
                        o.first = o.first or now
                        o.chunks += 1
                        text.append(ev["choices"][0]["text"])
        except httpx.TimeoutException:
            return done("hung", f"no end within {self.deadline_s:.0f} s")
        except httpx.HTTPError as e:
            return done("failed", f"{type(e).__name__}: {e}"[:160])
        return done("ok")

    def record(self, i: int) -> Outcome:
        """One request for prompt ``i``, its answer checked against the reference, kept."""
        status, text, o = self.request(i)
        if status == "ok" and text != self.reference.get(i, text):
            o.status, o.detail = "wrong", f"{text[:40]!r} != {self.reference[i][:40]!r}"
        with self._lock:
            self.outcomes.append(o)
        return o

    def burst(self, n: int) -> None:
        """``n`` requests at once (one thread each), kept like the load's; returns when all ended."""
        threads = [threading.Thread(target=self.record, args=(k % len(PROMPTS),), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.deadline_s + 10)

    def start(self, streams: int, interval_s: float = 0.0) -> None:
        """``streams`` threads, each sending its next request when the last one ended and
        at least ``interval_s`` after the last one started (a paced load)."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, args=(k, interval_s), daemon=True)
                         for k in range(streams)]
        for t in self._threads:
            t.start()

    def _loop(self, k: int, interval_s: float) -> None:
        n = k
        while not self._stop.is_set():
            i = n % len(PROMPTS)
            o = self.record(i)
            n += 1
            rest = o.start + interval_s - time.monotonic()
            if rest > 0:
                self._stop.wait(rest)

    def take_references(self) -> None:
        """Each prompt's answer alone, on a healthy pipeline: what later answers must equal."""
        for i in range(len(PROMPTS)):
            status, text, o = self.request(i)
            if status != "ok":
                raise RuntimeError(f"reference request failed on a healthy pipeline: {o.detail}")
            self.reference[i] = text

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.deadline_s + 10)


def _config(model_dir: str | None, port: int, args) -> dict:
    app_args = {"stages": [{"pool": "gpu", "dtype": "fp32"}, {"pool": "cpu", "dtype": "fp32"}],
                "exit": {"mode": "off"}, "api_key_env": "", "request_timeout_s": args.request_timeout_s,
                "kv_lease_s": args.kv_lease_s, "channel_host": "127.0.0.1"}
    if model_dir:
        app_args["model"] = model_dir
    cfg = local_serve_config(port, ["gpu", "cpu"], app_args)
    (stage1,) = [d for d in cfg["applications"][0]["deployments"] if d["name"] == stage_name(1)]
    stage1["num_replicas"] = getattr(args, "stage1_replicas", 1)
    return cfg


def _replicas(deployment: str) -> list:
    from ray.util.state import list_actors

    for _ in range(10):
        try:
            return list_actors(filters=[("state", "=", "ALIVE"),
                                        ("class_name", "=", f"ServeReplica:{APP}:{deployment}")],
                               limit=100, timeout=10, raise_on_missing_output=True)
        except Exception:  # noqa: BLE001 - the state API is slow on a loaded machine: retry
            time.sleep(1)
    return []


def _kill(fault: str, cluster) -> str:
    """Make the fault happen; returns what was killed."""
    from offramp.cluster import rayops

    if fault == "registry":
        rayops.kill_actor(rayops.get_actor(f"registry-{APP}"), restart=True)
        return f"registry-{APP}"
    deployment = {"stage0": stage_name(0), "stage1": stage_name(1), "ingress": INGRESS_NAME, "node": stage_name(1)}[fault]
    actors = _replicas(deployment)
    if not actors:
        raise RuntimeError(f"no live {deployment} replica to kill")
    actor = actors[0]
    if fault == "node":  # a worker node hosting the deployment (the head cannot be removed)
        nodes = {n.node_id: n for n in cluster.worker_nodes}  # the state API's node_id (unique_id is ip:socket)
        hosted = [a for a in actors if a.node_id in nodes]
        if not hosted:
            raise RuntimeError(f"no {deployment} replica runs on a removable (worker) node")
        cluster.remove_node(nodes[hosted[0].node_id], allow_graceful=False)
        return f"node {hosted[0].node_id[:8]} (with {deployment})"
    rayops.kill_actor(rayops.get_actor(actor.name, namespace="serve"))
    return f"{deployment} replica {actor.name.rsplit('#', 1)[-1]}"


def _stall(seconds: float) -> str:
    """Freeze a Stage1 replica's process for ``seconds`` (SIGSTOP: alive, answering nothing;
    SIGCONT after, whatever happens meanwhile) while the load runs in its threads. The
    bench's cluster is on this machine, so the replica's pid is a local process."""
    actors = [a for a in _replicas(stage_name(1)) if a.pid]
    if not actors:
        raise RuntimeError(f"no live {stage_name(1)} replica to stall")
    pid = int(actors[0].pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        with contextlib.suppress(ProcessLookupError):  # Serve may have replaced it meanwhile
            os.kill(pid, signal.SIGCONT)
    return f"{stage_name(1)} replica {actors[0].name.rsplit('#', 1)[-1]} frozen {seconds:g} s"


def _held_slots() -> dict[str, int]:
    from offramp.cluster import rayops

    return {f"stage{e.stage}:{e.replica[-6:]}": e.stats.sequences for e in rayops.registry_endpoints(APP)}


def _window(outcomes: list[Outcome], t0: float, t1: float) -> dict:
    """Requests that ended in [t0, t1]: counts by status, the first errors, how many paused
    over 1 s between two streamed events and the longest such pause."""
    counts = {"ok": 0, "wrong": 0, "failed": 0, "hung": 0}
    errors: list[str] = []
    gaps = []
    for o in outcomes:
        if t0 <= o.end <= t1:
            counts[o.status] += 1
            gaps.append(o.max_gap)
            if o.status != "ok" and len(errors) < 5:
                errors.append(f"{o.status}: {o.detail}")
    return {**counts, "errors": errors, "paused_over_1s": sum(g > 1.0 for g in gaps),
            "longest_pause_s": round(max(gaps, default=0.0), 2)}


def run(args) -> int:
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS]
    if bad or not faults:
        print(f"offramp bench faults: unknown fault(s) {bad}; choose from {', '.join(FAULTS)}")
        return 2
    with json_stdout(args.json) as emit:
        return _run(args, faults, emit)


def _run(args, faults: list[str], emit) -> int:
    from tqdm import tqdm

    from offramp.cluster.local import deploy_config, free_port, pool_cluster, wait_running

    t_start = time.monotonic()
    port = free_port()
    load = Load(f"http://127.0.0.1:{port}", args.max_tokens, args.request_timeout_s + 15)
    report: dict = {"streams": args.streams, "max_tokens": args.max_tokens, "kv_lease_s": args.kv_lease_s,
                    "idle_s": args.idle_s, "faults": []}
    bar = tqdm(total=len(faults) + 1, desc="faults", disable=args.json, dynamic_ncols=True)
    try:
        with pool_cluster(gpu_nodes=1, cpu_nodes=2, cpus_per_node=2, dashboard=True) as cluster:
            deploy_config(_config(args.model, port, args), APP)
            load.take_references()
            load.start(args.streams)
            time.sleep(args.recover_s / 2)
            report["baseline"] = _window(load.outcomes, 0.0, time.monotonic())
            bar.update(1)
            for fault in faults:
                t_fault = time.monotonic()
                try:
                    if fault == "burst":
                        load.burst(args.burst)
                        took = time.monotonic() - t_fault
                        what = f"nothing: {args.burst} requests at once, all ended in {took:.1f} s"
                    elif fault == "stall":
                        what = _stall(args.stall_s)
                    else:
                        what = _kill(fault, cluster)
                except Exception as e:  # noqa: BLE001 - report it, keep the other faults' figures
                    report["faults"].append({"fault": fault, "error": f"{type(e).__name__}: {e}"})
                    bar.update(1)
                    continue
                # a burst has ended when load.burst returns: nothing to recover from; the load
                # runs --recover-s from a stall's start, or up to its end if that is later
                if fault == "burst":
                    time.sleep(2.0)
                elif fault == "stall":  # the load ran through the freeze
                    time.sleep(max(0.0, args.recover_s - (time.monotonic() - t_fault)))
                else:
                    time.sleep(args.recover_s)
                load.stop()
                t_quiet = time.monotonic()
                rec = next((o.end - t_fault for o in sorted(load.outcomes, key=lambda o: o.end)
                            if o.start > t_fault and o.status == "ok"), None)
                time.sleep(args.idle_s)
                entry = {"fault": fault, "killed": what, **_window(load.outcomes, t_fault, t_quiet),
                         "recovery_s": None if rec is None else round(rec, 2),
                         "kv_slots_held_after_idle": _held_slots()}
                report["faults"].append(entry)
                bar.update(1)
                if not args.json:
                    bar.write(_line(entry))
                wait_running(APP, 240)
                load.start(args.streams)
                time.sleep(2)
            load.stop()
    finally:
        bar.close()
        load.stop()
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    emit(report)
    return 0


def _line(e: dict) -> str:
    if "error" in e:
        return f"{e['fault']:9} not run: {e['error']}"
    return (f"{e['fault']:9} killed {e['killed']}: ok {e['ok']} wrong {e['wrong']} failed {e['failed']} "
            f"hung {e['hung']}, {e['paused_over_1s']} paused > 1 s (longest {e['longest_pause_s']} s), "
            f"recovered in {e['recovery_s']} s, KV slots held after idle "
            f"{sum(v for v in e['kv_slots_held_after_idle'].values() if v > 0)}")
