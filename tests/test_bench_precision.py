"""``offramp bench precision`` on the tiny checkpoint and a small held-out split."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture()
def heldout(tmp_path):
    docs = []
    for i in range(8):  # heldout_docs keeps every other doc of a task for the "test" half
        docs.append({"task": "math", "key": f"m{i}", "text": " ".join(f"{a}+{a + i}={2 * a + i}" for a in range(40))})
        docs.append({"task": "qa", "key": f"q{i}", "text": "the quick brown fox jumps over the lazy dog " * 12})
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tmp_path


def test_precision_quality_and_time_ratios(tiny_model_dir, heldout):
    from offramp.bench.precision import measure

    res = measure(tiny_model_dir, heldout, ["fp32", "bf16", "int8"], max_tokens=256, seq_len=64, repeats=1,
                  progress=False)
    assert set(res["tasks"]) == {"math", "qa"}
    assert res["overall"]["fp32"]["agreement_with_fp32"] == 1.0
    bf = res["overall"]["bf16"]
    assert 0.5 < bf["agreement_with_fp32"] <= 1.0  # bf16 changes some argmaxes of a random model, not most
    assert bf["ppl"] == pytest.approx(res["overall"]["fp32"]["ppl"], rel=0.05)
    i8 = res["overall"]["int8"]  # weight-only int8: a small, measured price, not a broken model
    assert 0.5 < i8["agreement_with_fp32"] <= 1.0
    assert i8["ppl"] == pytest.approx(res["overall"]["fp32"]["ppl"], rel=0.05)
    assert res["time_ratio_to_fp32"]["fp32"] == 1.0 and res["time_ratio_to_fp32"]["bf16"] > 0
    with pytest.raises(ValueError, match="must include fp32"):
        measure(tiny_model_dir, heldout, ["bf16"], progress=False)


def test_precision_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "offramp.cli", "bench", "precision", "--model", str(tiny_model_dir),
                        "--data", str(tmp_path / "missing"), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "prepare-data" in r.stderr and "Traceback" not in r.stderr
