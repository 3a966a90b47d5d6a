"""Exit-aware placement planner (pure, deterministic, no Ray).

``plan(model, pools, workload, constraints)`` chooses split points, a device pool and
precision per stage, and replicas per stage.

Objective (lexicographic):
  1. feasible: every stage's weights + KV fit one device, per-pool device counts hold,
     each replica runs at <= ``target_utilisation`` at the offered load;
  2. meets the TPOT SLO, a p99 over requests of each request's TPOT, predicted as the
     mean TPOT times ``tpot_p99_factor`` (measured p99 over the model's mean for the current
     placement); if none does, the lowest-TPOT feasible plan is returned with
     ``meets_slo=False``;
  3. minimise cost per hour  sum(replicas * pool.cost_per_hour)  (a GPU replica-hour costs
     several CPU-node ones: cost_model.DEFAULT_COST_PER_HOUR);
  4. tie-break: lower TPOT, then fewer stages, then the lexicographically smallest split.

Exit-awareness: the arrival rate at a stage is ``decode_tokens_per_s * reach[start]``
(stage-0 passes per second times the fraction of them that visit it) and its TPOT share is
weighted by ``reach[start]`` (mean TPOT), so a rarely reached deep stage may sit on a slow
CPU pool when the SLO still holds, freeing GPUs. Speculative exits: a deep visit verifies a
whole draft, so a row there carries ``positions_per_row`` positions (compute per visit
grows) and a stage-0 pass yields ``tokens_per_pass`` tokens (rejected drafts cost passes);
TPOT = sum over stages of reach x (step + hop), divided by ``tokens_per_pass``.

Search: dynamic programming over contiguous layer ranges.  State = (layers covered,
stages used, pool/precision of the last stage); each state keeps a small Pareto set of
(cost, TPOT, devices used per pool) labels, because the SLO and pool counts are global
constraints that a single best value per state would get wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import BaseModel, Field, model_validator

from offramp.placement.cost_model import (
    PRECISION_INFO, CostModel, KvFill, ModelShape, PlacementError, PoolSpec, Precision,
)


class Workload(BaseModel):
    """Offered load, measured by the stages (see ``signals.py``)."""

    decode_tokens_per_s: float = Field(0.0, description="Generated tokens/s entering stage 0.")
    prefill_tokens_per_s: float = Field(0.0, description="Prompt tokens/s (prefill runs every layer).")
    reach: list[float] | None = Field(
        None, description="Fraction of decode tokens computing layer l (len num_layers, non-increasing); "
        "None = no exits. Build it with cost_model.reach_from_exit_rates.")
    context_len: int = Field(512, ge=0, description="Average tokens a decode row attends over.")
    max_context: int = Field(2048, ge=1, description="KV tokens reserved per sequence (memory sizing).")
    concurrent_sequences: int = Field(64, ge=0, description="Live sequences (each holds KV at every layer).")
    prefill_chunk: int = Field(256, ge=1, description="Prompt tokens per prefill step.")
    kv_fill: KvFill = Field("exact", description="How skipped layers get KV: 'exact' backfill or 'propagate'.")
    gate_pass_ratio: float = Field(1.5, ge=1, description="LM-head evaluations per exited token at a tap.")
    positions_per_row: list[float] | None = Field(
        None, description="Mean positions a row carries into layer l (len num_layers); None = 1 everywhere. "
        "Speculative verification brings a draft's positions to the deep stages in one row, so their compute "
        "per visit grows while their visits shrink.")
    tokens_per_pass: float = Field(1.0, gt=0, description="Tokens emitted per stage-0 pass: 1 without "
                                   "speculation; (accepted + 1) / drafted with it (rejected drafts cost passes).")

    @model_validator(mode="after")
    def _check(self) -> "Workload":
        for name in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            v = getattr(self, name)
            if not v >= 0 or math.isinf(v):
                raise PlacementError(f"workload {name}={v} is invalid; pass the measured rate (finite, >= 0).")
        if self.reach is not None:
            if any(not 0.0 <= r <= 1.0 for r in self.reach):
                raise PlacementError(f"workload reach {self.reach} has values outside [0, 1]; "
                                     "reach is a fraction of tokens.")
            if any(b > a + 1e-12 for a, b in zip(self.reach, self.reach[1:])):
                raise PlacementError("workload reach must be non-increasing (tokens only leave); "
                                     "build it with reach_from_exit_rates.")
        if self.positions_per_row is not None and any(not (1.0 <= p < math.inf) for p in self.positions_per_row):
            raise PlacementError(f"workload positions_per_row {self.positions_per_row} must be finite and >= 1 "
                                 "(a row carries at least its own position).")
        return self


class Pin(BaseModel):
    """Operator override for one stage (the escape hatch)."""

    stage: int = Field(..., ge=0, description="Stage index in the plan.")
    pool: str | None = Field(None, description="Stage must run on this pool.")
    replicas: int | None = Field(None, ge=1, description="Exact replica count.")
    precision: Precision | None = Field(None, description="Exact precision.")


class Constraints(BaseModel):
    """Targets and limits of a plan."""

    num_stages: int | None = Field(None, ge=1, description="Exact stage count; None = choose 1..max_stages.")
    max_stages: int = Field(4, ge=1, description="Most stages considered when num_stages is None.")
    split: list[int] | None = Field(None, description="Fixed split points (first layer of stages 1..N-1).")
    pins: list[Pin] = Field(default_factory=list, description="Per-stage pool / replicas / precision pins.")
    tpot_slo_s: float | None = Field(None, gt=0, description="Target p99 over requests of each request's TPOT, "
                                     "seconds (predicted as the mean TPOT x tpot_p99_factor).")
    tpot_p99_factor: float = Field(1.0, gt=0, description="Predicted p99 of requests' TPOT per second of predicted "
                                   "mean TPOT. The controller sets it to the p99 the ingress measures over the mean "
                                   "the cost model predicts for the current placement: the model predicts how a "
                                   "placement changes TPOT, the measurement anchors the level (1.0 before traffic).")
    tpot_p99_factors: dict[str, float] = Field(
        default_factory=dict, description="Measured p99 factor per placement (key: placement_signature): a "
        "placement the controller has served before at about this load is predicted with the factor measured "
        "while it served, not the current one. The cost model's ratios between placements can be wrong where "
        "it does not model the traffic (the baseline that ignores exits); what was measured is not.")
    tpot_mode: Literal["mean", "full_depth"] = Field(
        "mean", description="'mean' weights each stage by the fraction reaching it; 'full_depth' = no exits.")
    target_utilisation: float = Field(0.75, gt=0, le=1, description="Busy fraction per replica at plan load.")
    batch_size: int = Field(16, ge=1, description="Decode rows per step a replica runs at full load.")
    allow_int8: bool = Field(False, description="Let the planner pick int8 weight-only where a pool lists it.")
    max_replicas_per_stage: int = Field(64, ge=1, description="Upper bound on replicas of one stage.")
    max_labels: int = Field(16, ge=1, description="Pareto labels kept per DP state (bounds search time).")


class StagePlacement(BaseModel):
    """Where one stage runs: a layer range on a pool, its replicas and precision (the unit the
    mover creates and removes; the Serve deployment itself is ``deployments.app.StageDeployment``)."""

    start: int = Field(..., ge=0, description="First layer.")
    end: int = Field(..., ge=1, description="One past the last layer.")
    pool: str = Field(..., description="Pool name.")
    precision: Precision = Field("fp32", description="Weight precision.")
    replicas: int = Field(1, ge=0, description="Replica count.")

    @property
    def key(self) -> tuple[int, int, str, str]:
        return (self.start, self.end, self.pool, self.precision)


class StagePlan(StagePlacement):
    """A planned stage with the cost model's predictions."""

    step_s: float = Field(0.0, description="Predicted decode step at the latency batch.")
    hop_in_s: float = Field(0.0, description="Predicted hop from the previous stage.")
    reach: float = Field(1.0, description="Fraction of decode tokens entering the stage.")
    utilisation: float = Field(0.0, description="Predicted busy fraction per replica.")
    weight_bytes: float = Field(0.0, description="Resident weights per replica.")
    kv_bytes: float = Field(0.0, description="KV reserved per replica.")
    bound: str = Field("memory", description="'memory' or 'compute' at full batch.")

    def deployment(self) -> StagePlacement:
        """This stage as the mover's unit (the predictions dropped)."""
        return StagePlacement(**self.model_dump(include=set(StagePlacement.model_fields)))


class Plan(BaseModel):
    """Result of :func:`plan` or :func:`evaluate`."""

    stages: list[StagePlan]
    cost: float = Field(..., description="Sum of replicas * cost_per_hour: what the placement costs per hour.")
    tpot_s: float = Field(..., description="Predicted TPOT in the constraints' tpot_mode.")
    tpot_p99_s: float = Field(0.0, description="Predicted p99 of requests' TPOT (tpot_s x tpot_p99_factor): "
                              "what tpot_slo_s is checked against.")
    tpot_full_depth_s: float = Field(..., description="Predicted TPOT of a token that never exits.")
    devices: dict[str, int] = Field(..., description="Devices used per pool.")
    meets_slo: bool = Field(True, description="False when no feasible plan met tpot_slo_s.")
    notes: list[str] = Field(default_factory=list, description="Human-readable remarks.")
    reasons: list[str] = Field(default_factory=list, description="Per stage: why this pool and replica count "
                               "(the cheaper alternatives and what they would miss).")

    @property
    def split(self) -> list[int]:
        return [s.start for s in self.stages[1:]]

    def deployments(self) -> list[StagePlacement]:
        return [s.deployment() for s in self.stages]


def placement_signature(stages: Sequence[StagePlacement]) -> str:
    """What a placement is, replicas aside: layer ranges with their pool and precision
    (``"0-4:gpu/fp32,4-8:cpu/fp32"``), the key of ``Constraints.tpot_p99_factors``."""
    return ",".join(f"{d.start}-{d.end}:{d.pool}/{d.precision}" for d in sorted(stages, key=lambda d: d.start))


def p99_factor_of(stages: Sequence[StagePlacement], c: "Constraints") -> float:
    """The p99 factor a placement is predicted with: its measured one if remembered, else the current."""
    return c.tpot_p99_factors.get(placement_signature(stages), c.tpot_p99_factor) if c.tpot_p99_factors \
        else c.tpot_p99_factor


@dataclass(frozen=True)
class _Opt:
    pool: PoolSpec
    precision: str


@dataclass(frozen=True)
class _Label:
    cost: float
    lat: float
    usage: tuple[int, ...]
    stage: StagePlan
    parent: "_Label | None"


def _validate(model: ModelShape, pools: Sequence[PoolSpec], w: Workload, c: Constraints) -> list[float]:
    if not pools:
        raise PlacementError("no pools given; add at least one PoolSpec (e.g. a CPU pool for the whole model).")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise PlacementError(f"duplicate pool names {names}; give each pool a unique name.")
    L = model.num_layers
    reach = list(w.reach) if w.reach is not None else [1.0] * L
    if len(reach) != L:
        raise PlacementError(f"workload reach has {len(reach)} entries but the model has {L} layers; "
                             "pass one fraction per layer.")
    if c.split is not None:
        if any(not 0 < s < L for s in c.split) or sorted(set(c.split)) != list(c.split):
            raise PlacementError(f"split {c.split} must be strictly increasing layer indices in 1..{L - 1}.")
        if c.num_stages is not None and c.num_stages != len(c.split) + 1:
            raise PlacementError(f"split {c.split} gives {len(c.split) + 1} stages but num_stages="
                                 f"{c.num_stages}; drop one of them or make them agree.")
    n = c.num_stages or (len(c.split) + 1 if c.split is not None else None)
    if n is not None and n > L:
        raise PlacementError(f"num_stages={n} exceeds num_layers={L}; a stage needs at least one layer.")
    by_name = {p.name: p for p in pools}
    seen: dict[int, Pin] = {}
    for pin in c.pins:
        if pin.stage in seen:
            raise PlacementError(f"stage {pin.stage} is pinned twice ({seen[pin.stage]} and {pin}); "
                                 "merge them into one Pin.")
        seen[pin.stage] = pin
        if n is not None and pin.stage >= n:
            raise PlacementError(f"pin for stage {pin.stage} but the plan has {n} stages; "
                                 "fix the pin's stage index or num_stages.")
        if pin.pool is not None and pin.pool not in by_name:
            raise PlacementError(f"pin for stage {pin.stage} names pool {pin.pool!r}, not among {names}.")
        if pin.pool is not None and pin.precision is not None and pin.precision not in by_name[pin.pool].precisions:
            raise PlacementError(f"pin for stage {pin.stage}: pool {pin.pool} does not support "
                                 f"{pin.precision} (supports {by_name[pin.pool].precisions}).")
        if pin.pool is not None and pin.replicas is not None and pin.replicas > by_name[pin.pool].count:
            raise PlacementError(f"pin for stage {pin.stage} asks {pin.replicas} replicas on {pin.pool}, "
                                 f"which has {by_name[pin.pool].count} devices; lower the pin or add devices.")
    for name in names:
        want = sum(p.replicas for p in c.pins if p.pool == name and p.replicas is not None)
        if want > by_name[name].count:
            raise PlacementError(f"pins ask {want} replicas on pool {name}, which has "
                                 f"{by_name[name].count} devices; lower the pins or add devices.")
    return reach


def _options(pools: Sequence[PoolSpec], c: Constraints, pin: Pin | None) -> list[_Opt]:
    out = []
    for p in pools:
        if pin is not None and pin.pool is not None and p.name != pin.pool:
            continue
        if pin is not None and pin.precision is not None:
            precs = [pin.precision] if pin.precision in p.precisions else []
        else:
            precs = [next((q for q in p.precisions if q != "int8"), p.precisions[0])]
            if c.allow_int8 and "int8" in p.precisions and "int8" not in precs:
                precs.append("int8")
        out.extend(_Opt(p, q) for q in precs)
    return out


def _stage(cm: CostModel, start: int, end: int, opt: _Opt, reach: list[float], w: Workload,
           c: Constraints, pinned_replicas: int | None) -> StagePlan | None:
    """Evaluate one stage on one option; None when it cannot fit or needs too many devices."""
    pool, prec = opt.pool, opt.precision
    wb = cm.weight_bytes(start, end, prec)
    free = pool.usable_bytes - wb
    if free <= 0:
        return None
    kv_total = cm.kv_bytes(start, end, prec, w.concurrent_sequences, w.max_context)
    r_mem = math.ceil(kv_total / free - 1e-9) if kv_total > 0 else 1
    r0 = reach[start]
    ppr = w.positions_per_row[start] if w.positions_per_row is not None else 1.0
    full = cm.decode_step(start, end, pool, prec, c.batch_size * ppr, w.context_len, reach, w.kv_fill,
                          w.gate_pass_ratio)
    busy = w.decode_tokens_per_s * r0 * full.seconds / c.batch_size  # device-seconds per second
    if w.prefill_tokens_per_s > 0:
        pf = cm.prefill_chunk(start, end, pool, prec, w.prefill_chunk)
        busy += w.prefill_tokens_per_s * pf.seconds / w.prefill_chunk
    r_cap = math.ceil(busy / c.target_utilisation - 1e-9)
    replicas = pinned_replicas or max(1, r_mem, r_cap)
    if replicas < r_mem or replicas > min(pool.count, c.max_replicas_per_stage):
        return None
    lat_batch = min(c.batch_size, max(1, math.ceil(w.concurrent_sequences * r0 / replicas)))
    step = cm.decode_step(start, end, pool, prec, lat_batch * ppr, w.context_len, reach, w.kv_fill,
                          w.gate_pass_ratio)
    return StagePlan(start=start, end=end, pool=pool.name, precision=prec, replicas=replicas,
                     step_s=step.seconds, reach=r0, utilisation=busy / replicas, weight_bytes=wb,
                     kv_bytes=kv_total / replicas, bound=full.bound)


def _dominated(a: _Label, b: _Label) -> bool:
    """True when b is at least as good as a everywhere."""
    return b.cost <= a.cost + 1e-12 and b.lat <= a.lat + 1e-15 and all(y <= x for x, y in zip(a.usage, b.usage))


def _search(model: ModelShape, pools: Sequence[PoolSpec], reach: list[float], w: Workload, c: Constraints,
            cm: CostModel, use_slo: bool) -> list[_Label]:
    L = model.num_layers
    counts = tuple(p.count for p in pools)
    pidx = {p.name: i for i, p in enumerate(pools)}
    pins = {p.stage: p for p in c.pins}
    if c.split is not None:
        ranks = {b: i for i, b in enumerate([0, *c.split, L])}
        max_k = len(c.split) + 1
    else:
        ranks = None
        max_k = min(L, c.num_stages or c.max_stages)
    slo = c.tpot_slo_s if use_slo else None
    # prune with the smallest factor any placement may get (sound); finals are checked with their own
    prune = min([c.tpot_p99_factor, *c.tpot_p99_factors.values()])
    cache: dict[tuple, StagePlan | None] = {}
    # layers[k][(end, opt id)] -> Pareto labels of plans covering layers [0, end) with k stages
    layers: list[dict[tuple[int, int], list[_Label]]] = [
        {(0, -1): [_Label(0.0, 0.0, (0,) * len(pools), None, None)]}]  # type: ignore[arg-type]
    opt_ids: dict[tuple[str, str], int] = {}
    by_name = {p.name: p for p in pools}
    finals: list[_Label] = []
    for k in range(max_k):
        pin = pins.get(k)
        opts = _options(pools, c, pin)
        prev_states = sorted(layers[k].items(), key=lambda kv: kv[0])
        nxt: dict[tuple[int, int], list[_Label]] = {}
        for end in range(1, L + 1):
            if ranks is not None and ranks.get(end) != k + 1:
                continue
            for o in opts:
                oid = opt_ids.setdefault((o.pool.name, o.precision), len(opt_ids))
                new: list[_Label] = []
                for (start, _), labels in prev_states:
                    if start >= end:
                        continue
                    key = (start, end, oid, pin.replicas if pin else None)
                    if key not in cache:
                        cache[key] = _stage(cm, start, end, o, reach, w, c, pin.replicas if pin else None)
                    st = cache[key]
                    if st is None:
                        continue
                    rows = min(c.batch_size, max(1, math.ceil(w.concurrent_sequences * st.reach / st.replicas)))
                    for lab in labels:
                        hop = 0.0 if lab.stage is None else cm.hop_s(by_name[lab.stage.pool], o.pool, rows)
                        share = st.step_s + hop
                        lat = lab.lat + (share * st.reach if c.tpot_mode == "mean" else share)
                        if slo is not None and lat * prune / w.tokens_per_pass > slo + 1e-12:
                            continue  # latency only grows along a path
                        usage = list(lab.usage)
                        usage[pidx[o.pool.name]] += st.replicas
                        if any(u > n for u, n in zip(usage, counts)):
                            continue
                        stage = st.model_copy(update={"hop_in_s": hop})
                        new.append(_Label(lab.cost + st.replicas * o.pool.cost_per_hour, lat, tuple(usage), stage, lab))
                if not new:
                    continue
                new.sort(key=lambda x: (round(x.cost, 9), x.lat, x.usage, _splits(x)))
                kept: list[_Label] = []
                for lab in new:
                    if not any(_dominated(lab, q) for q in kept):
                        kept.append(lab)
                    if len(kept) >= c.max_labels:
                        break
                nxt[(end, oid)] = kept
                if end == L and (c.num_stages is None or c.num_stages == k + 1) and all(s <= k for s in pins):
                    finals.extend(lab for lab in kept if slo is None
                                  or _p99(lab, c, w) <= slo + 1e-12)
        layers.append(nxt)
    return finals


def _stages_of(lab: _Label) -> list[StagePlan]:
    out: list[StagePlan] = []
    node: _Label | None = lab
    while node is not None and node.stage is not None:
        out.append(node.stage)
        node = node.parent
    return out[::-1]


def _p99(lab: _Label, c: Constraints, w: Workload) -> float:
    """Predicted p99 TPOT of a whole plan, with its own (remembered or current) factor."""
    return lab.lat * p99_factor_of(_stages_of(lab), c) / w.tokens_per_pass


def _to_plan(lab: _Label, pools: Sequence[PoolSpec], c: Constraints, w: Workload, met: bool) -> Plan:
    stages = _stages_of(lab)
    devices = {p.name: 0 for p in pools}
    for s in stages:
        devices[s.pool] += s.replicas
    full = sum(s.step_s + s.hop_in_s for s in stages)
    notes = []
    for i, s in enumerate(stages):
        if s.utilisation > c.target_utilisation + 1e-9:
            notes.append(f"stage {i} runs at {s.utilisation:.0%} > target {c.target_utilisation:.0%} "
                         f"(replicas pinned to {s.replicas}).")
    if not met:
        notes.append(f"no feasible plan meets tpot_slo_s={c.tpot_slo_s}; this is the lowest-TPOT plan "
                     f"({lab.lat:.4g} s). Add faster devices, allow more stages, or relax the SLO.")
    tpot = lab.lat / w.tokens_per_pass
    return Plan(stages=stages, cost=round(lab.cost, 9), tpot_s=tpot, tpot_p99_s=tpot * p99_factor_of(stages, c),
                tpot_full_depth_s=full, devices=devices, meets_slo=met, notes=notes)


def plan(model: ModelShape, pools: Sequence[PoolSpec], workload: Workload,
         constraints: Constraints | None = None, cost_model: CostModel | None = None) -> Plan:
    """Best placement for ``workload`` (see the module docstring for the objective)."""
    c = constraints or Constraints()
    reach = _validate(model, pools, workload, c)
    cm = cost_model or CostModel(model)
    finals = _search(model, pools, reach, workload, c, cm, use_slo=c.tpot_slo_s is not None)
    if finals:
        best = min(finals, key=lambda x: (round(x.cost, 9), x.lat, _depth(x), _splits(x)))
        return _explained(_to_plan(best, pools, c, workload, met=True), model, pools, workload, c, cm)
    if c.tpot_slo_s is not None:
        finals = _search(model, pools, reach, workload, c, cm, use_slo=False)
        if finals:
            best = min(finals, key=lambda x: (_p99(x, c, workload), round(x.cost, 9), _depth(x), _splits(x)))
            return _explained(_to_plan(best, pools, c, workload, met=False), model, pools, workload, c, cm)
    raise PlacementError(_diagnose(model, pools, workload, c, cm))


def _explained(p: Plan, model: ModelShape, pools: Sequence[PoolSpec], w: Workload, c: Constraints,
               cm: CostModel) -> Plan:
    """``p`` with one reason per stage: each other pool/precision for the same layers (sized
    for the same load, the rest of the plan unchanged), what it would cost and predict, and
    why it lost (dearer, misses the SLO, does not fit)."""
    reach = list(w.reach) if w.reach is not None else [1.0] * model.num_layers
    pins = {q.stage: q for q in c.pins}
    free = c.model_copy(update={"max_replicas_per_stage": 10**9})
    slo = c.tpot_slo_s
    out = []
    for k, st in enumerate(p.stages):
        head = (f"stage {k} (layers {st.start}-{st.end - 1}, {st.reach:.0%} of tokens reach it): {st.pool} "
                f"x{st.replicas} {st.precision}")
        pin = pins.get(k)
        if pin is not None and pin.pool is not None:
            out.append(f"{head}: pinned to pool {pin.pool}")
            continue
        alts = []
        for o in _options(pools, c, None):
            if (o.pool.name, o.precision) == (st.pool, st.precision):
                continue
            alt = _stage(cm, st.start, st.end, o, reach, w, free, None)
            if alt is None or alt.replicas > min(o.pool.count, c.max_replicas_per_stage):
                alts.append(f"{o.pool.name} {o.precision} does not fit (its memory, or more replicas than the pool's "
                            f"{o.pool.count} devices)")
                continue
            deps = [alt.deployment() if i == k else d for i, d in enumerate(p.deployments())]
            e = evaluate(model, pools, w, deps, c, cm)
            what = f"{o.pool.name} x{alt.replicas} would cost {e.cost:.2f}/h at p99 TPOT {1e3 * e.tpot_p99_s:.1f} ms"
            if placement_signature(deps) in c.tpot_p99_factors:
                what += " (its p99 as measured when it served)"
            if slo is not None and e.tpot_p99_s > slo + 1e-12:
                alts.append(f"{what}, over the {1e3 * slo:.1f} ms SLO")
            elif e.cost > p.cost + 1e-9:
                alts.append(f"{what}: dearer")
            else:
                alts.append(f"{what}: slower at no lower cost")
        out.append(f"{head}" + (f"; {'; '.join(alts)}" if alts else ": the only option"))
    return p.model_copy(update={"reasons": out})


def _depth(lab: _Label) -> int:
    n, node = 0, lab
    while node is not None and node.stage is not None:
        n, node = n + 1, node.parent
    return n


def _splits(lab: _Label) -> tuple[int, ...]:
    out, node = [], lab
    while node is not None and node.stage is not None:
        out.append(node.stage.start)
        node = node.parent
    return tuple(reversed(out))


def _diagnose(model: ModelShape, pools: Sequence[PoolSpec], w: Workload, c: Constraints, cm: CostModel) -> str:
    """Name the binding problem when no plan exists."""
    fits = [p.name for p in pools
            if model.weight_bytes(model.layer_params(), min(p.precisions, key=_wbytes)) < p.usable_bytes]
    if not fits:
        need = model.weight_bytes(model.layer_params(), "int8")
        largest = max(p.usable_bytes for p in pools)
        return (f"model {model.name} cannot fit: one layer needs >= {need / 2**20:.1f} MiB but the largest usable "
                f"device memory is {largest / 2**20:.1f} MiB; add memory, lower precision, or use bigger devices.")
    stages = c.num_stages or c.max_stages
    return (f"no placement of {model.name} fits in {stages} stage(s) with the pools' memory and device counts "
            f"({', '.join(f'{p.name}: {p.count}' for p in pools)}) at {w.decode_tokens_per_s:g} decode tok/s and "
            f"{w.concurrent_sequences} sequences; add devices, allow more stages (max_stages), allow int8, "
            "or lower the load / max_context.")


def _wbytes(precision: str) -> float:
    return PRECISION_INFO[precision].weight_bytes


def evaluate(model: ModelShape, pools: Sequence[PoolSpec], workload: Workload,
             stages: Sequence[StagePlacement], constraints: Constraints | None = None,
             cost_model: CostModel | None = None) -> Plan:
    """Predicted metrics of an existing placement (replica counts as given, not re-planned).

    Stages must be contiguous and cover all layers; a stage that cannot hold its KV at
    this replica count gets utilisation ``inf``.
    """
    c = constraints or Constraints()
    reach = _validate(model, pools, workload, c.model_copy(update={"pins": [], "split": None, "num_stages": None}))
    cm = cost_model or CostModel(model)
    by_name = {p.name: p for p in pools}
    pos, lat, cost, out, prev = 0, 0.0, 0.0, [], None
    for d in stages:
        if d.start != pos:
            raise PlacementError(f"stages must be contiguous from layer 0; stage at {d.start} follows layer {pos}.")
        pos = d.end
        pool = by_name[d.pool]
        st = _stage(cm, d.start, d.end, _Opt(pool, d.precision), reach, workload,
                    c.model_copy(update={"max_replicas_per_stage": 10**9}), max(d.replicas, 1))
        if st is None:
            st = StagePlan(**d.model_dump(), utilisation=math.inf, reach=reach[d.start])
        hop = 0.0
        if prev is not None:
            hop = cm.hop_s(prev, pool, min(c.batch_size, max(1, math.ceil(
                workload.concurrent_sequences * st.reach / max(st.replicas, 1)))))
        st = st.model_copy(update={"hop_in_s": hop})
        lat += (st.step_s + hop) * (st.reach if c.tpot_mode == "mean" else 1.0)
        cost += d.replicas * pool.cost_per_hour
        out.append(st)
        prev = pool
    if pos != model.num_layers:
        raise PlacementError(f"stages cover layers 0..{pos} but the model has {model.num_layers}; add the rest.")
    devices = {p.name: sum(s.replicas for s in out if s.pool == p.name) for p in pools}
    lat /= workload.tokens_per_pass
    factor = p99_factor_of(stages, c)
    met = c.tpot_slo_s is None or lat * factor <= c.tpot_slo_s
    return Plan(stages=out, cost=round(cost, 9), tpot_s=lat, tpot_p99_s=lat * factor,
                tpot_full_depth_s=sum(s.step_s + s.hop_in_s for s in out), devices=devices, meets_slo=met)
