"""Pieces of ``offramp bench placement --exit-aware`` that decide its figures (the whole
bench boots a cluster three times: docs/placement.md has its run)."""
from __future__ import annotations

import math

import pytest

from offramp.bench.placement_exits import time_weighted, verdict


def test_time_weighted_cost_holds_each_value_until_the_next_sample():
    assert time_weighted([(0, 4.0), (10, 2.25), (40, 2.25)]) == pytest.approx((4.0 * 10 + 2.25 * 30) / 40)
    assert time_weighted([(5, 3.0)]) == 3.0 and math.isnan(time_weighted([]))


def _r(cost, p99, failed=0):
    return {"cost_per_hour_end": cost, "cost_per_hour_mean": cost + 0.5, "tpot_ms_p99_settled": p99,
            "requests_failed": failed}


@pytest.mark.parametrize("aware, unaware, met", [
    (_r(2.25, 25.0), _r(4.0, 14.0), True),
    (_r(3.0, 25.0), _r(4.0, 14.0), False),  # 25% cheaper only
    (_r(2.25, 31.0), _r(4.0, 14.0), False),  # over the SLO once settled
    (_r(2.25, 25.0, failed=1), _r(4.0, 14.0), False),  # a failed request
    (_r(2.25, None), _r(4.0, 14.0), False),  # nothing measured after the moves
    (_r(2.25, 25.0), _r(4.0, 30.5), False),  # the baseline itself missed the SLO: not equal footing
])
def test_the_must_show_can_fail(aware, unaware, met):
    v = verdict({"exit_aware": aware, "exit_unaware": unaware, "static_fast": _r(4.0, 14.0)}, 30.0)
    assert v["met"] is met
    assert verdict({"exit_aware": aware}, 30.0) is None


def test_defaults_name_real_tasks_and_contenders():
    import argparse

    from offramp.bench import placement
    from offramp.bench.placement_exits import CONTENDERS
    from offramp.bench.serve import TASKS

    ap = argparse.ArgumentParser()
    placement.register(ap.add_subparsers())
    args = ap.parse_args(["placement", "--exit-aware"])
    assert args.exit_aware and set(args.tasks.split(",")) <= set(TASKS)
    assert set(args.contenders.split(",")) == set(CONTENDERS)


def test_deep_visits_per_token_from_two_samples():
    from offramp.bench.placement_exits import _deep_per_token

    assert _deep_per_token([100, 20], 90, [400, 95], 390) == pytest.approx(0.25)
    assert _deep_per_token([100, 20], 90, [400, 95], 90) is None  # no token emitted in between
    assert _deep_per_token(None, 0, [1, 1], 5) is None


def test_settled_counts_from_when_the_last_move_was_done():
    from offramp.bench.placement_exits import settled_from

    assert settled_from([]) == 10.0
    moves = [{"at_s": 28.2, "result": "applied in 22.8s (1 step(s))"},
             {"at_s": 59.0, "result": "applied in 10.2s (2 step(s))"}]
    assert settled_from(moves) == pytest.approx(59.0 + 10.2 + 10.0)
    assert settled_from(moves + [{"at_s": 111.4, "result": "in progress"}]) == math.inf  # never settled
    assert settled_from([{"at_s": 40.0, "result": "rolled_back in 30.0s (1 step(s))"}]) == pytest.approx(80.0)


def test_replot_draws_the_timeline_again_from_the_json(tmp_path):
    """A run's --json keeps each contender's timeline and request TPOTs; --replot draws the
    figure from it (4 stages: every stage's band inside the axes); a JSON without them (an
    older run) is refused with the fix named."""
    import json

    import pytest

    from offramp.bench.placement_exits import replot

    tl = [{"t": float(t), "cost": 8.0 if t < 30 else 4.5, "stages": [["gpu", 1]] + [["cpu" if t >= 30 else "gpu", 1]] * 3,
           "passes": [t * 10, t * 4], "emitted": t * 11, "server_p99": 20.0} for t in range(0, 60, 2)]
    out = {"tpot_slo_ms": 35.0, "contenders": {
        "exit_aware": {"timeline": tl, "requests_tpot": [[t, 0.012] for t in range(1, 60)], "moves": [],
                       "cost_per_hour_mean": 5.2, "tpot_ms_p99": 12.0, "requests_failed": 0}}}
    src = tmp_path / "run.json"
    src.write_text(json.dumps(out))
    png = tmp_path / "again.png"
    assert replot(src, png) == 0 and png.stat().st_size > 10_000
    out["contenders"]["exit_aware"].pop("timeline")
    src.write_text(json.dumps(out))
    with pytest.raises(ValueError, match="run it again"):
        replot(src, tmp_path / "no.png")


def test_every_bench_deploys_a_valid_serve_config(tmp_path):
    """The Serve configs the benches build (one builder, bench.common.local_serve_config)
    validate as Serve's own deploy schema and as the app's arguments, with one deployment
    per stage on its pool."""
    import argparse

    from ray.serve.schema import ServeDeploySchema

    from offramp.bench import faults, placement, placement_exits
    from offramp.deployments.config import AppArgs, EmulatedDevice, ServeApp

    ns = argparse.Namespace(request_timeout_s=30.0, kv_lease_s=5.0, emulate=True, cpu_step_ms=5.0, cpu_token_ms=0.1)
    configs = {
        "faults": faults._config(str(tmp_path), 8123, ns),
        "placement": placement._config(tmp_path, 8123, ns),
        "placement --exit-aware": placement_exits._config(tmp_path, 8123, {"cpu": EmulatedDevice(step_s=0.01, layers=2)},
                                                          "speculative", 3),
    }
    for name, cfg in configs.items():
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        args = AppArgs.model_validate(app["args"])
        view = ServeApp(app, [(k, k + 1) for k in range(args.num_stages)])
        assert len(app["deployments"]) == args.num_stages + 1, name
        assert [st.pool for st in view.stages()] == [s.pool for s in args.stages], name
