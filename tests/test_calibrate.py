"""Learn-then-Test thresholds (Monte Carlo check of the guarantee), calibrate and eval
on a tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from offramp.training.calibrate import NEVER, binom_cdf, ltt_threshold


def test_binom_cdf_matches_direct_sum():
    for n, k, p in [(10, 3, 0.2), (50, 0, 0.02), (200, 7, 0.02), (30, 30, 0.5)]:
        ref = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binom_cdf(k, n, p) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def _risk(t: float) -> float:
    """True disagreement rate among tokens with conf >= t when conf ~ U(0,1) and
    P(disagree | c) = 0.2 (1 - c)^2:  E[0.2 (1-c)^2 | c >= t] = 0.2 (1 - t)^2 / 3."""
    return 0.2 * (1 - t) ** 2 / 3


def test_ltt_guarantee_holds_over_resamples():
    target, delta, n, reps = 0.98, 0.1, 2000, 300
    eps = 1 - target
    g = torch.Generator().manual_seed(0)
    violations, chosen = 0, []
    for _ in range(reps):
        conf = torch.rand(n, generator=g)
        disagree = torch.rand(n, generator=g) < 0.2 * (1 - conf) ** 2
        t, info = ltt_threshold(conf, ~disagree, target, delta, grid=100)
        if t < NEVER:
            violations += _risk(t) > eps
            chosen.append(t)
    rate = violations / reps
    mc_tol = 3 * math.sqrt(delta * (1 - delta) / reps)
    assert rate <= delta + mc_tol, rate
    # and it is not vacuous: thresholds near the true boundary (t* = 1 - sqrt(0.3) ~ 0.452)
    assert len(chosen) > 0.9 * reps
    assert sum(chosen) / len(chosen) < 0.75


def test_ltt_never_exits_when_nothing_is_good_enough():
    conf = torch.rand(3000, generator=torch.Generator().manual_seed(1))
    agree = torch.rand(3000, generator=torch.Generator().manual_seed(2)) < 0.9  # 10% errors
    t, _ = ltt_threshold(conf, agree, 0.98, 0.1)
    assert t == NEVER


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory):
    from offramp.ops.presets import make_checkpoint
    from offramp.training.data import DataSpec, prepare
    from offramp.training.gates import GateSpec, train_gates

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("calib")
    data = root / "data"
    prepare(data, DataSpec(seed=1, heldout_frac=0.4, math_problems=600, math_docs=2_000, coding_max_bytes=50_000,
                           qa_max_bytes=50_000, vocab_size=300, tokenizer_sample_bytes=30_000))
    model_dir = make_checkpoint(root / "tiny", "tiny", seed=3)
    train_gates(model_dir, data, GateSpec(steps=2, batch=3, seq_len=32))
    return model_dir, data


def test_calibrate_writes_thresholds_and_provenance(gated_model, tmp_path):
    from offramp.ops.exits import load_exits_config
    from offramp.training.calibrate import CalibSpec, calibrate

    model_dir, data = gated_model
    res = calibrate(model_dir, data, CalibSpec(target=0.9, delta=0.2, max_tokens=1500, seq_len=64),
                    plot=str(tmp_path / "curve.png"))
    cfg = load_exits_config(model_dir)
    c = cfg.calibration
    assert c is not None and c.target == 0.9 and c.delta == 0.2 and c.n > 0 and c.date
    assert c.method == "learn-then-test"
    for L, per in cfg.thresholds.items():
        assert int(L) in cfg.exit_layers and "default" in per
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "thresholds" in res["table"]


def test_eval_json_keys_and_ranges(gated_model, capsys):
    from offramp.cli import main

    model_dir, data = gated_model
    rc = main(["eval", "--model", str(model_dir), "--data", str(data), "--max-tokens", "1000", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert {"tasks", "overall", "exit_layers", "num_layers", "thresholds", "calibration",
            "math_exits_earlier_than_qa"} <= res.keys()
    for r in [*res["tasks"].values(), res["overall"]]:
        assert {"agreement", "exited_agreement", "frac_layers", "ppl_exit", "ppl_full",
                "exit_histogram", "exit_rate", "tokens"} <= r.keys()
        assert 0 <= r["agreement"] <= 1 and 0 < r["frac_layers"] <= 1 and 0 <= r["exit_rate"] <= 1
        assert r["ppl_exit"] > 1 and r["ppl_full"] > 1
        assert sum(r["exit_histogram"].values()) == r["tokens"]
        # no exits -> everything at full depth and agreement 1
        if r["exit_rate"] == 0:
            assert r["agreement"] == 1 and r["frac_layers"] == 1


def test_calibrate_draft_writes_draft_thresholds_and_keeps_the_agreement_ones(gated_model, capsys):
    from offramp.cli import main
    from offramp.ops.engine import StagedModel
    from offramp.ops.exits import load_exits_config
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    model_dir, data = gated_model
    before = load_exits_config(model_dir).thresholds
    rc = main(["calibrate-draft", "--model", str(model_dir), "--data", str(data), "--max-tokens", "200",
               "--new-tokens", "16", "--max-draft", "4"])
    assert rc == 0
    cfg = load_exits_config(model_dir)
    assert cfg.thresholds == before
    assert set(cfg.draft_thresholds) == {str(L) for L in cfg.exit_layers}
    assert all("default" in per for per in cfg.draft_thresholds.values())
    assert cfg.draft_calibration["max_draft"] == 4 and cfg.draft_calibration["expected_speedup"]
    assert "speedup" in capsys.readouterr().out
    # the served worker reads them: greedy speculative still equals exits off
    model = StagedModel(model_dir, num_stages=2)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    off = model.generate([[5, 6, 7, 8]], sp, ExitPolicy("off"))[0].generated
    spec = model.generate([[5, 6, 7, 8]], sp, ExitPolicy("speculative"))[0]
    assert spec.generated == off
    L = model.ranges[0][1]
    assert model.workers[0].draft_threshold(ExitPolicy("speculative")) == cfg.draft_thresholds[str(L)]["default"]
