"""Token choice from logits: greedy, or temperature / min-p / top-k / top-p sampling.

Sampling is stateless per (seed, step): any stage replica that produces token ``step`` of
a request draws the same value, so seeded requests are reproducible whichever gate the
token exits at.

A row's failure is that row's own: :func:`choose_tokens` never raises for one bad row
(non-finite logits, a temperature that would overflow); it returns a
:class:`~offramp.errors.RowFailed` in that row's place, so the other rows of the batch are
served and nobody mistakes the request's problem for a broken replica.
"""
from __future__ import annotations

import math

import torch

from offramp.errors import RowFailed
from offramp.protocol import MIN_TEMPERATURE, NEG_INF_LOGPROB, SamplingParams, TokenLogprob


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int | RowFailed]:
    """logits (B, V) -> one token id per row, or the row's :class:`RowFailed` (a row with
    no drafts to verify: :func:`verify_batch`'s plain case)."""
    B = len(params)
    return [r if isinstance(r, RowFailed) else r[0]
            for r in verify_batch(logits, [()] * B, [None] * B, params, steps)]


def processed_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax of ``logits`` (V,) after
    temperature, min-p, top-k and top-p (in that order). Speculative decoding applies the
    same processing to the drafter's and the full model's logits, so acceptance targets
    exactly this."""
    logits = (logits.float() - logits.max()) / p.temperature  # (V,) max 0: exp cannot overflow
    if p.min_p > 0.0:  # prob / top prob = exp(logit) here: keep tokens with exp(logit) >= min_p (the top always)
        logits = logits.masked_fill(logits < math.log(p.min_p), float("-inf"))
    if p.top_k and p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p (never empty)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return torch.softmax(logits, dim=-1)


# Random streams of one seeded request, per token index: SAMPLE is the plain draw (the same
# with exits off, calibrated or speculative, so a step nothing was drafted for draws what
# exits off draws); DRAFT, ACCEPT and RESIDUAL are speculative decoding's own.
SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3


def generator(seed: int | None, step: int, stream: int = SAMPLE) -> torch.Generator | None:
    if seed is None:
        return None
    mixed = seed * 1_000_003 + step
    if stream != SAMPLE:
        mixed = mixed * 7919 + stream
    return torch.Generator().manual_seed(mixed % (2**63))


def draw(probs: torch.Tensor, seed: int | None, step: int, stream: int = SAMPLE) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator(seed, step, stream)).item())


NON_FINITE = ("the model produced non-finite logits for this request (numerical overflow in the stage's "
              "precision); retry with exits off or report it to the operator")


def verify_batch(logits: torch.Tensor, drafts: list[tuple[int, ...]], draft_probs: list[torch.Tensor | None],
                 params: list[SamplingParams], steps: list[int]) -> list[list[int] | RowFailed]:
    """The tokens each row commits. Row ``b`` owns ``len(drafts[b]) + 1`` consecutive rows
    of ``logits`` (the full model's at its drafted positions and the one after; one row
    when nothing was drafted) and gets back its accepted drafts plus one token of the full
    model (the correction at the first rejection, else the bonus), or its own
    :class:`RowFailed`: a row's failure never raises for the others. ``draft_probs[b]``
    (k, V): the distributions its drafts were drawn from (sampled rows); ``steps[b]``: the
    token index of its first position (seeded streams).

    Greedy: a draft is accepted iff it is the full model's argmax, so the output equals
    exits off token for token. Sampled: the speculative-sampling rule (Leviathan et al.,
    Chen et al.): accept draft x with probability min(1, p(x)/q(x)), on rejection draw from
    norm(max(p - q, 0)); the committed tokens are then distributed exactly as the full
    model's samples. With no drafts this is the plain draw of exits off."""
    top, argmax = logits.max(dim=-1)  # max is NaN/inf iff the row has NaN/+inf (or is all -inf)
    finite, argmax = torch.isfinite(top).tolist(), argmax.tolist()
    out: list[list[int] | RowFailed] = []
    i = 0
    for d, q, p, step in zip(drafts, draft_probs, params, steps):
        n = len(d) + 1
        if not all(finite[i: i + n]):
            out.append(RowFailed(NON_FINITE))
        elif p.temperature < MIN_TEMPERATURE:
            out.append(accept_greedy(argmax[i: i + n], d))
        elif d and (q is None or q.shape[0] != len(d)):
            out.append(RowFailed("a sampled speculative row arrived without its draft distributions"))
        else:
            try:
                out.append(_accept_sampled(logits[i: i + n], d, q, p, step))
            except (RuntimeError, ValueError, OverflowError) as e:
                out.append(RowFailed(f"sampling failed for this request ({type(e).__name__}); check temperature, "
                                     "top_p and top_k"))
        i += n
    return out


def verify_drafts(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, p: SamplingParams,
                  step: int) -> list[int] | RowFailed:
    """:func:`verify_batch` for one row: ``logits`` (k+1, V), ``drafts`` k tokens."""
    return verify_batch(logits, [tuple(drafts)], [draft_probs], [p], [step])[0]


def accept_greedy(argmax: list[int], drafts) -> list[int]:
    """Greedy verification: the full model's argmax at the k drafted positions and the one
    after (``argmax``, k+1 ids) -> the accepted drafts plus the full model's next token."""
    for i, d in enumerate(drafts):
        if argmax[i] != d:
            return argmax[: i + 1]
    return argmax[: len(drafts) + 1]


def _accept_sampled(logits: torch.Tensor, drafts, draft_probs: torch.Tensor | None, p: SamplingParams,
                    step: int) -> list[int]:
    out = []
    for i, x in enumerate(drafts):
        target = processed_probs(logits[i], p)
        q = draft_probs[i].float()
        u = torch.rand(1, generator=generator(p.seed, step + i, ACCEPT)).item()
        if q[x] > 0 and u * float(q[x]) < float(target[x]):
            out.append(x)
            continue
        residual = (target - q).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = target
        out.append(draw(residual / residual.sum(), p.seed, step + i, RESIDUAL))
        return out
    k = len(drafts)
    return out + [draw(processed_probs(logits[k], p), p.seed, step + k)]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Per row of ``logits`` (N, V): the log-probability of ``tokens[i]`` and the ``top``
    most likely tokens, of the raw distribution (log-softmax in float32; -inf reported as
    :data:`NEG_INF_LOGPROB`)."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1).nan_to_num(nan=NEG_INF_LOGPROB, neginf=NEG_INF_LOGPROB)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(c) for c in chosen]
    vals, ids = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)
    return [TokenLogprob(c, tuple(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), vals.tolist())]


def adjust_logits(logits: torch.Tensor, p: SamplingParams, history, step: int, drafts=()) -> torch.Tensor:
    """The logits token choice uses for a row whose sampling adjusts them
    (:attr:`SamplingParams.adjusts_logits`): ``logits`` (n, V) at n consecutive positions,
    the first producing token ``step``; ``history`` the prompt and the ``step`` tokens
    generated before it; position j also sees ``drafts[:j]`` (a speculative chunk). Order
    as vLLM: logit_bias, min_tokens, then repetition (prompt + output), frequency and
    presence (output) penalties. Returns float32 logits; the input is not changed."""
    if not p.adjusts_logits:
        return logits
    out = logits.float().clone()
    V = out.shape[-1]
    prompt_len = len(history) - step
    for j in range(out.shape[0]):
        row = out[j]
        for t, b in p.logit_bias:
            row[t] += b
        if step + j < p.min_tokens and p.stop_token_ids:
            row[list(p.stop_token_ids)] = float("-inf")
        seen = list(history) + list(drafts[:j])
        if p.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted(set(seen)), device=row.device)
            v = row[ids]
            row[ids] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        output = seen[prompt_len:]
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(output), minlength=V).to(row.device, row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return out
