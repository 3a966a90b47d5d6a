"""In-process staged model: every stage worker in one process, no Ray.

This is the debugging reference every distributed path is checked against
(``offramp generate``), and a :class:`~offramp.protocol.Backend` for tests and
single-process serving. :meth:`StagedModel.step` is the one-token decode step for a whole
batch: rows enter stage 0, rows that exit at a gate leave the batch there, the rest move
on as one (possibly multi-token, backfilling) chunk to the next stage.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from offramp.errors import ConfigError
from offramp.ops import exits as ex
from offramp.ops import walk
from offramp.ops.checkpoint import ModelSpec, WeightReader, load_spec
from offramp.ops.partition import partition_layers
from offramp.ops.stage import load_stage
from offramp.ops.walk import Walk, check_prompt
from offramp.ops.worker import ExitPolicy, StageWorker, StepRow, check_speculative
from offramp.protocol import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob


def resolve_model_dir(model: str | Path | None) -> Path:
    """The user's checkpoint, or the embedded default model, or a clear error."""
    if model is not None:
        if not Path(model).is_dir():
            raise ConfigError(f"model directory {model} does not exist; pass --model with a local "
                              "Hugging Face checkpoint directory (config.json + *.safetensors)")
        return Path(model)
    from offramp.models import default_model_dir

    found = default_model_dir()
    if found is None:  # until the embedded model is trained: a tiny random preset
        from offramp.ops.presets import tiny_model_dir

        return tiny_model_dir()
    return found


@dataclass(kw_only=True)
class Sequence(Walk):
    """A sequence the in-process engine walks (:class:`~offramp.ops.walk.Walk`), with the
    exit stage of each generated token and its logprobs."""

    seq_id: str
    exit_stages: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token (sampling.logprobs)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class StagedModel:
    def __init__(self, model_dir: str | Path | None = None, num_stages: int | None = None,
                 split: list[int] | None = None, dtypes: list[str] | str = "fp32", max_slots: int = 64,
                 max_seq: int | None = None, kv_fill: str = "exact", device: str = "cpu", compile: bool = False):
        if kv_fill not in ("exact", "propagate"):
            raise ConfigError(f"kv_fill={kv_fill!r}; use 'exact' (default) or 'propagate' (approximate)")
        self.model_dir = resolve_model_dir(model_dir)
        self.spec: ModelSpec = load_spec(self.model_dir)
        self.exits = ex.load_exits_config(self.model_dir) if ex.exits_present(self.model_dir) else None
        self.ranges = partition_layers(self.spec.num_layers, num_stages, split)
        n = len(self.ranges)
        dtypes = [dtypes] * n if isinstance(dtypes, str) else list(dtypes)
        if len(dtypes) != n:
            raise ConfigError(f"{len(dtypes)} stage dtypes given for {n} stages; give one per stage or one for all")
        reader = WeightReader(self.model_dir)
        self.kv_fill = kv_fill
        self.workers = [
            StageWorker(load_stage(self.model_dir, self.spec, r, first=i == 0, last=i == n - 1, exits=self.exits,
                                   dtype=dtypes[i], device=device, reader=reader),
                        i, n, self.exits, max_slots=max_slots, max_seq=max_seq, kv_fill=kv_fill, device=device,
                        compile=compile)
            for i, r in enumerate(self.ranges)
        ]
        self.max_seq = self.workers[0].max_seq
        self._ids = itertools.count()

    @property
    def num_stages(self) -> int:
        return len(self.workers)

    # -- validation --------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        check_prompt(prompt_ids, max_tokens, self.spec.vocab_size, self.max_seq)

    # -- one decode step for a batch ---------------------------------------------------
    def step(self, seqs: list[Sequence]) -> list[list[tuple[int, int, TokenLogprob | None]] | Exception]:
        """Feed every sequence its unfed tokens; returns the new (token, exit_stage, logprob)
        triples per sequence (one, or for a speculative sequence its accepted drafts plus
        one; logprob None unless asked), or that sequence's own error (its row failed; the
        others are unaffected). A first step asking for prompt logprobs fills
        ``Sequence.prompt_logprobs``."""
        rows = []
        for s in seqs:
            rows.append(s.row(s.seq_id, self.max_seq))
            s.fed = len(s.tokens)
        by_id = {s.seq_id: s for s in seqs}
        out: dict[str, list[tuple[int, int, TokenLogprob | None]] | Exception] = {}
        last = self.num_stages - 1
        for k, worker in enumerate(self.workers):
            if not rows:
                break
            nxt = []
            for row, res in zip(rows, worker.step(rows)):
                s = by_id[row.seq_id]
                kind, onward = walk.sort(s, row, res)
                if kind is walk.Kind.FAILED:
                    out[s.seq_id] = res.error
                elif kind is walk.Kind.VERIFIED:
                    out[s.seq_id] = list(zip(res.tokens, [last] * len(res.tokens),
                                             res.logprobs or [None] * len(res.tokens)))
                    s.verified(len(row.drafts), len(res.tokens) - 1)
                    for w in self.workers:  # in one process there may be no next row to roll back on
                        w.truncate(s.seq_id, s.fed)
                elif kind is walk.Kind.TOKEN:
                    out[s.seq_id] = [(res.token, k, res.logprobs[0] if res.logprobs else None)]
                    if res.exited and self.kv_fill == "propagate":
                        for later in self.workers[k + 1:]:
                            later.propagate(row.seq_id, res.hidden, row.position)
                else:  # ONWARD (nothing is forwarded in one process)
                    nxt.append(onward)
            rows = nxt
        return [out[s.seq_id] for s in seqs]

    def flush(self, seq: Sequence) -> None:
        """Push every deferred chunk through to the last stage (complete, exact KV).
        A non-exiting row picks up the stage's own parked states in front of it."""
        for k, worker in enumerate(self.workers[:-1]):
            parked = worker.pending.pop(seq.seq_id, [])
            chunk = torch.cat(parked) if parked else None
            for later in self.workers[k + 1:]:
                if chunk is None:
                    break
                pos = later.cached_length(seq.seq_id) + chunk.shape[0] - 1
                chunk = later.step([StepRow(seq.seq_id, chunk, pos, flush=True)])[0].hidden

    def release(self, seq: Sequence) -> None:
        for w in self.workers:
            w.release(seq.seq_id)

    # -- generation loops --------------------------------------------------------------
    def new_sequence(self, prompt_ids: list[int], sampling: SamplingParams, policy: ExitPolicy,
                     seq_id: str | None = None) -> Sequence:
        self.check_prompt(list(prompt_ids), sampling.max_tokens)
        if policy.speculative:
            check_speculative(policy, self.kv_fill)
            err = self.workers[0].draft_error()
            if err is not None:
                raise err
        return Sequence(seq_id=seq_id or f"seq-{next(self._ids)}", tokens=list(prompt_ids), prompt_len=len(prompt_ids),
                        sampling=sampling, policy=policy)

    def commit(self, s: Sequence, new: list[tuple[int, int, TokenLogprob | None]]) -> list[tuple[int, int, TokenLogprob | None]]:
        """Append a step's tokens to ``s`` up to the first that finishes it (drafts accepted
        past a stop token are dropped); returns the ones appended."""
        taken = []
        for tok, stage, lp in new:
            s.finish_reason = s.append(tok, self.spec.eos_token_ids, self.max_seq)
            s.exit_stages.append(stage)
            if lp is not None:
                s.logprobs.append(lp)
            taken.append((tok, stage, lp))
            if s.finish_reason:
                break
        return taken

    def generate(self, prompts: list[list[int]], sampling: SamplingParams = SamplingParams(),
                 policy: ExitPolicy = ExitPolicy("off"), keep_kv: bool = False,
                 on_step: Callable[[], None] | None = None) -> list[Sequence]:
        """Generate for a batch of prompts together (rows leave as they finish).

        ``on_step``, when given, is called with no arguments once after every decode step,
        right after that step's token has been appended to each active sequence (the first
        call follows the prefill step that made the first token). A sequence with ``k``
        generated tokens was active in exactly the first ``k`` steps, so timestamps taken
        there time its tokens (``offramp bench serve`` does this)."""
        seqs = [self.new_sequence(p, sampling, policy) for p in prompts]
        active = list(seqs)
        while active:
            for s, res in zip(active, self.step(active)):
                if isinstance(res, Exception):
                    for r in seqs:
                        self.release(r)
                    raise res
                self.commit(s, res)
            if on_step is not None:
                on_step()
            done = [s for s in active if s.finish_reason]
            for s in done:
                if keep_kv:
                    self.flush(s)
                else:
                    self.release(s)
            active = [s for s in active if not s.finish_reason]
        return seqs


class InProcessBackend:
    """:class:`~offramp.protocol.Backend` over a :class:`StagedModel`: one background thread
    runs continuous batching; requests join and leave between steps."""

    def __init__(self, model: StagedModel):
        self.model = model
        self.num_stages = model.num_stages
        self._lock = threading.Lock()
        self._joining: list[tuple[Sequence, asyncio.Queue, asyncio.AbstractEventLoop]] = []
        # Ended requests' Sequence objects (not ids: a request id a client reuses right after
        # must not cancel the new request that joins in the same loop turn).
        self._cancelled: list[Sequence] = []
        self._wake = threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="offramp-engine").start()

    async def readiness(self) -> str | None:
        return None  # the model is loaded before the backend exists

    async def generate(self, request: GenerationRequest):
        seq = self.model.new_sequence(list(request.prompt_ids), request.sampling,
                                      ExitPolicy.from_request(request.exit_mode, request.task, request.max_draft),
                                      request.request_id)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._joining.append((seq, queue, asyncio.get_running_loop()))
        self._wake.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            with self._lock:
                self._cancelled.append(seq)
            self._wake.set()

    def _loop(self) -> None:
        active: dict[str, tuple[Sequence, asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        while True:
            if not active:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                for entry in self._joining:
                    active[entry[0].seq_id] = entry
                self._joining.clear()
                for seq in self._cancelled:
                    if seq.seq_id in active and active[seq.seq_id][0] is seq:
                        self.model.release(active.pop(seq.seq_id)[0])
                self._cancelled.clear()
            if not active:
                continue
            entries = list(active.values())
            try:
                results = self.model.step([e[0] for e in entries])
            except Exception as e:  # noqa: BLE001 - the whole step failed: every waiting request gets it
                results = [e] * len(entries)
            for (seq, q, loop), res in zip(entries, results):
                if isinstance(res, Exception):  # this request's own failure: it alone ends
                    loop.call_soon_threadsafe(q.put_nowait, res)
                else:
                    first = len(seq.generated) == 0
                    taken = self.model.commit(seq, res)
                    for i, (tok, stage, lp) in enumerate(taken):
                        done = seq.finish_reason if i == len(taken) - 1 else None
                        verified = seq.last_round if i == 0 and seq.policy.speculative else None
                        prompt_lp = seq.prompt_logprobs if first and i == 0 else None
                        loop.call_soon_threadsafe(q.put_nowait, TokenEvent(tok, stage, done, verified, lp, prompt_lp))
                if isinstance(res, Exception) or seq.finish_reason:
                    self.model.release(seq)
                    active.pop(seq.seq_id, None)
