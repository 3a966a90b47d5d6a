"""One API request as ``n`` backend requests: detokenized, stop-checked, deadline-bound.

Each choice is its own backend request (``request_id-i``), started together. Their
deltas are merged in arrival order. Whenever a choice ends early (stop string, front-end
length cap, error, client gone), its backend iterator is closed, which cancels the
backend request and frees its KV.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from offramp.api.text import IncrementalDetokenizer, StopMatcher
from offramp.errors import DeadlineExceeded
from offramp.observability import tracing
from offramp.protocol import DraftCounts, ExitMode, GenerationRequest, SamplingParams, TokenEvent, TokenLogprob


@dataclass
class ChoiceDelta:
    """New text of one choice, the exit stage of each token consumed since its last delta,
    and ``finish_reason`` on the choice's last delta."""

    index: int
    text: str
    exit_stages: list[int]
    finish_reason: str | None = None
    # logprobs asked: (token id, its logprobs) of each token consumed since the last delta
    logprobs: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    exit_stages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    verified: DraftCounts = field(default_factory=DraftCounts)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per token_ids entry, when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # per prompt token, when asked


async def _close(it: Any) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


class _Choice:
    def __init__(self, index: int, it: AsyncIterator[TokenEvent], tokenizer: Any, prompt_ids: list[int],
                 stops: list[str], max_tokens: int, deadline: float, timeout_s: float, want_logprobs: bool = False,
                 kept_stops: Sequence[str] = ()):
        self.index = index
        self.it = it
        self.primed = False
        self.first: TokenEvent | None = None
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stopper = StopMatcher(stops, kept_stops)
        self.max_tokens = max_tokens
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.exit_stages: list[int] = []
        self.token_ids: list[int] = []
        self.verified = DraftCounts()
        self.finish_reason: str | None = None
        self.ended = False
        self.want_logprobs = want_logprobs
        self.logprobs: list[TokenLogprob | None] = []  # per token, when asked (None: the backend gave none)
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    async def _next(self) -> TokenEvent | None:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):  # not wait_for: no task per token
                return await self.it.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise DeadlineExceeded(
                f"request ran past its deadline of {self.timeout_s:g} s; retry, or lower max_tokens"
            ) from None

    async def prime(self) -> None:
        """Wait for the first token, so admission errors (429/503) become the HTTP status."""
        self.first = await self._next()
        self.primed = True

    async def run(self) -> AsyncIterator[ChoiceDelta]:
        pending: list[int] = []
        lps: list[tuple[int, TokenLogprob | None]] = []
        try:
            while True:
                if self.primed:
                    ev, self.first, self.primed = self.first, None, False
                else:
                    ev = await self._next()
                if ev is None:  # backend ended without saying why: treat as a natural stop
                    await self._end()
                    yield self._final("", pending, "stop", lps)
                    return
                self.exit_stages.append(ev.exit_stage)
                self.token_ids.append(ev.token_id)
                if ev.verified is not None:
                    self.verified.add(*ev.verified)
                if ev.prompt_logprobs is not None:
                    self.prompt_logprobs = ev.prompt_logprobs
                if self.want_logprobs:
                    self.logprobs.append(ev.logprob)
                    lps.append((ev.token_id, ev.logprob))
                pending.append(ev.exit_stage)
                text, stopped = self.stopper.feed(self.detok.add(ev.token_id))
                if stopped:
                    await self._end()  # cancel the backend request before the client hears "stop"
                    self.finish_reason = "stop"
                    yield ChoiceDelta(self.index, text, pending, "stop", lps)
                    return
                finish = ev.finish_reason
                if finish is None and len(self.exit_stages) >= self.max_tokens:
                    finish = "length"  # backend overran max_tokens: cut here
                if finish is not None:
                    await self._end()
                    yield self._final(text, pending, finish, lps)
                    return
                if text:
                    yield ChoiceDelta(self.index, text, pending, logprobs=lps)
                    pending, lps = [], []
        finally:
            await self._end()

    async def _end(self) -> None:
        if not self.ended:
            self.ended = True
            await _close(self.it)

    def _final(self, text: str, pending: list[int], finish: str, lps) -> ChoiceDelta:
        tail, stopped = self.stopper.feed(self.detok.flush())
        text += tail
        if stopped:
            finish = "stop"
        else:
            text += self.stopper.flush()
        self.finish_reason = finish
        return ChoiceDelta(self.index, text, pending, finish, lps)


class Generation:
    """Runs one API request against the backend. Use :meth:`start`, then :meth:`deltas`
    (streaming) or :meth:`collect`; always :meth:`aclose` (idempotent)."""

    def __init__(self, backend: Any, tokenizer: Any, *, request_id: str, prompt_ids: list[int], n: int,
                 sampling: SamplingParams, stops: list[str], exit_mode: ExitMode, task: str | None,
                 timeout_s: float, trace_context: dict[str, str] | None = None, max_draft: int | None = None,
                 span: tuple[Any, contextlib.ExitStack] | None = None, kept_stops: Sequence[str] = ()):
        self.request_id = request_id
        # The request span and the stack that ends it (Frontend.generation); None: no span.
        self.span, self._span_stack = span if span is not None else (None, None)
        self.exit_mode = exit_mode
        self.prompt_ids = prompt_ids
        self.logprobs = sampling.logprobs is not None  # asked: every token's logprobs are reported
        self.num_stages = int(getattr(backend, "num_stages", 1))
        deadline = time.monotonic() + timeout_s
        self.choices: list[_Choice] = []
        for i in range(n):
            s = sampling
            if n > 1 and s.seed is not None:  # distinct but reproducible choices
                s = SamplingParams(**{**s.__dict__, "seed": s.seed + i})
            req = GenerationRequest(
                request_id=request_id if n == 1 else f"{request_id}-{i}",
                prompt_ids=tuple(prompt_ids), sampling=s, exit_mode=exit_mode, max_draft=max_draft,
                task=task, trace_context=trace_context, deadline_s=timeout_s,
            )
            self.choices.append(_Choice(i, backend.generate(req), tokenizer, prompt_ids, stops,
                                        sampling.max_tokens, deadline, timeout_s, self.logprobs, kept_stops))
        self._runs = [c.run() for c in self.choices]
        self._merged: AsyncIterator[ChoiceDelta] | None = None

    async def start(self) -> None:
        """Wait for every choice's first token; on any failure close all and re-raise it."""
        results = await asyncio.gather(*(c.prime() for c in self.choices), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                await self.aclose()
                raise r

    def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of all choices in arrival order (one choice: no tasks involved)."""
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    async def _merge(self) -> AsyncIterator[ChoiceDelta]:
        if len(self._runs) == 1:
            async for d in self._runs[0]:
                yield d
            return
        pending: dict[asyncio.Future, AsyncIterator[ChoiceDelta]] = {
            asyncio.ensure_future(r.__anext__()): r for r in self._runs
        }
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    run = pending.pop(fut)
                    try:
                        d = fut.result()
                    except StopAsyncIteration:
                        continue
                    yield d
                    pending[asyncio.ensure_future(run.__anext__())] = run
        finally:
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def collect(self) -> list[ChoiceResult]:
        results = [ChoiceResult(c.index) for c in self.choices]
        parts: list[list[str]] = [[] for _ in self.choices]
        async for d in self.deltas():
            parts[d.index].append(d.text)
            if d.finish_reason:
                results[d.index].finish_reason = d.finish_reason
        for r, c, p in zip(results, self.choices, parts):
            r.text = "".join(p)
            r.exit_stages = list(c.exit_stages)
            r.token_ids = list(c.token_ids)
            r.verified = c.verified
            r.logprobs = list(c.logprobs)
            r.prompt_logprobs = c.prompt_logprobs
        return results

    async def aclose(self) -> None:
        if self._merged is not None:
            await self._merged.aclose()  # stops the merge's tasks before the runs are closed
        for run, c in zip(self._runs, self.choices):
            await run.aclose()  # runs the choice's finally (closes its backend iterator) if started
            await c._end()  # for a choice whose run never started

    # -- accounting ---------------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.exit_stages) for c in self.choices)

    def stages_skipped(self, exit_stages: list[int]) -> int:
        return sum(self.num_stages - 1 - s for s in exit_stages)

    def speculative(self, choices: list[Any]) -> dict[str, Any] | None:
        """``offramp.speculative`` over ``choices`` (ChoiceResults or the running choices),
        or None when the request did not run speculative (no verify round, not asked for;
        a server whose default is speculative runs 'calibrated' requests speculative)."""
        total = DraftCounts()
        for c in choices:
            total += c.verified
        if not total.rounds and self.exit_mode != "speculative":
            return None
        return total.report(sum(len(c.exit_stages) for c in choices))

    def end_span(self, error: BaseException | None = None) -> None:
        """End the request span, once (later calls do nothing): the response attributes on
        success, the error (``error.type``) otherwise."""
        stack, self._span_stack = self._span_stack, None
        if stack is None:
            return
        if error is not None:
            stack.__exit__(type(error), error, error.__traceback__)
            return
        stages = [s for c in self.choices for s in c.exit_stages]
        tracing.set_response(self.span, response_id=self.request_id, input_tokens=self.prompt_tokens,
                             output_tokens=self.completion_tokens,
                             finish_reasons=[c.finish_reason for c in self.choices if c.finish_reason] or None,
                             stages_skipped=self.stages_skipped(stages))
        stack.close()

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
