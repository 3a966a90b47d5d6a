"""Online audit of early exits (exact backfill checked at the last stage) and the
threshold offsets that hold the agreement target under drift."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from offramp.ops import exits as ex
from offramp.ops.checkpoint import load_spec
from offramp.ops.online_tuning import AgreementTuner, wilson
from offramp.ops.stage import load_stage
from offramp.ops.worker import ExitPolicy, StageWorker, StepRow
from offramp.protocol import GenerationRequest, SamplingParams


def test_wilson_interval():
    lo, hi = wilson(98, 100, 1.645)
    assert lo < 0.98 < hi and 0.94 < lo and hi < 0.995
    assert wilson(0, 0, 1.645) == (0.0, 1.0)


def test_tuner_tightens_under_drift_and_relaxes_back_to_the_calibrated_floor():
    rng = random.Random(3)
    t = AgreementTuner(target=0.98, window=200, min_checks=100, step=0.02)
    for _ in range(600):  # drift: this gate's exits agree only 90% of the time
        t.observe(3, "qa", rng.random() < 0.90)
    assert t.offset(3, "qa") >= 0.04  # raised after each window of evidence
    assert t.offset(3, "math") == 0.0 and t.offset(5, "qa") == 0.0  # per gate and task
    raised = t.offset(3, "qa")
    for _ in range(3000):  # the raised threshold (or the traffic) agrees again
        t.observe(3, "qa", True)
    assert t.offset(3, "qa") == 0.0 < raised  # back to the calibrated value, never below
    snap = t.snapshot()["3/qa"]
    assert snap["checks"] == 3600 and snap["changes"] >= 4
    # inside the target's noise: no change (no action on weak evidence)
    t2 = AgreementTuner(target=0.98, window=400, min_checks=400)
    for i in range(400):
        t2.observe(1, None, i % 50 != 0)  # exactly 98%
    assert t2.offset(1, None) == 0.0
    off = AgreementTuner(enabled=False)
    for _ in range(500):
        off.observe(1, None, False)
    assert off.offset(1, None) == 0.0 and off.snapshot()["1/default"]["agreement"] == 0.0
    with pytest.raises(ValueError, match="target"):
        AgreementTuner(target=1.0)


def test_calibrated_threshold_takes_the_online_offset(tiny_model_dir):
    spec = load_spec(tiny_model_dir)
    w = StageWorker(load_stage(tiny_model_dir, spec, (0, 2), first=True, last=False, exits=None), 0, 2, None)
    w.exits = ex.ExitsConfig(exit_layers=[2], thresholds={"2": {"default": 0.3}})
    assert w.threshold(ExitPolicy("calibrated")) == pytest.approx(0.3)
    assert w.threshold(ExitPolicy("calibrated", offset=0.1)) == pytest.approx(0.4)
    assert w.threshold(ExitPolicy("threshold", 0.2, offset=0.1)) == 0.2  # an explicit threshold is the user's


def test_last_stage_returns_full_depth_tokens_of_backfilled_positions(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    spec = load_spec(tiny_model_dir)
    w = StageWorker(load_stage(tiny_model_dir, spec, (0, spec.num_layers), first=True, last=True, exits=None),
                    0, 1, None)
    ids = [5, 9, 17, 3, 44, 2, 8]
    (res,) = w.step([StepRow("s", torch.tensor(ids), len(ids) - 1, verify=True)])
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        full = hf(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    assert res.backfill == full[:-1] and res.token == full[-1]
    (plain,) = w.step([StepRow("t", torch.tensor(ids), len(ids) - 1)])
    assert plain.backfill is None  # only when asked
    # a batch of audited rows of different lengths: one LM-head call, split back per row
    a, b, c = w.step([StepRow("u", torch.tensor(ids), len(ids) - 1, verify=True),
                      StepRow("v", torch.tensor(ids[:4]), 3),
                      StepRow("x", torch.tensor(ids[:3]), 2, verify=True)])
    assert a.backfill == full[:-1] and b.backfill is None and c.backfill == full[:2]


def test_pipeline_audits_exits_against_full_depth(tiny_model_dir):
    """2 stages; stage 0 lets every odd-step token exit (a patched gate), the even ones go
    deep carrying the exited states. The ingress's audit must count exactly the exited
    tokens that were backfilled, and agreement exactly as Hugging Face's full-depth argmax
    at those positions says."""
    from transformers import AutoModelForCausalLM

    from test_split_moves import _Replicas  # real stage servers on local threads

    from offramp.deployments.pipeline import PipelineBackend, Router

    L = load_spec(tiny_model_dir).num_layers

    async def scenario():
        reps = _Replicas(tiny_model_dir)
        s0 = reps.add("s0", 0, (0, 2))
        reps.add("s1", 1, (2, L))
        orig = s0.worker._gate
        s0.worker._gate = lambda rows, live, h, results: orig(
            rows, [b for b in live if rows[b].step % 2 == 1], h, results)
        backend = PipelineBackend(2, Router(2, "tok", reps.lookup, num_layers=L), eos_token_ids=(), max_seq=128,
                                  vocab_size=load_spec(tiny_model_dir).vocab_size, audit_rate=1.0,
                                  tuner=AgreementTuner(target=0.98))
        prompt = (5, 9, 17, 3)
        req = GenerationRequest("r", prompt, SamplingParams(max_tokens=10, ignore_eos=True), exit_mode=0.0)
        try:
            events = [ev async for ev in backend.generate(req)]
        finally:
            reps.close()
        return prompt, events, backend.stats()

    prompt, events, stats = asyncio.run(scenario())
    assert [ev.exit_stage for ev in events] == [1, 0] * 5  # odd steps exited at stage 0
    tokens = list(prompt) + [ev.token_id for ev in events]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        full = hf(torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    # steps 1, 3, 5, 7 were backfilled by the deep steps after them (step 9's never was)
    checked = [len(prompt) + s - 1 for s in (1, 3, 5, 7)]
    agreed = sum(full[p] == tokens[p + 1] for p in checked)
    audit = stats["exit_audit"]["2/default"]
    assert audit["checks"] == 4 and audit["agreement"] == pytest.approx(agreed / 4)
