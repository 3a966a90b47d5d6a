"""Apply the policy's moves to a running Serve application, one knob at a time.

A move becomes one or more *steps*; a step changes one field of one stage deployment in
the application's Serve config (``num_replicas``, or the ``pool_<name>`` resource in
``ray_actor_options``) and re-applies the config - the in-process ``serve deploy``. Serve
updates that deployment alone because the application's ``args`` never change. After
each step the mover waits until the deployment is HEALTHY with exactly the new replica
set RUNNING and every one of those replicas registered (so the ingress routes to it)
before the next step (make before break), with a deadline; on failure it restores the
deployment's previous entry and raises :class:`MoveFailed`.

Crash safety: before a step is applied, the intent (the move, the config before it, the
config the step leads to, the step index) is written to Ray's internal KV, and deleted
when the move is complete. :meth:`Mover.reconcile` runs when the controller starts: if an
intent is left, the deployment's live entry is compared with the intent's ``before`` and
``target`` entries - applied and it was the last step: wait for it to become healthy and
finish; never applied: drop it (the next interval re-plans from the live state); anything
else (half-applied, or a multi-step move stopped between steps): restore ``before``.
So a move is never applied twice and never left half done.

Knobs:

* ``set_replicas`` (knob ``replicas``): one step. Never to 0 - the last replica holding a
  layer is never removed.
* ``add`` on a new pool for the same layers (knob ``pool``): Serve replaces replicas on a
  resource change by a rolling update. By default that stops old replicas while starting
  new ones, which with one replica leaves the stage empty for a replica start. Where Serve
  has ``max_surge_percent`` (2.60+) the step also sets it to 100, so Serve readies the new
  replicas before it stops the old ones (one step); on older Serve the mover first scales
  the deployment to at least 2 on the old pool, then switches the pool (the rolling update
  then always keeps a live replica), then sets the target count. The matching
  ``remove`` of the old pool is then a no-op (the deployment is already on the new pool).
* ``add`` of another precision for the same layers and pool (knob ``precision``): the same steps, with the pool one
  setting ``ray_actor_options.runtime_env.env_vars.OFFRAMP_STAGE_DTYPE`` of that deployment
  (Serve merges deployment env vars into the app's runtime env, and a changed actor option
  is again a rolling update of that deployment alone; the stage reads the variable before
  its ``stages[].dtype`` arg). A move of both pool and precision makes both steps.
* split points (knob ``split``): one boundary at a time. The layers of a deployment are
  set per deployment in ``ray_actor_options.runtime_env.env_vars.OFFRAMP_STAGE_LAYERS``
  (``start:end``; the app ``args`` - and so every other deployment - stay untouched).
  Moving the boundary between Stage k and Stage k+1 from b to b' takes two rolling
  updates: first the side that *gains* layers, then the side that loses them, each with
  the same guard as a pool move (surge, or scale to 2). Throughout, both chains stay
  complete because the ingress routes by layer and may enter a replica inside its range (a replica of the
  old Stage k+1, layers b..c, serves sequences arriving at b' > b from the grown Stage k);
  see :class:`~offramp.deployments.pipeline.Router` and docs/placement.md, "Split moves".
  A sequence whose replica goes away replays its tokens on the new chain.

Crash safety covers moves that touch two deployments: reconcile compares every touched
deployment with the intent, and a rollback restores them in reverse order (the shrunk side
first), which is again a sequence of complete chains.
"""
from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

from offramp.cluster.records import IngressTotals, StageRecord
from offramp.deployments.config import PRECISIONS, ServeApp, Setting, StageEntry, stage_name
from offramp.errors import OfframpError
from offramp.placement.planner import StagePlacement
from offramp.placement.policy import Move

log = logging.getLogger("offramp.placement")

INTENT_KEY = "intent/{app}"


class MoveFailed(OfframpError):
    """A move did not reach a healthy state before its deadline; it was rolled back."""


class MoveDeferred(OfframpError):
    """A move this mover does not make now: stale against the live config (re-plan), an
    autoscaled deployment, a last replica of its layers, or an earlier move not yet restored."""


class Ops(Protocol):
    """What the controller and the mover need from the cluster. Production:
    :class:`RayOps` (every call through :mod:`offramp.cluster.rayops`); tests: a fake."""

    def deployed_app_config(self, app: str) -> dict | None: ...
    def deploy_app_config(self, app: str, config: dict) -> None: ...
    def deployment_states(self, app: str) -> dict[str, dict]: ...
    def registry_endpoints(self, app: str) -> list[StageRecord]: ...
    def ingress_stats(self, app: str) -> IngressTotals | None: ...
    def pool_capacity(self) -> dict[str, int]: ...
    def kv_get(self, key: str) -> bytes | None: ...
    def kv_put(self, key: str, value: bytes) -> None: ...
    def kv_del(self, key: str) -> None: ...
    def clock(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class RayOps:
    """:class:`Ops` on a live cluster."""

    def __init__(self):
        from offramp.cluster import rayops

        self.r = rayops

    def deployed_app_config(self, app):
        return self.r.deployed_app_config(app)

    def deploy_app_config(self, app, config):
        self.r.deploy_app_config(app, config)

    def deployment_states(self, app):
        return self.r.deployment_states(app)

    def registry_endpoints(self, app):
        return self.r.registry_endpoints(app)

    def ingress_stats(self, app):
        """Stage calls and TPOT of every ingress replica combined (their registry
        heartbeats); else one replica's, whichever answers GET /v1/offramp/stats."""
        import httpx

        try:
            total = self.r.registry_ingress(app)
        except Exception:  # noqa: BLE001 - registry restarting: fall back to HTTP
            total = None
        if total is not None:
            return total
        root = self.r.http_root(app)
        if root is None:
            return None
        try:
            r = httpx.get(f"{root}/v1/offramp/stats", timeout=5)
            return IngressTotals.from_dict(r.json()) if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def pool_capacity(self):
        return self.r.pool_capacity()

    def kv_get(self, key):
        return self.r.kv_get(key)

    def kv_put(self, key, value):
        self.r.kv_put(key, value)

    def kv_del(self, key):
        self.r.kv_del(key)

    def clock(self):
        return time.time()

    def sleep(self, seconds):
        time.sleep(seconds)


@functools.lru_cache(maxsize=1)
def serve_surges() -> bool:
    """True when this Ray Serve takes ``max_surge_percent`` on a deployment (2.60 does): a
    rolling update then starts and readies the new replicas before it stops old ones."""
    try:
        from ray.serve.schema import DeploymentSchema

        return "max_surge_percent" in DeploymentSchema.model_fields
    except Exception:  # noqa: BLE001 - no Serve here: the fallback guard is always correct
        return False


@dataclass(frozen=True)
class Step:
    """One Serve apply: one setting of one deployment's config (``setting``: what it sets,
    not a policy knob: a ``pool`` knob's move may take a ``num_replicas`` and a ``pool``
    step). ``surge``: also set the deployment's
    ``max_surge_percent`` to 100, so the rolling update this step causes is make before
    break inside Serve (new replicas ready, then old ones stop)."""

    deployment: str  # e.g. "Stage2"
    stage: int
    setting: Setting
    value: Any
    surge: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        """From ``asdict`` (a persisted intent; one written before ``knob`` was renamed
        ``setting`` too)."""
        return cls(**{("setting" if k == "knob" else k): v for k, v in d.items()})

    def apply_to(self, app_config: dict) -> dict:
        if self.setting == "num_replicas" and (not isinstance(self.value, int) or self.value < 1):
            raise MoveDeferred(f"{self.deployment}: num_replicas={self.value}; the mover never scales a stage "
                               "below 1 (its layers would have no replica)")
        return ServeApp(app_config).with_setting(self.deployment, self.setting, self.value, self.surge).config


def stage_placement(app_config: dict, ranges: list[tuple[int, int]]) -> list[StagePlacement]:
    """Current placement (stage k -> layers, pool, precision, replicas) from the applied config
    (``ranges``: the app's split; split moves' per-deployment overrides win)."""
    return [StagePlacement(start=st.layers[0], end=st.layers[1], pool=st.pool, precision=st.precision,
                           replicas=max(st.replicas, 1)) for st in ServeApp(app_config, ranges).stages()]


def _managed(app_config: dict, k: int) -> StageEntry:
    """Stage ``k``'s entry; refused when Serve autoscales it (the controller does not fight Serve)."""
    st = ServeApp(app_config).stage(k)
    if st.autoscaled:
        raise MoveDeferred(f"{st.name} is autoscaled by Serve; remove its autoscaling_config to let the "
                           "placement controller manage it")
    return st


def _guarded(app_config: dict, name: str, k: int, changes: list[tuple[str, Any]],
             replicas: int | None = None) -> list[Step]:
    """Steps that make ``changes`` (setting, value) to a deployment - each a rolling update -
    without ever leaving it empty, then give it ``replicas`` (default: as many as now).
    With Serve's surge each change is one step (new replicas ready before old ones stop);
    without it the deployment holds at least 2 replicas while the changes roll."""
    n = ServeApp(app_config).stage(k).replicas
    surge = serve_surges()
    during = n if surge else max(n, 2)
    steps = [] if during == n else [Step(name, k, "num_replicas", during)]
    steps += [Step(name, k, setting, value, surge) for setting, value in changes]  # type: ignore[arg-type]
    final = n if replicas is None else replicas
    if final != during:
        steps.append(Step(name, k, "num_replicas", final))
    return steps


def split_steps(app_config: dict, ranges: list[tuple[int, int]], target: list[int]) -> list[Step]:
    """Steps that shift one boundary of ``ranges`` to its value in ``target`` (split points:
    the first layer of stages 1..N-1): the first boundary that can move there while both
    neighbours keep a layer (one always can, for any target of the same stage count). The
    stage that gains layers is rolled first, then the one that loses them."""
    bounds = [r[0] for r in ranges[1:]]
    n, last = len(ranges), ranges[-1][1]
    if len(target) != len(bounds) or list(target) != sorted(set(target)) or not all(0 < t < last for t in target):
        raise MoveDeferred(f"split {target} is not {len(bounds)} increasing layer indices in 1..{last - 1} "
                           f"(a split move keeps the number of stages, {n})")
    edges = [0, *bounds, last]
    i = next((i for i in range(len(bounds)) if bounds[i] != target[i] and edges[i] < target[i] < edges[i + 2]), None)
    if i is None:
        return []  # already there
    lo, hi, b = i, i + 1, target[i]  # the boundary between Stage i and Stage i+1 moves to b
    for k in (lo, hi):
        _managed(app_config, k)
    new = {lo: (ranges[lo][0], b), hi: (b, ranges[hi][1])}
    grow = lo if b > ranges[lo][1] else hi
    steps = []
    for k in (grow, hi if grow == lo else lo):
        steps += _guarded(app_config, stage_name(k), k, [("layers", f"{new[k][0]}:{new[k][1]}")])
    return steps


def plan_steps(app_config: dict, ranges: list[tuple[int, int]], move: Move) -> list[Step]:
    """The Serve steps that make ``move`` (empty: nothing to do). ``ranges``: the app's
    split; the deployments' own layer overrides (earlier split moves) are applied here."""
    d = move.deployment
    if move.action == "rebalance":
        return []
    ranges = [st.layers for st in ServeApp(app_config, ranges).stages()]
    if move.knob == "split" and move.action == "add":
        if move.split is None:
            raise MoveDeferred("a split move needs its target split points (Move.split); re-plan")
        return split_steps(app_config, ranges, move.split)
    if (d.start, d.end) not in ranges:
        if move.action == "remove":
            return []  # the split move that made the new ranges already retired these layers
        raise MoveDeferred(f"layers {d.start}-{d.end - 1} are no stage's any more (a split move changed them); "
                           "re-plan")
    k = ranges.index((d.start, d.end))
    name = stage_name(k)
    st = _managed(app_config, k)
    cur_n, cur_pool, cur_prec = st.replicas, st.pool if st.pool_pinned else "", st.precision
    if move.action == "set_replicas":
        if d.pool != cur_pool and cur_pool:
            raise MoveDeferred(f"{name} runs on pool {cur_pool}, the move is for {d.pool}; re-plan")
        return [] if move.replicas_to == cur_n else [Step(name, k, "num_replicas", move.replicas_to)]
    if move.action == "add":  # same layers, another pool and/or precision
        new_pool, new_prec = d.pool != cur_pool, d.precision != cur_prec
        if not (new_pool or new_prec):
            raise MoveDeferred(f"{name} already runs layers {d.start}-{d.end - 1} on {d.pool} in {d.precision}; "
                               "re-plan")
        if d.precision not in PRECISIONS:
            raise MoveDeferred(f"{name}: precision {d.precision!r} is not one a stage loads "
                               f"({', '.join(PRECISIONS)})")
        changes = ([("pool", d.pool)] if new_pool else []) + ([("precision", d.precision)] if new_prec else [])
        return _guarded(app_config, name, k, changes, move.replicas_to)
    if move.action == "remove":
        if d.pool != cur_pool or d.precision != cur_prec:
            return []  # the pool/precision move already replaced these replicas
        raise MoveDeferred(f"{name}: removing the only deployment of layers {d.start}-{d.end - 1} is never done")
    raise MoveDeferred(f"unknown move action {move.action}")


# -- the mover ---------------------------------------------------------------------------
@dataclass
class MoveResult:
    move: dict
    steps: list[dict]
    seconds: float
    outcome: str  # "applied" | "noop"


class Mover:
    """Applies moves through :class:`Ops`, one step at a time, with a durable intent."""

    def __init__(self, app: str, ops: Ops, ranges: list[tuple[int, int]], deadline_s: float = 120.0,
                 poll_s: float = 0.5, on_event: Callable[[dict], None] | None = None):
        self.app, self.ops, self.ranges = app, ops, list(ranges)
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self.on_event = on_event or (lambda e: None)
        self.key = INTENT_KEY.format(app=app)

    # intent ----------------------------------------------------------------------------
    def intent(self) -> dict | None:
        raw = self.ops.kv_get(self.key)
        return None if raw is None else json.loads(raw)

    def _save(self, intent: dict) -> None:
        self.ops.kv_put(self.key, json.dumps(intent).encode())

    def _config(self) -> dict:
        cfg = self.ops.deployed_app_config(self.app)
        if cfg is None:
            raise MoveDeferred(f"application {self.app!r} has no applied Serve config (deployed with serve.run?); "
                               "deploy it from a config (serve deploy / offramp serve) to let the controller move it")
        return cfg

    # apply -----------------------------------------------------------------------------
    def apply(self, move: Move) -> MoveResult:
        t0 = self.ops.clock()
        if self.intent() is not None:  # a move whose restore failed: reconcile it first
            raise MoveDeferred("an earlier move is not yet restored (its intent is kept); reconcile it first")
        before = self._config()
        steps = plan_steps(before, self.ranges, move)
        if not steps:
            return MoveResult(move.model_dump(mode="json"), [], 0.0, "noop")
        intent = {"id": uuid.uuid4().hex[:12], "move": move.model_dump(mode="json"), "before": before,
                  "steps": [asdict(s) for s in steps], "step": -1, "target": before, "time": t0}
        cfg = before
        for i, step in enumerate(steps):
            cfg = step.apply_to(cfg)
            intent.update(step=i, target=cfg)
            self._save(intent)  # written before the apply: a crash from here on is reconciled
            self.on_event({"event": "step", "intent": intent["id"], "step": asdict(step)})
            try:
                # A step that restarts replicas is done when none of the old ones runs: right
                # after the apply, Serve may still report the old replica set HEALTHY.
                old = set() if step.setting == "num_replicas" else set(
                    (self.ops.deployment_states(self.app).get(step.deployment) or {}).get("running", []))
                self.ops.deploy_app_config(self.app, cfg)
                self.wait(step.deployment, step.stage, ServeApp(cfg).stage(step.stage).replicas, replaced=old)
            except Exception as e:  # noqa: BLE001 - any failure: restore, then report
                what = f"{step.deployment}: step {i + 1}/{len(steps)} ({step.setting}={step.value}) failed: {e}"
                if not self._restore(steps[: i + 1], before):
                    # The intent stays: the next reconcile (controller tick or restart) retries.
                    raise MoveFailed(f"{what}; restoring its previous settings failed too, the intent is kept "
                                     "for reconcile") from e
                self.ops.kv_del(self.key)
                raise MoveFailed(f"{what}; restored its previous settings") from e
        self.ops.kv_del(self.key)
        return MoveResult(move.model_dump(mode="json"), [asdict(s) for s in steps], self.ops.clock() - t0, "applied")

    def wait(self, deployment: str, stage: int, replicas: int, deadline_s: float | None = None,
             replaced: set[str] = frozenset()) -> None:
        """Until ``deployment`` is HEALTHY with exactly ``replicas`` RUNNING, none of them in
        ``replaced`` (the replicas a restarting step replaces), and all of them heartbeating in
        the registry. Raises TimeoutError / RuntimeError."""
        end = self.ops.clock() + (deadline_s or self.deadline_s)
        last: Any = None
        while True:
            st = self.ops.deployment_states(self.app).get(deployment)
            last = st
            if st is not None:
                if st["status"] in ("DEPLOY_FAILED",):
                    raise RuntimeError(f"Serve reports {deployment} {st['status']}")
                running = set(st["running"])
                if (st["status"] == "HEALTHY" and len(running) == replicas and not running & replaced
                        and sum(st["replicas"].values()) == replicas):
                    registered = {e.replica for e in self.ops.registry_endpoints(self.app) if e.stage == stage}
                    if running <= registered:
                        return
                    last = {**st, "registered": sorted(registered)}
            if self.ops.clock() >= end:
                raise TimeoutError(f"{deployment} not healthy with {replicas} registered replicas after "
                                   f"{deadline_s or self.deadline_s:.0f}s (last state: {last})")
            self.ops.sleep(self.poll_s)

    def _restore(self, steps: list[Step], before: dict) -> bool:
        """Put the entries of the deployments ``steps`` touched back as in ``before`` (others
        as they are now), the last touched first: undoing a split move shrinks the grown side
        back only after the other side holds its old layers again, so chains stay complete.
        False when a deployment could not be restored (the caller keeps the intent)."""
        ok = True
        touched = list(dict.fromkeys((s.deployment, s.stage) for s in steps))
        old = ServeApp(before)
        for deployment, stage in reversed(touched):
            entry = old.entry(deployment)
            try:
                live = ServeApp(self._config())
                if live.entry(deployment) != entry:
                    self.ops.deploy_app_config(self.app, live.with_entry(entry).config)
                self.wait(deployment, stage, old.stage(stage).replicas)
            except Exception as e:  # noqa: BLE001 - the operator must look; the intent log says what
                ok = False
                log.error("restoring %s failed: %s", deployment, e)
                self.on_event({"event": "restore_failed", "deployment": deployment, "error": str(e)})
        return ok

    # recovery --------------------------------------------------------------------------
    def reconcile(self) -> dict | None:
        """Bring a move left by a crashed controller to a consistent end. Returns what was done."""
        intent = self.intent()
        if intent is None:
            return None
        steps = [Step.from_dict(st) for st in intent["steps"]]
        touched = list(dict.fromkeys(st.deployment for st in steps))
        target_app = ServeApp(intent["target"])
        apps = (ServeApp(self._config()), target_app, ServeApp(intent["before"]))
        live, target, before = ({n: app.entry(n) for n in touched} for app in apps)
        last = intent["step"] == len(steps) - 1
        restored = True
        if live == target and last:
            step = steps[-1]
            try:
                self.wait(step.deployment, step.stage, target_app.stage(step.stage).replicas)
                outcome = "completed"
            except Exception as e:  # noqa: BLE001
                restored = self._restore(steps, intent["before"])
                outcome = f"rolled back: the applied move did not become healthy ({e})"
        elif live == before:
            outcome = "dropped: the move was never applied"
        else:
            restored = self._restore(steps[: max(intent["step"], 0) + 1], intent["before"])
            outcome = f"rolled back: stopped at step {intent['step'] + 1}/{len(steps)}"
        if restored:
            self.ops.kv_del(self.key)
        else:  # kept: the next reconcile tries again; no new move starts meanwhile
            outcome = f"restore failed, intent kept for the next reconcile ({outcome})"
        report = {"intent": intent["id"], "move": intent["move"], "outcome": outcome}
        self.on_event({"event": "reconcile", **report})
        return report
