"""Placement controller and mover without Ray: a fake Serve + registry + KV (FakeOps)."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest

from offramp.cluster.records import IngressTotals, StageRecord, StageStats
from offramp.deployments.config import ServeApp
from offramp.placement.controller import (
    AppFacts, ControllerConfig, Observation, PlacementController, SignalCollector, StageLoad, workload_from,
)
from offramp.placement.cost_model import ModelShape, PoolSpec
from offramp.placement.mover import (
    MoveDeferred, MoveFailed, Mover, Step, plan_steps, stage_placement,
)
from offramp.placement.planner import Pin, StagePlacement
from offramp.placement.policy import Move, PolicyConfig

APP = "offramp"
RANGES = [(0, 1), (1, 2), (2, 3), (3, 4)]
MODEL = ModelShape(name="tiny4", num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=512)
FACTS = AppFacts(RANGES, MODEL, max_context=256)
POOLS = [PoolSpec(name="gpu", kind="gpu", count=8, memory_bytes=24e9, mem_bandwidth=600e9, flops=60e12,
                  fixed_overhead_s=0.003, cost_per_hour=2.0),
         PoolSpec(name="cpu", kind="cpu", count=8, memory_bytes=64e9, mem_bandwidth=40e9, flops=1e12,
                  fixed_overhead_s=0.001, cost_per_hour=0.25)]


def app_config(replicas=(1, 1, 1, 1), pools=("gpu", "gpu", "cpu", "cpu")):
    deps = [{"name": "OfframpIngress", "num_replicas": 1}]
    for k, (n, p) in enumerate(zip(replicas, pools)):
        deps.append({"name": f"Stage{k}", "num_replicas": n,
                     "ray_actor_options": {"num_cpus": 0.5, "resources": {f"pool_{p}": 1}}})
    return {"name": APP, "import_path": "offramp.deployments.app:build_app",
            "args": {"model": "/m", "num_stages": 4, "stages": [{"pool": p, "dtype": "fp32"} for p in pools]},
            "deployments": deps}



def _layers(app_config: dict, ranges) -> list[tuple[int, int]]:
    """Layers per stage as deployed (split moves' overrides over the app's split)."""
    return [st.layers for st in ServeApp(app_config, ranges).stages()]


it = IngressTotals.from_dict  # an ingress's stats as the controller reads them


def ep(stage: int, replica: str, stats: dict) -> StageRecord:
    """A registry entry as the controller reads it (stats as a heartbeat sends them)."""
    return StageRecord(stage, replica, stats=StageStats.from_dict(stats))

class FakeOps:
    """Serve applies a config after ``start_s`` of fake time; a replica registers at once and
    reports the busy fraction the test sets for its stage."""

    def __init__(self, config, start_s=2.0):
        self.config = copy.deepcopy(config)
        self.kv: dict[str, bytes] = {}
        self.t = 1000.0
        self.start_s = start_s
        self.applied: list[dict] = []
        self.busy = {k: 0.1 for k in range(4)}  # busy fraction per replica, by stage
        self.rows_per_s = 20.0
        self.calls = [0, 0, 0, 0]
        self.exit_frac = [1.0, 1.0, 1.0, 1.0]  # fraction of tokens reaching each stage
        self.fail_deployment: str | None = None  # its new replicas never become healthy
        self._replicas: dict[str, list[dict]] = {}  # deployment -> [{"id", "ready_at", "pool", "stats"}]
        self._seq = 0
        self._sync(ready_at=0.0)

    # Serve --------------------------------------------------------------------------
    def _sync(self, ready_at):
        for k in range(4):
            name = f"Stage{k}"
            e, st = ServeApp(self.config).entry(name), ServeApp(self.config).stage(k)
            env = ((e.get("ray_actor_options") or {}).get("runtime_env") or {}).get("env_vars") or {}
            want = e.get("num_replicas", 1)  # what replaces replicas: any change of their actor options
            pool = (st.pool if st.pool_pinned else "any", env.get("OFFRAMP_STAGE_DTYPE") or "fp32",
                    env.get("OFFRAMP_STAGE_LAYERS"))
            reps = self._replicas.setdefault(name, [])
            keep = [r for r in reps if r["pool"] == pool][:want]  # actor option change: all replaced
            while len(keep) < want:
                self._seq += 1
                ready = math.inf if name == self.fail_deployment else ready_at
                keep.append({"id": f"r{self._seq}", "ready_at": ready, "pool": pool,
                             "stats": {"batches": 0, "rows": 0, "busy_s": 0.0, "queue": 0, "kv_occupancy": 0.1,
                                       "sequences": 2}})
            self._replicas[name] = keep

    def deployed_app_config(self, app):
        return copy.deepcopy(self.config)

    def deploy_app_config(self, app, config):
        self.applied.append(copy.deepcopy(config))
        self.config = copy.deepcopy(config)
        self._sync(ready_at=self.t + self.start_s)

    def _ready(self, name):
        return [r for r in self._replicas[name] if r["ready_at"] <= self.t]

    def deployment_states(self, app):
        out = {}
        for name, reps in self._replicas.items():
            ready = self._ready(name)
            out[name] = {"status": "HEALTHY" if len(ready) == len(reps) else "UPDATING", "target": len(reps),
                         "running": [r["id"] for r in ready],
                         "replicas": {"RUNNING": len(ready), "STARTING": len(reps) - len(ready)}}
        return out

    def registry_endpoints(self, app):
        return [ep(int(name[5:]), r["id"], r["stats"]) for name in self._replicas for r in self._ready(name)]

    def ingress_stats(self, app):
        return IngressTotals(stage_calls=list(self.calls), tpot_ms_p99=20.0)

    def pool_capacity(self):
        return {"gpu": 8, "cpu": 8}

    # KV / time -----------------------------------------------------------------------
    def kv_get(self, key):
        return self.kv.get(key)

    def kv_put(self, key, value):
        self.kv[key] = value

    def kv_del(self, key):
        self.kv.pop(key, None)

    def clock(self):
        return self.t

    def sleep(self, s):
        self.advance(s)

    def advance(self, s):
        """Time passes under load: counters grow."""
        self.t += s
        for k in range(4):
            arrivals = self.rows_per_s * self.exit_frac[k] * s
            self.calls[k] += int(round(arrivals))
            reps = self._ready(f"Stage{k}")
            for r in reps:
                st = r["stats"]
                st["batches"] += 10 * s
                st["rows"] += arrivals / len(reps)
                st["busy_s"] += self.busy[k] * s


@pytest.fixture(params=[True, False], ids=["surge", "scale-to-2"])
def surge(request, monkeypatch):
    """Both make-before-break guards: Serve's max_surge_percent (one step) and, for Serve
    without it, scaling to 2 replicas around the change."""
    import offramp.placement.mover as mover_mod

    monkeypatch.setattr(mover_mod, "serve_surges", lambda: request.param)
    return request.param


def guarded(name, knob, value, surge, n=1):
    """The steps the mover makes to change ``knob`` of a deployment of ``n`` replicas."""
    if surge:
        return [(name, knob, value)]
    return ([(name, "num_replicas", 2)] if n < 2 else []) + [(name, knob, value)] + (
        [(name, "num_replicas", n)] if n < 2 else [])


def controller(ops, **kw):
    pol = kw.pop("policy", {})
    cfg = ControllerConfig(app=APP, interval_s=5, pools=POOLS, target_utilisation=0.5,
                           policy=PolicyConfig(sustain_intervals=2, cooldown_s=60, **pol), **kw)
    return PlacementController(cfg, ops, FACTS)


def run(ctl, ops, intervals, dt=5.0):
    out = []
    for _ in range(intervals):
        ops.advance(dt)
        out.append(ctl.tick())
    return out


def replicas(ops):
    return [ServeApp(ops.config).entry(f"Stage{k}")["num_replicas"] for k in range(4)]


# -- signals -> workload ------------------------------------------------------------------
def test_signals_rates_and_reach_from_exits():
    col = SignalCollector(RANGES)
    eps = lambda busy: [ep(k, f"r{k}", {"batches": 10 * b, "rows": 40 * b,
                                                                    "busy_s": b, "queue": k, "kv_occupancy": 0.2,
                                                                    "sequences": 3})
                        for k, b in enumerate(busy)]
    assert col.sample(0.0, eps([0, 0, 0, 0]), it({"stage_calls": [0, 0, 0, 0]})) is None
    obs = col.sample(10.0, eps([5, 4, 2, 1]), it({"stage_calls": [1000, 500, 250, 250], "tpot_ms_p99": 12.0}))
    assert obs.source == "ingress" and obs.window_s == 10.0
    assert [s.arrival_per_s for s in obs.stages] == [100, 50, 25, 25]
    assert [s.busy["r%d" % k] for k, s in enumerate(obs.stages)] == [0.5, 0.4, 0.2, 0.1]
    assert obs.stages[0].step_s == pytest.approx(0.1) and obs.stages[0].batch == pytest.approx(4.0)
    assert obs.stages[3].queue == 3 and obs.tpot_ms_p99 == 12.0
    w = workload_from(obs, FACTS, 512)
    assert w.decode_tokens_per_s == 100
    assert w.reach == pytest.approx([1.0, 0.5, 0.25, 0.25])
    assert w.context_len == 256 and w.concurrent_sequences == 3


def test_speculative_traffic_counts_drafting_passes_and_deep_visits():
    """An ingress that reports stage_passes (speculative rows: 4 passes of stage 0 per deep
    visit): stage 0's arrival is its passes, the deep stages' their visits, so their reach
    is deep visits per stage-0 pass."""
    col = SignalCollector(RANGES)
    eps = [ep(k, f"r{k}", {}) for k in range(4)]
    col.sample(0.0, eps, it({"stage_calls": [0] * 4, "stage_passes": [0] * 4}))
    obs = col.sample(10.0, eps, it({"stage_calls": [250] * 4, "stage_passes": [1000, 250, 250, 250]}))
    assert [s.arrival_per_s for s in obs.stages] == [100, 25, 25, 25]
    assert workload_from(obs, FACTS, 512).reach == pytest.approx([1.0, 0.25, 0.25, 0.25])


def test_signals_split_prefill_and_decode_and_carry_gauges():
    col = SignalCollector(RANGES)

    def eps(t):  # per 10 s: 8 decode batches of 0.05 s, 2 prefill batches of 0.3 s over 40 positions
        return [ep(k, f"r{k}", {
            "batches": 10 * t, "rows": 16 * t, "busy_s": 1.0 * t, "decode_batches": 8 * t, "decode_s": 0.4 * t,
            "prefill_batches": 2 * t, "prefill_s": 0.6 * t, "prefill_positions": 40 * t,
            "max_wait_s": 0.25, "memory_headroom_bytes": 2 ** 30}) for k in range(4)]

    col.sample(0.0, eps(0), it({"stage_calls": [0] * 4, "hop_s_sum": [0.0] * 4, "hop_n": [0] * 4}))
    obs = col.sample(10.0, eps(1), it({"stage_calls": [100] * 4, "hop_s_sum": [0.1, 0.2, 0.0, 0.4],
                                    "hop_n": [100, 100, 0, 100]}))
    assert [obs.signals[r][0].hop_s for r in (RANGES[0], RANGES[1], RANGES[3])] == pytest.approx([0.001, 0.002, 0.004])
    assert math.isnan(obs.signals[RANGES[2]][0].hop_s)  # no calls into stage 2 this window
    (sig,) = obs.signals[RANGES[0]]
    assert sig.decode_step_s == pytest.approx(0.05) and sig.prefill_step_s == pytest.approx(0.3)
    assert sig.prefill_tokens_per_s == pytest.approx(4.0)
    assert sig.oldest_wait_s == 0.25 and sig.memory_headroom_bytes == 2 ** 30


def test_signals_fall_back_to_stage_rows_when_ingress_counters_reset():
    col = SignalCollector(RANGES)
    eps = lambda rows: [ep(k, f"r{k}", {"batches": rows, "rows": rows, "busy_s": 0.0})
                        for k in range(4)]
    col.sample(0.0, eps(0), it({"stage_calls": [900, 900, 900, 900]}))
    obs = col.sample(2.0, eps(40), it({"stage_calls": [10, 10, 10, 10]}))  # another ingress replica answered
    assert obs.source == "stages" and [s.arrival_per_s for s in obs.stages] == [20] * 4


def test_new_replica_has_no_rate_yet():
    col = SignalCollector(RANGES[:1])
    col.sample(0.0, [ep(0, "a", {"busy_s": 0.0, "batches": 0, "rows": 0})], None)
    obs = col.sample(1.0, [ep(0, "a", {"busy_s": 0.9, "batches": 9, "rows": 9}),
                           ep(0, "b", {"busy_s": 5.0, "batches": 9, "rows": 9})], None)
    assert obs.stages[0].busy == {"a": pytest.approx(0.9), "b": 0.0} and obs.stages[0].replicas == 2


# -- pure config editing -------------------------------------------------------------------
def test_placement_from_config_and_steps(surge):
    cfg = app_config(replicas=(1, 2, 1, 1))
    cur = stage_placement(cfg, RANGES)
    assert [(d.pool, d.replicas) for d in cur] == [("gpu", 1), ("gpu", 2), ("cpu", 1), ("cpu", 1)]
    up = Move(action="set_replicas", knob="replicas", deployment=cur[2].model_copy(update={"replicas": 2}),
              replicas_from=1, replicas_to=2)
    (s,) = plan_steps(cfg, RANGES, up)
    new = s.apply_to(cfg)
    assert ServeApp(new).entry("Stage2")["num_replicas"] == 2 and ServeApp(cfg).entry("Stage2")["num_replicas"] == 1
    assert new["args"] == cfg["args"]  # args never change: Serve restarts nothing else
    with pytest.raises(MoveDeferred, match="never scales a stage below 1"):
        Step("Stage2", 2, "num_replicas", 0).apply_to(cfg)
    pool = Move(action="add", knob="pool", deployment=StagePlacement(start=2, end=3, pool="gpu", replicas=1),
                replicas_to=1)
    steps = plan_steps(cfg, RANGES, pool)  # make before break: surge, or 2 on the old pool, switch, back to 1
    assert [(s.deployment, s.setting, s.value) for s in steps] == guarded("Stage2", "pool", "gpu", surge)
    moved = cfg
    for s in steps:
        moved = s.apply_to(moved)
    e = ServeApp(moved).entry("Stage2")
    assert e["ray_actor_options"]["resources"] == {"pool_gpu": 1} and e["ray_actor_options"]["num_cpus"] == 0.5
    assert e.get("max_surge_percent") == (100 if surge else None)
    remove_old = Move(action="remove", knob="pool", deployment=cur[2], replicas_from=1)
    assert plan_steps(moved, RANGES, remove_old) == []
    split = Move(action="add", knob="split", deployment=StagePlacement(start=0, end=2, pool="gpu"), replicas_to=1)
    with pytest.raises(MoveDeferred, match="split"):
        plan_steps(cfg, RANGES, split)
    auto = copy.deepcopy(cfg)
    ServeApp(auto).entry("Stage2")["autoscaling_config"] = {"min_replicas": 1}
    with pytest.raises(MoveDeferred, match="autoscaled"):
        plan_steps(auto, RANGES, up)


def test_the_serve_app_view_reads_each_setting_where_it_lives_and_never_mutates():
    """``ServeApp``: a stage's pool is its pool resource, else the app's stages[k].pool; its
    precision and layers are the move's env overrides, else stages[k].dtype and the split;
    "auto" replicas or an autoscaling_config mark it autoscaled; an edit is a new view."""
    cfg = app_config(pools=("gpu", "gpu", "cpu", "cpu"))
    cfg["deployments"][1].pop("ray_actor_options")  # Stage0: no pool resource of its own
    cfg["args"]["stages"][0]["dtype"] = "bf16"
    frozen = copy.deepcopy(cfg)
    app = ServeApp(cfg, RANGES)
    s0 = app.stage(0)
    assert (s0.name, s0.pool, s0.pool_pinned, s0.precision, s0.layers, s0.replicas) == \
        ("Stage0", "gpu", False, "bf16", (0, 1), 1)
    edited = app.with_setting("Stage0", "pool", "cpu").with_setting("Stage0", "precision", "int8") \
        .with_setting("Stage1", "layers", "1:3", surge=True).with_setting("Stage3", "num_replicas", 3)
    assert cfg == frozen, "the view never changes the dict it was built from"
    s0, s1, s3 = edited.stage(0), edited.stage(1), edited.stage(3)
    assert (s0.pool, s0.pool_pinned, s0.precision) == ("cpu", True, "int8")
    assert s1.layers == (1, 3) and edited.entry("Stage1")["max_surge_percent"] == 100
    assert s3.replicas == 3 and not s3.autoscaled
    assert [st.layers for st in edited.stages()] == [(0, 1), (1, 3), (2, 3), (3, 4)]
    auto = edited.with_entry({**edited.entry("Stage3"), "num_replicas": "auto"})
    assert auto.stage(3).autoscaled and auto.stage(3).replicas == -1
    assert ServeApp(None).stage(2).pool == "any" and ServeApp({}).entry("Stage9") == {"name": "Stage9"}
    with pytest.raises(ValueError, match="num_replicas, pool, precision, layers"):
        app.with_setting("Stage0", "knob", 1)


# -- controller decision sequences ----------------------------------------------------------
def test_sustained_saturation_adds_a_replica_then_cools_down():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"max_busy_fraction": 0.6})
    run(ctl, ops, 3)  # light load: holds
    assert replicas(ops) == [1, 1, 1, 1] and not ops.applied
    ops.busy[2] = 0.95  # load shift: stage 2 saturates
    recs = run(ctl, ops, 1)[0]
    assert all(r["outcome"] == "hold" for r in recs) and "held" in recs[0]["reason"]  # 1 of 2 intervals
    recs = run(ctl, ops, 1)[0]
    (applied,) = [r for r in recs if r["outcome"] == "apply"]
    assert applied["move"]["deployment"]["start"] == 2 and applied["move"]["replicas_to"] == 2
    assert "busy" in applied["reason"] and applied["result"].startswith("applied")
    assert replicas(ops) == [1, 1, 2, 1] and len(ops.applied) == 1
    assert ops.kv.get("intent/offramp") is None  # intent cleared once healthy
    # still saturated right after (each replica 0.95): the layers are cooling down
    recs = run(ctl, ops, 2)[-1]
    assert replicas(ops) == [1, 1, 2, 1] and any("cooling down" in r["reason"] for r in recs)
    ops.busy[2] = 0.3
    run(ctl, ops, 14)  # after cool-down the plan needs 2 x 0.3 / 0.5 -> 2: stays
    assert replicas(ops) == [1, 1, 2, 1]
    assert ctl.moves_made == 1 and all(isinstance(r, dict) for r in ctl.status()["decisions"])
    json.dumps(ctl.status())  # the CLI prints it


def test_dry_run_logs_but_changes_nothing():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"max_busy_fraction": 0.6, "dry_run": True})
    ops.busy[1] = 0.95
    recs = [r for rs in run(ctl, ops, 5) for r in rs]
    assert any(r["outcome"] == "dry_run" and r["move"]["deployment"]["start"] == 1 for r in recs)
    assert not ops.applied and replicas(ops) == [1, 1, 1, 1] and not ops.kv.get("intent/offramp")


def test_pins_hold_replicas():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"max_busy_fraction": 0.6}, pins=[{"stage": 2, "replicas": 1}])
    ops.busy[2] = 0.95
    run(ctl, ops, 4)
    assert replicas(ops) == [1, 1, 1, 1]


def test_pins_from_the_controller_config():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"min_gain": 0.0}, pins=[Pin(stage=0, replicas=3)])
    run(ctl, ops, 2)
    assert replicas(ops)[0] == 3


def _failing_stage3_move(ops):
    """A controller whose first move (a Stage3 replica) never becomes healthy; returns it
    and the move's failed decision."""
    ctl = controller(ops, policy={"max_busy_fraction": 0.6}, move_deadline_s=10)
    ops.busy[3] = 0.95
    ops.fail_deployment = "Stage3"
    recs = [r for rs in run(ctl, ops, 3) for r in rs]
    (failed,) = [r for r in recs if r["outcome"] == "failed"]
    return ctl, failed


def test_failed_move_rolls_back():
    ops = FakeOps(app_config())
    _, failed = _failing_stage3_move(ops)
    assert "restored" in failed["result"]
    assert replicas(ops) == [1, 1, 1, 1] and ops.kv.get("intent/offramp") is None


def test_a_failed_restore_keeps_the_intent_until_a_reconcile_restores_it():
    class RefusingOps(FakeOps):
        refuse = False  # Serve refuses every apply (a controller outage during the rollback)

        def deploy_app_config(self, app, config):
            if self.refuse:
                raise RuntimeError("the Serve controller is unreachable")
            super().deploy_app_config(app, config)
            self.refuse = self.refuse_after_first

    ops = RefusingOps(app_config())
    ops.refuse_after_first = True
    ctl, failed = _failing_stage3_move(ops)
    assert "intent is kept" in failed["result"]
    kept = json.loads(ops.kv["intent/offramp"])  # the move and the config to restore survive
    assert ServeApp(kept["before"]).entry("Stage3")["num_replicas"] == 1
    assert replicas(ops)[3] == 2  # the half-applied move is still live
    with pytest.raises(MoveDeferred):  # no new move on top of it
        ctl.mover.apply(Move.model_validate(kept["move"]))
    held = ctl.tick()  # the controller retries the restore first; Serve still refuses
    assert held[0]["outcome"] == "hold" and "could not be restored" in held[0]["reason"]
    assert "intent/offramp" in ops.kv
    ops.refuse_after_first = ops.refuse = False  # Serve is back
    ops.fail_deployment = None
    ops.advance(5.0)
    ctl.tick()
    assert "intent/offramp" not in ops.kv and replicas(ops) == [1, 1, 1, 1]


def test_redeploy_keeps_what_the_operator_set():
    """A placement move re-applies the whole declarative config: proxy location, HTTP and
    gRPC options, target capacity and tracing stay as they are live."""
    from offramp.cluster.rayops import redeploy_schema

    details = {"proxy_location": "EveryNode",
               "http_options": {"host": "0.0.0.0", "port": 8000, "root_path": "", "request_timeout_s": 30.0,
                                "keep_alive_timeout_s": 90},
               "grpc_options": {"port": 9000, "grpc_servicer_functions": [
                   "offramp.api.proto.offramp_pb2_grpc.add_OfframpServicer_to_server"]},
               "target_capacity": 50.0, "applications": {}}
    app = {"name": APP, "import_path": "offramp.deployments.app:build_app", "route_prefix": "/"}
    schema = redeploy_schema(details, [app], {"exporter_import_path": "offramp.observability.tracing:exporter",
                                              "sampling_ratio": 1.0})
    out = schema.model_dump(mode="json", exclude_unset=True)
    assert out["proxy_location"] == "EveryNode" and out["target_capacity"] == 50.0
    assert out["http_options"] == {k: v for k, v in details["http_options"].items()}
    assert out["grpc_options"] == details["grpc_options"]
    assert out["tracing_config"]["sampling_ratio"] == 1.0
    assert [a["name"] for a in out["applications"]] == [APP]


RANGES8 = [(0, 2), (2, 4), (4, 6), (6, 8)]  # the mover needs only the ranges, not the model


def split_move(split):
    return Move(action="add", knob="split", deployment=StagePlacement(start=0, end=split[0], pool="gpu"),
                split=split, replicas_to=1)


@pytest.mark.parametrize("target,grow,shrink", [
    ([2, 5, 6], ("Stage1", "2:5"), ("Stage2", "5:6")),  # boundary 4 -> 5: Stage1 gains layer 4
    ([2, 3, 6], ("Stage2", "3:6"), ("Stage1", "2:3")),  # boundary 4 -> 3: Stage2 gains layer 3
])
def test_split_move_grows_one_side_then_shrinks_the_other(target, grow, shrink, surge):
    ops = FakeOps(app_config())
    before = copy.deepcopy(ops.config)
    steps = plan_steps(ops.config, RANGES8, split_move(target))
    expect = guarded(grow[0], "layers", grow[1], surge) + guarded(shrink[0], "layers", shrink[1], surge)
    assert [(s.deployment, s.setting, s.value) for s in steps] == expect
    res = Mover(APP, ops, RANGES8, deadline_s=30).apply(split_move(target))
    assert res.outcome == "applied" and len(res.steps) == len(expect)
    assert _layers(ops.config, RANGES8) == [(0, 2), (2, target[1]), (target[1], 6), (6, 8)]
    assert [(d.start, d.end) for d in stage_placement(ops.config, RANGES8)] == _layers(ops.config, RANGES8)
    assert ops.config["args"] == before["args"]  # no other deployment restarts
    for k in (0, 3):
        assert ServeApp(ops.config).entry(f"Stage{k}") == ServeApp(before).entry(f"Stage{k}")
    assert replicas(ops) == [1, 1, 1, 1] and ops.kv.get("intent/offramp") is None
    # the old range's "remove" is a no-op now; moving to where it is does nothing
    old = StagePlacement(start=2, end=4, pool="gpu")
    assert plan_steps(ops.config, RANGES8, Move(action="remove", knob="split", deployment=old)) == []
    assert plan_steps(ops.config, RANGES8, split_move(target)) == []


def test_split_move_reaches_any_target_one_boundary_at_a_time(surge):
    ops = FakeOps(app_config(replicas=(2, 2, 2, 2)))
    mover = Mover(APP, ops, RANGES8, deadline_s=30)
    seen = []
    for _ in range(5):
        res = mover.apply(split_move([3, 6, 7]))  # boundaries 2->3 and 6->7 first, then 4->6
        if res.outcome == "noop":
            break
        assert len(res.steps) == 2  # 2 replicas already: no scale-up guard either way
        seen.append(_layers(ops.config, RANGES8))
    assert seen[-1] == [(0, 3), (3, 6), (6, 7), (7, 8)] and len(seen) == 3
    for bad, msg in [([3, 3, 7], "increasing"), ([3, 6], "keeps the number of stages"), ([3, 6, 8], "1..7")]:
        with pytest.raises(MoveDeferred, match=msg):
            mover.apply(split_move(bad))


def test_recover_rolls_back_half_applied_split_move_in_reverse_order(surge):
    ops = FakeOps(app_config())
    before = copy.deepcopy(ops.config)
    # Stage1 grown, then the crash: with surge (2 steps) just before Stage2's step is applied;
    # with the scale-to-2 guard (6 steps) just after Stage2's layers are applied
    real = crashing_apply(ops, (2, "before") if surge else (5, "after"))
    with pytest.raises(Crash):
        Mover(APP, ops, RANGES8).apply(split_move([2, 5, 6]))
    assert _layers(ops.config, RANGES8) == [(0, 2), (2, 5), (4 if surge else 5, 6), (6, 8)]
    ops.deploy_app_config = real
    n = len(ops.applied)
    report = Mover(APP, ops, RANGES8).reconcile()
    assert report["outcome"].startswith("rolled back")
    # Stage2 (the shrunk side) is restored before Stage1: every step keeps both chains whole
    configs = ops.applied[n - 1:]
    changed = [[f"Stage{k}" for k in range(4) if ServeApp(a).entry(f"Stage{k}") != ServeApp(b).entry(f"Stage{k}")]
               for a, b in zip(configs, configs[1:])]
    assert changed == ([["Stage1"]] if surge else [["Stage2"], ["Stage1"]])
    for k in range(4):
        assert ServeApp(ops.config).entry(f"Stage{k}") == ServeApp(before).entry(f"Stage{k}")


@pytest.fixture
def planned(monkeypatch):
    """The Constraints of every plan() the controller asks for, in order."""
    import offramp.placement.controller as controller_mod

    seen = []
    real = controller_mod.plan

    def spy(model, pools, w, c, costs):
        seen.append(c)
        return real(model, pools, w, c, costs)

    monkeypatch.setattr(controller_mod, "plan", spy)
    return seen


def test_controller_plans_split_points_only_when_allowed(planned):
    for knob, expect in [("precision", [1, 2, 3]), ("split", None)]:
        ops = FakeOps(app_config())
        run(controller(ops, max_knob=knob), ops, 2)
        assert planned[-1].split == expect


# -- crash safety ---------------------------------------------------------------------------
class Crash(BaseException):
    pass


def crashing_apply(ops, on_call):
    """Make the ``on_call``-th deploy_app_config crash the controller before/after applying."""
    real, n = ops.deploy_app_config, [0]

    def deploy(app, cfg, when=on_call):
        n[0] += 1
        if n[0] == when[0]:
            if when[1] == "after":
                real(app, cfg)
            raise Crash()
        real(app, cfg)

    ops.deploy_app_config = deploy
    return real


def move_stage(k, to, pool="gpu"):
    return Move(action="set_replicas", knob="replicas",
                deployment=StagePlacement(start=k, end=k + 1, pool=pool, replicas=to), replicas_from=1, replicas_to=to)


@pytest.mark.parametrize("when,expect,reps", [
    ((1, "after"), "completed", [1, 2, 1, 1]),  # applied, then the controller died: finish, don't re-apply
    ((1, "before"), "dropped", [1, 1, 1, 1]),  # intent written, never applied: drop it
])
def test_recover_from_persisted_intent(when, expect, reps):
    ops = FakeOps(app_config())
    real = crashing_apply(ops, when)
    with pytest.raises(Crash):
        Mover(APP, ops, RANGES).apply(move_stage(1, 2))
    assert json.loads(ops.kv["intent/offramp"])["move"]["replicas_to"] == 2
    ops.deploy_app_config = real
    applied_before = len(ops.applied)
    ctl = controller(ops)  # the restarted controller
    report = ctl.recover()
    assert report["outcome"].startswith(expect) and ops.kv.get("intent/offramp") is None
    assert replicas(ops) == reps and len(ops.applied) == applied_before  # nothing applied twice
    assert any(r.get("event") == "reconcile" for r in ctl.decisions)
    assert ctl.moves_made == (expect == "completed")
    assert ctl.recover() is None


def test_recover_rolls_back_half_applied_pool_move(monkeypatch):
    import offramp.placement.mover as mover_mod

    monkeypatch.setattr(mover_mod, "serve_surges", lambda: False)  # the 3-step guard (a 1-step move just completes)
    ops = FakeOps(app_config())
    real = crashing_apply(ops, (2, "after"))  # step 1 (2 replicas) done, step 2 (pool switch) applied, then crash
    pool_move = Move(action="add", knob="pool", deployment=StagePlacement(start=3, end=4, pool="gpu", replicas=1),
                     replicas_to=1)
    with pytest.raises(Crash):
        Mover(APP, ops, RANGES).apply(pool_move)
    assert ServeApp(ops.config).stage(3).pool == "gpu"
    ops.deploy_app_config = real
    report = controller(ops).recover()
    assert report["outcome"].startswith("rolled back")
    e = ServeApp(ops.config).entry("Stage3")
    assert ServeApp(ops.config).stage(3).pool == "cpu" and e["num_replicas"] == 1


def test_cooldown_survives_restart():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"max_busy_fraction": 0.6})
    ops.busy[2] = 0.95
    run(ctl, ops, 3)
    assert replicas(ops) == [1, 1, 2, 1]
    ops.busy[2] = 2.0  # still saturated at 2 replicas: wants 3
    ctl2 = controller(ops, policy={"max_busy_fraction": 0.6})  # restarted controller
    recs = [r for rs in run(ctl2, ops, 4) for r in rs]
    assert replicas(ops) == [1, 1, 2, 1] and any("cooling down" in r["reason"] for r in recs)
    assert ctl2.moves_made == 1  # restored from the persisted state


def test_workload_without_traffic_is_valid():
    obs = Observation(0.0, 5.0, [StageLoad(k, r, 1, 0.0, {}, math.nan, math.nan, 0, 0.0, 0)
                                 for k, r in enumerate(RANGES)], "stages")
    w = workload_from(obs, FACTS, 512)
    assert w.decode_tokens_per_s == 0 and w.reach is None


def test_controller_crash_mid_tick_keeps_decision_and_cooldown():
    ops = FakeOps(app_config())
    ctl = controller(ops, policy={"max_busy_fraction": 0.6})
    ops.busy[2] = 0.95
    real = crashing_apply(ops, (1, "after"))
    with pytest.raises(Crash):
        run(ctl, ops, 3)
    ops.deploy_app_config = real
    ctl2 = controller(ops, policy={"max_busy_fraction": 0.6})
    assert ctl2.recover()["outcome"] == "completed" and ctl2.moves_made == 1
    (rec,) = [d for d in ctl2.decisions if d["outcome"] == "apply"]
    assert rec["result"] == "in progress" and rec["move"]["deployment"]["start"] == 2
    ops.busy[2] = 2.0  # wants a third replica, but the layer is cooling down since the crashed move
    run(ctl2, ops, 4)
    assert replicas(ops) == [1, 1, 2, 1] and len(ops.applied) == 1


def test_registry_combines_every_ingress_replica(monkeypatch):
    from offramp.cluster import registry

    clock = [1000.0]
    monkeypatch.setattr(registry.time, "time", lambda: clock[0])
    reg = registry.RegistryCore()
    assert reg.ingress_totals() is None
    reg.ingress_heartbeat("a", {"stage_calls": [10, 6, 2], "tokens": 8, "tpot_ms_p99": 40.0, "ttft_ms_p99": None})
    reg.ingress_heartbeat("b", {"stage_calls": [5, 5, 5], "tokens": 3, "tpot_ms_p99": 90.0, "ttft_ms_p99": 120.0})
    tot = reg.ingress_totals()
    assert tot.stage_calls == [15, 11, 7] and tot.tokens == 11 and tot.replicas == 2
    assert tot.tpot_ms_p99 == 90.0 and tot.ttft_ms_p99 == 120.0  # the worst replica's
    clock[0] += registry.STALE_S + 1  # "b" stops beating, "a" goes on
    reg.ingress_heartbeat("a", {"stage_calls": [12, 7, 2], "tokens": 9, "tpot_ms_p99": 41.0})
    assert reg.ingress_totals().stage_calls == [12, 7, 2]
    reg.deregister("a")
    assert reg.ingress_totals() is None
    # speculative load: passes (stage 0's drafting passes) are summed when every replica has them
    reg.ingress_heartbeat("a", {"stage_calls": [4, 4], "stage_passes": [10, 4], "tokens": 9})
    reg.ingress_heartbeat("b", {"stage_calls": [2, 2], "stage_passes": [5, 2], "tokens": 4})
    assert reg.ingress_totals().stage_passes == [15, 6]
    reg.ingress_heartbeat("c", {"stage_calls": [1, 1], "tokens": 1})  # an older ingress: no passes
    assert reg.ingress_totals().stage_passes is None and reg.ingress_totals().stage_calls == [7, 7]


def test_precision_move_is_make_before_break_and_touches_one_deployment(surge):
    ops = FakeOps(app_config())
    before = copy.deepcopy(ops.config)
    move = Move(action="add", knob="precision",
                deployment=StagePlacement(start=3, end=4, pool="cpu", precision="bf16", replicas=1), replicas_to=1)
    steps = plan_steps(ops.config, RANGES, move)
    expect = guarded("Stage3", "precision", "bf16", surge)
    assert [(s.deployment, s.setting, s.value) for s in steps] == expect
    res = Mover(APP, ops, RANGES, deadline_s=30, poll_s=0.5).apply(move)
    assert res.outcome == "applied" and len(res.steps) == len(expect)
    e = ServeApp(ops.config).entry("Stage3")
    assert e["ray_actor_options"]["runtime_env"]["env_vars"] == {"OFFRAMP_STAGE_DTYPE": "bf16"}
    assert e["ray_actor_options"]["resources"] == {"pool_cpu": 1} and e["num_replicas"] == 1
    assert ops.config["args"] == before["args"]  # args unchanged: no other stage restarts
    for k in range(3):
        assert ServeApp(ops.config).entry(f"Stage{k}") == ServeApp(before).entry(f"Stage{k}")
    assert stage_placement(ops.config, RANGES)[3].precision == "bf16"
    # the old precision's "remove" is a no-op now; a move to where it already is is refused
    # with the reason; int8 weight-only is one more precision a stage loads
    old = StagePlacement(start=3, end=4, pool="cpu", precision="fp32", replicas=1)
    assert plan_steps(ops.config, RANGES, Move(action="remove", knob="precision", deployment=old)) == []
    with pytest.raises(MoveDeferred, match="already runs"):
        plan_steps(ops.config, RANGES, move)
    int8 = move.model_copy(update={"deployment": old.model_copy(update={"precision": "int8"})})
    assert [(s.setting, s.value) for s in plan_steps(ops.config, RANGES, int8)] == \
        [(k, v) for _, k, v in guarded("Stage3", "precision", "int8", surge)]


def test_controller_applies_a_split_move_when_allowed():
    """8 layers in 4 stages, stages 2-3 saturated on the CPU pool: with ``max_knob: split``
    the controller also shifts a boundary (one per move, through the mover); the deployed
    ranges stay contiguous over all 8 layers and every decision carries its reason."""
    m8 = ModelShape(name="t8", num_layers=8, hidden=1024, intermediate=4096, heads=16, kv_heads=16, vocab=32000)
    ops = FakeOps(app_config())
    ops.busy = {0: 0.3, 1: 0.3, 2: 0.95, 3: 0.95}
    cfg = ControllerConfig(app=APP, interval_s=5, pools=POOLS, target_utilisation=0.5, max_knob="split",
                           policy=PolicyConfig(sustain_intervals=2, cooldown_s=60))
    ctl = PlacementController(cfg, ops, AppFacts(RANGES8, m8, max_context=256))
    recs = [r for rs in run(ctl, ops, 6) for r in rs]
    splits = [r for r in recs if r["outcome"] == "apply" and r["move"]["knob"] == "split"]
    assert splits and all(r["result"].startswith("applied") and r["reason"] for r in splits)
    ranges = _layers(ops.config, RANGES8)
    assert ranges != RANGES8 and ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [(d.start, d.end) for d in ctl.current()] == ranges


def test_pool_speed_is_fitted_from_startup_profiles():
    """Replicas publish start-up profiles (bare-layer decode steps); the controller fits the
    pool's overhead / bandwidth / FLOP rate to them and plans with the fitted pool."""
    from offramp.placement.cost_model import CostModel, ProfileSample

    true_cpu = POOLS[1].model_copy(update={"fixed_overhead_s": 0.004, "mem_bandwidth": 8e9, "flops": 1e10})
    cm = CostModel(MODEL)

    def sample(batch, layers):  # what a replica on the true device would measure
        from offramp.placement.cost_model import _sample_work

        nbytes, flops = _sample_work(MODEL, ProfileSample(batch=batch, layers=layers, seconds=1, context=64), "fp32")
        t = true_cpu.fixed_overhead_s + max(nbytes / true_cpu.mem_bandwidth, flops / true_cpu.flops)
        return {"batch": batch, "layers": layers, "seconds": t, "context": 64}

    ops = FakeOps(app_config())
    real = ops.registry_endpoints

    def with_profiles(app):
        out = []
        for e in real(app):
            pool = "cpu" if e.stage >= 2 else "gpu"
            prof = [sample(b, n) for b in (1, 4, 16, 64, 256) for n in (1, 2)] if pool == "cpu" else []
            out.append(replace(e, pool=pool, dtype="fp32", profile=tuple(prof)))
        return out

    ops.registry_endpoints = with_profiles
    ctl = controller(ops)
    run(ctl, ops, 2)
    cpu = {p.name: p for p in ctl.pools(ctl.current())}["cpu"]
    assert cpu.fixed_overhead_s == pytest.approx(0.004, rel=0.05)
    assert cpu.mem_bandwidth == pytest.approx(8e9, rel=0.05) and cpu.flops == pytest.approx(1e10, rel=0.05)
    gpu = {p.name: p for p in ctl.pools(ctl.current())}["gpu"]
    assert gpu == POOLS[0]  # no profile: the configured figures
    assert set(ctl.status()["pool_fits"]) == {"cpu"}
    for batch, layers in ((8, 3), (128, 3)):  # predictions off the measured grid
        assert cm.decode_step(0, layers, cpu, "fp32", batch, 64, calibrated=False).seconds == pytest.approx(
            sample(batch, layers)["seconds"], rel=0.05)
    off = controller(ops, profile_pools=False)
    off.observe()
    assert {p.name: p for p in off.pools(off.current())}["cpu"] == POOLS[1]


def test_speculative_signals_give_positions_per_row_tokens_per_pass_and_request_tpot():
    """Over an interval: 1000 stage-0 passes, 250 deep visits of 5 positions a row, 600
    tokens emitted. The
    exit-unaware view of the same interval plans one position a row and no exits. The plan's
    p99 is anchored on the measured one."""
    col = SignalCollector(RANGES)

    def eps(scale):
        return [ep(k, f"r{k}", {
            "batches": 100 * scale, "rows": (1000 if k == 0 else 250) * scale,
            "positions": (1000 if k == 0 else 1250) * scale, "busy_s": scale}) for k in range(4)]

    ing = lambda s: it({"stage_calls": [250 * s] * 4, "stage_passes": [1000 * s, 250 * s, 250 * s, 250 * s],
                        "tokens_emitted": 600 * s, "request_tpot_ms_p99": 30.0, "request_tpot_ms_mean": 20.0})
    col.sample(0.0, eps(0), ing(0))
    obs = col.sample(10.0, eps(1), ing(1))
    assert [s.positions_per_row for s in obs.stages] == [1.0, 5.0, 5.0, 5.0]
    assert obs.tokens_per_pass == pytest.approx(0.6) and obs.request_tpot_ms_p99 == 30.0
    w = workload_from(obs, FACTS, 512)
    assert w.positions_per_row == [1.0, 5.0, 5.0, 5.0] and w.tokens_per_pass == pytest.approx(0.6)
    assert w.reach == pytest.approx([1.0, 0.25, 0.25, 0.25])
    blind = workload_from(obs, FACTS, 512, exit_aware=False)
    assert blind.reach is None and blind.positions_per_row is None and blind.tokens_per_pass == 1.0
    ops = FakeOps(app_config())
    ctl = controller(ops, tpot_slo_s=1.0)
    _, target, cur, _ = ctl.make_plan(obs)
    assert cur.tpot_p99_s == pytest.approx(0.030)  # the current placement's p99 is the measured one
    assert target.tpot_p99_s / target.tpot_s == pytest.approx(cur.tpot_p99_s / cur.tpot_s)  # others scale


def test_cost_per_replica_hour_from_the_config():
    ops = FakeOps(app_config())
    ctl = controller(ops, cost_per_replica_hour={"cpu": 0.5})
    assert {p.name: p.cost_per_hour for p in ctl.pools(ctl.current())} == {"gpu": 2.0, "cpu": 0.5}
    cfg = ControllerConfig(cost_per_replica_hour={"gpu": 3.0})
    assert cfg.pool_cost("gpu", "gpu") == 3.0 and cfg.pool_cost("cpu", "cpu") == 0.25
    assert cfg.pool_cost("a100", "gpu") == 3.0  # a pool named nowhere costs what its kind does
    with pytest.raises(ValueError, match="finite amount >= 0"):
        ControllerConfig(cost_per_replica_hour={"gpu": -1.0})
    with pytest.raises(ValueError, match="extra"):
        ControllerConfig(interval=3)  # a typo is refused, not ignored


class SlowOnCpuOps(FakeOps):
    """The model's blind spot: Stage0 measures 10x the p99 on the CPU pool (say, it drafts
    there), which no prediction of this model shows."""

    def ingress_stats(self, app):
        cpu = ServeApp(self.config).stage(0).pool == "cpu"
        return IngressTotals(stage_calls=list(self.calls), request_tpot_ms_p99=200.0 if cpu else 20.0)


@pytest.mark.parametrize("remember_s", [1800.0, 0.0], ids=["remembers", "forgets"])
def test_a_placement_that_breached_is_not_tried_again_at_the_same_load(remember_s):
    """The model likes Stage0 on the cheap pool; served there it breaches the SLO, so it goes
    back. Remembering what each placement measured keeps it back through many cool-downs;
    a controller that predicts afresh every time (``remember_s=0``) moves there again."""
    ops = SlowOnCpuOps(app_config())
    pins = [Pin(stage=1, pool="gpu"), Pin(stage=2, pool="cpu"), Pin(stage=3, pool="cpu")]
    ctl = controller(ops, max_knob="pool", tpot_slo_s=0.1, pins=pins, remember_s=remember_s)
    pools = []
    for _ in range(60):  # 300 s: five cool-downs
        run(ctl, ops, 1)
        pools.append(ServeApp(ops.config).stage(0).pool)
    went = [i for i in range(1, len(pools)) if pools[i] == "cpu" and pools[i - 1] == "gpu"]
    back = [i for i in range(1, len(pools)) if pools[i] == "gpu" and pools[i - 1] == "cpu"]
    assert went and back and back[0] > went[0]  # tried the cheap pool, measured the breach, went back
    if remember_s:
        assert len(went) == 1 and pools[-1] == "gpu"
        sig = "0-1:cpu/fp32,1-2:gpu/fp32,2-3:cpu/fp32,3-4:cpu/fp32"
        st = ctl.status()["measured_placements"]
        assert st[sig]["p99_ms"] == 200.0 and st[sig]["p99_factor"] > 5 * min(m["p99_factor"] for m in st.values())
        assert "as measured when it served" in ctl.last_plan.reasons[0], ctl.last_plan.reasons
    else:
        assert len(went) >= 2  # the same mistake again after the cool-down


def test_the_cool_down_counts_from_when_a_move_is_done():
    """A move whose replicas take 45 s to start (of a 60 s cool-down) leaves its layers
    resting 60 s after it is done, not 15."""
    ops = FakeOps(app_config(), start_s=45.0)
    ctl = controller(ops, policy={"max_busy_fraction": 0.6})
    ops.busy[2] = 0.95
    recs = [r for rs in run(ctl, ops, 3) for r in rs]
    (applied,) = [r for r in recs if r["outcome"] == "apply"]
    done = ops.t
    assert done - applied["time"] >= 45.0
    assert ctl.policy.last_moves()[2] == done and ctl.policy.last_moves()[0] is None
    recs = run(ctl, ops, 2)[-1]  # 10 s after, still saturated: resting
    assert any("cooling down" in r["reason"] and f"{60 - (ops.t - done):.0f}s" in r["reason"] for r in recs)


def test_a_remembered_breach_holds_at_any_higher_load_a_good_record_only_near_its_own():
    """A placement that missed the SLO served less than was offered (its measured rate is
    low): the memory of it holds at any higher load. One that met it holds only within
    the load band (at a much higher load it is predicted afresh)."""
    ops = FakeOps(app_config())
    ctl = controller(ops, tpot_slo_s=0.1)
    bad, good = ([StagePlacement(start=a, end=a + 1, pool=p) for a, p in enumerate(pools)]
                 for pools in (("cpu", "cpu", "cpu", "cpu"), ("gpu", "gpu", "cpu", "cpu")))

    def serve(placement, p99_ms, factor, rate):
        obs = Observation(ops.t, 5.0, [], "ingress", request_tpot_ms_p99=p99_ms)
        for _ in range(2):  # sustain_intervals: long enough to count
            out = ctl._remember(obs, placement, factor, rate)
        return out

    serve(bad, 300.0, 6.0, 10.0)
    serve(good, 20.0, 1.0, 10.0)
    from offramp.placement.planner import placement_signature as sig

    other = [StagePlacement(start=a, end=a + 1, pool="gpu") for a in range(4)]
    assert serve(other, 20.0, 1.0, 10.0) == {sig(bad): 6.0, sig(good): 1.0}
    assert serve(other, 20.0, 1.0, 25.0) == {sig(bad): 6.0}  # 2.5x the load: only the breach holds
    assert serve(other, 20.0, 1.0, 5.0) == {}  # half the load: both predicted afresh


@pytest.mark.parametrize("pin_pool, floor", [("cpu", True), ("gpu", False)])
def test_the_measured_floor_holds_only_where_the_stage_was_measured(pin_pool, floor):
    """Stage 2 measured 2.4 busy replicas' worth on the CPU pool: kept there, the plan gets
    at least ceil(2.4 / 0.5) = 5 replicas; moved to the GPU pool, those busy seconds say
    nothing and the cost model sizes it."""
    ops = FakeOps(app_config(replicas=(1, 1, 3, 1)))
    ctl = controller(ops, max_knob="pool", max_replicas_per_stage=8, pins=[Pin(stage=2, pool=pin_pool)])
    busy = {0: {"a": 0.1}, 1: {"b": 0.1}, 2: {"c": 0.8, "d": 0.8, "e": 0.8}, 3: {"f": 0.1}}
    obs = Observation(ops.t, 5.0, [StageLoad(k, r, len(busy[k]), 20.0, busy[k], 0.01, 2.0, 0, 0.1, 2)
                                   for k, r in enumerate(RANGES)], "ingress", request_tpot_ms_p99=20.0)
    _, target, _, _ = ctl.make_plan(obs)
    st = target.stages[2]
    assert st.pool == pin_pool
    assert (st.replicas >= 5) is floor


def test_plans_aim_under_the_slo_by_the_headroom_and_breaches_fire_at_the_slo(planned):
    """``slo_headroom``: the planner is asked for p99 <= SLO x (1 - headroom); the breach
    rule compares the measured p99 with the SLO itself (20 ms measured: no breach at 21 ms)."""
    ops = FakeOps(app_config())  # its ingress reports a 20 ms p99
    ctl = controller(ops, tpot_slo_s=0.021, slo_headroom=0.2)
    recs = [r for rs in run(ctl, ops, 4) for r in rs]
    assert planned and planned[-1].tpot_slo_s == pytest.approx(0.0168)
    assert ctl.status()["plan"]["planned_for_ms"] == pytest.approx(16.8)
    assert max(r.get("breach_intervals", 0) for r in recs) == 0
    ops2 = FakeOps(app_config())
    late = controller(ops2, tpot_slo_s=0.019, slo_headroom=0.2)
    recs = [r for rs in run(late, ops2, 3) for r in rs]
    assert max(r.get("breach_intervals", 0) for r in recs) == 2  # 20 ms > 19 ms, both intervals
