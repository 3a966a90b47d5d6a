"""Token choice from logits: greedy, or temperature / top-k / top-p sampling.

Sampling is stateless per (seed, step): any stage replica that produces token ``step`` of
a request draws the same value, so seeded requests are reproducible whichever gate the
token exits at.

A row's failure is that row's own: :func:`choose_tokens` never raises for one bad row
(non-finite logits, a temperature that would overflow); it returns a
:class:`~offramp.errors.RowFailed` in that row's place, so the other rows of the batch are
served and nobody mistakes the request's problem for a broken replica.
"""
from __future__ import annotations

import torch

from offramp.errors import RowFailed
from offramp.protocol import MIN_TEMPERATURE, SamplingParams


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int | RowFailed]:
    """logits (B, V) -> one token id per row, or the row's :class:`RowFailed`."""
    top, greedy_t = logits.max(dim=-1)  # (B,): max is NaN/inf iff the row has NaN/+inf (or is all -inf)
    finite, greedy = torch.isfinite(top).tolist(), greedy_t.tolist()
    out: list[int | RowFailed] = []
    for b, p in enumerate(params):
        if not finite[b]:
            out.append(RowFailed("the model produced non-finite logits for this request (numerical overflow in "
                                 "the stage's precision); retry with exits off or report it to the operator"))
        elif p.temperature < MIN_TEMPERATURE:
            out.append(greedy[b])
        else:
            try:
                out.append(_sample(logits[b].float(), p, steps[b]))
            except (RuntimeError, ValueError, OverflowError) as e:
                out.append(RowFailed(f"sampling failed for this request ({type(e).__name__}); check temperature, "
                                     "top_p and top_k"))
    return out


def _sample(logits: torch.Tensor, p: SamplingParams, step: int) -> int:
    logits = (logits - logits.max()) / p.temperature  # (V,) max 0: exp cannot overflow
    if p.top_k and p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p (never empty)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    gen = None
    if p.seed is not None:
        gen = torch.Generator().manual_seed((p.seed * 1_000_003 + step) % (2**63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
