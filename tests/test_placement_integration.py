"""The placement controller on a real local cluster (head + GPU-pool node + 2 CPU-pool nodes)
serving the tiny 4-layer model in 4 stages, under continuous greedy load.

One scenario, in order (it shares the session's app, so it restores it at the end):

1. idle -> load shift: the controller (a detached actor, 2 s interval) sees stages 1 and 2
   busy past the breach threshold for 2 intervals and adds a replica to stage 1; stages 0
   and 3 are pinned to 1 replica (the escape hatch), so the moves are predictable;
2. the next move (stage 2) is in flight when the controller actor is killed; Ray restarts
   it, it reconciles the persisted intent (completes the applied move, or drops one never
   applied) and ends with Serve, the registry and the config agreeing;
3. throughout: zero failed requests, and every greedy output equals the one taken before
   the load started.
"""
from __future__ import annotations

import threading
import time

import pytest

from serve_fixtures import APP, MODEL_NAME, apply_config, registry_endpoints, wait_running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPTS = ["The quick brown fox", "Pipeline stages exit early", "Hello there, general", "0 1 2 3 4 5"]
MAX_TOKENS = 8


def greedy(client, prompt):
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"offramp": {"exit": "off"}, "ignore_eos": True})
    return r.choices[0].text


class Load:
    """Greedy requests from ``streams`` threads until stopped (bounded by ``max_s``)."""

    def __init__(self, sc, streams=3, max_s=150.0):
        self.sc, self.streams, self.max_s = sc, streams, max_s
        self.stop = threading.Event()
        self.ok, self.failed, self.mismatch = 0, [], []
        self.expected: dict[str, str] = {}
        self.threads = []

    def _run(self, i):
        client = self.sc.openai(timeout=60)
        end = time.monotonic() + self.max_s
        n = i
        while not self.stop.is_set() and time.monotonic() < end:
            p = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                out = greedy(client, p)
            except Exception as e:  # noqa: BLE001 - every failure is counted, none hidden
                self.failed.append(f"{type(e).__name__}: {e}")
                continue
            self.ok += 1
            if p in self.expected and out != self.expected[p]:
                self.mismatch.append((p, out, self.expected[p]))

    def start(self):
        client = self.sc.openai(timeout=60)
        self.expected = {p: greedy(client, p) for p in PROMPTS}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.streams)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def _until(pred, timeout, what, every=0.3, info=lambda: ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {info()}")


def test_controller_scales_saturated_stage_and_survives_a_crash(serve_cluster):
    from offramp.cluster import rayops
    from offramp.placement.controller import ControllerActor, ControllerConfig, controller_name

    for key in ("intent", "state"):
        rayops.kv_del(f"{key}/{APP}")
    cfg = ControllerConfig(
        app=APP, interval_s=2.0, max_replicas_per_stage=2, target_utilisation=0.02, move_deadline_s=90,
        pins=[{"stage": 0, "replicas": 1}, {"stage": 3, "replicas": 1}],
        policy={"sustain_intervals": 2, "cooldown_s": 600, "max_busy_fraction": 0.01, "min_gain": 10.0})
    load = Load(serve_cluster)
    actor = None
    try:
        actor = rayops.start_detached(ControllerActor, controller_name(APP), cfg.model_dump(mode="json"))
        st = rayops.call(actor, "status", 5)
        assert [p["replicas"] for p in st["placement"]] == [1, 1, 1, 1]
        assert [p["pool"] for p in st["placement"]] == ["gpu", "gpu", "cpu", "cpu"]
        time.sleep(4)  # idle: no breach, no move
        st = rayops.call(actor, "status", 50)
        assert st["moves_made"] == 0 and not [d for d in st["decisions"] if d["outcome"] == "apply"]

        load.start()  # the load shift
        st = _until(lambda: (s := rayops.call(actor, "status", 50))["moves_made"] >= 1 and s, 60, "the first move",
                    info=lambda: rayops.call(actor, "status", 8))
        (first,) = [d for d in st["decisions"] if d["outcome"] == "apply"][:1]
        assert first["move"]["deployment"]["start"] == 1 and first["move"]["replicas_to"] == 2, first
        assert "busy" in first["reason"] and first["result"].startswith("applied"), first
        assert [p["replicas"] for p in st["placement"]] == [1, 2, 1, 1]

        # the second move (stage 2) applied to Serve but not yet healthy: kill the controller;
        # Ray restarts it and it must finish that move, not apply it again
        def applied_not_done():
            intent = rayops.call(actor, "status", 1)["intent"]
            return intent and rayops.deployed_app_config(APP) == intent["target"]

        _until(applied_not_done, 60, "the second move applied and in flight", every=0.1)
        rayops.kill_actor(actor, restart=True)
        st = _until(lambda: _status_or_none(rayops, actor), 90, "the restarted controller")
        assert st["recovered"] is not None, st
        assert st["recovered"]["outcome"] == "completed", st["recovered"]
        assert st["recovered"]["move"]["deployment"]["start"] == 2
        assert st["intent"] is None
        # consistent: config, Serve and registry agree, and no move was repeated
        st = _until(lambda: (s := rayops.call(actor, "status", 50)) and
                    [p["replicas"] for p in s["placement"]] == [1, 2, 2, 1] and s, 90, "stage 2 at 2 replicas")
        wait_running(90, want={"Stage0": 1, "Stage1": 2, "Stage2": 2, "Stage3": 1})
        regs = _until(lambda: (r := registry_endpoints()) and [sum(e.stage == k for e in r) for k in range(4)]
                      == [1, 2, 2, 1] and r, 30, "the registry to list the new replicas")
        assert len(regs) == 6
        assert st["moves_made"] == 2 and sum(d["outcome"] == "apply" for d in st["decisions"]) == 2
        recovered = st["recovered"]
        # the CLI reads the running controller, and plans on its own without changing anything
        status = _cli(["placement", "status", "--json"])
        assert status["controller"] == "running" and [p["replicas"] for p in status["placement"]] == [1, 2, 2, 1]
        planned = _cli(["placement", "plan", "--json", "--window", "2"])
        assert planned["signals"]["stages"][0]["arrival_per_s"] > 0 and planned["plan"]["stages"]
    finally:
        load.finish()
        if actor is not None:
            rayops.kill_actor(actor)
        for key in ("intent", "state"):
            rayops.kv_del(f"{key}/{APP}")
    assert load.ok >= 20, f"only {load.ok} requests completed"
    assert load.failed == [], load.failed[:5]
    assert load.mismatch == [], load.mismatch[:3]
    print(f"requests ok={load.ok} failed=0; recovered: {recovered}")
    apply_config(serve_cluster.config, wait_s=None)  # put the session's app back as it was
    wait_running(120, want={"Stage1": 1, "Stage2": 1})


def _cli(argv):
    import argparse
    import contextlib
    import io
    import json

    from offramp.placement import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads(out.getvalue())


def _status_or_none(rayops, actor):
    try:
        return rayops.call(actor, "status", 50, timeout=10)
    except Exception:  # noqa: BLE001 - restarting
        return None


def test_pool_and_precision_moves_under_load(serve_cluster):
    """Through the mover, under 3 greedy streams: Stage3 CPU pool -> GPU pool (outputs must
    not change), then Stage3 fp32 -> bf16 (a per-deployment env var; outputs may change, so
    only failures count). Each is 3 Serve steps, make before break; the replicas that end up
    serving report the new pool / precision in the registry; no other stage restarts."""
    from offramp.placement.mover import Mover, RayOps, serve_surges
    from offramp.placement.planner import StagePlacement
    from offramp.placement.policy import Move

    ranges = [(0, 1), (1, 2), (2, 3), (3, 4)]
    others = {e.replica for e in registry_endpoints() if e.stage != 3}
    load = Load(serve_cluster)
    try:
        load.start()
        time.sleep(2)
        to_gpu = Move(action="add", knob="pool", deployment=StagePlacement(start=3, end=4, pool="gpu", replicas=1),
                      replicas_to=1, reason="test: pool move under load")
        res = Mover(APP, RayOps(), ranges, deadline_s=120).apply(to_gpu)
        assert res.outcome == "applied" and len(res.steps) == (1 if serve_surges() else 3), res
        regs = _until(lambda: (r := [e for e in registry_endpoints() if e.stage == 3]) and len(r) == 1 and r,
                      30, "one Stage3 replica registered")
        assert regs[0].pool == "gpu" and regs[0].dtype == "fp32", regs
        n_ok, mism = load.ok, len(load.mismatch)
        assert mism == 0, load.mismatch[:3]

        load.expected = {}  # bf16 may change greedy tokens: count failures only from here
        to_bf16 = Move(action="add", knob="precision",
                       deployment=StagePlacement(start=3, end=4, pool="gpu", precision="bf16", replicas=1),
                       replicas_to=1, reason="test: precision move under load")
        res = Mover(APP, RayOps(), ranges, deadline_s=120).apply(to_bf16)
        assert [s["setting"] for s in res.steps] == (["precision"] if serve_surges() else
                                                  ["num_replicas", "precision", "num_replicas"]), res.steps
        regs = _until(lambda: (r := [e for e in registry_endpoints() if e.stage == 3]) and len(r) == 1
                      and r[0].dtype == "bf16" and r, 30, "the bf16 replica registered")
        assert regs[0].pool == "gpu"
        time.sleep(2)
        assert load.ok > n_ok  # traffic kept flowing after the moves
        # stages 0-2 were never restarted: the same replicas serve them
        assert {e.replica for e in registry_endpoints() if e.stage != 3} == others
    finally:
        load.finish()
    assert load.failed == [], load.failed[:5]
    print(f"requests ok={load.ok} failed=0 across a pool and a precision move")
    apply_config(serve_cluster.config, wait_s=None)  # put the session's app back as it was
    wait_running(120, want={"Stage3": 1})


@pytest.mark.timeout(600)
def test_split_moves_live_under_load(serve_cluster):
    """``offramp placement apply --split`` on a 2-stage app under 3 greedy streams: the
    boundary 2 -> 1 (Stage1 gains a layer), then 1 -> 3 (Stage0 gains two). Each move rolls
    the gaining stage first, then the other (6 Serve steps with the scale-to-2 guard); the
    ingress routes by layer, entering the old replicas inside their range meanwhile. Zero
    failed requests, greedy outputs unchanged, the replicas that end up serving hold the
    new layers, and the app's args never change (no restart of the whole app)."""
    import copy

    from offramp.cluster import rayops
    from offramp.placement.mover import serve_surges

    cfg = copy.deepcopy(serve_cluster.config)
    app = cfg["applications"][0]
    app["args"].update(num_stages=2, stages=[{"pool": "gpu", "dtype": "fp32"}, {"pool": "cpu", "dtype": "fp32"}])
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("OfframpIngress", "Stage0", "Stage1")]
    for d, pool in zip(app["deployments"][1:], ("gpu", "cpu")):
        d.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5, "resources": {f"pool_{pool}": 1}})

    def layers():
        return sorted((e.stage, e.layers) for e in registry_endpoints() if e.stage < 2)

    apply_config(cfg, wait_s=None)
    try:
        wait_running(180, want={"Stage0": 1, "Stage1": 1})
        _until(lambda: layers() == [(0, (0, 2)), (1, (2, 4))], 60, "the 2-stage app registered", info=layers)
        # every replica warmed up and profiled its layers before registering (the cost model's seed)
        assert all({p["batch"] for p in e.profile} >= {1, 16} for e in registry_endpoints()), registry_endpoints()
        args_before = rayops.deployed_app_config(APP)["args"]
        load = Load(serve_cluster, max_s=400)
        least_running = {"Stage0": 1, "Stage1": 1}  # make before break: a stage is never without a replica
        samples = [0]  # Serve states actually read (the check above is empty without them)
        watching = threading.Event()

        def watch():
            while not watching.is_set():
                try:
                    states = rayops.deployment_states(APP)
                except Exception:  # noqa: BLE001 - the Serve controller busy: sample again
                    states = {}
                samples[0] += bool(states)
                for name, st in states.items():
                    if name in least_running:
                        least_running[name] = min(least_running[name], len(st["running"]))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        try:
            load.start()
            watcher.start()
            time.sleep(3)  # an ingress heartbeat with the load's counters
            replays0 = rayops.registry_ingress(APP).replays
            time.sleep(2)
            for split, want in (([1], [(0, (0, 1)), (1, (1, 4))]), ([3], [(0, (0, 3)), (1, (3, 4))])):
                n_ok = load.ok
                out = _cli(["placement", "apply", "--split", ",".join(map(str, split)), "--window", "1", "--json"])
                (rec,) = out["moves"]
                assert rec["result"].startswith("applied"), rec
                print(f"split -> {split}: {rec['result']}, steps {[(s['deployment'], s['value']) for s in rec['steps']]}")
                assert [s["setting"] for s in rec["steps"]].count("layers") == 2, rec["steps"]
                assert len(rec["steps"]) == (2 if serve_surges() else 6), rec["steps"]
                assert [p["layers"] for p in out["placement"]] == [[a, b - 1] for _, (a, b) in want]
                _until(lambda: layers() == want, 30, f"replicas holding {want}", info=layers)
                _until(lambda: load.ok > n_ok + 3, 60, "traffic flowing after the move")
                assert load.mismatch == [], load.mismatch[:3]
            assert rayops.deployed_app_config(APP)["args"] == args_before
            time.sleep(3)
            # sequences in flight finished on their old replicas while those drained: none replayed
            assert rayops.registry_ingress(APP).replays == replays0
            assert least_running == {"Stage0": 1, "Stage1": 1} and samples[0] > 50, (least_running, samples)
        finally:
            watching.set()
            load.finish()
        assert load.failed == [], load.failed[:5]
        assert load.mismatch == [], load.mismatch[:3]
        print(f"requests ok={load.ok} failed=0 across split moves 2->1->3")
    finally:
        apply_config(serve_cluster.config, wait_s=None)  # put the session's app back as it was
        wait_running(180, want={f"Stage{k}": 1 for k in range(4)})
