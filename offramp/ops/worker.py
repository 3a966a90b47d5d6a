"""A stage worker: one stage's layers, its KV cache, its exit gate and its deferred chunks.

The same object runs in-process (``offramp generate``, the golden reference) and inside a
Ray Serve stage replica. One call, :meth:`StageWorker.step`, runs one forward pass over a
ragged batch of rows (continuous batching: rows at different positions, prefill and
decode mixed) and answers, per row, either *exit* (a token chosen here, at this stage's
exit gate or the LM head of the last stage) or *continue* (hidden states for the next
stage).

Exact deferred backfill: when a row exits here, its hidden states are parked in
``pending``; the next time that sequence continues past this stage they ride along in
front of the new position as one multi-token chunk, so every later stage's KV ends up
exactly what full-depth computation produces. ``kv_fill="propagate"`` instead returns the
exited state for CALM-style approximate K/V in the skipped layers (no pending).
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from offramp.errors import BadRequest, StageUnavailable
from offramp.ops import exits as ex
from offramp.ops.kv_cache import KVCache
from offramp.ops.layers import StepMeta
from offramp.ops.sampling import (DRAFT, adjust_logits, choose_tokens, draw, processed_probs, token_logprobs,
                                  verify_batch)
from offramp.ops.stage import Stage
from offramp.protocol import DEFAULT_MAX_DRAFT, MAX_DRAFT_LIMIT, MIN_TEMPERATURE, SamplingParams, TokenLogprob, stops


log = logging.getLogger(__name__)
PROFILE_PREFIX = "\x00profile/"  # reserved sequence ids of the start-up profile


class KVMissing(StageUnavailable):
    """This replica lacks a sequence's earlier KV (e.g. the sequence was routed to a new
    replica): the caller must replay the sequence from its tokens."""




@dataclass(frozen=True)
class ExitPolicy:
    mode: Literal["off", "calibrated", "threshold", "speculative"] = "calibrated"
    threshold: float | None = None  # "threshold": the gate threshold; "speculative": the draft threshold (None: the exits file's)
    task: str | None = None
    offset: float = 0.0  # "calibrated": added to the gate's threshold (online tuning under drift)
    max_draft: int = DEFAULT_MAX_DRAFT  # "speculative": most tokens drafted per deep visit

    @staticmethod
    def from_request(exit_mode, task: str | None, max_draft: int | None = None) -> "ExitPolicy":
        if exit_mode == "speculative":
            return ExitPolicy("speculative", None, task, max_draft=DEFAULT_MAX_DRAFT if max_draft is None else max_draft)
        if exit_mode in ("off", "calibrated"):
            return ExitPolicy(exit_mode, None, task)
        return ExitPolicy("threshold", float(exit_mode), task)

    @property
    def speculative(self) -> bool:
        return self.mode == "speculative"


def check_speculative(policy: ExitPolicy, kv_fill: str) -> None:
    """Why a speculative request cannot run with this policy and KV fill, as the error its
    client gets (whether the first stage can draft, that stage says: :meth:`StageWorker.draft_error`)."""
    if not 1 <= policy.max_draft <= MAX_DRAFT_LIMIT:
        raise BadRequest(f"max_draft={policy.max_draft} is out of range; use 1 to {MAX_DRAFT_LIMIT}", param="max_draft")
    if kv_fill == "propagate":
        raise BadRequest("exit 'speculative' cannot run with kv_fill 'propagate' (its skipped-layer K/V is "
                         "approximate, speculative output is exact); use exit 'calibrated', or serve with "
                         "kv_fill 'exact'", param="exit")


def draft_budget(policy: ExitPolicy, sampling: SamplingParams, generated: int, total: int, max_seq: int) -> int:
    """How many tokens a speculative sequence may draft this step: its max_draft, capped so
    the committed tokens (drafts + one) fit max_tokens and the context."""
    if not policy.speculative:
        return 0
    return max(0, min(policy.max_draft, sampling.max_tokens - generated - 1, max_seq - total - 1))


@dataclass
class StepRow:
    seq_id: str
    inputs: torch.Tensor  # (n,) token ids on stage 0, else (n, d) hidden states
    position: int  # absolute position of the last input
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policy: ExitPolicy = field(default_factory=ExitPolicy)
    step: int = 0  # index of the token this pass produces (seeded sampling)
    flush: bool = False  # backfill only: no gate, no token
    layer: int | None = None  # global layer this row enters at (None: the stage's first layer)
    verify: bool = False  # last stage: also return the full-depth greedy token of the backfilled positions
    # Speculative rows. On the drafting stage (the first, ending at an exit head): ``draft``
    # is how many tokens it may draft on from this row. On the last stage: ``drafts`` are
    # the drafted tokens of the chunk's last ``len(drafts)`` positions but one, to verify,
    # with ``draft_probs`` (k, V), the distributions they were drawn from (sampled rows).
    draft: int = 0
    drafts: tuple[int, ...] = ()
    draft_probs: torch.Tensor | None = None
    # Prompt logprobs (echo): the prompt's tokens after the first, which the last stage
    # scores at the chunk's positions before the last. A row that carries them is the whole
    # prompt, taken to full depth (no gate exit, no drafting).
    score: tuple[int, ...] = ()
    # Rows whose sampling adjusts logits (penalties, logit_bias, min_tokens): the prompt and
    # the tokens generated before this row's first position (the choice needs them; the
    # stages after the first never see token ids).
    history: tuple[int, ...] = ()

    def onward(self, hidden: torch.Tensor, drafts=None, draft_probs: torch.Tensor | None = None) -> "StepRow":
        """The row that carries this row's continuing ``hidden`` chunk to the next stage. A
        drafting stage's chunk (``drafts`` given) ends ``len(drafts)`` positions later and
        brings its drafts along; any other stage's passes on the drafts it was given."""
        if drafts is None:
            drafts, draft_probs, position = self.drafts, self.draft_probs, self.position
        else:
            drafts, position = tuple(drafts), self.position + len(drafts)
        return StepRow(self.seq_id, hidden, position, self.sampling, self.policy, self.step,
                       drafts=drafts, draft_probs=draft_probs, score=self.score, history=self.history)


@dataclass
class StepResult:
    seq_id: str
    token: int | None = None  # chosen here (exit, or last stage)
    hidden: torch.Tensor | None = None  # (m, d) for the next stage (continue / propagate)
    exited: bool = False
    confidence: float | None = None
    backfill: list[int] | None = None  # verify rows: full-depth argmax at positions before the last
    error: Exception | None = None  # this row's own failure (sampling math, non-finite logits): it alone fails
    # Speculative rows: the drafting stage's drafts (and their distributions, sampled rows)
    # ride with ``hidden``; the last stage answers the committed ``tokens`` (accepted
    # drafts + one) and has already rolled its KV back to them.
    drafts: list[int] | None = None
    draft_probs: torch.Tensor | None = None
    tokens: list[int] | None = None
    # sampling.logprobs asked: one per token chosen here (``token``, or each of ``tokens``),
    # from the head that chose it; ``score`` rows: the prompt's, from the LM head.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    hop_s: float = 0.0  # over a stage channel: the round trip minus the server's own time
    # Chain forwarding: the stage sent this row's continuing chunk straight on to the next
    # stage of its chain (whose answer goes to the ingress); ``drafts`` still says what it drafted.
    forwarded: bool = False


class StageWorker:
    def __init__(self, stage: Stage, index: int, num_stages: int, exits: ex.ExitsConfig | None,
                 max_slots: int = 64, max_seq: int | None = None, kv_fill: str = "exact", device: str = "cpu",
                 compile: bool = False):
        spec = stage.spec
        self.stage, self.index, self.num_stages = stage, index, num_stages
        self.exits, self.kv_fill, self.device = exits, kv_fill, device
        self.max_seq = min(max_seq or spec.max_position, spec.max_position)
        self.cache = KVCache(len(stage.layers), max_slots, self.max_seq, spec.num_kv_heads, spec.head_dim,
                             stage.lm_dtype, device)
        self.pending: dict[str, list[torch.Tensor]] = {}  # deferred chunks (n, d) per sequence
        self.start_layer, self.end_layer = stage.layer_range
        # Local layer each sequence entered at (0 but while a split point moves, when a
        # replica is also entered at the boundary its layers are moving to).
        self.entry: dict[str, int] = {}
        self.metric = exits.metric if exits else "max_prob"
        # KV lease: monotonic time something last arrived for each sequence (steps,
        # propagates, the ingress's renewals). :meth:`expired` finds the ones nobody will
        # finish (an ingress died, a release was lost) so the replica reclaims their slots.
        self.touched: dict[str, float] = {}
        self.min_layers = exits.min_layers if exits else 1
        if compile:
            stage.compile_layers()
            try:
                log.info("stage %d: compiled its decoder blocks' graphs in %.1f s", index, self.warm_up())
            except Exception as e:  # noqa: BLE001 - no C compiler, an op inductor lacks: serve eager
                stage.compiled = None
                log.warning("stage %d: torch.compile failed (%s: %s); serving eager. On CPU inductor needs a "
                            "C++ compiler (e.g. apt-get install g++); or set compile: false.",
                            index, type(e).__name__, (str(e).splitlines() or [""])[0][:300])

    # -- bookkeeping -------------------------------------------------------------------
    def release(self, seq_id: str) -> None:
        self.cache.free(seq_id)
        self.pending.pop(seq_id, None)
        self.entry.pop(seq_id, None)
        self.touched.pop(seq_id, None)

    def holds(self, seq_id: str) -> bool:
        return seq_id in self.cache.slot_of or seq_id in self.pending

    def touch(self, seq_id: str, now: float | None = None) -> None:
        self.touched[seq_id] = time.monotonic() if now is None else now

    def expired(self, lease_s: float, now: float | None = None) -> list[str]:
        """Sequences holding KV or parked chunks with nothing for them within ``lease_s``
        (a sequence never touched counts as touched now: its lease starts here)."""
        now = time.monotonic() if now is None else now
        held = set(self.cache.slot_of) | set(self.pending)
        for s in [s for s in self.touched if s not in held and now - self.touched[s] > lease_s]:
            del self.touched[s]  # released elsewhere or never allocated: forget it
        out = []
        for s in held:
            if s.startswith(PROFILE_PREFIX):
                continue
            t = self.touched.setdefault(s, now)
            if now - t > lease_s:
                out.append(s)
        return out

    def entry_error(self, row: StepRow) -> Exception | None:
        """Why ``row`` cannot enter this stage where it asks to (None: it can)."""
        if row.draft > 0 and self.stage.first:
            err = self.draft_error()
            if err is not None:
                return err
        layer = self.start_layer if row.layer is None else row.layer
        if not self.start_layer <= layer < self.end_layer:
            return BadRequest(f"stage {self.index} holds layers {self.start_layer}-{self.end_layer - 1}; "
                              f"a row asked to enter at layer {layer}")
        if self.stage.first and layer != self.start_layer:
            return BadRequest(f"stage {self.index} embeds token ids; it is entered at layer {self.start_layer} only")
        entered = self.entry.get(row.seq_id)
        if entered is not None and entered != layer - self.start_layer and row.seq_id in self.cache.slot_of:
            return KVMissing(f"sequence {row.seq_id} entered stage {self.index} at layer "
                             f"{self.start_layer + entered}, now at {layer}; replay the sequence")
        return None

    def _skip(self, row: StepRow) -> int:
        err = self.entry_error(row)
        if err is not None:
            raise err
        return 0 if row.layer is None else row.layer - self.start_layer

    def fits_cache(self, row: StepRow) -> bool:
        """Does ``row`` continue what this stage holds of its sequence? A speculative row may
        also come after rejected drafts (more cached; :meth:`step` rolls them back)."""
        have, start = self.cached_length(row.seq_id), row.position + 1 - row.inputs.shape[0]
        return have == start or (row.policy.speculative and have > start)

    def cached_length(self, seq_id: str) -> int:
        return self.cache.length.get(seq_id, 0)

    def pending_length(self, seq_id: str) -> int:
        return sum(t.shape[0] for t in self.pending.get(seq_id, ()))

    def threshold(self, policy: ExitPolicy) -> float:
        """The confidence a token needs to exit at this stage's gate (inf: never)."""
        return self._threshold(policy)

    def _threshold(self, policy: ExitPolicy) -> float:
        if policy.mode in ("off", "speculative") or not self.stage.has_exit or self.end_layer < self.min_layers:
            return float("inf")
        if policy.mode == "threshold":
            return policy.threshold
        return self.exits.threshold(self.end_layer, policy.task) + policy.offset if self.exits else float("inf")

    @property
    def drafts(self) -> bool:
        """Whether this stage drafts for speculative rows: the first stage, ending at an exit head."""
        return self.stage.first and self.stage.has_exit

    def draft_error(self) -> BadRequest | None:
        """Why this first stage cannot draft for speculative rows (None: it can)."""
        if self.drafts:
            return None
        return BadRequest(f"exit 'speculative' needs an exit head where the first stage ends (after layer "
                          f"{self.end_layer}) and this model has none there; use exit 'off' or 'calibrated', or "
                          "serve a checkpoint with exit heads (offramp train-gates) at that split", param="exit")

    def draft_threshold(self, policy: ExitPolicy) -> float:
        """The exit confidence a drafted token needs for drafting to go on past it."""
        if policy.threshold is not None:
            return policy.threshold
        return self.exits.draft_threshold(self.end_layer, policy.task) if self.exits else ex.DEFAULT_DRAFT_THRESHOLD

    def truncate(self, seq_id: str, length: int) -> None:
        """Roll a sequence's KV back to its first ``length`` positions (rejected drafts).
        Positions past ``length`` are dead: every later write lands on them before any
        attention can read them (reads stop at each row's own position)."""
        if seq_id in self.cache.length and self.cache.length[seq_id] > length:
            self.cache.length[seq_id] = length

    # -- the forward pass --------------------------------------------------------------
    @torch.inference_mode()
    def step(self, rows: list[StepRow]) -> list[StepResult]:
        """One forward pass per entry layer present (one in steady state); on the drafting
        stage, speculative rows that drafted a confident token go round again with it as
        input (batched together, no hop) until their draft ends, and answer one chunk."""
        if not rows:
            return []
        for r in rows:  # a speculative row may come back after rejected drafts: roll back to it
            if r.policy.speculative:
                self.truncate(r.seq_id, r.position + 1 - r.inputs.shape[0])
        results = self._step_entries(rows)
        if not self.drafts:
            return results
        drafting = {b: (rows[b], res) for b, res in enumerate(results)
                    if rows[b].draft > 0 and res.exited and res.error is None}
        drafted: dict[int, tuple[list[int], list[torch.Tensor]]] = {b: ([], []) for b in drafting}
        while drafting:
            for b, (row, res) in drafting.items():
                drafted[b][0].append(res.token)
                if res.draft_probs is not None:
                    drafted[b][1].append(res.draft_probs)
            order = list(drafting)
            # A drafted token that ends the sequence (eos, a stop token) is the draft's last:
            # it still goes in as the next position (the chunk always ends with the last
            # draft's input), but nothing is drafted past it, which the ingress would drop.
            nxt = [StepRow(row.seq_id, torch.tensor([res.token]), row.position + 1, row.sampling, row.policy,
                           row.step + 1,
                           draft=0 if stops(row.sampling, res.token, self.stage.spec.eos_token_ids) else row.draft - 1,
                           history=row.history + (res.token,) if row.sampling.adjusts_logits else ())
                   for row, res in drafting.values()]
            again = self._step_entries(nxt)
            drafting = {}
            for b, row, res in zip(order, nxt, again):
                if res.error is not None:
                    self.pending.pop(row.seq_id, None)
                    results[b] = res
                elif row.draft > 0 and res.exited:
                    drafting[b] = (row, res)
                else:
                    results[b] = res
        for b, (toks, probs) in drafted.items():
            res = results[b]
            if res.error is None:
                res.token, res.exited, res.confidence = None, False, None
                res.drafts, res.draft_probs = toks, (torch.stack(probs) if probs else None)
        return results

    def _step_entries(self, rows: list[StepRow]) -> list[StepResult]:
        skips = [self._skip(r) for r in rows]
        if len(set(skips)) == 1:
            return self._step(rows, skips[0])
        out: list[StepResult | None] = [None] * len(rows)
        for skip in sorted(set(skips)):
            idx = [i for i, s in enumerate(skips) if s == skip]
            for i, res in zip(idx, self._step([rows[i] for i in idx], skip)):
                out[i] = res
        return out  # type: ignore[return-value]

    def _step(self, rows: list[StepRow], skip: int) -> list[StepResult]:
        lengths, starts, slots = [], [], []
        for r in rows:
            n = r.inputs.shape[0]
            if n < 1:
                raise BadRequest("a stage row carries no positions")
            have = self.cache.length.get(r.seq_id, 0)
            if have + n != r.position + 1:
                raise KVMissing(f"stage {self.index} has {have} cached positions of sequence {r.seq_id} "
                                f"but got {n} new ending at {r.position}; replay the sequence")
            if r.position >= self.max_seq:
                raise BadRequest(f"sequence {r.seq_id} reached position {r.position}; the stage holds at most "
                                 f"{self.max_seq} positions")
            slots.append(self.cache.alloc(r.seq_id))
            self.entry.setdefault(r.seq_id, skip)
            starts.append(have)
            lengths.append(n)
        meta = self._meta(slots, starts, lengths)
        x = self._pad_inputs(rows, max(lengths))
        h = self.stage(x, meta, self.cache, skip)  # (B, T, d)
        for r, n in zip(rows, lengths):
            self.cache.length[r.seq_id] += n
        idx = torch.tensor(lengths, device=h.device) - 1
        h_last = h[torch.arange(len(rows), device=h.device), idx]  # (B, d)

        results = [StepResult(r.seq_id) for r in rows]
        live = [b for b, r in enumerate(rows) if not r.flush]
        if self.stage.last:
            if live:
                self._final_tokens(rows, live, h, h_last, lengths, results)
                self._score_prompts(rows, live, h, lengths, results)
            audit = [b for b, r in enumerate(rows) if r.verify and lengths[b] > 1]
            if audit:  # the online audit of earlier exits: one LM-head call over their backfilled positions
                full = self.stage.final_logits(torch.cat([h[b, : lengths[b] - 1] for b in audit])).argmax(-1).tolist()
                i = 0
                for b in audit:
                    results[b].backfill, i = full[i: i + lengths[b] - 1], i + lengths[b] - 1
            return results
        live = [b for b in live if not rows[b].score]  # prompt logprobs: full depth
        exited = self._gate(rows, live, h_last, results)
        if self.drafts:
            exited |= self._draft(rows, live, h_last, results)
        for b, r in enumerate(rows):
            chunk = h[b, : lengths[b]]  # (n, d)
            if b in exited:
                if self.kv_fill == "propagate":
                    results[b].hidden = chunk.clone()
                else:
                    self.pending.setdefault(r.seq_id, []).append(chunk.clone())
            else:
                parked = self.pending.pop(r.seq_id, [])
                results[b].hidden = torch.cat([*parked, chunk]) if parked else chunk.clone()
        return results

    def _meta(self, slots: list[int], starts: list[int], lengths: list[int]) -> StepMeta:
        """One pass's batch metadata (KV writes, mask, RoPE tables) for rows at ``slots``
        with ``starts`` positions cached and ``lengths`` new ones."""
        meta = StepMeta.build(slots, starts, lengths, self.device, self.stage.spec.sliding_window)
        if self.stage.spec.is_llama:
            meta.cos, meta.sin = self.stage.rope.tables(meta.positions, self.stage.lm_dtype)
        return meta

    def _pad_inputs(self, rows: list[StepRow], T: int) -> torch.Tensor:
        if self.stage.first:
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, : r.inputs.shape[0]] = r.inputs
            return x.to(self.device)
        d = self.stage.spec.hidden_size
        if all(r.inputs.shape[0] == T for r in rows):
            return torch.stack([r.inputs for r in rows]).to(self.device, self.stage.lm_dtype)
        x = torch.zeros(len(rows), T, d, dtype=self.stage.lm_dtype, device=self.device)
        for b, r in enumerate(rows):
            x[b, : r.inputs.shape[0]] = r.inputs
        return x

    def _gate(self, rows, live, h_last, results) -> set[int]:
        """Two-tier exit decision for the rows in ``live``; fills tokens of exited rows."""
        thresholds = {b: self._threshold(rows[b].policy) for b in live}
        cand = [b for b in live if thresholds[b] != float("inf")]
        if cand and self.stage.has_gate:
            task_idx = torch.tensor([self.exits.task_index(rows[b].policy.task) for b in cand], device=h_last.device)
            p = self.stage.gate_prob(h_last[cand], task_idx).tolist()
            cand = [b for b, pb in zip(cand, p) if pb >= self.exits.gate_threshold]
        if not cand:
            return set()
        logits = self.stage.exit_logits(h_last[cand])  # (c, V): only rows the gate let through
        conf = ex.confidence(logits, self.metric).tolist()
        keep = [i for i, b in enumerate(cand) if conf[i] >= thresholds[b]]
        if not keep:
            return set()
        chosen = [cand[i] for i in keep]
        toks = choose_tokens(self._adjusted(logits[keep], [rows[b] for b in chosen]),
                             [rows[b].sampling for b in chosen], [rows[b].step for b in chosen])
        for i, b, t in zip(keep, chosen, toks):
            if isinstance(t, Exception):  # the row leaves the batch with its error
                results[b].error, results[b].exited = t, True
            else:
                results[b].token, results[b].exited, results[b].confidence = t, True, conf[i]
                if rows[b].sampling.logprobs is not None:  # the exit head's own distribution
                    results[b].logprobs = token_logprobs(logits[i: i + 1], [t], rows[b].sampling.logprobs)
        return set(chosen)

    def _final_tokens(self, rows, live, h, h_last, lengths, results) -> None:
        """Last stage: the token(s) each live row commits, from one LM-head call over each
        row's last ``k + 1`` positions (``k`` drafts to verify; 0 for a row that did not
        draft). A speculative row answers its committed ``tokens`` and its rejected
        positions leave this stage's KV at once."""
        bad = [b for b in live if len(rows[b].drafts) >= lengths[b]]
        for b in bad:
            results[b].error = BadRequest(f"sequence {rows[b].seq_id}: {len(rows[b].drafts)} drafts need a chunk of "
                                          f"more than {lengths[b]} positions")
        live = [b for b in live if b not in bad]
        if not live:
            return
        ks = [len(rows[b].drafts) for b in live]
        flat = (torch.cat([h[b, lengths[b] - k - 1: lengths[b]] for b, k in zip(live, ks)]) if any(ks)
                else h_last[live])  # (sum(k + 1), d)
        logits = self.stage.final_logits(flat)
        outs = verify_batch(self._adjusted(logits, [rows[b] for b in live], ks), [rows[b].drafts for b in live],
                            [rows[b].draft_probs for b in live], [rows[b].sampling for b in live],
                            [rows[b].step for b in live])
        i = 0
        for b, k, out in zip(live, ks, outs):
            row, first, i = rows[b], i, i + k + 1
            if isinstance(out, Exception):
                results[b].error = out
                continue
            if row.sampling.logprobs is not None:  # committed token j comes from logits row j
                results[b].logprobs = token_logprobs(logits[first: first + len(out)], out, row.sampling.logprobs)
            results[b].token = out[-1]
            if row.policy.speculative:
                results[b].tokens = out
                self.truncate(row.seq_id, row.position - k + len(out))

    @staticmethod
    def _adjusted(logits: torch.Tensor, rows: list[StepRow], ks: list[int] | None = None) -> torch.Tensor:
        """``logits`` as token choice sees them: row i of ``rows`` owns ``ks[i] + 1``
        consecutive rows (its drafts to verify and the one after; one without ``ks``),
        adjusted by its penalties / logit_bias / min_tokens (the raw logits stay for logprobs)."""
        ks = ks if ks is not None else [0] * len(rows)
        if not any(r.sampling.adjusts_logits for r in rows):
            return logits
        out, i = logits.float().clone(), 0
        for r, k in zip(rows, ks):
            if r.sampling.adjusts_logits:
                out[i: i + k + 1] = adjust_logits(logits[i: i + k + 1], r.sampling, r.history, r.step, r.drafts)
            i += k + 1
        return out

    def _score_prompts(self, rows, live, h, lengths, results) -> None:
        """Prompt logprobs of ``score`` rows: one LM-head call over their positions before
        the last (position i predicts the prompt's token i + 1)."""
        want = [b for b in live if rows[b].score and results[b].error is None]
        for b in [b for b in want if len(rows[b].score) != lengths[b] - 1]:
            results[b].error = BadRequest(f"sequence {rows[b].seq_id}: {len(rows[b].score)} prompt tokens to score "
                                          f"need a chunk of {len(rows[b].score) + 1} positions, got {lengths[b]}")
        want = [b for b in want if results[b].error is None]
        if not want:
            return
        logits = self.stage.final_logits(torch.cat([h[b, : lengths[b] - 1] for b in want]))
        i = 0
        for b in want:
            n = len(rows[b].score)
            results[b].prompt_logprobs = token_logprobs(logits[i: i + n], list(rows[b].score),
                                                        rows[b].sampling.prompt_logprobs or 0)
            i += n

    def _draft(self, rows, live, h_last, results) -> set[int]:
        """Speculative rows on the drafting stage: the exit head proposes the next token;
        a row whose proposal is confident enough parks its chunk (like an exit) and drafts
        on, the others continue to the deep stages with every parked position."""
        cand = [b for b in live if rows[b].policy.speculative and rows[b].draft > 0]
        if not cand:
            return set()
        logits = self.stage.exit_logits(h_last[cand])  # (c, V)
        conf = ex.confidence(logits, self.metric).tolist()
        logits = self._adjusted(logits, [rows[b] for b in cand])  # the draft is chosen as the verifier chooses
        top, argmax = logits.max(dim=-1)
        finite, argmax = torch.isfinite(top).tolist(), argmax.tolist()
        out = set()
        for i, b in enumerate(cand):
            row = rows[b]
            if not finite[i] or conf[i] < self.draft_threshold(row.policy):
                continue  # not worth drafting: the row goes deep now
            if row.sampling.temperature < MIN_TEMPERATURE:
                tok, probs = argmax[i], None
            else:
                probs = processed_probs(logits[i], row.sampling)
                tok = draw(probs, row.sampling.seed, row.step, DRAFT)
            results[b].token, results[b].exited, results[b].confidence = tok, True, conf[i]
            results[b].draft_probs = probs
            out.add(b)
        return out

    @torch.inference_mode()
    def propagate(self, seq_id: str, hidden: torch.Tensor, position: int, layer: int | None = None) -> None:
        """Approximate fill of this (skipped) stage's KV from an exited state (n, d)."""
        skip = self._skip(StepRow(seq_id, hidden, position, layer=layer))
        n = hidden.shape[0]
        have = self.cache.length.get(seq_id, 0)
        if have + n != position + 1:
            raise KVMissing(f"stage {self.index}: propagate for {seq_id} expects {have} cached positions")
        slot = self.cache.alloc(seq_id)
        self.entry.setdefault(seq_id, skip)
        meta = self._meta([slot], [have], [n])
        self.stage.propagate(hidden[None].to(self.device), meta, self.cache, skip)
        self.cache.length[seq_id] += n

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run the decoder blocks once per structural variant a served batch can take (one
        row or several; one position or a chunk; uniform or staggered positions, i.e. no
        attention mask or one; contiguous KV slots or a gather), so a compiled stage builds
        every graph before it takes traffic, not on a user's request. On reserved slots,
        freed after; returns the seconds it took."""
        t0 = time.perf_counter()
        n = min(3, self.cache.free_slots())
        if n < 1 or self.max_seq < 16:
            return 0.0
        spec, dev = self.stage.spec, self.device
        ids = [f"{PROFILE_PREFIX}warm{i}" for i in range(n)]
        slots = [self.cache.alloc(s) for s in ids]
        cases = [([0], [0], [8]), ([0], [8], [1])]  # prefill, then decode, of one row
        if n >= 2:
            cases += [([0, 1], [0, 0], [8, 8]), ([0, 1], [9, 9], [1, 1]), ([0, 1], [4, 9], [1, 1]),
                      ([0, 1], [4, 9], [3, 1])]  # contiguous slots: chunks, uniform and staggered decode
        if n >= 3:
            cases += [([0, 2], [9, 9], [1, 1]), ([0, 2], [4, 9], [1, 1]), ([0, 2], [4, 9], [3, 2])]  # a gather
        try:
            for rows, starts, lengths in cases:
                meta = self._meta([slots[r] for r in rows], starts, lengths)
                h = torch.zeros(len(rows), max(lengths), spec.hidden_size, device=dev, dtype=self.stage.lm_dtype)
                self.stage.run_layers(h, meta, self.cache)
        finally:
            for s in ids:
                self.cache.free(s)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def profile(self, batches: tuple[int, ...] = (1, 4, 16), context: int = 64, repeats: int = 3) -> list[dict]:
        """Warm-up and a quick speed profile of this stage's bare layers (no embedding, no
        LM head): one prefill of ``context`` positions per sequence, then ``repeats`` decode
        steps at each batch size, over all the stage's layers and over its last layer alone
        (median kept). Returns samples in the form of
        :class:`offramp.placement.cost_model.ProfileSample` (batch, layers, seconds,
        context), from which the placement controller fits the pool's speed at start-up.
        Uses free KV slots under reserved ids and frees them; nothing is left behind."""
        n = min(max(batches), self.cache.free_slots())
        context = min(context, self.max_seq - 2 * repeats * len(batches) - 1)
        if n < 1 or context < 1:
            return []
        spec, dev = self.stage.spec, self.device
        ids = [f"{PROFILE_PREFIX}{i}" for i in range(n)]
        slots = [self.cache.alloc(s) for s in ids]

        def run(rows: int, length: int, skip: int = 0) -> float:
            meta = self._meta(slots[:rows], [self.cache.length[s] for s in ids[:rows]], [length] * rows)
            h = torch.randn(rows, length, spec.hidden_size, device=dev).to(self.stage.lm_dtype)
            t0 = time.perf_counter()
            self.stage.run_layers(h, meta, self.cache, skip)
            if dev != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()
            for s in ids[:rows]:
                self.cache.length[s] += length
            return time.perf_counter() - t0

        try:
            run(n, context)  # the prefill: fills the KV attended below, and warms the kernels up
            out = []
            # all layers, and the last one alone: per-layer cost and per-step overhead then
            # separate (with one layer count, the fit cannot tell them apart)
            counts = sorted({len(self.stage.layers), 1})
            for b in sorted({min(b, n) for b in batches}):
                for layers in counts:
                    skip = len(self.stage.layers) - layers
                    t = statistics.median(run(b, 1, skip) for _ in range(repeats))
                    out.append({"batch": b, "layers": layers, "seconds": t, "context": context})
            return out
        finally:
            for s in ids:
                self.release(s)
