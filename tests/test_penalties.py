"""Penalties, logit_bias and min_tokens against transformers' logits processors on tiny
random checkpoints, greedy: the staged engine (2 stages, exits off) produces the tokens
``generate`` produces with the matching processor. Speculative exits with forced drafts
keep producing exactly those tokens (the drafter and the verifier adjust alike), and the
adjustments reach the HTTP API.

transformers has no presence/frequency processor; the reference is OpenAI's documented
formula, ``logit[t] -= frequency * count[t] + presence * (count[t] > 0)`` over the output.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from offramp.ops.engine import StagedModel
from offramp.ops.sampling import adjust_logits
from offramp.ops.worker import ExitPolicy
from offramp.protocol import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 12, 13], [20, 30, 40, 50, 60]]
N = 16


@pytest.fixture
def checkpoint(family_checkpoint):
    return family_checkpoint


@pytest.fixture
def hf(family_hf):
    return family_hf


class OutputPenalties(LogitsProcessor):
    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        out = input_ids[:, self.prompt_len:]
        if out.shape[1]:
            counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_greedy(hf, prompt, n, **kw) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


CASES = {
    "repetition": (dict(repetition_penalty=1.8), lambda p: dict(repetition_penalty=1.8)),
    "frequency": (dict(frequency_penalty=1.5), lambda p: dict(logits_processor=LogitsProcessorList(
        [OutputPenalties(len(p), 1.5, 0.0)]))),
    "presence": (dict(presence_penalty=1.2), lambda p: dict(logits_processor=LogitsProcessorList(
        [OutputPenalties(len(p), 0.0, 1.2)]))),
    "logit_bias": (dict(logit_bias=((7, 5.0), (9, -100.0))), lambda p: dict(sequence_bias={(7,): 5.0, (9,): -100.0})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_adjustments_equal_transformers(checkpoint, hf, case):
    ours, theirs = CASES[case]
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=N, ignore_eos=True, **ours)
    plain = model.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True), ExitPolicy("off"))
    got = model.generate(PROMPTS, sp, ExitPolicy("off"))
    for p, s, base in zip(PROMPTS, got, plain):
        assert s.generated == hf_greedy(hf, p, N, eos_token_id=None, **theirs(p)), f"{case}, prompt {p}"
    assert any(s.generated != b.generated for s, b in zip(got, plain)), f"{case} changed nothing: a weak test"


def test_min_tokens_holds_back_eos_like_transformers(checkpoint, hf):
    model = StagedModel(checkpoint, num_stages=2)
    eos = model.spec.eos_token_ids[0]
    sp = SamplingParams(max_tokens=N, logit_bias=((eos, 100.0),), min_tokens=5, stop_token_ids=(eos,))
    for p, s in zip(PROMPTS, model.generate(PROMPTS, sp, ExitPolicy("off"))):
        assert len(s.generated) == 6 and s.generated[-1] == eos and eos not in s.generated[:5]
        assert s.generated == hf_greedy(hf, p, N, eos_token_id=eos, min_new_tokens=5, sequence_bias={(eos,): 100.0})


def test_speculative_with_adjustments_equals_exits_off(checkpoint):
    model = StagedModel(checkpoint, num_stages=2)
    sp = SamplingParams(max_tokens=N, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.7,
                        presence_penalty=0.3, logit_bias=((11, 3.0),))
    off = model.generate(PROMPTS, sp, ExitPolicy("off"))
    spec = model.generate(PROMPTS, sp, ExitPolicy("speculative", 0.0, max_draft=4))
    assert [s.generated for s in spec] == [s.generated for s in off]
    assert sum(s.drafted for s in spec) > 0


def test_adjust_logits_sees_drafts_before_each_position():
    """A verify chunk: position j counts the drafts before it as output."""
    logits = torch.zeros(3, 10)
    sp = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)
    out = adjust_logits(logits, sp, history=[1, 2, 4], step=1, drafts=(4, 5))  # prompt [1, 2], output [4]
    assert out[0, 4] == -1.5 and out[0, 5] == 0 and out[0, 1] == 0
    assert out[1, 4] == -2.5 and out[1, 5] == 0
    assert out[2, 5] == -1.5
    assert torch.equal(logits, torch.zeros(3, 10)), "the input is not changed"


def test_penalties_over_http(tiny_model_dir):
    """The API fields reach token choice: the HTTP result equals the engine's."""
    import openai

    from offramp.api.app import create_app
    from offramp.api.frontend import ApiSettings, Frontend
    from offramp.api.text import load_tokenizer
    from offramp.ops.engine import InProcessBackend
    from test_api_helpers import LiveServer

    staged = StagedModel(tiny_model_dir, num_stages=2)
    app = create_app(Frontend(backend=InProcessBackend(staged), tokenizer=load_tokenizer(tiny_model_dir),
                              settings=ApiSettings(model_name="m", max_context=staged.max_seq)))
    prompt = [5, 6, 7, 8]
    sp = SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                        presence_penalty=0.2, logit_bias=((17, 2.0),))
    (ref,) = StagedModel(tiny_model_dir, num_stages=2).generate([prompt], sp, ExitPolicy("off"))
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="m", prompt=[prompt], max_tokens=10, temperature=0,
                                      frequency_penalty=0.5, presence_penalty=0.2, logit_bias={"17": 2},
                                      extra_body={"repetition_penalty": 1.3, "ignore_eos": True,
                                                  "offramp": {"exit": "off"}})
    assert r.choices[0].model_extra["offramp"]["token_ids"] == ref.generated


def test_adjust_logits_repetition_matches_the_transformers_processor():
    """Both signs: positive logits are divided, negative ones multiplied (CTRL's rule)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 3
    history = [3, 7, 7, 12, 40, 41]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), logits.clone())
    got = adjust_logits(logits, SamplingParams(repetition_penalty=1.7), history, step=2)
    assert torch.allclose(got, want)
    assert (logits[0, history] < 0).any() and (logits[0, history] > 0).any()
