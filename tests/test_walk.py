"""The token walk the in-process engine and the served pipeline share (offramp/ops/walk.py):
the row a step starts with, what each kind of stage answer means, a verify round's
bookkeeping and the one prompt check. Unit tests; the golden tests (served == in process
== transformers) cover the walk end to end."""
from __future__ import annotations

import pytest
import torch

from offramp.errors import BadRequest
from offramp.ops import walk
from offramp.ops.walk import Kind, Walk, check_prompt
from offramp.ops.worker import ExitPolicy, StepResult, StepRow
from offramp.protocol import SamplingParams, TokenLogprob


def _walk(tokens=(5, 6, 7), prompt_len=3, **sampling) -> Walk:
    sp = SamplingParams(**{"max_tokens": 8, **sampling})
    return Walk(tokens=list(tokens), prompt_len=prompt_len, sampling=sp, policy=ExitPolicy("off"))


def test_first_row_feeds_the_prompt_and_scores_it_when_asked():
    w = _walk(prompt_logprobs=1)
    row = w.row("s", max_seq=64)
    assert row.inputs.tolist() == [5, 6, 7] and row.position == 2 and row.step == 0
    assert row.score == (6, 7) and row.draft == 0 and row.history == ()
    w.fed = 3
    w.tokens.append(9)
    row = w.row("s", max_seq=64)
    assert row.inputs.tolist() == [9] and row.position == 3 and row.step == 1 and row.score == ()


def test_a_logit_adjusting_sampler_gets_the_history():
    w = _walk(presence_penalty=0.5)
    assert w.row("s", max_seq=64).history == (5, 6, 7)


def test_the_draft_budget_fits_max_tokens_and_the_context_and_can_be_withheld():
    w = _walk(max_tokens=3)
    w.policy = ExitPolicy("speculative", max_draft=5)
    assert w.row("s", max_seq=64).draft == 2  # drafts + one committed token <= max_tokens
    assert w.row("s", max_seq=5).draft == 1  # ... and <= the context
    assert w.row("s", max_seq=64, drafting=False).draft == 0


@pytest.mark.parametrize("res, kind", [
    (StepResult("s", error=ValueError("x"), token=3), Kind.FAILED),  # the row's error wins
    (StepResult("s", tokens=[3, 4]), Kind.VERIFIED),
    (StepResult("s", token=3, exited=True), Kind.TOKEN),
    (StepResult("s", forwarded=True, drafts=[1]), Kind.FORWARDED),
])
def test_sort_names_each_kind_of_answer(res, kind):
    got, onward = walk.sort(_walk(), StepRow("s", torch.tensor([7]), 2), res)
    assert got is kind and onward is None


def test_a_continuing_answer_goes_on_with_its_hidden_state_and_drafts():
    row = StepRow("s", torch.tensor([7]), 2, step=4)
    hidden = torch.zeros(3, 8)
    kind, onward = walk.sort(_walk(), row, StepResult("s", hidden=hidden, drafts=[11, 12]))
    assert kind is Kind.ONWARD
    assert onward.inputs is hidden and onward.position == 4 and onward.drafts == (11, 12) and onward.step == 4


def test_prompt_logprobs_are_kept_with_none_for_the_first_prompt_token():
    w = _walk(prompt_logprobs=1)
    lps = [TokenLogprob(-1.0), TokenLogprob(-2.0)]
    walk.sort(w, StepRow("s", torch.tensor([5, 6, 7]), 2), StepResult("s", token=1, prompt_logprobs=lps))
    assert w.prompt_logprobs == (None, *lps)


def test_a_verify_round_feeds_only_the_last_token_next_and_is_counted():
    w = _walk()
    w.fed = 3
    w.verified(drafted=3, accepted=2)  # before its 3 tokens are appended
    for t in (20, 21, 22):
        w.append(t, eos_token_ids=(0,), max_seq=64)
    assert w.fed == 5 and w.tokens[w.fed:] == [22]
    assert w.last_round == (3, 2) and (w.drafted, w.accepted, w.rounds) == (3, 2, 1)
    assert w.draft_counts.accepted == 2


def test_append_says_why_a_sequence_finishes():
    w = _walk(max_tokens=2)
    assert w.append(4, eos_token_ids=(0,), max_seq=64) is None
    assert w.append(4, eos_token_ids=(0,), max_seq=64) == "length"
    assert _walk().append(0, eos_token_ids=(0,), max_seq=64) == "stop"


@pytest.mark.parametrize("prompt, max_tokens, match", [
    ([], 1, "empty"), ([1, 99], 1, "outside the vocabulary"), ([1, 2], 9, "exceeds the context"),
])
def test_check_prompt_names_the_fix(prompt, max_tokens, match):
    with pytest.raises(BadRequest, match=match):
        check_prompt(prompt, max_tokens, vocab_size=50, max_seq=10)
    check_prompt([1, 2], 8, vocab_size=50, max_seq=10)
