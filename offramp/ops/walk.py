"""The token walk the in-process engine and the served pipeline share.

One decode step of one sequence, wherever its stages run:

1. :meth:`Walk.row` builds the row stage 0 gets: the tokens not yet fed, the position of
   the last, the draft budget of a speculative sequence, the prompt to score on a first
   step that asks for prompt logprobs, the history a logit-adjusting sampler needs.
2. Each stage answers the row; :func:`sort` says what the answer means, in one order for
   both callers: the row's own failure; a verified speculative round (accepted drafts plus
   the full model's next token); a token chosen here (a gate exit or the last stage); a
   row the stage forwarded along its chain; or the row that goes on to the next stage.
3. :meth:`Walk.verified` does a verify round's bookkeeping (the next step feeds only the
   last committed token; the stages drop the rejected positions) and :meth:`Walk.append`
   commits one token and says whether it finishes the sequence.

:class:`~offramp.ops.engine.StagedModel.step` walks the stages by calling each
:class:`~offramp.ops.worker.StageWorker` in process; :class:`~offramp.deployments.pipeline.
PipelineBackend` walks them over stage channels (frames grouped per replica, chains
forwarded stage to stage). What they do with each kind differs (a list of tokens for the
caller vs events, metrics and replays), what a step *is* does not, and it lives here.
:func:`check_prompt` is the one admission check of a request's prompt for both.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from offramp.errors import BadRequest
from offramp.ops.worker import ExitPolicy, StepResult, StepRow, draft_budget
from offramp.protocol import DraftCounts, SamplingParams, TokenLogprob, finish_reason


def check_prompt(prompt_ids: list[int], max_tokens: int, vocab_size: int, max_seq: int) -> None:
    """A request's prompt can be walked: not empty, every id in the vocabulary, and the
    prompt plus ``max_tokens`` within the context."""
    if not prompt_ids:
        raise BadRequest("the prompt is empty; send at least one token", param="prompt")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param="prompt")
    if len(prompt_ids) + max_tokens > max_seq:
        raise BadRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                         f"{max_seq}; shorten the prompt or lower max_tokens", param="max_tokens")


class Kind(enum.Enum):
    FAILED = "failed"  # the row's own error (res.error): it alone fails or replays
    VERIFIED = "verified"  # a speculative round: res.tokens = accepted drafts + one, from the last stage
    TOKEN = "token"  # res.token chosen here: a gate exit (res.exited) or the last stage
    FORWARDED = "forwarded"  # sent straight on to the next stage of its chain (its answer comes from there)
    ONWARD = "onward"  # goes on to the next stage: the row :func:`sort` returns with it


@dataclass(kw_only=True)
class Walk:
    """A sequence's state the walk needs: its tokens (prompt + generated), how many of them
    stage 0 has been fed, and its speculative rounds."""

    tokens: list[int]
    prompt_len: int
    sampling: SamplingParams
    policy: ExitPolicy
    fed: int = 0  # tokens already fed into stage 0
    drafted: int = 0  # speculative: tokens drafted, accepted, and deep visits (verify rounds)
    accepted: int = 0
    rounds: int = 0
    last_round: tuple[int, int] | None = None  # (drafted, accepted) of the last verify round
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # sampling.prompt_logprobs: after the first step

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def draft_counts(self) -> DraftCounts:
        return DraftCounts(self.drafted, self.accepted, self.rounds)

    def row(self, seq_id: str, max_seq: int, drafting: bool = True) -> StepRow:
        """Stage 0's row for this step (``drafting`` False: a speculative sequence drafts
        nothing this step, e.g. above the ingress's ``draft_max_active``)."""
        n, sp = self.n_generated, self.sampling
        score = tuple(self.tokens[1: self.prompt_len]) if n == 0 and sp.prompt_logprobs is not None else ()
        budget = draft_budget(self.policy, sp, n, len(self.tokens), max_seq) if drafting else 0
        return StepRow(seq_id, torch.tensor(self.tokens[self.fed:], dtype=torch.long), len(self.tokens) - 1,
                       sp, self.policy, step=n, draft=budget, score=score,
                       history=tuple(self.tokens) if sp.adjusts_logits else ())

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify round committed ``accepted`` of ``drafted`` drafts (before its tokens
        are appended): only positions whose inputs were committed stay in any stage's KV,
        and the next step feeds the last token."""
        self.fed = len(self.tokens) + accepted
        self.last_round = (drafted, accepted)
        self.drafted += drafted
        self.accepted += accepted
        self.rounds += 1

    def append(self, token: int, eos_token_ids: tuple[int, ...], max_seq: int) -> str | None:
        """Commit one token; why it finishes the sequence, or None."""
        self.tokens.append(token)
        return finish_reason(self.sampling, token, self.n_generated, len(self.tokens), eos_token_ids, max_seq)


def sort(walk: Walk, row: StepRow, res: StepResult) -> tuple[Kind, StepRow | None]:
    """What one stage's answer ``res`` to ``row`` means for ``walk`` (and, for
    :attr:`Kind.ONWARD`, the row that carries it to the next stage). Records the prompt
    logprobs a first step's last stage scored."""
    if res.error is not None:
        return Kind.FAILED, None
    if res.prompt_logprobs is not None:
        walk.prompt_logprobs = (None, *res.prompt_logprobs)
    if res.tokens is not None:
        return Kind.VERIFIED, None
    if res.token is not None:
        return Kind.TOKEN, None
    if res.forwarded:
        return Kind.FORWARDED, None
    return Kind.ONWARD, row.onward(res.hidden, res.drafts, res.draft_probs)
