"""Golden plans of the exit-aware planner (pure, no Ray)."""
from __future__ import annotations

import math

import pytest

from offramp.placement.cost_model import ModelShape, PlacementError, PoolSpec, reach_from_exit_rates
from offramp.placement.planner import (
    Constraints, Pin, StagePlacement, Workload, evaluate, placement_signature, plan,
)

M = ModelShape(name="m1b", num_layers=16, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
               exit_layers=[4, 8, 12])
GPU = PoolSpec(name="gpu", kind="gpu", count=4, memory_bytes=24e9, mem_bandwidth=600e9, flops=60e12,
               fixed_overhead_s=0.003, precisions=["bf16"], cost_per_hour=2.0)
CPU = PoolSpec(name="cpu", kind="cpu", count=16, memory_bytes=64e9, mem_bandwidth=40e9, flops=1e12,
               fixed_overhead_s=0.001, precisions=["fp32", "int8"], cost_per_hour=0.25)


def shape(p):
    return [(s.start, s.end, s.pool, s.precision, s.replicas) for s in p.stages]


def test_homogeneous_single_stage_replicas_from_load():
    assert shape(plan(M, [GPU], Workload(decode_tokens_per_s=100))) == [(0, 16, "gpu", "bf16", 1)]
    p = plan(M, [GPU], Workload(decode_tokens_per_s=3000))
    assert shape(p) == [(0, 16, "gpu", "bf16", 2)]
    assert p.stages[0].utilisation <= 0.75 and p.devices == {"gpu": 2}


def test_homogeneous_forced_two_stages_is_golden():
    p = plan(M, [GPU], Workload(decode_tokens_per_s=3000), Constraints(num_stages=2))
    assert shape(p) == [(0, 1, "gpu", "bf16", 1), (1, 16, "gpu", "bf16", 2)]
    assert p.split == [1]


def test_fast_gpu_slow_cpu_follows_slo():
    loose = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=100), Constraints(tpot_slo_s=0.2))
    assert shape(loose) == [(0, 16, "cpu", "fp32", 1)]  # SLO holds on a CPU node: no GPU used
    tight = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=100), Constraints(tpot_slo_s=0.02))
    assert shape(tight) == [(0, 16, "gpu", "bf16", 1)]
    int8 = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=100), Constraints(tpot_slo_s=0.2, allow_int8=True))
    assert shape(int8) == [(0, 16, "cpu", "int8", 1)] and int8.tpot_s < loose.tpot_s


def test_memory_limited_gpu_splits_and_fits():
    small = GPU.model_copy(update={"memory_bytes": 2e9, "count": 8})
    p = plan(M, [small], Workload(decode_tokens_per_s=100, concurrent_sequences=16))
    assert shape(p) == [(0, 3, "gpu", "bf16", 1), (3, 16, "gpu", "bf16", 1)]
    for s in p.stages:
        assert s.weight_bytes + s.kv_bytes <= small.usable_bytes


@pytest.mark.parametrize("rates,expect", [
    ({4: 0.1, 8: 0.1, 12: 0.1}, [(0, 16, "gpu", "bf16", 2)]),
    ({4: 0.8, 8: 0.5}, [(0, 4, "gpu", "bf16", 1), (4, 11, "cpu", "fp32", 3), (11, 16, "cpu", "fp32", 2)]),
])
def test_deep_stages_go_to_cpu_only_when_exits_pay(rates, expect):
    w = Workload(decode_tokens_per_s=3000, reach=reach_from_exit_rates(16, rates), concurrent_sequences=64)
    p = plan(M, [GPU, CPU], w, Constraints(tpot_slo_s=0.02))
    assert shape(p) == expect and p.meets_slo
    # the same plan with no exits would break the SLO
    if any(s.pool == "cpu" for s in p.stages):
        no_exit = evaluate(M, [GPU, CPU], w.model_copy(update={"reach": None}), p.deployments(),
                           Constraints(tpot_slo_s=0.02))
        assert not no_exit.meets_slo


def test_pins_respected():
    c = Constraints(split=[6], pins=[Pin(stage=1, pool="cpu", replicas=5)])
    p = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=1000), c)
    assert p.split == [6] and p.stages[1].pool == "cpu" and p.stages[1].replicas == 5
    p2 = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=1000), Constraints(pins=[Pin(stage=0, pool="gpu")]))
    assert all(s.pool == "gpu" for s in p2.stages[:1])


def test_deterministic_and_evaluate_agrees():
    w = Workload(decode_tokens_per_s=3000, reach=reach_from_exit_rates(16, {4: 0.8, 8: 0.5}))
    a = plan(M, [GPU, CPU], w, Constraints(tpot_slo_s=0.02))
    b = plan(M, [GPU, CPU], w, Constraints(tpot_slo_s=0.02))
    assert a.model_dump() == b.model_dump()
    e = evaluate(M, [GPU, CPU], w, a.deployments(), Constraints(tpot_slo_s=0.02))
    assert e.cost == a.cost and math.isclose(e.tpot_s, a.tpot_s, rel_tol=1e-9)


def test_slo_unreachable_returns_fastest_plan_flagged():
    p = plan(M, [CPU], Workload(decode_tokens_per_s=10), Constraints(tpot_slo_s=0.001))
    assert not p.meets_slo and "relax the SLO" in p.notes[-1]


@pytest.mark.parametrize("call,match", [
    (lambda: plan(M, [], Workload()), "no pools"),
    (lambda: plan(M, [GPU], Workload(), Constraints(num_stages=17)), "exceeds num_layers"),
    (lambda: plan(M, [GPU.model_copy(update={"memory_bytes": 1e6})], Workload()), "cannot fit"),
    (lambda: Workload(decode_tokens_per_s=-5), "measured rate"),
    (lambda: plan(M, [GPU], Workload(reach=[1.0] * 3)), "one fraction per layer"),
    (lambda: Workload(reach=[1.0, 0.5, 0.8]), "non-increasing"),
    (lambda: plan(M, [GPU, CPU], Workload(), Constraints(pins=[Pin(stage=0, pool="gpu"), Pin(stage=0, pool="cpu")])),
     "pinned twice"),
    (lambda: plan(M, [GPU], Workload(), Constraints(pins=[Pin(stage=0, pool="tpu")])), "not among"),
    (lambda: plan(M, [GPU], Workload(), Constraints(pins=[Pin(stage=0, pool="gpu", replicas=9)])), "add devices"),
    (lambda: plan(M, [GPU], Workload(), Constraints(split=[4], num_stages=3)), "make them agree"),
    (lambda: plan(M, [GPU], Workload(), Constraints(split=[8, 4])), "strictly increasing"),
    (lambda: plan(M, [GPU, GPU], Workload()), "duplicate pool"),
    (lambda: plan(M, [GPU.model_copy(update={"count": 1})], Workload(decode_tokens_per_s=1e6)), "add devices"),
])
def test_invalid_inputs_rejected_with_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_evaluate_rejects_gaps():
    with pytest.raises(PlacementError, match="contiguous"):
        evaluate(M, [GPU], Workload(), [StagePlacement(start=0, end=4, pool="gpu", precision="bf16"),
                                        StagePlacement(start=6, end=16, pool="gpu", precision="bf16")])


def test_speculative_verification_costs_positions_and_rejected_drafts_cost_passes():
    """A deep visit that verifies a 5-position draft computes 5 positions a row, and a
    stage-0 pass yields 0.6 tokens: both raise the predicted TPOT, and dropping either lets
    a plan through that the measured traffic would not hold."""
    reach = reach_from_exit_rates(16, {8: 0.75})  # one deep visit per 4 stage-0 passes
    w = Workload(decode_tokens_per_s=400, reach=reach, concurrent_sequences=16)
    spec = w.model_copy(update={"positions_per_row": [1.0] * 8 + [5.0] * 8, "tokens_per_pass": 0.6})
    split = Constraints(split=[8])
    deps = [StagePlacement(start=0, end=8, pool="gpu", precision="bf16"),
            StagePlacement(start=8, end=16, pool="cpu", precision="fp32")]
    plain, verified = evaluate(M, [GPU, CPU], w, deps, split), evaluate(M, [GPU, CPU], spec, deps, split)
    assert verified.stages[1].step_s > plain.stages[1].step_s  # more positions per row at the deep stage
    assert verified.stages[0].step_s == pytest.approx(plain.stages[0].step_s)
    assert verified.tpot_s > plain.tpot_s / 0.6  # both effects: the division and the longer deep step
    slo = (plain.tpot_s + verified.tpot_s) / 2  # between the two predictions
    naive = plan(M, [GPU, CPU], w, Constraints(split=[8], tpot_slo_s=slo))
    honest = plan(M, [GPU, CPU], spec, Constraints(split=[8], tpot_slo_s=slo))
    assert naive.meets_slo and honest.tpot_s <= slo
    assert honest.cost > naive.cost  # the measured traffic needs the dearer plan


def test_the_slo_is_a_p99_and_each_stage_says_why():
    reach = reach_from_exit_rates(16, {8: 0.8})
    w = Workload(decode_tokens_per_s=300, reach=reach, concurrent_sequences=16)
    base = plan(M, [GPU, CPU], w, Constraints(split=[8]))
    slo = base.tpot_s * 1.5
    cheap = plan(M, [GPU, CPU], w, Constraints(split=[8], tpot_slo_s=slo))
    wide = plan(M, [GPU, CPU], w, Constraints(split=[8], tpot_slo_s=slo, tpot_p99_factor=3.0))
    assert cheap.tpot_p99_s == pytest.approx(cheap.tpot_s) and cheap.tpot_p99_s <= slo
    assert wide.tpot_p99_s == pytest.approx(3.0 * wide.tpot_s)
    assert wide.meets_slo == (wide.tpot_p99_s <= slo)
    assert wide.cost >= cheap.cost  # a wider spread of requests leaves less room for cheap pools
    assert len(cheap.reasons) == 2 and all(r.startswith(f"stage {k} ") for k, r in enumerate(cheap.reasons))
    for r, s in zip(cheap.reasons, cheap.stages):
        other = "cpu" if s.pool == "gpu" else "gpu"
        assert f"{s.pool} x{s.replicas}" in r and other in r  # the alternative and its verdict
        assert "over the" in r or "dearer" in r or "slower" in r or "does not fit" in r


def test_a_placement_measured_over_the_slo_is_not_planned_again():
    """A placement the controller served is predicted with the p99 factor it measured there:
    the model's choice, measured at 3x its prediction, gives way to the next-cheapest plan;
    a measured factor that agrees with the model changes nothing; when every placement was
    measured over the SLO the plan is the lowest measured p99, flagged."""
    reach = reach_from_exit_rates(16, {8: 0.8})
    w = Workload(decode_tokens_per_s=300, reach=reach, concurrent_sequences=16)
    slo = plan(M, [GPU, CPU], w, Constraints(split=[8])).tpot_s * 1.5
    first = plan(M, [GPU, CPU], w, Constraints(split=[8], tpot_slo_s=slo))
    sig = placement_signature(first.deployments())
    a, b = first.stages
    assert first.meets_slo and sig == f"0-8:{a.pool}/{a.precision},8-16:{b.pool}/{b.precision}"
    agrees = plan(M, [GPU, CPU], w, Constraints(split=[8], tpot_slo_s=slo, tpot_p99_factors={sig: 1.0}))
    assert placement_signature(agrees.deployments()) == sig
    burnt = Constraints(split=[8], tpot_slo_s=slo, tpot_p99_factors={sig: 3.0})
    second = plan(M, [GPU, CPU], w, burnt)
    assert placement_signature(second.deployments()) != sig and second.meets_slo
    assert second.cost >= first.cost and second.tpot_p99_s <= slo
    assert any("as measured when it served" in r for r in second.reasons)  # why the cheaper one lost
    again = evaluate(M, [GPU, CPU], w, first.deployments(), burnt)
    assert again.tpot_p99_s == pytest.approx(3.0 * again.tpot_s) and not again.meets_slo
    prec = {"gpu": "bf16", "cpu": "fp32"}
    every = {placement_signature([StagePlacement(start=0, end=8, pool=a, precision=prec[a]),
                                  StagePlacement(start=8, end=16, pool=b, precision=prec[b])]): 50.0
             for a in prec for b in prec}
    over = Constraints(split=[8], tpot_slo_s=slo, tpot_p99_factors=every)
    none = plan(M, [GPU, CPU], w, over)
    assert not none.meets_slo and any("no feasible plan meets" in n for n in none.notes)
    assert none.tpot_p99_s <= evaluate(M, [GPU, CPU], w, first.deployments(), over).tpot_p99_s
