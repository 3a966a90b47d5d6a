"""Analytic cost model of a pipeline stage on a device pool (pure, no Ray).

One stage step is modelled as a roofline::

    step_s ≈ fixed_overhead + max(bytes_moved / mem_bandwidth, flops / flops_rate)

where ``bytes_moved`` are the stage's weights (read once per step) plus the KV cache the
step's rows attend over, and ``flops`` are the matmuls and attention of every row at
every layer.  A hop between stages is ``hop_fixed + bytes / link_bandwidth``.

Exits enter through ``reach[l]``, the fraction of stage-0 tokens that compute layer ``l``.
Tokens that exited before layer ``l`` still need their KV there (see ARCHITECTURE.md,
"KV of skipped layers"): with ``kv_fill="exact"`` (deferred batched backfill) they ride
along with the next deep token and cost full FLOPs but no extra weight reads; with
``kv_fill="propagate"`` they cost only the K/V projections.  So exits save weight reads
and latency everywhere, but save FLOPs (what a CPU pool is short of) only in
``propagate`` mode — the model says so rather than hiding it.

Pool parameters are seeded by :func:`fit_profile` (least squares over measured samples)
and corrected online by :class:`StepCalibration` (EWMA of measured / predicted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from offramp.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16", "int8"]
DeviceKind = Literal["gpu", "cpu"]
KvFill = Literal["exact", "propagate"]
StepKind = Literal["decode", "prefill"]


class PlacementError(ConfigError):
    """Invalid planner/cost-model input. The message names the problem and the fix."""


@dataclass(frozen=True)
class PrecisionInfo:
    """Bytes per weight and per activation/KV element of one precision."""

    weight_bytes: float  # per parameter, scales included
    act_bytes: int  # activations and KV cache elements


# int8 is weight-only (per-output-channel fp32 scales, ~4/hidden bytes per weight on top,
# added in ModelShape.weight_bytes); activations and KV stay fp32 as on today's CPU path.
# Its quality impact is measured elsewhere; the planner uses it only when allowed.
PRECISION_INFO: dict[str, PrecisionInfo] = {
    "fp32": PrecisionInfo(4.0, 4),
    "bf16": PrecisionInfo(2.0, 2),
    "fp16": PrecisionInfo(2.0, 2),
    "int8": PrecisionInfo(1.0, 4),
}


class ModelShape(BaseModel):
    """The planner's view of a model: the shape of a Llama-style decoder (gated MLP, GQA
    attention) that its costs follow. (The checkpoint's own config is ``ops.checkpoint.ModelSpec``.)"""

    model_config = ConfigDict(frozen=True)

    name: str = Field("model", description="Name used in messages and plans.")
    num_layers: int = Field(..., ge=1, description="Transformer blocks.")
    hidden: int = Field(..., ge=1, description="Model width d_model.")
    intermediate: int = Field(..., ge=1, description="MLP inner width (gate/up/down).")
    heads: int = Field(..., ge=1, description="Attention query heads.")
    kv_heads: int = Field(..., ge=1, description="Key/value heads (GQA); = heads for MHA.")
    vocab: int = Field(..., ge=1, description="Vocabulary size (embedding and LM head rows).")
    tied_embeddings: bool = Field(
        True, description="LM head shares the embedding matrix (one copy on a single-stage plan)."
    )
    exit_layers: list[int] = Field(
        default_factory=list,
        description="Boundaries with a trained exit tap: e means 'after layer e-1'; 1 <= e < num_layers. "
        "The stage owning layer e-1 holds the gate and a copy of the LM head.",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelShape":
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise PlacementError(
                f"model {self.name}: hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads} "
                "must divide evenly (hidden % heads == 0, heads % kv_heads == 0); fix the model shape."
            )
        bad = [e for e in self.exit_layers if not 1 <= e < self.num_layers]
        if bad:
            raise PlacementError(
                f"model {self.name}: exit_layers {bad} outside 1..{self.num_layers - 1} "
                f"(num_layers={self.num_layers}); list only interior boundaries."
            )
        return self

    @classmethod
    def tiny(cls) -> "ModelShape":
        """The 20M-parameter development model (d384, 8 layers) with exits after layers 2, 4, 6."""
        return cls(name="tiny", num_layers=8, hidden=384, intermediate=1024, heads=6, kv_heads=6,
                   vocab=32000, exit_layers=[2, 4, 6])

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_params(self) -> int:
        """Parameters of one block: q,o (h*h), k,v (h*kv_dim), gate/up/down, two norms."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    def head_params(self) -> int:
        """LM head (vocab x hidden) plus its final norm."""
        return self.vocab * self.hidden + self.hidden

    def weight_bytes(self, params: float, precision: str) -> float:
        """Bytes of ``params`` weights at ``precision`` (int8 adds per-row fp32 scales)."""
        info = PRECISION_INFO[precision]
        scale = 4.0 / self.hidden if precision == "int8" else 0.0
        return params * (info.weight_bytes + scale)

    def kv_bytes_per_token_layer(self, precision: str) -> int:
        """K and V of one token at one layer."""
        return 2 * self.kv_dim * PRECISION_INFO[precision].act_bytes

    def layer_flops(self, context: float) -> float:
        """FLOPs of one token through one block attending over ``context`` tokens."""
        h = self.hidden
        matmul = 2 * (2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate)
        attention = 4 * context * h  # q.k and a.v
        return matmul + attention

    def kv_projection_flops(self) -> float:
        """FLOPs to compute only K and V of one token at one block (state propagation)."""
        return 2 * 2 * self.hidden * self.kv_dim

    def head_flops(self) -> float:
        return 2.0 * self.vocab * self.hidden

    def taps_in(self, start: int, end: int) -> list[int]:
        """Exit taps owned by the stage holding layers [start, end)."""
        return [e for e in sorted(self.exit_layers) if start < e <= end and e < self.num_layers]


# Cost of one replica-hour when a config names none: one mid-range cloud GPU vs one CPU node
# of about 8 vCPUs at on-demand list prices (2026). Set your own in the controller config
# (``cost_per_replica_hour``) or the Helm values (``placement.costPerReplicaHour``).
DEFAULT_COST_PER_HOUR: dict[str, float] = {"gpu": 2.0, "cpu": 0.25}


class PoolSpec(BaseModel):
    """A pool of identical devices (one GPU, or one CPU node, per stage replica)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(..., description="Pool name, e.g. 'a100' or 'cpu'; matches the Ray node label.")
    kind: DeviceKind = Field(..., description="'gpu' or 'cpu'.")
    count: int = Field(..., ge=0, description="Devices (GPUs) or nodes (CPU) available for stage replicas.")
    memory_bytes: float = Field(..., gt=0, description="Memory of one device/node usable by one replica.")
    mem_bandwidth: float = Field(..., gt=0, description="Memory bandwidth of one device, bytes/s.")
    flops: float = Field(..., gt=0, description="Sustained FLOP/s of one device at its native precision.")
    fixed_overhead_s: float = Field(0.0, ge=0, description="Per-step launch/framework overhead, seconds.")
    precisions: list[Precision] = Field(
        default_factory=lambda: ["fp32"],
        description="Supported precisions, preferred first; 'int8' = weight-only (CPU).",
    )
    link_bandwidth: float = Field(1.25e9, gt=0, description="Network bytes/s to other pools.")
    hop_fixed_s: float = Field(0.0015, ge=0, description="Fixed cost of one stage-to-stage hop, seconds.")
    cost_per_hour: float = Field(
        1.0, ge=0, description="What one replica on this pool costs per hour (any currency, the same for every "
        "pool): the planner's objective is the cheapest placement meeting the TPOT SLO. Defaults: "
        "DEFAULT_COST_PER_HOUR.")
    memory_reserve: float = Field(
        0.1, ge=0, lt=1, description="Fraction of memory kept free for activations and fragmentation."
    )

    @model_validator(mode="after")
    def _check(self) -> "PoolSpec":
        if not self.precisions:
            raise PlacementError(f"pool {self.name}: precisions is empty; list at least one, e.g. ['fp32'].")
        return self

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * (1.0 - self.memory_reserve)


@dataclass(frozen=True)
class StepCost:
    """Predicted cost of one step of a stage replica."""

    seconds: float
    bytes: float
    flops: float
    bound: Literal["memory", "compute"]


class StepCalibration:
    """Online correction: EWMA of measured / predicted step time per (pool, kind, stage).

    Ratios are averaged in log space so a 2x over- and a 2x under-estimate cancel.
    A stage range never measured falls back to the pool's average over all its stages.
    """

    def __init__(self, alpha: float = 0.2, clamp: tuple[float, float] = (0.1, 10.0)):
        if not 0 < alpha <= 1:
            raise PlacementError(f"StepCalibration alpha={alpha} must be in (0, 1]; 0.1-0.3 is typical.")
        self.alpha = alpha
        self.clamp = clamp
        self._log: dict[tuple, float] = {}

    def observe(self, pool: str, kind: StepKind, start: int, end: int,
                measured_s: float, predicted_s: float) -> float:
        """Fold one measurement in; returns the new factor for this stage."""
        if measured_s <= 0 or predicted_s <= 0:
            return self.factor(pool, kind, start, end)
        r = math.log(min(max(measured_s / predicted_s, self.clamp[0]), self.clamp[1]))
        for key in ((pool, kind, start, end), (pool, kind)):
            old = self._log.get(key)
            self._log[key] = r if old is None else old + self.alpha * (r - old)
        return self.factor(pool, kind, start, end)

    def factor(self, pool: str, kind: StepKind, start: int | None = None, end: int | None = None) -> float:
        """Multiplier for predictions of this stage on this pool: measured there, else this
        stage's average over the pools it was measured on (what the model misses about a
        stage - its batch shapes, attended context, framework overhead - moves with it to a
        pool not measured yet; another stage's error would not), else the pool's average,
        else 1.0."""
        v = self._log.get((pool, kind, start, end))
        if v is None:
            seen = [x for (p, k, *rng), x in self._log.items() if k == kind and rng == [start, end] and p != pool]
            v = sum(seen) / len(seen) if seen else self._log.get((pool, kind), 0.0)
        return math.exp(v)


class CostModel:
    """Predicts step, hop and memory costs of layer ranges on pools."""

    def __init__(self, model: ModelShape, calibration: StepCalibration | None = None):
        self.model = model
        self.calibration = calibration or StepCalibration()

    # --- memory ---------------------------------------------------------------------
    def weight_bytes(self, start: int, end: int, precision: str) -> float:
        """Resident weights of layers [start, end): embedding on the first stage, final norm +
        LM head on the last, gate + LM-head copy on a stage owning exit taps (one head copy)."""
        m = self.model
        params = (end - start) * m.layer_params()
        first, last = start == 0, end == m.num_layers
        taps = m.taps_in(start, end)
        if first:
            params += m.vocab * m.hidden
        needs_head = last or bool(taps)
        if needs_head and not (first and m.tied_embeddings):
            params += m.head_params()
        params += len(taps) * 2 * m.hidden  # gate (linear) + exit norm per tap
        return m.weight_bytes(params, precision)

    def kv_bytes(self, start: int, end: int, precision: str, sequences: float, context: float) -> float:
        return sequences * context * (end - start) * self.model.kv_bytes_per_token_layer(precision)

    # --- time -----------------------------------------------------------------------
    def decode_step(self, start: int, end: int, pool: PoolSpec, precision: str, batch: float,
                    context: float, reach: Sequence[float] | None = None, kv_fill: KvFill = "exact",
                    gate_pass_ratio: float = 1.5, calibrated: bool = True) -> StepCost:
        """One decode step of ``batch`` deep rows entering the stage (exited rows' backfill rides along)."""
        m = self.model
        reach = reach if reach is not None else [1.0] * m.num_layers
        r0 = max(reach[start], 1e-6)
        kvb = m.kv_bytes_per_token_layer(precision)
        fill_flops = m.layer_flops(context) if kv_fill == "exact" else m.kv_projection_flops()
        flops = 0.0
        kv_read = 0.0
        for l in range(start, end):
            deep = batch * reach[l] / r0  # rows still going at layer l
            fill = batch * (1.0 - reach[l]) / r0  # rows that exited earlier and need KV here
            flops += deep * m.layer_flops(context) + fill * fill_flops
            kv_read += (deep + (fill if kv_fill == "exact" else 0.0)) * context * kvb
        head_bytes = m.weight_bytes(m.head_params(), precision)
        extra_bytes = 0.0
        for e in m.taps_in(start, end):
            exited = batch * (reach[e - 1] - (reach[e] if e < m.num_layers else 0.0)) / r0
            rows = min(batch * reach[e - 1] / r0, gate_pass_ratio * exited)
            flops += rows * m.head_flops()
            extra_bytes = head_bytes if rows > 0 else extra_bytes
        if end == m.num_layers:
            flops += batch * reach[end - 1] / r0 * m.head_flops()
            extra_bytes = head_bytes
        layer_bytes = m.weight_bytes((end - start) * m.layer_params(), precision)
        nbytes = layer_bytes + extra_bytes + kv_read
        return self._roofline(pool, precision, nbytes, flops, "decode", start, end, calibrated)

    def prefill_chunk(self, start: int, end: int, pool: PoolSpec, precision: str, tokens: float,
                      calibrated: bool = True) -> StepCost:
        """One prefill chunk of ``tokens`` prompt tokens (no exits during prefill)."""
        m = self.model
        flops = tokens * (end - start) * m.layer_flops(tokens / 2.0)
        if end == m.num_layers:
            flops += m.head_flops()
        nbytes = (m.weight_bytes((end - start) * m.layer_params(), precision)
                  + tokens * (end - start) * m.kv_bytes_per_token_layer(precision))
        return self._roofline(pool, precision, nbytes, flops, "prefill", start, end, calibrated)

    def hop_s(self, src: PoolSpec, dst: PoolSpec, rows: float, precision: str = "fp32") -> float:
        """Move ``rows`` hidden states from a stage on ``src`` to one on ``dst``."""
        nbytes = rows * self.model.hidden * PRECISION_INFO[precision].act_bytes
        return max(src.hop_fixed_s, dst.hop_fixed_s) + nbytes / min(src.link_bandwidth, dst.link_bandwidth)

    def _roofline(self, pool: PoolSpec, precision: str, nbytes: float, flops: float, kind: StepKind,
                  start: int, end: int, calibrated: bool) -> StepCost:
        if precision not in pool.precisions:
            raise PlacementError(
                f"pool {pool.name} does not support precision {precision!r} (supports {pool.precisions}); "
                "choose one of those or add it to the pool's precisions."
            )
        t_mem = nbytes / pool.mem_bandwidth
        t_cmp = flops / pool.flops
        t = pool.fixed_overhead_s + max(t_mem, t_cmp)
        if calibrated:
            t *= self.calibration.factor(pool.name, kind, start, end)
        return StepCost(t, nbytes, flops, "memory" if t_mem >= t_cmp else "compute")


# --- profile fitting -----------------------------------------------------------------
class ProfileSample(BaseModel):
    """One measured decode step of a bare layer range (no embedding / head) on one device."""

    batch: int = Field(..., ge=1, description="Rows in the step.")
    layers: int = Field(..., ge=1, description="Transformer blocks in the measured range.")
    seconds: float = Field(..., gt=0, description="Measured wall time of the step.")
    context: int = Field(0, ge=0, description="Tokens each row attends over.")


@dataclass(frozen=True)
class PoolFit:
    """Result of :func:`fit_profile`. A regime with no samples keeps the prior value."""

    fixed_overhead_s: float
    mem_bandwidth: float
    flops: float
    rms_residual_s: float
    memory_bound_samples: int
    compute_bound_samples: int

    def apply(self, pool: PoolSpec) -> PoolSpec:
        """The pool with fitted timing parameters."""
        return pool.model_copy(update={"fixed_overhead_s": self.fixed_overhead_s,
                                       "mem_bandwidth": self.mem_bandwidth, "flops": self.flops})


def _sample_work(model: ModelShape, s: ProfileSample, precision: str) -> tuple[float, float]:
    nbytes = (model.weight_bytes(s.layers * model.layer_params(), precision)
              + s.batch * s.context * s.layers * model.kv_bytes_per_token_layer(precision))
    return nbytes, s.batch * s.layers * model.layer_flops(s.context)


def fit_profile(model: ModelShape, samples: Iterable[ProfileSample], precision: str = "fp32",
                prior: PoolSpec | None = None) -> PoolFit:
    """Fit ``t = c + max(bytes/bw, flops/F)`` to measured samples by least squares.

    The memory/compute regime is monotone in arithmetic intensity (flops/bytes), so the
    samples are sorted by intensity and every cut point is tried: samples below the cut
    are memory-bound (t = c + bytes*a), above compute-bound (t = c + flops*b); each cut is
    one linear least-squares problem, and the cut with the least residual wins (a
    single-regime fit within 1% of it wins instead: fewer parameters).  A regime
    without samples cannot be identified and keeps ``prior``'s value.
    """
    pts = [(*_sample_work(model, s, precision), s.seconds) for s in samples]
    if len(pts) < 2:
        raise PlacementError(f"fit_profile needs >= 2 samples, got {len(pts)}; measure a few batch sizes.")
    pts.sort(key=lambda p: (p[1] / p[0], p[0], p[1]))
    y = np.array([p[2] for p in pts])
    best: tuple[float, int, np.ndarray] | None = None
    fits: list[tuple[float, int, np.ndarray]] = []
    for cut in range(len(pts) + 1):
        cols = [np.ones(len(pts))]
        cols.append(np.array([p[0] if i < cut else 0.0 for i, p in enumerate(pts)]))
        cols.append(np.array([p[1] if i >= cut else 0.0 for i, p in enumerate(pts)]))
        a = np.stack(cols, axis=1)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        if cut > 0 and coef[1] <= 0 or cut < len(pts) and coef[2] <= 0 or coef[0] < -1e-9:
            continue
        # the chosen regime must be the binding one at every sample (max() consistency)
        if 0 < cut < len(pts) and not all(
            (p[0] * coef[1] >= p[1] * coef[2]) == (i < cut)
            or abs(p[0] * coef[1] - p[1] * coef[2]) <= 0.02 * max(p[0] * coef[1], p[1] * coef[2])
            for i, p in enumerate(pts)
        ):
            continue
        fits.append((float(np.sum((a @ coef - y) ** 2)), cut, coef))
    if fits:
        # Occam: a single-regime fit that is as good (within 1%) beats a two-regime one
        floor = min(f[0] for f in fits) * 1.01 + 1e-24 * len(pts)
        best = min((f for f in fits if f[0] <= floor), key=lambda f: (0 < f[1] < len(pts), f[0], f[1]))
    if best is None:
        raise PlacementError("fit_profile found no consistent fit (times fall as work grows?); "
                             "check the samples' batch/layers/seconds.")
    rss, cut, coef = best
    bw = 1.0 / coef[1] if cut > 0 else (prior.mem_bandwidth if prior else math.inf)
    fl = 1.0 / coef[2] if cut < len(pts) else (prior.flops if prior else math.inf)
    return PoolFit(max(float(coef[0]), 0.0), float(bw), float(fl), math.sqrt(rss / len(pts)),
                   cut, len(pts) - cut)


def reach_from_exit_rates(num_layers: int, exit_rates: dict[int, float]) -> list[float]:
    """Fraction of tokens reaching each layer from per-tap exit rates.

    ``exit_rates[e]`` is the measured fraction of the tokens *arriving at* tap e (after
    layer e-1) that exit there.
    """
    reach, alive = [], 1.0
    for l in range(num_layers):
        if l in exit_rates:
            r = exit_rates[l]
            if not 0.0 <= r <= 1.0:
                raise PlacementError(f"exit rate at tap {l} is {r}; rates are fractions in [0, 1].")
            alive *= 1.0 - r
        reach.append(alive)
    return reach
