"""The placement controller: signals -> plan -> policy -> mover, once per interval.

Signals come from what the system already publishes, so nothing is added to the data
path: each stage replica's heartbeat stats in the registry (cumulative ``batches``,
``rows``, ``busy_s``; gauges ``queue``, ``kv_occupancy``, ``sequences``) and the
ingress's ``stage_calls`` (post-exit arrivals per stage). Rates are differences of the
cumulative counters between two samples. From them:

* arrival rate at stage k = d(stage_passes[k])/dt: the forward passes the ingress caused
  there, i.e. its visits plus, at stage 0, the drafting passes of speculative rows
  (``stage_calls`` from an ingress that does not report passes; falls back to the stage's
  summed ``rows`` rate when the ingress cannot be read or its counters moved backwards,
  e.g. a different ingress replica answered);
* ``reach`` of every layer of stage k = arrival[k] / arrival[0] (exits between stages;
  with speculative traffic, deep visits per stage-0 pass: verification visits the deep
  stages once per draft, so they look like stages behind an exit);
* per-replica utilisation = d(busy_s)/dt, step time = d(busy_s)/d(batches), batch =
  d(rows)/d(batches); these also calibrate the cost model online
  (:class:`~offramp.placement.cost_model.StepCalibration`).

The plan turns only the knobs allowed (``max_knob``: replicas; + pools; + precision; +
split points, moved one boundary per move), respects pins, and never gives a stage fewer
replicas than its *measured* busy time needs at the target utilisation (the measured
floor: when the cost model and the meters disagree, the meters win). The
:class:`~offramp.placement.policy.Policy` adds hysteresis, per-layer cool-down, bounded
moves and dry-run; the :class:`~offramp.placement.mover.Mover` applies moves with a
durable intent. Every decision is kept as a JSON-able dict (the last ``decisions_kept``,
also persisted so a restarted controller still shows them).

:class:`ControllerActor` runs it inside the cluster as a detached, restarting actor
(``offramp placement start``); on (re)start it reconciles a move left half done.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from offramp.cluster.records import IngressTotals, StageRecord, StageStats
from offramp.deployments.config import AppArgs, model_facts
from offramp.placement.cost_model import (
    DEFAULT_COST_PER_HOUR, CostModel, ModelShape, PlacementError, PoolFit, PoolSpec, ProfileSample, fit_profile,
    reach_from_exit_rates,
)
from offramp.placement.mover import MoveDeferred, MoveFailed, Mover, Ops, RayOps, stage_placement
from offramp.placement.planner import (
    Constraints, Pin, Plan, StagePlacement, Workload, evaluate, placement_signature, plan,
)
from offramp.placement.policy import KNOB_RANK, Decision, Knob, PlanKnob, Policy, PolicyConfig, detect_breaches
from offramp.placement.signals import StageSignals

log = logging.getLogger("offramp.placement")

DEFAULT_POOLS = {  # per-device figures used when the config names none (docs/placement.md)
    "gpu": dict(kind="gpu", memory_bytes=24e9, mem_bandwidth=600e9, flops=60e12, fixed_overhead_s=0.003,
                cost_per_hour=DEFAULT_COST_PER_HOUR["gpu"]),
    "cpu": dict(kind="cpu", memory_bytes=64e9, mem_bandwidth=40e9, flops=1e12, fixed_overhead_s=0.001,
                cost_per_hour=DEFAULT_COST_PER_HOUR["cpu"]),
}


class ControllerConfig(BaseModel):
    """Settings of the placement controller (``offramp placement start --config``)."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field("offramp", description="Serve application to manage.")
    interval_s: float = Field(10.0, gt=0, description="Seconds between control intervals (signal samples).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Hysteresis, cool-down, dry-run.")
    pools: list[PoolSpec] | None = Field(None, description="Device pools; None = defaults sized from the "
                                         "cluster's pool_<name> resources.")
    cost_per_replica_hour: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_COST_PER_HOUR),
        description="Cost of one replica-hour per pool name (any currency, the same for every pool); the plan is "
        "the cheapest placement that meets tpot_slo_s. Overrides a configured pool's cost_per_hour; a pool "
        "named nowhere costs what its kind's default does.")
    exit_aware: bool = Field(True, description="Plan with the measured post-exit arrival rates (deep stages see "
                             "fewer tokens when exits or speculative drafts skip them). False: every token is "
                             "planned to visit every stage (the baseline `bench placement --exit-aware` compares).")
    pins: list[Pin] = Field(default_factory=list, description="Operator pins: a stage's pool, replicas or "
                            "precision the planner must keep.")
    max_knob: PlanKnob = Field(
        "replicas", description="Most expensive knob turned automatically, in cost order: replicas; + pools; "
        "+ precision; + split points (one boundary per move).")
    target_utilisation: float = Field(0.75, gt=0, le=1, description="Busy fraction per replica to plan for.")
    max_replicas_per_stage: int = Field(4, ge=1, description="Upper bound on one stage's replicas.")
    context_len: int = Field(512, ge=1, description="Average attended context assumed by the cost model.")
    tpot_slo_s: float | None = Field(None, gt=0, description="TPOT target (also a breach when the ingress "
                                     "p99 exceeds it).")
    move_deadline_s: float = Field(120.0, gt=0, description="Time a move step has to become healthy.")
    profile_pools: bool = Field(True, description="Fit each pool's overhead, bandwidth and FLOP rate from the "
                                "stage replicas' start-up profiles (then the online calibration corrects it).")
    decisions_kept: int = Field(200, ge=1, description="Decision records kept (and returned by status).")
    remember_s: float = Field(1800.0, ge=0, description="How long what a placement measured while it served (its "
                              "p99 over the model's mean) replaces the model's prediction when the planner "
                              "weighs that placement again; 0 = never (predict every placement afresh).")
    remember_load_band: float = Field(0.3, ge=0, description="A remembered placement counts at a load within this "
                                      "fraction of the load it was measured at, and one that missed the SLO also at "
                                      "any higher load (it served less than was offered); else it is predicted.")
    slo_headroom: float = Field(0.1, ge=0, lt=1, description="Plans aim at a p99 of tpot_slo_s x (1 - slo_headroom); "
                                "the breach rule fires at tpot_slo_s itself. A placement predicted just under the "
                                "SLO is not worth a move the run-to-run noise of a p99 undoes.")

    @property
    def planned_slo_s(self) -> float | None:
        """The p99 plans aim at: ``tpot_slo_s`` less the headroom (None without an SLO)."""
        return None if self.tpot_slo_s is None else self.tpot_slo_s * (1 - self.slo_headroom)

    @field_validator("cost_per_replica_hour")
    @classmethod
    def _costs(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: c for k, c in v.items() if not (math.isfinite(c) and c >= 0)}
        if bad:
            raise ValueError(f"cost_per_replica_hour {bad}: a replica-hour costs a finite amount >= 0, e.g. "
                             "{gpu: 2.0, cpu: 0.25}")
        return v

    def pool_cost(self, name: str, kind: str) -> float:
        """What one replica-hour on pool ``name`` (of ``kind``) costs under this config."""
        if name in self.cost_per_replica_hour:
            return self.cost_per_replica_hour[name]
        return self.cost_per_replica_hour.get(kind, DEFAULT_COST_PER_HOUR.get(kind, DEFAULT_COST_PER_HOUR["cpu"]))


@dataclass
class AppFacts:
    """What the controller needs to know about the served model."""

    ranges: list[tuple[int, int]]  # layers [start, end) per stage
    model: ModelShape  # the planner's view of the model
    max_context: int
    kv_fill: str = "exact"


def model_shape(spec, exit_layers=()) -> ModelShape:
    """The planner's view of a checkpoint's config (``offramp.ops.checkpoint.load_spec``)."""
    return ModelShape(name=spec.model_type, num_layers=spec.num_layers, hidden=spec.hidden_size,
                      intermediate=spec.intermediate_size, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                      vocab=spec.vocab_size, tied_embeddings=spec.tie_word_embeddings,
                      exit_layers=[e for e in exit_layers if 1 <= e < spec.num_layers])


def app_facts(app_config: dict) -> AppFacts:
    """Model facts of a deployed Offramp app (reads the checkpoint's config, no weights)."""
    args = AppArgs.model_validate(app_config.get("args") or {})
    _, spec, ranges, exits = model_facts(args)
    model = model_shape(spec, exits.exit_layers if exits else ())
    return AppFacts([(r.start, r.stop) if hasattr(r, "start") else tuple(r) for r in ranges], model,
                    min(args.max_context or spec.max_position, spec.max_position), args.exit.kv_fill)


# -- signals -----------------------------------------------------------------------------
@dataclass
class StageLoad:
    """One stage over the last interval (all replicas)."""

    stage: int
    layers: tuple[int, int]
    replicas: int  # registered replicas
    arrival_per_s: float  # post-exit rows arriving per second
    busy: dict[str, float]  # replica -> busy fraction
    step_s: float  # mean step time (nan: no steps)
    batch: float  # mean rows per step (nan: no steps)
    queue: int
    kv_occupancy: float  # highest replica
    sequences: int
    positions_per_row: float = 1.0  # mean positions a row carried (speculative verification: > 1)


@dataclass
class Observation:
    time: float
    window_s: float
    stages: list[StageLoad]
    source: str  # "ingress" or "stages": where arrival rates came from
    tpot_ms_p99: float | None = None  # between tokens
    request_tpot_ms_p99: float | None = None  # of whole requests' TPOT (what the SLO is about)
    request_tpot_ms_mean: float | None = None
    tokens_per_pass: float | None = None  # tokens emitted per stage-0 pass (< 1: rejected drafts)
    signals: dict[tuple[int, int], list[StageSignals]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"time": self.time, "window_s": round(self.window_s, 3), "source": self.source,
                "tpot_ms_p99": self.tpot_ms_p99, "request_tpot_ms_p99": self.request_tpot_ms_p99,
                "request_tpot_ms_mean": self.request_tpot_ms_mean, "tokens_per_pass": self.tokens_per_pass,
                "stages": [{**asdict(s), "busy": {k: round(v, 4) for k, v in s.busy.items()},
                            "arrival_per_s": round(s.arrival_per_s, 3)} for s in self.stages]}


class SignalCollector:
    """Turns successive samples of cumulative counters into rates (pure; time is given)."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges
        # (time, stats by replica, (counter name, ingress counts), ingress (hop_s_sum, hop_n)) of the last sample
        self._prev: tuple[float, dict[str, tuple[int, StageStats]], tuple[str, list[int]] | None, tuple | None] | None = None
        self._prev_emitted: int | None = None  # the ingress's tokens_emitted at the last sample

    def sample(self, now: float, endpoints: list[StageRecord], ingress: IngressTotals | None) -> Observation | None:
        """None on the first sample (rates need two)."""
        stats = {e.replica: (e.stage, e.stats) for e in endpoints}
        passes = ingress is not None and ingress.stage_passes is not None
        key = "stage_passes" if passes else "stage_calls"
        calls = (list(ingress.stage_passes if passes else ingress.stage_calls) or None) if ingress else None
        hops = (list(ingress.hop_s_sum), list(ingress.hop_n)) if ingress and ingress.hop_n is not None else None
        prev, self._prev = self._prev, (now, stats, None if calls is None else (key, calls), hops)
        emitted = ingress.tokens_emitted if passes else None
        prev_emitted, self._prev_emitted = self._prev_emitted, emitted
        if prev is None or now <= prev[0]:
            return None
        t0, s0, prev_calls, prev_hops = prev
        dt = now - t0
        stages, signals = [], {}
        # differences of one counter only (an ingress replica without passes may join)
        c0 = prev_calls[1] if prev_calls is not None and prev_calls[0] == key else None
        use_ingress = (calls is not None and c0 is not None and len(calls) == len(c0) == len(self.ranges)
                       and all(b >= a for a, b in zip(c0, calls)))
        for k, rng in enumerate(self.ranges):
            busy, batches, rows, positions, busy_s, queue, kv, seqs, n = {}, 0, 0, 0, 0.0, 0, 0.0, 0, 0
            split = {"decode_batches": 0, "decode_s": 0.0, "prefill_batches": 0, "prefill_s": 0.0,
                     "prefill_positions": 0}  # deltas of the prefill/decode counters
            for rep, (stage, st) in sorted(stats.items()):
                if stage != k:
                    continue
                n += 1
                queue += st.queue
                kv = max(kv, 0.0 if math.isnan(st.kv_occupancy) else st.kv_occupancy)
                seqs += st.sequences
                old = s0[rep][1] if rep in s0 else None
                if old is None or st.busy_s is None or old.busy_s is None or st.busy_s < old.busy_s:
                    busy[rep] = 0.0  # new replica (or restarted counters): no rate yet
                    continue
                db = st.busy_s - old.busy_s
                busy[rep] = min(1.0, db / dt)
                busy_s += db
                batches += st.batches - old.batches
                rows += st.rows - old.rows
                positions += st.positions - old.positions
                for key in split:
                    split[key] += getattr(st, key) - getattr(old, key)
            arrival = (calls[k] - c0[k]) / dt if use_ingress else rows / dt
            step = busy_s / batches if batches > 0 else math.nan
            batch = rows / batches if batches > 0 else math.nan
            ppr = max(1.0, positions / rows) if rows > 0 else 1.0
            stages.append(StageLoad(k, rng, n, arrival, busy, step, batch, queue, kv, seqs, ppr))
            hop = math.nan  # mean hop cost into this stage over the window (ingress counters)
            if hops and prev_hops and len(hops[1]) == len(prev_hops[1]) == len(self.ranges):
                dn = hops[1][k] - prev_hops[1][k]
                if dn > 0:
                    hop = max(0.0, (hops[0][k] - prev_hops[0][k]) / dn)
            decode_step = split["decode_s"] / split["decode_batches"] if split["decode_batches"] > 0 else step
            prefill_step = split["prefill_s"] / split["prefill_batches"] if split["prefill_batches"] > 0 else math.nan
            signals[rng] = [StageSignals(
                stage=k, replica=rep, window_s=dt, prefill_step_s=prefill_step, decode_step_s=decode_step,
                batch_size=batch, tokens_per_s=rows / dt, arrival_tokens_per_s=arrival / max(n, 1),
                prefill_tokens_per_s=split["prefill_positions"] / dt, busy_fraction=b, queue_len=float(stats[rep][1].queue),
                oldest_wait_s=_num(stats[rep][1].max_wait_s), kv_occupancy=stats[rep][1].kv_occupancy,
                memory_headroom_bytes=_num(stats[rep][1].memory_headroom_bytes), hop_s=hop, steps=batches)
                for rep, b in busy.items()]
        ing = ingress or IngressTotals()
        tpp = None  # tokens per stage-0 pass over the interval
        if use_ingress and emitted is not None and prev_emitted is not None and emitted >= prev_emitted:
            passes0 = calls[0] - c0[0]
            tpp = (emitted - prev_emitted) / passes0 if passes0 > 0 else None
        return Observation(now, dt, stages, "ingress" if use_ingress else "stages", ing.tpot_ms_p99,
                           ing.request_tpot_ms_p99, ing.request_tpot_ms_mean, tpp, signals)


def _num(v) -> float:
    """A reported gauge as a float; NaN when the replica did not report it."""
    return float(v) if v is not None else math.nan


def workload_from(obs: Observation, facts: AppFacts, context_len: int, exit_aware: bool = True) -> Workload:
    """The planner's :class:`Workload` from one observation (reach from measured exits;
    ``exit_aware=False``: none, as if every token visited every stage)."""
    arrivals = [s.arrival_per_s for s in obs.stages]
    a0 = arrivals[0] if arrivals else 0.0
    reach = None
    if a0 > 0 and len(arrivals) > 1:
        rates, alive = {}, 1.0
        for k in range(1, len(obs.stages)):
            frac = min(1.0, max(0.0, arrivals[k] / a0))
            frac = min(frac, alive)  # tokens only leave
            rates[obs.stages[k].layers[0]] = 0.0 if alive <= 0 else 1.0 - frac / alive
            alive = frac
        reach = reach_from_exit_rates(facts.model.num_layers, rates)
    ppr, tpp = None, 1.0
    if exit_aware:
        ppr = [1.0] * facts.model.num_layers
        for s in obs.stages:
            for l in range(s.layers[0], min(s.layers[1], facts.model.num_layers)):
                ppr[l] = s.positions_per_row
        if obs.tokens_per_pass:
            tpp = min(max(obs.tokens_per_pass, 0.05), 64.0)
    else:
        reach = None  # every token planned to visit every stage, one position each
    seqs = obs.stages[0].sequences if obs.stages else 0
    return Workload(decode_tokens_per_s=max(0.0, a0), reach=reach, context_len=min(context_len, facts.max_context),
                    max_context=facts.max_context, concurrent_sequences=max(1, seqs), kv_fill=facts.kv_fill,
                    positions_per_row=ppr, tokens_per_pass=tpp)


def p99_factor(obs: Observation, predicted_mean_s: float, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Measured p99 of the requests' TPOT over the mean TPOT the cost model predicts for the
    placement that served them (1.0 without a measurement). The SLO is a p99 and the model
    predicts a serial mean (no overlap of micro-batches, no spread between requests): its
    ratios between placements are what it is good for, so the level comes from the ingress."""
    p99 = obs.request_tpot_ms_p99 or obs.tpot_ms_p99
    if not p99 or not predicted_mean_s > 0 or not math.isfinite(predicted_mean_s):
        return 1.0
    return min(bounds[1], max(bounds[0], p99 / 1e3 / predicted_mean_s))


# -- the controller ----------------------------------------------------------------------
class PlacementController:
    """One control loop's state; :meth:`tick` is one interval. Uses only :class:`Ops`."""

    def __init__(self, config: ControllerConfig, ops: Ops, facts: AppFacts | None = None):
        self.cfg, self.ops = config, ops
        app_cfg = ops.deployed_app_config(config.app)
        if app_cfg is None:
            raise MoveDeferred(f"application {config.app!r} has no applied Serve config; deploy it from a config "
                               "file so the controller can read and re-apply it")
        self.facts = facts or app_facts(app_cfg)
        self.collector = SignalCollector(self.facts.ranges)
        # Dry-run lives here, not in the policy: the policy's own dry-run freezes its breach
        # counters, so a dry-run controller would never show what a sustained breach does.
        self.dry_run = config.policy.dry_run
        self.policy = Policy(self.facts.model.num_layers, config.policy.model_copy(update={"dry_run": False}))
        self.costs = CostModel(self.facts.model)
        self.decisions: deque[dict] = deque(maxlen=config.decisions_kept)
        self.mover = Mover(config.app, ops, self.facts.ranges, deadline_s=config.move_deadline_s,
                           on_event=self._event)
        self.last_obs: Observation | None = None
        self.last_plan: Plan | None = None
        # start-up profiles by replica: (pool, dtype, samples); kept after the replica goes
        # (a measurement of that pool stays true), the newest 64 replicas
        self.profiles: dict[str, tuple[str, str, list[ProfileSample]]] = {}
        self.pool_fits: dict[str, PoolFit] = {}
        self.moves_made = 0
        # what each placement measured while it served (placement_signature -> {"time", "factor",
        # "rate", "p99_ms"}), and how many intervals the current one has served unchanged
        self.measured: dict[str, dict] = {}
        self._serving: tuple[str, int] = ("", 0)
        self._restore_state()

    # persistence of what must outlive a restart (intent is the mover's) --------------
    def _key(self, what: str) -> str:
        return f"{what}/{self.cfg.app}"

    def _restore_state(self) -> None:
        raw = self.ops.kv_get(self._key("state"))
        if raw:
            st = json.loads(raw)
            self.policy.restore_last_moves(st.get("last_move", []))  # cool-down survives restarts
            self.decisions.extend(st.get("decisions", []))
            self.moves_made = st.get("moves_made", 0)
            self.measured = dict(st.get("measured", {}))

    def _persist(self) -> None:
        lm = self.policy.last_moves()
        self.ops.kv_put(self._key("state"), json.dumps(
            {"last_move": lm, "decisions": list(self.decisions)[-50:], "moves_made": self.moves_made,
             "measured": self.measured}).encode())

    def _event(self, e: dict) -> None:
        self._log({"time": self.ops.clock(), "outcome": "event", **e})

    def _log(self, rec: dict) -> None:
        self.decisions.append(rec)
        log.info("placement %s", json.dumps(rec, default=str))

    # control ---------------------------------------------------------------------------
    def recover(self) -> dict | None:
        """Finish or undo a move a previous controller left half done (call before ticking)."""
        report = self.mover.reconcile()
        if report is not None:
            self.moves_made += report["outcome"] == "completed"
            self._persist()
        return report

    def current(self) -> list[StagePlacement]:
        return stage_placement(self.ops.deployed_app_config(self.cfg.app) or {}, self.facts.ranges)

    def ranges(self) -> list[tuple[int, int]]:
        """Layers per stage as deployed now (split moves change them)."""
        return [(d.start, d.end) for d in self.current()]

    def pools(self, current: list[StagePlacement]) -> list[PoolSpec]:
        """The configured pools, else defaults sized from the cluster; with timing fitted
        from start-up profiles where the pool has them (``profile_pools``)."""
        if self.cfg.pools:
            out = [p if p.name not in self.cfg.cost_per_replica_hour else
                   p.model_copy(update={"cost_per_hour": self.cfg.cost_per_replica_hour[p.name]})
                   for p in self.cfg.pools]
        else:
            cap = self.ops.pool_capacity()
            out = []
            for n in sorted(set(cap) | {d.pool for d in current}):
                base = DEFAULT_POOLS.get(n, DEFAULT_POOLS["cpu"])
                base = {**base, "cost_per_hour": self.cfg.pool_cost(n, base["kind"])}
                out.append(PoolSpec(name=n, count=max(cap.get(n, 0), sum(d.replicas for d in current if d.pool == n)),
                                    **base))
        return [self._fitted(p) for p in out] if self.cfg.profile_pools else out

    def _keep_profiles(self, endpoints: list[StageRecord]) -> None:
        for e in endpoints:
            if e.profile and e.replica not in self.profiles:
                try:
                    samples = [ProfileSample.model_validate(p) for p in e.profile]
                except ValueError:
                    continue  # a replica of another version: not worth a failed tick
                self.profiles[e.replica] = (e.pool, e.dtype, samples)
                while len(self.profiles) > 64:
                    self.profiles.pop(next(iter(self.profiles)))

    def _fitted(self, pool: PoolSpec) -> PoolSpec:
        """``pool`` with overhead / bandwidth / FLOP rate fitted to its replicas' profiles
        (those of its most common precision); unchanged when they do not pin a fit down."""
        by_dtype: dict[str, list[ProfileSample]] = {}
        for p, dtype, samples in self.profiles.values():
            if p == pool.name:
                by_dtype.setdefault(dtype, []).extend(samples)
        if not by_dtype:
            return pool
        dtype, samples = max(by_dtype.items(), key=lambda kv: len(kv[1]))
        try:
            fit = fit_profile(self.facts.model, samples, dtype, prior=pool)
        except PlacementError:
            return pool
        self.pool_fits[pool.name] = fit
        return fit.apply(pool)
    def pins(self) -> list[Pin]:
        """The operator's pins (``ControllerConfig.pins``: the app's arguments carry none,
        so one config holds every input of the controller)."""
        return list(self.cfg.pins)

    def observe(self) -> Observation | None:
        self.collector.ranges = self.ranges()
        endpoints = self.ops.registry_endpoints(self.cfg.app)
        self._keep_profiles(endpoints)
        obs = self.collector.sample(self.ops.clock(), endpoints, self.ops.ingress_stats(self.cfg.app))
        if obs is not None:
            self.last_obs = obs
        return obs

    def _calibrate(self, obs: Observation, current: list[StagePlacement], pools: dict[str, PoolSpec],
                   w: Workload) -> None:
        for s, d in zip(obs.stages, current):
            if math.isfinite(s.step_s) and s.step_s > 0 and d.pool in pools:
                ppr = w.positions_per_row[d.start] if w.positions_per_row is not None else 1.0
                pred = self.costs.decode_step(d.start, d.end, pools[d.pool], d.precision, max(s.batch, 1.0) * ppr,
                                              w.context_len, w.reach, w.kv_fill, calibrated=False).seconds
                self.costs.calibration.observe(d.pool, "decode", d.start, d.end, s.step_s, pred)

    def _turns(self, knob: Knob) -> bool:
        """Whether the plan may turn ``knob`` (``max_knob`` and every cheaper one)."""
        return KNOB_RANK[knob] <= KNOB_RANK[self.cfg.max_knob]

    def make_plan(self, obs: Observation) -> tuple[list[StagePlacement], Plan, Plan, Workload]:
        """(current placement, target plan, current placement's evaluation, workload)."""
        current = self.current()
        pools = self.pools(current)
        w = workload_from(obs, self.facts, self.cfg.context_len, self.cfg.exit_aware)
        self._calibrate(obs, current, {p.name: p for p in pools}, w)
        batches = [s.batch for s in obs.stages if math.isfinite(s.batch)]
        user = {p.stage: p for p in self.pins()}
        pins = []
        for k, d in enumerate(current):
            u = user.get(k)
            pool = (u.pool if u and u.pool else None) or (d.pool if not self._turns("pool") else None)
            prec = (u.precision if u and u.precision else None) or (
                d.precision if not self._turns("precision") else None)
            pins.append(Pin(stage=k, pool=pool, precision=prec, replicas=u.replicas if u else None))
        split = None if self._turns("split") else [d.start for d in current[1:]]
        c = Constraints(num_stages=len(current), split=split, pins=pins,
                        tpot_slo_s=self.cfg.planned_slo_s, target_utilisation=self.cfg.target_utilisation,
                        batch_size=max(1, round(max(batches))) if batches else 16,
                        max_replicas_per_stage=64)  # capped below: an over-bound plan is still a plan
        try:  # the p99 anchor: the current placement's predicted mean against the measured p99
            c = c.model_copy(update={"tpot_p99_factor": p99_factor(
                obs, evaluate(self.facts.model, pools, w, current, c, self.costs).tpot_s)})
        except PlacementError:
            pass
        c = c.model_copy(update={"tpot_p99_factors": self._remember(obs, current, c.tpot_p99_factor,
                                                                     w.decode_tokens_per_s)})
        target = plan(self.facts.model, pools, w, c, self.costs)
        # measured floor: never fewer replicas than the measured busy time needs, where the
        # stage stays where it was measured (busy seconds on one pool say nothing of another's)
        stages = []
        for k, st in enumerate(target.stages):
            s = obs.stages[k]
            here = k < len(current) and st.key == current[k].key
            need = math.ceil(sum(s.busy.values()) / self.cfg.target_utilisation - 1e-9) if s.busy and here else 1
            pinned = user.get(k) and user[k].replicas
            n = st.replicas if pinned else min(self.cfg.max_replicas_per_stage, max(st.replicas, need))
            n = max(n, 1)
            stages.append(st.model_copy(update={"replicas": n}))
        by_name = {p.name: p for p in pools}
        target = target.model_copy(update={"stages": stages, "cost": round(sum(
            st.replicas * by_name[st.pool].cost_per_hour for st in stages), 9)})
        try:
            cur_eval = evaluate(self.facts.model, pools, w, current, c, self.costs)
        except PlacementError:
            cur_eval = target
        self.last_plan = target
        return current, target, cur_eval, w

    def _remember(self, obs: Observation, current: list[StagePlacement], factor: float,
                  rate: float) -> dict[str, float]:
        """Record what the current placement measures; return the other placements' remembered
        p99 factors that still apply (fresh, at a load within ``remember_load_band``).

        The model predicts a placement it has not served from its own ratios; once a
        placement has served, its measured p99 over the model's mean is what the planner uses
        for it while the load is about the same. This is what stops a controller from moving
        back and forth between a placement the model likes and the SLO breach it measured
        there (a model that does not see the traffic's shape, e.g. the exit-unaware one
        under speculative decoding, predicts the same wrong figure every time)."""
        sig = placement_signature(current)
        n = self._serving[1] + 1 if self._serving[0] == sig else 1
        self._serving = (sig, n)
        now = self.ops.clock()
        p99 = obs.request_tpot_ms_p99 or obs.tpot_ms_p99
        # the ingress's p99 covers its recent window: count a placement once it has served
        # as long as a breach must last (what it measured before is the previous placement's)
        if p99 and rate > 0 and n >= self.policy.cfg.sustain_intervals and self.cfg.remember_s > 0:
            self.measured[sig] = {"time": now, "factor": factor, "rate": rate, "p99_ms": p99}
        for k in [k for k, m in self.measured.items() if now - m["time"] > self.cfg.remember_s]:
            del self.measured[k]
        band, slo_ms = self.cfg.remember_load_band, 1e3 * (self.cfg.tpot_slo_s or math.inf)
        return {k: m["factor"] for k, m in self.measured.items()
                if k != sig and rate > 0 and (abs(rate - m["rate"]) <= band * m["rate"]
                                              or (m["p99_ms"] > slo_ms and rate >= m["rate"]))}

    def tick(self) -> list[dict]:
        """One interval: observe, plan, decide, apply at most the policy's bounded moves."""
        now = self.ops.clock()
        if self.mover.intent() is not None:  # a move whose restore failed earlier: finish it first
            report = self.recover()  # not None: there was an intent
            if self.mover.intent() is not None:
                rec = {"time": now, "outcome": "hold", "reason": f"an earlier move could not be restored "
                       f"({report['outcome']}); no new move until it is"}
                self._log(rec)
                return [rec]
        obs = self.observe()
        if obs is None:
            rec = {"time": now, "outcome": "hold", "reason": "first sample: rates need two intervals"}
            self._log(rec)
            return [rec]
        try:
            current, target, cur_eval, _ = self.make_plan(obs)
        except (PlacementError, ValueError) as e:
            rec = {"time": now, "outcome": "hold", "reason": f"no plan: {e}"}
            self._log(rec)
            return [rec]
        measured = obs.request_tpot_ms_p99 or obs.tpot_ms_p99  # whole requests' when the ingress reports it
        breaches = detect_breaches(obs.signals, self.policy.cfg, self.cfg.tpot_slo_s,
                                   measured / 1e3 if measured and self.cfg.tpot_slo_s else None)
        out = []
        for d in self.policy.step(now, current, target, cur_eval, breaches):
            rec = json.loads(d.model_dump_json())
            if d.outcome == "apply" and d.move is not None and self.dry_run:
                rec.update(outcome="dry_run", result="dry run: not applied")
                self._cooldown_from(d, None)
            elif d.outcome == "apply" and d.move is not None:
                rec["result"] = "in progress"
                self._log(rec)  # logged and persisted before the move: a crash keeps the record
                self._persist()
                try:
                    res = self.mover.apply(d.move)
                    rec["result"] = f"{res.outcome} in {res.seconds:.1f}s ({len(res.steps)} step(s))"
                    self._cooldown_from(d, self.ops.clock())  # from when it is done, not decided
                    self.moves_made += res.outcome == "applied"
                except MoveDeferred as e:
                    rec.update(outcome="hold", result=f"deferred: {e}")
                    self._cooldown_from(d, None)
                except MoveFailed as e:
                    rec.update(outcome="failed", result=str(e))
                log.info("placement result %s", json.dumps(rec, default=str))
                out.append(rec)
                continue
            out.append(rec)
            self._log(rec)
        self._persist()
        return out

    def _cooldown_from(self, d: Decision, at: float | None) -> None:
        """Restart the cool-down of ``d``'s layers at ``at``: when a move is *done* (a move that
        takes most of the cool-down to apply would otherwise leave no time to measure the new
        placement), or None for a move the mover did not make (nothing changed)."""
        if d.move is not None:
            self.policy.moved(range(d.move.deployment.start, d.move.deployment.end), at)

    def status(self, last: int = 20) -> dict:
        cur = self.current()
        return {
            "app": self.cfg.app, "dry_run": self.dry_run, "interval_s": self.cfg.interval_s,
            "placement": [{"stage": k, "layers": [d.start, d.end - 1], "pool": d.pool, "replicas": d.replicas,
                           "precision": d.precision} for k, d in enumerate(cur)],
            "signals": self.last_obs.to_dict() if self.last_obs else None,
            "plan": None if self.last_plan is None else {
                "stages": [{"layers": [s.start, s.end - 1], "pool": s.pool, "replicas": s.replicas,
                            "precision": s.precision, "utilisation": round(s.utilisation, 3)}
                           for s in self.last_plan.stages],
                "tpot_ms": round(self.last_plan.tpot_s * 1e3, 3),
                "tpot_p99_ms": round(self.last_plan.tpot_p99_s * 1e3, 3), "meets_slo": self.last_plan.meets_slo,
                "slo_ms": None if self.cfg.tpot_slo_s is None else round(self.cfg.tpot_slo_s * 1e3, 3),
                "planned_for_ms": None if self.cfg.planned_slo_s is None else round(self.cfg.planned_slo_s * 1e3, 3),
                "cost_per_hour": self.last_plan.cost, "exit_aware": self.cfg.exit_aware,
                "reasons": self.last_plan.reasons, "notes": self.last_plan.notes},
            "moves_made": self.moves_made,
            "measured_placements": {k: {"age_s": round(self.ops.clock() - m["time"], 1), "p99_ms": m["p99_ms"],
                                        "p99_factor": round(m["factor"], 3), "rate": round(m["rate"], 3)}
                                    for k, m in self.measured.items()},
            "pool_fits": {n: {"fixed_overhead_s": f.fixed_overhead_s, "mem_bandwidth": f.mem_bandwidth,
                              "flops": f.flops, "rms_residual_s": f.rms_residual_s,
                              "samples": f.memory_bound_samples + f.compute_bound_samples}
                          for n, f in self.pool_fits.items()},
            "intent": self.mover.intent(),
            "decisions": list(self.decisions)[-last:],
        }


# -- the in-cluster actor ----------------------------------------------------------------
class ControllerActor:
    """The controller as a detached, restarting Ray actor (started by ``offramp placement
    start`` through :func:`offramp.cluster.rayops.start_detached`). Its loop runs on a
    thread; on every (re)start it first reconciles a half-done move."""

    def __init__(self, config: dict, run: bool = True):
        logging.basicConfig(level=logging.INFO)
        self.cfg = ControllerConfig.model_validate(config)
        self.ctl = PlacementController(self.cfg, RayOps())
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self.recovered = self.ctl.recover()
        if run:
            threading.Thread(target=self._loop, daemon=True, name="offramp-placement").start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - keep controlling; the record says what broke
                self.ctl._log({"time": self.ctl.ops.clock(), "outcome": "error", "reason": f"{type(e).__name__}: {e}"})

    def tick(self) -> list[dict]:
        with self._tick_lock:
            return self.ctl.tick()

    def status(self, last: int = 20) -> dict:
        return {**self.ctl.status(last), "recovered": self.recovered, "running": not self._stop.is_set()}

    def set_dry_run(self, dry_run: bool) -> None:
        self.ctl.dry_run = dry_run

    def stop(self) -> None:
        self._stop.set()


def controller_name(app: str) -> str:
    return f"placement-{app}"
