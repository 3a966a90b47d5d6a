"""Hysteresis policy: turn (current placement, new plan) into a few safe moves (pure).

Rules (ARCHITECTURE.md, "Placement controller"):

* act only on a breach sustained for ``sustain_intervals`` intervals, or a predicted
  gain (cost, or TPOT at no higher cost) of at least ``min_gain``: a dearer placement
  only on a sustained breach;
* knobs in order of cost: routing < replicas < pool < precision < split points; the controller's
  ``max_knob`` caps which of them a plan may turn;
* per-stage (per-layer) cool-down, at most ``max_moves_per_interval`` moves per interval;
* make before break: new deployments are added before old ones are removed, and a move
  that would leave any layer without a replica is never emitted;
* dry-run logs the decisions without updating the policy's state.

Finishing a transition (removing a deployment whose layers are already served by live
target deployments) skips the trigger and the cool-down: holding both costs devices.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field

from offramp.placement.planner import Plan, StagePlacement
from offramp.placement.signals import StageSignals

# The one vocabulary of knobs, in cost order (ControllerConfig.max_knob names one of them;
# the mover's steps set deployment *settings*, a different thing: mover.Step.setting).
PlanKnob = Literal["replicas", "pool", "precision", "split"]  # what a plan turns (ControllerConfig.max_knob)
Knob = Literal["routing", PlanKnob]
KNOB_RANK: dict[str, int] = {k: i for i, k in enumerate(get_args(Knob))}


class Move(BaseModel):
    """One action for the mover. Apply one at a time, waiting for new replicas to warm."""

    action: Literal["rebalance", "set_replicas", "add", "remove"] = Field(..., description="What to do.")
    knob: Knob = Field(..., description="Which knob this turns (cost order routing < replicas < pool < precision "
                       "< split).")
    deployment: StagePlacement = Field(..., description="Target deployment (for set_replicas: the new count).")
    replicas_from: int = Field(0, description="Replicas before the move.")
    replicas_to: int = Field(0, description="Replicas after the move.")
    split: list[int] | None = Field(None, description="Knob split: the target plan's split points; the mover "
                                    "shifts one boundary toward them per move.")
    reason: str = Field("", description="Why, for people reading the log.")


class Decision(BaseModel):
    """One log record of the policy (JSON via ``model_dump_json``)."""

    time: float = Field(..., description="Controller clock, seconds.")
    outcome: Literal["apply", "dry_run", "hold"] = Field(..., description="Emitted, logged only, or held back.")
    move: Move | None = Field(None, description="The move (None for a plain hold).")
    reason: str = Field(..., description="Human-readable explanation.")
    gain: float = Field(0.0, description="Predicted relative gain of the target plan.")
    breach_intervals: int = Field(0, description="Longest sustained breach among stages, in intervals.")


class PolicyConfig(BaseModel):
    """Hysteresis settings."""

    model_config = ConfigDict(extra="forbid")

    sustain_intervals: int = Field(3, ge=1, description="Consecutive breached intervals before acting.")
    min_gain: float = Field(0.25, ge=0, description="Predicted relative gain that justifies a move.")
    cooldown_s: float = Field(300.0, ge=0, description="Seconds a layer range rests after a move.")
    max_moves_per_interval: int = Field(1, ge=1, description="Moves emitted per interval.")
    dry_run: bool = Field(False, description="Log decisions, change nothing.")
    max_oldest_wait_s: float = Field(1.0, gt=0, description="Queue age counted as a breach.")
    max_busy_fraction: float = Field(0.9, gt=0, le=1, description="Replica busy fraction counted as a breach.")


# --- placement algebra ------------------------------------------------------------
def covered_layers(placement: Sequence[StagePlacement], num_layers: int) -> list[bool]:
    cov = [False] * num_layers
    for d in placement:
        if d.replicas >= 1:
            for l in range(d.start, min(d.end, num_layers)):
                cov[l] = True
    return cov


def apply_move(placement: Sequence[StagePlacement], move: Move) -> list[StagePlacement]:
    """The placement after ``move`` (pure; the mover's dry-run)."""
    out = [d for d in placement if d.key != move.deployment.key]
    if move.action in ("add", "set_replicas"):
        out.append(move.deployment.model_copy(update={"replicas": move.replicas_to}))
    elif move.action == "rebalance":
        return list(placement)
    return sorted(out, key=lambda d: d.key)


def is_safe(placement: Sequence[StagePlacement], move: Move, num_layers: int) -> bool:
    """True when every layer keeps a replica after ``move``."""
    before = covered_layers(placement, num_layers)
    after = covered_layers(apply_move(placement, move), num_layers)
    return all(a or not b for a, b in zip(after, before))


def _knob_of(d: StagePlacement, other: Sequence[StagePlacement]) -> Knob:
    """The knob that adds (or retires) ``d`` against the ``other`` placement: its layers
    on another precision of the same pool, on another pool, or in another split."""
    if not any((o.start, o.end) == (d.start, d.end) for o in other):
        return "split"
    return "precision" if any((o.start, o.end, o.pool) == (d.start, d.end, d.pool) for o in other) else "pool"


def diff(current: Sequence[StagePlacement], target: Sequence[StagePlacement],
         num_layers: int) -> list[Move]:
    """Moves from ``current`` to ``target``, cheapest knob first, adds before removes.

    Each remove is emitted only if, after the earlier moves in the list, every layer
    still has a replica (make before break).
    """
    cur = {d.key: d for d in current}
    tkeys = {d.key for d in target}
    tsplit = [d.start for d in sorted(target, key=lambda d: d.start)[1:]]
    grow: list[Move] = []
    for t in sorted(target, key=lambda d: d.key):
        if t.key in cur:
            c = cur[t.key]
            if c.replicas != t.replicas:
                grow.append(Move(action="set_replicas", knob="replicas", deployment=t, replicas_from=c.replicas,
                                 replicas_to=t.replicas, reason=f"layers {t.start}-{t.end - 1} on {t.pool}: "
                                 f"{c.replicas} -> {t.replicas} replicas for the offered load"))
        else:
            knob = _knob_of(t, current)
            what = (f"new split: layers {t.start}-{t.end - 1} on {t.pool}/{t.precision}" if knob == "split"
                    else f"move layers {t.start}-{t.end - 1} to {t.pool}/{t.precision}")
            grow.append(Move(action="add", knob=knob, deployment=t, replicas_from=0, replicas_to=t.replicas,
                             split=tsplit if knob == "split" else None,
                             reason=f"{what} x{t.replicas} (added before the old one is removed)"))
    grow.sort(key=lambda m: (KNOB_RANK[m.knob], m.replicas_to < m.replicas_from, m.deployment.key))
    shrink: list[Move] = []
    for c in sorted(current, key=lambda d: d.key):
        if c.key not in tkeys:
            knob = _knob_of(c, target)
            shrink.append(Move(action="remove", knob=knob, deployment=c, replicas_from=c.replicas, replicas_to=0,
                               reason=f"retire layers {c.start}-{c.end - 1} on {c.pool}/{c.precision}: "
                               "replaced by the target placement"))
    out, state = [], list(current)
    for m in grow + shrink:
        if m.action == "remove" and not is_safe(state, m, num_layers):
            continue
        out.append(m)
        state = apply_move(state, m)
    return out


def _is_completion(current: Sequence[StagePlacement], target: Sequence[StagePlacement], m: Move) -> bool:
    """A remove whose layers are already served by live deployments of the target."""
    if m.action != "remove":
        return False
    tkeys = {d.key for d in target}
    live = [d for d in current if d.key in tkeys and d.replicas >= 1]
    return all(any(d.start <= l < d.end for d in live) for l in range(m.deployment.start, m.deployment.end))


def predicted_gain(current: Plan, target: Plan) -> float:
    """Relative improvement of ``target`` over ``current`` in cost or TPOT (the larger), the
    two weighed together as the planner's objective does: a dearer target gains nothing.
    Paying more is justified by a *sustained* breach only (the breach rule): one noisy
    interval over the SLO must not buy devices that the next quiet one gives back."""
    g_cost = (current.cost - target.cost) / current.cost if current.cost > 0 else 0.0
    g_lat = (current.tpot_s - target.tpot_s) / current.tpot_s if current.tpot_s > 0 else 0.0
    if not math.isfinite(g_lat):
        g_lat = 1.0
    if target.cost > current.cost + 1e-9:
        return 0.0
    return max(g_cost, g_lat)


def detect_breaches(signals: Mapping[tuple[int, int], Sequence[StageSignals]], cfg: PolicyConfig,
                    tpot_slo_s: float | None = None, measured_tpot_s: float | None = None) -> dict[tuple[int, int], str]:
    """Stages (by layer range) whose measured signals breach the targets this interval."""
    out: dict[tuple[int, int], str] = {}
    for rng, sigs in sorted(signals.items()):
        for s in sigs:
            if s.oldest_wait_s > cfg.max_oldest_wait_s:
                out[rng] = f"replica {s.replica} oldest wait {s.oldest_wait_s:.2f}s > {cfg.max_oldest_wait_s}s"
                break
            if s.busy_fraction > cfg.max_busy_fraction:
                out[rng] = f"replica {s.replica} busy {s.busy_fraction:.0%} > {cfg.max_busy_fraction:.0%}"
                break
    if tpot_slo_s is not None and measured_tpot_s is not None and measured_tpot_s > tpot_slo_s:
        for rng in signals:
            out.setdefault(rng, f"TPOT {measured_tpot_s * 1e3:.1f} ms > SLO {tpot_slo_s * 1e3:.1f} ms")
    return out


class Policy:
    """Stateful hysteresis between intervals. Call :meth:`step` once per control interval."""

    def __init__(self, num_layers: int, config: PolicyConfig | None = None):
        self.num_layers = num_layers
        self.cfg = config or PolicyConfig()
        self._breach: dict[tuple[int, int], int] = {}
        self._last_move: list[float] = [-math.inf] * num_layers

    # cool-down state, for the controller (persisted across restarts, restarted when a move is done)
    def last_moves(self) -> list[float | None]:
        """When each layer last moved (None: never); JSON-safe, for persisting."""
        return [None if not math.isfinite(t) else t for t in self._last_move]

    def restore_last_moves(self, times: Sequence[float | None]) -> None:
        """Undo :meth:`last_moves` (a restarted controller keeps its cool-downs)."""
        for l, t in enumerate(list(times)[: self.num_layers]):
            self._last_move[l] = -math.inf if t is None else t

    def moved(self, layers: range, at: float | None) -> None:
        """Layers ``layers`` moved at ``at`` (their cool-down starts there); None: the move did
        not happen, so no cool-down."""
        for l in layers:
            self._last_move[l] = -math.inf if at is None else at

    def step(self, now: float, current: Sequence[StagePlacement], target: Plan, current_eval: Plan,
             breaches: Mapping[tuple[int, int], str] | None = None,
             routing: Sequence[Move] = ()) -> list[Decision]:
        """Decisions for this interval; those with outcome 'apply' are the moves to make, in order."""
        cfg, breaches = self.cfg, dict(breaches or {})
        counts = {r: self._breach.get(r, 0) + 1 for r in breaches}
        if not cfg.dry_run:
            self._breach = counts
        sustained = max(counts.values(), default=0)
        gain = predicted_gain(current_eval, target)
        tdeps = target.deployments()
        moves = list(routing) + diff(current, tdeps, self.num_layers)
        if not moves:
            return [Decision(time=now, outcome="hold", reason="placement already matches the plan",
                             gain=gain, breach_intervals=sustained)]
        triggered = sustained >= cfg.sustain_intervals or gain >= cfg.min_gain
        why = (f"breach sustained {sustained} intervals ({'; '.join(f'{a}-{b - 1}: {t}' for (a, b), t in sorted(breaches.items()))})"
               if sustained >= cfg.sustain_intervals else f"predicted gain {gain:.0%} >= {cfg.min_gain:.0%}")
        out: list[Decision] = []
        emitted, state = 0, list(current)
        for m in moves:
            if emitted >= cfg.max_moves_per_interval:
                break
            completion = _is_completion(state, tdeps, m)
            if not (triggered or completion):
                out.append(Decision(time=now, outcome="hold", move=m, gain=gain, breach_intervals=sustained,
                                    reason=f"held: breach {sustained}/{cfg.sustain_intervals} intervals and "
                                    f"gain {gain:.0%} < {cfg.min_gain:.0%}"))
                break
            layers = range(m.deployment.start, m.deployment.end)
            rest = max(self._last_move[l] for l in layers) + cfg.cooldown_s - now
            if rest > 0 and not completion:
                out.append(Decision(time=now, outcome="hold", move=m, gain=gain, breach_intervals=sustained,
                                    reason=f"held: layers {layers.start}-{layers.stop - 1} cooling down "
                                    f"{rest:.0f}s more"))
                continue
            if m.action == "remove" and not is_safe(state, m, self.num_layers):
                continue  # never leave a layer without a replica
            reason = m.reason + ("; finishing a transition" if completion else f"; {why}")
            out.append(Decision(time=now, outcome="dry_run" if cfg.dry_run else "apply",
                                move=m.model_copy(update={"reason": reason}), reason=reason,
                                gain=gain, breach_intervals=sustained))
            emitted += 1
            state = apply_move(state, m)
            if not cfg.dry_run:
                for l in layers:
                    self._last_move[l] = now
                if m.action != "remove":
                    self._breach = {r: 0 for r in self._breach}  # measure the new placement afresh
        return out
