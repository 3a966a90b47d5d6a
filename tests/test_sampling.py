"""Unit tests of the sampler's logit processing (min-p; the speculative rule over it)."""
import pytest
import torch

from offramp.ops.sampling import choose_tokens, processed_probs, verify_drafts
from offramp.protocol import SamplingParams

LOGITS = torch.tensor([3.0, 2.2, 1.0, 0.1, -0.5, -4.0, 2.9])


@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.3, 0.7), (0.5, 1.3), (0.9, 1.0)])
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(min_p, temperature):
    """vLLM's definition: after temperature, keep token i iff p_i >= min_p * max(p), renormalize."""
    got = processed_probs(LOGITS, SamplingParams(temperature=temperature, min_p=min_p))
    probs = torch.softmax(LOGITS / temperature, -1)
    ref = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    assert (ref == 0).any(), "each case has a token min-p removes"
    torch.testing.assert_close(got, ref / ref.sum())


def test_min_p_one_is_greedy_and_zero_is_off():
    sp = SamplingParams(temperature=1.0, min_p=1.0)
    assert processed_probs(LOGITS, sp).tolist() == [1.0] + [0.0] * 6
    assert [choose_tokens(LOGITS[None], [SamplingParams(temperature=1.0, min_p=1.0, seed=s)], [0])[0]
            for s in range(20)] == [0] * 20
    torch.testing.assert_close(processed_probs(LOGITS, SamplingParams(temperature=1.0, min_p=0.0)),
                               torch.softmax(LOGITS, -1))


def test_min_p_composes_with_top_k_and_top_p():
    """min-p first, then top-k, then top-p over what is left."""
    sp = SamplingParams(temperature=1.0, min_p=0.1, top_k=3, top_p=0.8)
    got = processed_probs(LOGITS, sp)
    assert set(got.nonzero().flatten().tolist()) == {0, 6}  # top 3 = {0, 6, 1}; top_p 0.8 stops after 2
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))


def test_speculative_acceptance_targets_the_min_p_distribution():
    """A draft from an unrestricted q, verified under min-p: a token min-p removes is never
    committed (rejected, and the residual has no mass there)."""
    q = torch.softmax(torch.zeros(7), -1)
    target = processed_probs(LOGITS, SamplingParams(temperature=1.0, min_p=0.5))
    banned = (target == 0).nonzero().flatten().tolist()
    for seed in range(40):
        x = banned[seed % len(banned)]
        out = verify_drafts(torch.stack([LOGITS, LOGITS]), [x], q[None],
                            SamplingParams(temperature=1.0, min_p=0.5, seed=seed), 0)
        assert out[0] not in banned and len(out) == 1
