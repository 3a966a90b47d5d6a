"""Speculative exits in one process: the drafting stage drafts with its exit head, the deep
stages verify a whole draft in one pass, rejected positions leave every stage's KV.

Golden: greedy speculative output equals exits off token for token (tiny random Llama,
Qwen2 and GPT-2 with forced drafts, and the embedded model with its own draft thresholds),
and after rejections each stage's KV equals a full-depth prefill of the final sequence.
Sampling: the acceptance rule is checked against the exact distributions with a
chi-square test that a wrong rule fails.
"""
from __future__ import annotations

import pytest
import torch

from offramp.errors import BadRequest
from offramp.ops import exits as ex
from offramp.ops.engine import StagedModel
from offramp.ops.presets import make_checkpoint
from offramp.ops.sampling import processed_probs, verify_drafts
from offramp.ops.worker import ExitPolicy, StepRow
from offramp.protocol import SamplingParams
from test_core import assert_kv_equals_full_prefill

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60]]
GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"spec-{request.param}")
    make_checkpoint(path, "tiny", family=request.param, seed=5)
    return path


@pytest.fixture
def mixed_confidence(monkeypatch):
    """Pseudo-random confidences (a pure function of the logits): drafts of mixed lengths
    on a random model; gates, chunks, verification and rollback are the real path."""
    monkeypatch.setattr(ex, "confidence", lambda logits, metric: (logits.float().sum(-1) * 1000).remainder(1.0))


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("max_draft", [1, 4])
def test_forced_drafts_equal_exits_off(checkpoint, stages, max_draft):
    model = StagedModel(checkpoint, num_stages=stages)
    off = model.generate(PROMPTS, GREEDY, ExitPolicy("off"))
    spec = model.generate(PROMPTS, GREEDY, ExitPolicy("speculative", max_draft=max_draft), keep_kv=True)
    assert [s.generated for s in spec] == [s.generated for s in off]
    assert sum(s.drafted for s in spec) > 0
    assert all(s.rounds + s.accepted == len(s.generated) for s in spec), "a round commits its accepted drafts + 1"
    assert_kv_equals_full_prefill(model, checkpoint, spec, stages)


def test_a_draft_ends_at_a_token_that_ends_the_sequence(checkpoint):
    """A drafted stop token (eos, or one of stop_token_ids) is the draft's last: nothing is
    drafted past it (the ingress would drop it); the output is still exits off's."""
    model = StagedModel(checkpoint, num_stages=2)
    policy = ExitPolicy("speculative", 0.0, max_draft=6)  # threshold 0: every proposal is drafted

    def drafts(sampling, seq_id):
        row = StepRow(seq_id, torch.tensor(PROMPTS[0]), len(PROMPTS[0]) - 1, sampling, policy, draft=6)
        (res,) = model.workers[0].step([row])
        model.workers[0].release(seq_id)
        return res.drafts

    free = drafts(GREEDY, "free")
    assert len(free) == 6
    stops = SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(free[2],))
    assert drafts(stops, "cut") == free[:free.index(free[2]) + 1]
    (off,) = model.generate([PROMPTS[0]], stops, ExitPolicy("off"))
    (spec,) = model.generate([PROMPTS[0]], stops, policy)
    assert spec.generated == off.generated and spec.finish_reason == off.finish_reason


@pytest.mark.parametrize("stages", [2, 4])
def test_mixed_draft_lengths_after_rejections_keep_exact_kv(checkpoint, mixed_confidence, stages):
    model = StagedModel(checkpoint, num_stages=stages)
    policy = ExitPolicy("speculative", 0.3, max_draft=5)
    spec = model.generate(PROMPTS, GREEDY, policy, keep_kv=True)
    off = StagedModel(checkpoint, num_stages=stages).generate(PROMPTS, GREEDY, ExitPolicy("off"))
    assert [s.generated for s in spec] == [s.generated for s in off]
    drafted, accepted = sum(s.drafted for s in spec), sum(s.accepted for s in spec)
    assert drafted > accepted > 0, "the test needs accepted and rejected drafts"
    assert_kv_equals_full_prefill(model, checkpoint, spec, stages)


def test_rows_with_different_draft_lengths_batch_like_one_at_a_time(checkpoint, mixed_confidence):
    model = StagedModel(checkpoint, num_stages=2)
    policy = ExitPolicy("speculative", 0.4, max_draft=3)
    together = model.generate(PROMPTS, GREEDY, policy)
    alone = [model.generate([p], GREEDY, policy)[0] for p in PROMPTS]
    assert [s.generated for s in together] == [s.generated for s in alone]
    assert [s.drafted for s in together] == [s.drafted for s in alone]


def test_stop_token_inside_an_accepted_draft_ends_the_sequence(checkpoint):
    model = StagedModel(checkpoint, num_stages=2)
    full = model.generate([PROMPTS[0]], GREEDY, ExitPolicy("off"))[0].generated
    stop = full[5]
    first = full.index(stop)
    sp = SamplingParams(max_tokens=20, stop_token_ids=(stop,), ignore_eos=True)
    (s,) = model.generate([PROMPTS[0]], sp, ExitPolicy("speculative", max_draft=6))
    assert s.generated == full[: first + 1] and s.finish_reason == "stop"
    assert all(w.cached_length(s.seq_id) == 0 for w in model.workers), "a finished sequence holds no KV"


def test_seeded_speculative_sampling_is_reproducible(checkpoint):
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=11, ignore_eos=True)
    policy = ExitPolicy("speculative", max_draft=3)
    a = model.generate(PROMPTS, sp, policy)
    b = model.generate(PROMPTS, sp, policy)
    assert [s.generated for s in a] == [s.generated for s in b]


def test_max_tokens_and_context_cap_the_draft(checkpoint):
    model = StagedModel(checkpoint, num_stages=2)
    for n in (1, 2, 3):
        (s,) = model.generate([PROMPTS[1]], SamplingParams(max_tokens=n, ignore_eos=True),
                              ExitPolicy("speculative", max_draft=8))
        assert len(s.generated) == n and s.finish_reason == "length"
    near = list(range(5, 5 + model.max_seq - 3))
    (s,) = model.generate([near], SamplingParams(max_tokens=3, ignore_eos=True), ExitPolicy("speculative", max_draft=8))
    assert len(s.tokens) <= model.max_seq


def test_speculative_requests_that_cannot_run_get_clear_errors(checkpoint, tmp_path):
    model = StagedModel(checkpoint, num_stages=2)
    for bad in (0, 33):
        with pytest.raises(BadRequest, match="max_draft"):
            model.new_sequence(PROMPTS[0], GREEDY, ExitPolicy("speculative", max_draft=bad))
    with pytest.raises(BadRequest, match="kv_fill"):
        StagedModel(checkpoint, num_stages=2, kv_fill="propagate").new_sequence(
            PROMPTS[0], GREEDY, ExitPolicy("speculative"))
    # an exits file without a head where stage 0 ends (layer 2 of 4): nothing can draft
    import shutil

    shutil.copytree(checkpoint, tmp_path / "m", dirs_exist_ok=True)
    cfg = ex.ExitsConfig(exit_layers=[1, 3], gate_enabled=False)
    spec = StagedModel(checkpoint, num_stages=1).spec
    d = spec.hidden_size
    tensors = {f"exits.{L}.norm.weight": torch.ones(d) for L in (1, 3)}
    if not spec.is_llama:
        tensors.update({f"exits.{L}.norm.bias": torch.zeros(d) for L in (1, 3)})
    ex.save_exits(tmp_path / "m", cfg, tensors)
    with pytest.raises(BadRequest, match="exit head where the first stage ends"):
        StagedModel(tmp_path / "m", num_stages=2).new_sequence(PROMPTS[0], GREEDY, ExitPolicy("speculative"))


def test_embedded_model_speculative_equals_exits_off():
    for stages in (2, 4):
        model = StagedModel(None, num_stages=stages)
        prompts = [[0, 412, 1033, 77, 2050, 9, 300], [0, 5, 17, 300, 42, 99, 1500, 8]]
        sp = SamplingParams(max_tokens=32, ignore_eos=True)
        off = model.generate(prompts, sp, ExitPolicy("off"))
        spec = model.generate(prompts, sp, ExitPolicy("speculative"))
        assert [s.generated for s in spec] == [s.generated for s in off]
        assert sum(s.accepted for s in spec) > 0


# -- sampling: the acceptance rule against exact distributions ---------------------------------
def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit (cells with expected count < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_acceptance_rule_reproduces_the_target_distribution():
    """verify_drafts alone: drafts drawn from q, committed first tokens must follow p."""
    V = 6
    torch.manual_seed(0)
    p_logits = torch.tensor([2.0, 1.5, 0.2, -1.0, 0.7, -3.0])
    q_logits = torch.tensor([0.1, 2.5, 1.8, 0.0, -2.0, 1.0])
    sp = SamplingParams(temperature=1.0, max_tokens=4)
    p, q = processed_probs(p_logits, sp), processed_probs(q_logits, sp)
    N = 6000
    counts = torch.zeros(V)
    naive = torch.zeros(V)  # a wrong rule (always accept the draft): the test must reject it
    for i in range(N):
        x = int(torch.multinomial(q, 1))
        logits = torch.stack([p_logits, p_logits])
        out = verify_drafts(logits, [x], q[None], SamplingParams(temperature=1.0, seed=i), 0)
        counts[out[0]] += 1
        naive[x] += 1
    assert _chi2_pvalue(counts, p) > 1e-3
    assert _chi2_pvalue(naive, p) < 1e-6


def test_speculative_sampling_matches_the_full_model_over_two_tokens(checkpoint):
    """End to end with forced drafts (max_draft 2): the joint distribution of the first two
    sampled tokens equals the full model's, computed exactly from its logits."""
    model = StagedModel(checkpoint, num_stages=2, max_slots=400)
    prompt = PROMPTS[1]
    sp = SamplingParams(max_tokens=2, temperature=0.7, top_k=4, ignore_eos=True)
    ref = StagedModel(checkpoint, num_stages=1)

    # exact joint from the full model's logits: p(t1) p(t2 | t1) on top-k supports
    def logits_after(ids: list[int]) -> torch.Tensor:
        seq = ref.new_sequence(ids, SamplingParams(max_tokens=1, ignore_eos=True), ExitPolicy("off"))
        w = ref.workers[0]
        from offramp.ops.layers import StepMeta

        with torch.inference_mode():
            slot = w.cache.alloc(seq.seq_id)
            meta = StepMeta.build([slot], [0], [len(ids)], "cpu", w.stage.spec.sliding_window)
            if w.stage.spec.is_llama:
                meta.cos, meta.sin = w.stage.rope.tables(meta.positions, w.stage.lm_dtype)
            h = w.stage(torch.tensor([ids]), meta, w.cache)
            out = w.stage.final_logits(h[0, -1:])[0]
        w.release(seq.seq_id)
        return out

    p1 = processed_probs(logits_after(prompt), sp)
    joint = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = processed_probs(logits_after(prompt + [t1]), sp)
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    cells = sorted(joint)
    torch.manual_seed(1)
    N, batch = 2400, 400
    counts = torch.zeros(len(cells) + 1)
    index = {c: i for i, c in enumerate(cells)}
    policy = ExitPolicy("speculative", max_draft=2)
    for _ in range(N // batch):
        for s in model.generate([prompt] * batch, sp, policy):
            counts[index.get(tuple(s.generated), len(cells))] += 1
    assert counts[-1] == 0, "a pair outside the full model's top-k support was sampled"
    probs = torch.tensor([joint[c] for c in cells] + [0.0])
    assert _chi2_pvalue(counts[:-1], probs[:-1] / probs.sum()) > 1e-3


# -- served: real stage channels and the ingress step scheduler (no Ray) -------------------------
def _served(model_dir, stages: int):
    from offramp.deployments import pipeline as pl
    from test_split_moves import _Replicas

    from offramp.ops.partition import partition_layers

    reps = _Replicas(model_dir)
    for i, rng in enumerate(partition_layers(reps.spec.num_layers, stages)):
        reps.add(f"s{i}", i, rng, num_stages=stages)
    router = pl.Router(stages, "tok", reps.lookup, num_layers=reps.spec.num_layers)
    backend = pl.PipelineBackend(stages, router, eos_token_ids=(), max_seq=128, vocab_size=reps.spec.vocab_size,
                                 request_timeout_s=30)
    return reps, backend


def _spec_req(i: int, prompt, n: int = 16, max_draft: int | None = None, exit_mode="speculative", **sampling):
    from offramp.protocol import GenerationRequest

    return GenerationRequest(f"sp{i}", tuple(prompt), SamplingParams(max_tokens=n, ignore_eos=True, **sampling),
                             exit_mode=exit_mode, max_draft=max_draft)


async def _events(backend, req):
    return [ev async for ev in backend.generate(req)]


@pytest.mark.parametrize("stages", [2, 4])
def test_served_speculative_equals_exits_off_and_reports_rounds(checkpoint, stages):
    """Concurrent speculative streams through real stage channels: each equals the unsplit
    model's greedy output; the verify rounds each event reports add up."""
    import asyncio

    whole = StagedModel(checkpoint, num_stages=1)
    ref = [whole.generate([p], GREEDY, ExitPolicy("off"))[0].generated for p in PROMPTS]

    async def scenario():
        reps, backend = _served(checkpoint, stages)
        try:
            outs = await asyncio.gather(*(_events(backend, _spec_req(i, p, n=20, max_draft=3))
                                          for i, p in enumerate(PROMPTS)))
            await asyncio.sleep(0.2)
            held = {n: len(s.worker.cache.slot_of) + len(s.worker.pending) for n, s in reps.servers.items()}
            return outs, backend.stats(), held
        finally:
            reps.close()

    outs, stats, held = asyncio.run(scenario())
    assert [[e.token_id for e in evs] for evs in outs] == ref
    rounds = [e.verified for evs in outs for e in evs if e.verified is not None]
    assert len(rounds) == stats["speculative"]["verify_rounds"]
    assert sum(a for _, a in rounds) + len(rounds) == sum(len(r) for r in ref)
    assert stats["speculative"]["drafted"] >= stats["speculative"]["accepted"]
    assert stats["stage_calls"][-1] == len(rounds), "one deep visit per verify round"
    drafted = sum(d for d, _ in rounds)
    assert stats["stage_passes"][0] == stats["stage_calls"][0] + drafted, "stage 0: a pass per draft more"
    assert stats["stage_passes"][1:] == stats["stage_calls"][1:]
    assert not any(held.values()), held


def test_served_seeded_speculative_sampling_is_reproducible(checkpoint):
    import asyncio

    async def scenario():
        reps, backend = _served(checkpoint, 2)
        try:
            sampled = dict(temperature=0.8, top_k=20, seed=5)
            a = await _events(backend, _spec_req(1, PROMPTS[0], **sampled))
            b = await _events(backend, _spec_req(2, PROMPTS[0], **sampled))
            return [e.token_id for e in a], [e.token_id for e in b]
        finally:
            reps.close()

    a, b = asyncio.run(scenario())
    assert a == b and len(a) == 16


def test_served_speculative_bad_requests(checkpoint):
    import asyncio

    from offramp.deployments import pipeline as pl

    async def first(backend, req):
        async for _ in backend.generate(req):
            return

    async def scenario():
        reps, backend = _served(checkpoint, 2)
        try:
            with pytest.raises(BadRequest, match="max_draft"):
                await first(backend, _spec_req(1, PROMPTS[0], max_draft=0))
            router = pl.Router(2, "tok", reps.lookup, num_layers=reps.spec.num_layers)
            prop = pl.PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=reps.spec.vocab_size,
                                      kv_fill="propagate")
            with pytest.raises(BadRequest, match="kv_fill"):
                await first(prop, _spec_req(2, PROMPTS[0]))
            # the server's default mode: a request that leaves "calibrated" gets speculative
            router2 = pl.Router(2, "tok", reps.lookup, num_layers=reps.spec.num_layers)
            spec_default = pl.PipelineBackend(2, router2, eos_token_ids=(), max_seq=128,
                                              vocab_size=reps.spec.vocab_size, default_exit="speculative", max_draft=2)
            evs = await _events(spec_default, _spec_req(3, PROMPTS[0], exit_mode="calibrated"))
            return evs
        finally:
            reps.close()

    evs = asyncio.run(scenario())
    assert any(e.verified for e in evs) and all(e.verified[0] <= 2 for e in evs if e.verified)


def _unsplit_greedy(model_dir) -> list[list[int]]:
    whole = StagedModel(model_dir, num_stages=1)
    return [whole.generate([p], GREEDY, ExitPolicy("off"))[0].generated for p in PROMPTS]


def _served_under(model_dir, limit: str, value: int, exit_mode="speculative"):
    """PROMPTS served at once by two stages with the ingress's load rule ``limit``
    (draft_max_active / gate_max_active) at ``value``: each request's events, the stats."""
    import asyncio

    async def scenario():
        reps, backend = _served(model_dir, 2)
        setattr(backend, limit, value)
        try:
            outs = await asyncio.gather(*(_events(backend, _spec_req(i, p, n=20, exit_mode=exit_mode))
                                          for i, p in enumerate(PROMPTS)))
            return outs, backend.stats()
        finally:
            reps.close()

    return asyncio.run(scenario())


def test_served_speculative_rows_stop_drafting_above_draft_max_active(checkpoint):
    """Past draft_max_active active requests a speculative row decodes one token per step
    (no drafting pass, still the full model's tokens); at or below it, it drafts."""
    ref = _unsplit_greedy(checkpoint)
    for limit, drafts in ((0, False), (3, True)):
        outs, stats = _served_under(checkpoint, "draft_max_active", limit)
        assert [[e.token_id for e in evs] for evs in outs] == ref
        assert (stats["speculative"]["drafted"] > 0) == drafts, limit


def test_served_rows_run_full_depth_above_gate_max_active(checkpoint):
    """Past gate_max_active active requests a calibrated/threshold row runs full depth (no
    gate, no exit: the exits-off tokens, every one from the last stage); at or below it the
    gates run (a threshold of 0 exits every token at the first gate). The limit below is 0,
    not len(PROMPTS) - 1: the rule reads the active count at each step, and the two lanes
    may finish a step apart, which would let the last lane's final steps gate."""
    full, _ = _served_under(checkpoint, "gate_max_active", 0, exit_mode=0.0)
    assert [[e.token_id for e in evs] for evs in full] == _unsplit_greedy(checkpoint)
    assert {e.exit_stage for evs in full for e in evs} == {1}
    gated, _ = _served_under(checkpoint, "gate_max_active", len(PROMPTS), exit_mode=0.0)
    assert {e.exit_stage for evs in gated for e in evs} == {0}


@pytest.mark.gpu
def test_forced_drafts_on_cuda_equal_exits_off(checkpoint):
    """Drafting and verification with every stage on a GPU keep the output token for token
    the full model's (greedy), as on the CPU."""
    model = StagedModel(checkpoint, num_stages=2, device="cuda")
    off = model.generate(PROMPTS, GREEDY, ExitPolicy("off"))
    spec = model.generate(PROMPTS, GREEDY, ExitPolicy("speculative", max_draft=4))
    assert [s.generated for s in spec] == [s.generated for s in off]
    assert sum(s.drafted for s in spec) > 0
