"""Token choice from logits: greedy, or temperature / top-k / top-p sampling.

Sampling is stateless per (seed, step): any stage replica that produces token ``step`` of
a request draws the same value, so seeded requests are reproducible whichever gate the
token exits at.
"""
from __future__ import annotations

import torch

from offramp.protocol import SamplingParams


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """logits (B, V) -> one token id per row."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for b, p in enumerate(params):
        if p.temperature <= 0:
            out.append(greedy[b])
            continue
        out.append(_sample(logits[b].float(), p, steps[b]))
    return out


def _sample(logits: torch.Tensor, p: SamplingParams, step: int) -> int:
    logits = logits / p.temperature  # (V,)
    if p.top_k and p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    gen = None
    if p.seed is not None:
        gen = torch.Generator().manual_seed((p.seed * 1_000_003 + step) % (2**63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
