"""Cost model, profile fitting, online calibration and signal windows (pure, no Ray)."""
from __future__ import annotations

import math

import pytest

from offramp.placement.cost_model import (
    StepCalibration, CostModel, ModelShape, PlacementError, PoolSpec, ProfileSample, _sample_work, fit_profile,
    reach_from_exit_rates,
)
from offramp.placement.signals import StageSignals, stage_arrival_rates

M = ModelShape.tiny()
CPU = PoolSpec(name="cpu", kind="cpu", count=2, memory_bytes=8e9, mem_bandwidth=2e10, flops=5e10,
               fixed_overhead_s=0.0005, precisions=["fp32", "int8"])
GPU = PoolSpec(name="gpu", kind="gpu", count=1, memory_bytes=80e9, mem_bandwidth=2e12, flops=3e14,
               fixed_overhead_s=0.002, precisions=["bf16"])


def test_weight_bytes_end_stages_and_exit_heads():
    cm = CostModel(M)
    layer = M.weight_bytes(M.layer_params(), "fp32")
    emb = M.vocab * M.hidden * 4
    head = M.head_params() * 4
    assert cm.weight_bytes(0, 8, "fp32") == pytest.approx(8 * layer + emb + 3 * 2 * M.hidden * 4)  # tied head
    assert cm.weight_bytes(0, 1, "fp32") == pytest.approx(layer + emb)  # no tap in layer 0
    assert cm.weight_bytes(2, 3, "fp32") == pytest.approx(layer)  # tap 2 belongs to the stage ending at 2
    assert cm.weight_bytes(1, 2, "fp32") == pytest.approx(layer + head + 2 * M.hidden * 4)  # owns tap 2
    assert cm.weight_bytes(4, 6, "fp32") == pytest.approx(2 * layer + head + 2 * M.hidden * 4)  # tap 6
    assert cm.weight_bytes(6, 8, "fp32") == pytest.approx(2 * layer + head)  # last: head, no tap
    assert cm.weight_bytes(6, 8, "int8") < 0.3 * cm.weight_bytes(6, 8, "fp32")


def test_decode_regimes_gpu_memory_cpu_compute():
    cm = CostModel(M)
    assert cm.decode_step(0, 8, GPU, "bf16", 16, 128).bound == "memory"
    assert cm.decode_step(0, 8, CPU, "fp32", 1, 128).bound == "memory"
    assert cm.decode_step(0, 8, CPU, "fp32", 8, 128).bound == "compute"


def test_exits_cut_deep_work_only_in_propagate_mode():
    cm = CostModel(M)
    reach = reach_from_exit_rates(8, {2: 0.5, 4: 0.5, 6: 0.5})
    assert reach == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
    exact = cm.decode_step(4, 8, CPU, "fp32", 8, 128, reach, "exact")
    prop = cm.decode_step(4, 8, CPU, "fp32", 8, 128, reach, "propagate")
    none = cm.decode_step(4, 8, CPU, "fp32", 8, 128)
    # work per second at one arrival rate: steps/s scale with reach at the stage's start
    fill_rows = sum(8 * (1 - reach[l]) for l in range(4, 8))  # exited tokens needing KV here, per 8 tokens
    saved = (exact.flops - prop.flops) * reach[4]
    assert saved == pytest.approx(fill_rows * (M.layer_flops(128) - M.kv_projection_flops()))
    assert exact.flops * reach[4] > none.flops - 8 * M.head_flops()  # exact: no layer FLOPs saved  # exact backfill: every token's KV is computed here


def test_hop_and_precision_checks():
    cm = CostModel(M)
    assert cm.hop_s(GPU, CPU, 16) == pytest.approx(max(GPU.hop_fixed_s, CPU.hop_fixed_s) + 16 * 384 * 4 / 1.25e9)
    with pytest.raises(PlacementError, match="does not support"):
        cm.decode_step(0, 8, GPU, "int8", 1, 0)


def _samples(pool, batches, layers, context=64):
    out = []
    for b in batches:
        for n in layers:
            s = ProfileSample(batch=b, layers=n, seconds=1.0, context=context)
            nbytes, flops = _sample_work(M, s, "fp32")
            t = pool.fixed_overhead_s + max(nbytes / pool.mem_bandwidth, flops / pool.flops)
            out.append(s.model_copy(update={"seconds": t}))
    return out


def test_fit_profile_recovers_known_parameters():
    fit = fit_profile(M, _samples(CPU, [1, 2, 4, 8, 16, 32], [1, 2, 4]))
    assert fit.fixed_overhead_s == pytest.approx(CPU.fixed_overhead_s, rel=1e-3)
    assert fit.mem_bandwidth == pytest.approx(CPU.mem_bandwidth, rel=1e-3)
    assert fit.flops == pytest.approx(CPU.flops, rel=1e-3)
    assert fit.memory_bound_samples > 0 and fit.compute_bound_samples > 0
    assert fit.apply(CPU.model_copy(update={"flops": 1.0})).flops == pytest.approx(CPU.flops, rel=1e-3)


def test_fit_profile_single_regime_keeps_prior_and_rejects_too_few():
    fit = fit_profile(M, _samples(GPU, [1, 2, 4], [1, 2]), prior=GPU.model_copy(update={"flops": 7e14}))
    assert fit.compute_bound_samples == 0  # decode on a GPU: memory-bound at small batch
    assert fit.flops == 7e14 and fit.mem_bandwidth == pytest.approx(GPU.mem_bandwidth, rel=1e-3)
    with pytest.raises(PlacementError, match="measure a few"):
        fit_profile(M, _samples(CPU, [1], [1]))


def test_online_correction_converges():
    cm = CostModel(M, StepCalibration(alpha=0.2))
    pred = cm.decode_step(0, 4, CPU, "fp32", 4, 64, calibrated=False).seconds
    for i in range(60):
        noise = 1.0 + 0.05 * (1 if i % 2 else -1)
        cm.calibration.observe("cpu", "decode", 0, 4, 1.7 * pred * noise, pred)
    assert cm.decode_step(0, 4, CPU, "fp32", 4, 64).seconds == pytest.approx(1.7 * pred, rel=0.06)
    # an unmeasured range on the same pool borrows the pool-wide factor
    other = cm.decode_step(4, 8, CPU, "fp32", 4, 64)
    raw = cm.decode_step(4, 8, CPU, "fp32", 4, 64, calibrated=False)
    assert other.seconds / raw.seconds == pytest.approx(1.7, rel=0.06)
    assert cm.calibration.factor("gpu", "decode") == 1.0


def test_stage_arrival_rates_sum_replicas_and_skip_unknown():
    def sig(stage, replica, rate):
        nan = float("nan")
        return StageSignals(stage=stage, replica=replica, window_s=10, prefill_step_s=nan, decode_step_s=0.01,
                            batch_size=8, tokens_per_s=rate, arrival_tokens_per_s=rate, prefill_tokens_per_s=0,
                            busy_fraction=0.1, queue_len=0, oldest_wait_s=0, kv_occupancy=0.5,
                            memory_headroom_bytes=nan, hop_s=0.002, steps=20)

    out = stage_arrival_rates([sig(1, "a", 16.0), sig(1, "b", 16.0), sig(0, "c", 5.0), sig(2, "d", float("nan"))])
    assert out == {0: 5.0, 1: pytest.approx(32.0)} and list(out) == [0, 1]
    assert sig(1, "a", 1.0).to_dict()["replica"] == "a"


def test_calibration_carries_a_stage_factor_to_a_pool_not_measured_yet():
    from offramp.placement.cost_model import StepCalibration

    cal = StepCalibration(alpha=1.0)
    cal.observe("gpu", "decode", 4, 8, measured_s=0.02, predicted_s=0.01)
    cal.observe("gpu", "decode", 0, 4, measured_s=0.01, predicted_s=0.01)
    assert cal.factor("gpu", "decode", 4, 8) == pytest.approx(2.0)
    assert cal.factor("cpu", "decode", 4, 8) == pytest.approx(2.0)  # what the model misses about the stage
    assert cal.factor("cpu", "decode", 0, 4) == pytest.approx(1.0)
    cal.observe("cpu", "decode", 0, 4, measured_s=0.03, predicted_s=0.01)
    assert cal.factor("cpu", "decode", 4, 8) == pytest.approx(2.0)  # the stage's own error, not stage 0's
    assert cal.factor("cpu", "decode", 8, 12) == pytest.approx(3.0)  # a stage never measured: the pool's
