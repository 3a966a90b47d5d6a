"""Offramp's Prometheus metrics, recorded through ``ray.util.metrics``.

Ray exports them on each node's metrics export port (``ray start --metrics-export-port``)
with a ``ray_`` prefix: ``offramp_early_exit_total`` is scraped as
``ray_offramp_early_exit_total``. Names have no dots (Ray silently drops such metrics) and
no tag is called ``deployment``, ``replica`` or ``application`` (Ray Serve reserves them;
Ray adds ``SessionName``, ``NodeAddress``, ... itself).

Every metric object is created on first use, and only when Ray is initialised (a Serve
replica always is); elsewhere (unit tests, the in-process engine) recording is a no-op.
Record through the helpers at the bottom so call sites stay one line each.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# Histogram boundaries (seconds / rows).
STEP_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TPOT_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

RESERVED_TAGS = frozenset({"deployment", "replica", "application"})


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" | "gauge" | "histogram"
    name: str
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()


SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("counter", "offramp_early_exit_total",
               "Tokens that left the pipeline at the exit gate after `stage` (full-depth tokens not counted).",
               ("stage", "task")),
    MetricSpec("counter", "offramp_gate_evaluations_total",
               "Rows whose exit gate after `stage` was evaluated (denominator of the activation ratio).",
               ("stage", "task")),
    MetricSpec("gauge", "offramp_gate_activation_ratio",
               "Recent fraction of evaluated rows that exited at the gate after `stage` (EWMA).",
               ("stage", "task")),
    MetricSpec("gauge", "offramp_exit_agreement_ratio",
               "Recent fraction of checked exited tokens equal to the full-depth token (EWMA, online audit).",
               ("stage", "task")),
    MetricSpec("counter", "offramp_exit_agreement_checks_total",
               "Exited tokens re-checked against full depth; `agreed` is true or false.",
               ("stage", "task", "agreed")),
    MetricSpec("histogram", "offramp_stage_step_seconds",
               "Wall time of one batched forward step of a stage.", ("stage", "pool"), tuple(STEP_BUCKETS)),
    MetricSpec("gauge", "offramp_stage_queue_depth",
               "Rows waiting for the next step of a stage replica.", ("stage", "pool")),
    MetricSpec("histogram", "offramp_stage_batch_size",
               "Rows in one batched step of a stage.", ("stage", "pool"), tuple(BATCH_BUCKETS)),
    MetricSpec("counter", "offramp_tokens_total",
               "Generated tokens by the stage they exited after (num_stages-1 = full depth).",
               ("model", "exit_stage")),
    MetricSpec("histogram", "offramp_ttft_seconds",
               "Time to first token, server side.", ("model",), tuple(TTFT_BUCKETS)),
    MetricSpec("histogram", "offramp_tpot_seconds",
               "Time per output token after the first, server side.", ("model",), tuple(TPOT_BUCKETS)),
    MetricSpec("counter", "offramp_hops_saved_total",
               "Stage visits skipped by early exits: num_stages-1-exit_stage per token.", ("exit_stage",)),
    MetricSpec("counter", "offramp_draft_tokens_total",
               "Speculative exits: tokens the first stage drafted with its exit head.", ("task", "model")),
    MetricSpec("counter", "offramp_accepted_draft_tokens_total",
               "Speculative exits: drafted tokens the deep stages accepted (acceptance rate = this / drafted).",
               ("task", "model")),
    MetricSpec("gauge", "offramp_requests_waiting_for_kv",
               "Requests an ingress replica holds until a stage replica has a free KV slot.", ("model",)),
    MetricSpec("counter", "offramp_kv_waits_total",
               "Times a request was queued at the ingress because a stage replica had no free KV slot.", ("model",)),
    MetricSpec("counter", "offramp_verify_rounds_total",
               "Speculative exits: verify rounds (deep-stage visits); each commits its accepted drafts + 1 token.",
               ("task", "model")),
)}


class _Noop:
    def inc(self, value: float = 1.0, tags: dict | None = None) -> None: ...
    def set(self, value: float, tags: dict | None = None) -> None: ...
    def observe(self, value: float, tags: dict | None = None) -> None: ...


NOOP = _Noop()
_lock = threading.Lock()
_objects: dict[str, Any] = {}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def get(name: str) -> Any:
    """The metric object ``name`` (a :data:`SPECS` key): a Ray metric once Ray is up,
    else :data:`NOOP` (checked again on the next call, so a later ``ray.init`` counts)."""
    obj = _objects.get(name)
    if obj is not None:
        return obj
    if not _ray_ready():
        return NOOP
    spec = SPECS[name]
    with _lock:
        obj = _objects.get(name)
        if obj is None:
            from ray.util import metrics as rm

            if spec.kind == "counter":
                obj = rm.Counter(spec.name, spec.description, spec.tags)
            elif spec.kind == "gauge":
                obj = rm.Gauge(spec.name, spec.description, spec.tags)
            else:
                obj = rm.Histogram(spec.name, spec.description, list(spec.buckets), spec.tags)
            _objects[name] = obj
    return obj


class _Ewma:
    """Exponentially weighted ratio per tag set (about the last ``1/alpha`` observations)."""

    def __init__(self, alpha: float = 0.02):
        self.alpha = alpha
        self.values: dict[tuple, float] = {}

    def update(self, key: tuple, value: float, weight: int = 1) -> float:
        a = 1.0 - (1.0 - self.alpha) ** max(1, weight)
        old = self.values.get(key)
        new = value if old is None else old + a * (value - old)
        self.values[key] = new
        return new


_activation = _Ewma()
_agreement = _Ewma()


def _task(task: str | None) -> str:
    return task or "none"


# --------------------------------------------------------------------------- helpers


def record_gate(stage: int, evaluated: int, exited: int, task: str | None = None) -> None:
    """A stage's gate looked at ``evaluated`` rows in one step and let ``exited`` leave."""
    if evaluated <= 0:
        return
    tags = {"stage": str(stage), "task": _task(task)}
    get("offramp_gate_evaluations_total").inc(evaluated, tags)
    if exited:
        get("offramp_early_exit_total").inc(exited, tags)
    gauge = get("offramp_gate_activation_ratio")
    if gauge is not NOOP:
        gauge.set(_activation.update((stage, tags["task"]), exited / evaluated, evaluated), tags)


def record_agreement(stage: int, agreed: bool, task: str | None = None) -> None:
    """An exited token was re-checked at full depth (online audit)."""
    tags = {"stage": str(stage), "task": _task(task)}
    get("offramp_exit_agreement_checks_total").inc(1, {**tags, "agreed": "true" if agreed else "false"})
    gauge = get("offramp_exit_agreement_ratio")
    if gauge is not NOOP:
        gauge.set(_agreement.update((stage, tags["task"]), 1.0 if agreed else 0.0), tags)


def record_step(stage: int, pool: str, seconds: float, batch_size: int, queue_depth: int | None = None) -> None:
    """One batched forward step of a stage replica."""
    tags = {"stage": str(stage), "pool": pool}
    get("offramp_stage_step_seconds").observe(seconds, tags)
    get("offramp_stage_batch_size").observe(batch_size, tags)
    if queue_depth is not None:
        get("offramp_stage_queue_depth").set(queue_depth, tags)


def set_queue_depth(stage: int, pool: str, depth: int) -> None:
    get("offramp_stage_queue_depth").set(depth, {"stage": str(stage), "pool": pool})


def record_tokens(model: str, exit_stages: list[int], num_stages: int) -> None:
    """Tokens delivered to a client, by exit stage; also counts the stage hops saved."""
    counts: dict[int, int] = {}
    for s in exit_stages:
        counts[s] = counts.get(s, 0) + 1
    for s, n in counts.items():
        get("offramp_tokens_total").inc(n, {"model": model, "exit_stage": str(s)})
        saved = (num_stages - 1 - s) * n
        if saved > 0:
            get("offramp_hops_saved_total").inc(saved, {"exit_stage": str(s)})


def record_verify(model: str, task: str | None, drafted: int, accepted: int) -> None:
    """One speculative verify round of a request (a ``TokenEvent.verified``): ``drafted``
    tokens went to the deep stages, ``accepted`` of them were kept."""
    tags = {"task": _task(task), "model": model}
    get("offramp_verify_rounds_total").inc(1, tags)
    if drafted > 0:
        get("offramp_draft_tokens_total").inc(drafted, tags)
    if accepted > 0:
        get("offramp_accepted_draft_tokens_total").inc(accepted, tags)


def record_kv_wait(model: str, waiting: int, queued: bool) -> None:
    """The ingress's queue for KV slots changed: ``waiting`` requests now; ``queued``: one
    more was just put in it."""
    get("offramp_requests_waiting_for_kv").set(waiting, {"model": model})
    if queued:
        get("offramp_kv_waits_total").inc(1, {"model": model})


def record_ttft(model: str, seconds: float) -> None:
    get("offramp_ttft_seconds").observe(seconds, {"model": model})


def record_tpot(model: str, seconds: float) -> None:
    get("offramp_tpot_seconds").observe(seconds, {"model": model})
