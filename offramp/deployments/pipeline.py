"""The ingress side of the pipeline: a step scheduler drives the active sequences
through the stage replicas.

Each step gives every ready sequence of a micro-batch ("lane") one token: the rows for
one stage replica travel in one frame; a row whose gate lets it exit leaves there, so no
call is made to later stages on its path; the rest move on as the next frame. Several
lanes run concurrently, so stages compute different micro-batches at once (pipeline
parallelism). Rows of several lanes (and ingress replicas) also meet in each stage
replica's batcher (continuous batching).

Session affinity: a sequence's KV lives in the replicas it went through, so the first
token picks the least-loaded replica per stage and the sequence keeps that route. When
a replica disappears or answers "KV missing" (a scale-down, a crash, a re-route), the
sequence is replayed under a new session id - one prefill over its tokens so far - on
live replicas; no computation ever runs on missing KV. Tokens already streamed stay
valid (greedy and seeded sampling are reproducible).

Chain forwarding (``chain=True``, the default): the frame to a stage also names, per row,
the rest of the row's route with a frame id reserved on this ingress's connection to each
of those stages (:meth:`StageClient.expect`); each stage sends its continuing rows straight
on to the next one, which answers here. A deep token's critical path is then ingress →
stage 0 → ... → last stage → ingress. What a stage does not forward (its next stage not
connected yet) comes back whole and goes on from here as without chaining.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections import deque
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from offramp import errors
from offramp.deployments.channel import ChainHop, StageClient
from offramp.deployments.config import DEFAULT_KV_LEASE_S
from offramp.observability import metrics
from offramp.ops.online_tuning import AgreementTuner
from offramp.ops import walk
from offramp.ops.walk import Walk, check_prompt
from offramp.ops.worker import ExitPolicy, KVMissing, StepResult, StepRow, check_speculative
from offramp.protocol import DEFAULT_MAX_DRAFT, DraftCounts, GenerationRequest, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)
RETRYABLE = (errors.StageUnavailable, errors.DeadlineExceeded, KVMissing)
REFRESH_S = 1.0  # how stale the ingress's view of the registry may be (a leaving replica waits this out)
LOOKUP_TIMEOUT_S = 5.0  # one registry lookup; past it the last view stays
RESTART_GRACE_S = 10.0  # after a registry restart, endpoints not re-registered yet stay routable this long
SLOT_PROBE_S = 0.25  # the first sequence waiting for a KV slot asks again this often (slots other ingresses free)
# A frame of a step still out when the step's other frames are back is a straggler after
# max(STRAGGLER_MIN_S, STRAGGLER_FACTOR x the first one's round trip): its rows go on
# outside the lane (see PipelineBackend, "Stragglers").
STRAGGLER_MIN_S = 0.25
STRAGGLER_FACTOR = 10.0


@dataclass(frozen=True)
class Endpoint:
    stage: int
    replica: str
    host: str
    port: int
    start: int = 0  # layers [start, end) this replica holds
    end: int = 0


@dataclass(kw_only=True, eq=False)
class _Seq(Walk):
    """A request the ingress walks (:class:`~offramp.ops.walk.Walk`: its tokens, what stage
    0 has been fed, its speculative rounds), with its route, deadline and event queue.
    Compared by identity (one object per request: the KV-slot queue finds it by ``is``)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    request: GenerationRequest
    session: str = ""
    route: dict[int, Endpoint] = field(default_factory=dict)  # entry layer -> replica holding the KV
    exited: dict[int, tuple[int, int]] = field(default_factory=dict)  # position -> (stage, layer) it exited at
    deadline: float = float("inf")  # monotonic
    last: float = 0.0  # when the last token (or the request) came: TTFT/TPOT samples
    first_at: float = 0.0  # when the first token came: the request's own TPOT at its end
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenEvent | Exception, to the request
    lane: "_Lane | None" = None
    done: bool = False  # finished, failed or cancelled: its lane releases it after the current step
    failures: int = 0  # replica failures while producing the current token
    waits: int = 0  # backoff exponent of the current token's retries
    retry_at: float = 0.0  # not stepped before this (monotonic): a replay's backoff or a wait for a KV slot
    slot_wait: bool = False  # waiting for a KV slot (:meth:`PipelineBackend._park`)
    arrival: int = 0  # arrival order on this ingress: the order of the wait for KV slots
    detached: bool = False  # its current step goes on outside its lane (a straggling frame's row)


class Router:
    """Live endpoints (from the registry), one client per endpoint, and the number of
    sequences routed to each (least-loaded choice for new sequences).

    Routing is by layer, not by stage index: the hop after a replica that ended at layer
    ``L`` goes to a replica whose range starts at ``L``, else (while a split point moves)
    to a non-first replica whose range contains ``L``, entered there. So both the old and
    the new chain stay complete through every step of a split move (docs/placement.md).

    The registry is read off the per-token path: :meth:`start` runs a background refresh
    every :data:`REFRESH_S`, each lookup bounded by :data:`LOOKUP_TIMEOUT_S`; a failed
    lookup keeps the last view. ``lookup`` returns ``{"epoch": ..., "endpoints": [...]}``
    (:meth:`~offramp.cluster.registry.RegistryCore.routing`): when the epoch changes (the
    registry actor restarted and replicas are registering again) endpoints missing from
    the new list stay routable for :data:`RESTART_GRACE_S`, so a registry restart fails
    no request."""

    def __init__(self, num_stages: int, token: str, lookup: Callable[[], Awaitable[dict]],
                 num_layers: int | None = None, ssl_context=None, link_delay_s: float = 0.0):
        self.num_stages, self.token, self.lookup = num_stages, token, lookup
        self.ssl_context = ssl_context  # channel TLS, client side (None = plain TCP)
        self.link_delay_s = link_delay_s  # emulated distance to the stages (AppArgs.emulate_link_ms)
        self.key = uuid.uuid4().hex  # names this ingress's connections: stages answer chained frames on them
        self.num_layers = num_layers
        self.endpoints: list[Endpoint] = []
        self.clients: dict[Endpoint, StageClient] = {}
        self.load: dict[Endpoint, int] = {}
        self.dead: dict[str, float] = {}  # replica -> banned until
        self._epoch = None
        self._grace: tuple[float, list[Endpoint]] = (0.0, [])  # (until, endpoints of the previous epoch)
        self._task: asyncio.Task | None = None
        self._soon: asyncio.Task | None = None  # an out-of-turn refresh in flight

    def start(self) -> None:
        """Keep the view fresh from a background task of the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def ready(self) -> None:
        """Before a walk: the first view of the registry (awaited once, bounded), then the
        background refresh."""
        self.start()
        if not self.endpoints:
            await self.refresh()

    def refresh_soon(self) -> None:
        """Read the registry in the background now, unless a read asked for this way is
        still running (a replica failing many sequences at once asks once per sequence)."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        """Read the registry now (bounded by :data:`LOOKUP_TIMEOUT_S`)."""
        try:
            got = await asyncio.wait_for(self.lookup(), LOOKUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the registry is restarting or slow: keep the last view
            log.warning("registry lookup failed (%s); routing on the last known endpoints", type(e).__name__)
            return
        epoch, entries = got["epoch"], got["endpoints"]
        fresh = []
        for e in entries:  # StageRecords
            if 0 <= e.stage < self.num_stages and e.layers is not None:
                fresh.append(Endpoint(e.stage, e.replica, e.host, e.port, *e.layers))
        now = time.monotonic()
        if self._epoch is not None and epoch != self._epoch:
            log.warning("the registry restarted; keeping the previous endpoints for %.0f s while replicas "
                        "register again", RESTART_GRACE_S)
            self._grace = (now + RESTART_GRACE_S, list(self.endpoints))
        self._epoch = epoch
        until, previous = self._grace
        if now < until:
            known = {ep.replica for ep in fresh}
            fresh += [ep for ep in previous if ep.replica not in known]
        self.endpoints = fresh

    def missing(self) -> str | None:
        """None when live replicas cover a full walk (layer 0 to the last), else which layer
        no live replica holds (Serve is starting or replacing it)."""
        live = self._live()
        if self.num_layers is None:
            absent = sorted(set(range(self.num_stages)) - {ep.stage for ep in live})
            return f"no live replica of stage {absent[0]}" if absent else None
        layer = 0
        while layer < self.num_layers:
            entries = self._entries(live, layer)
            if not entries:
                return f"no live replica holds layer {layer}"
            layer = max(ep.end for ep in entries)
        return None

    def _live(self) -> list[Endpoint]:
        now = time.monotonic()
        return [ep for ep in self.endpoints if self.dead.get(ep.replica, 0) < now]

    @staticmethod
    def _entries(live: list[Endpoint], layer: int) -> list[Endpoint]:
        """Replicas a walk can enter at ``layer``: those starting there, else those holding
        it (not the first stage: that one is entered with token ids)."""
        return [ep for ep in live if ep.start == layer] or [
            ep for ep in live if ep.start < layer < ep.end and ep.start > 0]

    def pick(self, layer: int) -> Endpoint:
        """The least-loaded live replica to enter at ``layer``: one starting there if any,
        else one holding it (not the first stage: that one is entered with token ids)."""
        cands = self._entries(self._live(), layer)
        if not cands:
            raise errors.StageUnavailable(f"no live replica holds layer {layer}; Serve is starting or replacing "
                                          "it - retry shortly")
        return min(cands, key=lambda ep: (self.load.get(ep, 0), ep.end - ep.start, ep.replica))

    def client(self, ep: Endpoint) -> StageClient:
        c = self.clients.get(ep)
        if c is None or c.broken:
            c = self.clients[ep] = StageClient(ep.host, ep.port, self.token, label=f"stage {ep.stage}",
                                               ssl_context=self.ssl_context, key=self.key,
                                               link_delay_s=self.link_delay_s)
        return c

    def known(self, ep: Endpoint) -> bool:
        """Still registered (a release or renewal is worth sending)."""
        return ep in self.endpoints

    def ban(self, ep: Endpoint, seconds: float = 12.0) -> None:
        self.dead[ep.replica] = time.monotonic() + seconds
        c = self.clients.pop(ep, None)
        if c is not None:
            c.close()


@dataclass(eq=False)
class _Hop:
    """One frame of a chained step: the rows this ingress sends to (``fid`` None) or expects
    from (``fid``: the frame id reserved on its connection) replica ``ep``, and the frames
    its forwarded rows go on to."""
    ep: Endpoint
    items: list = field(default_factory=list)  # (seq, row, entry layer)
    fid: int | None = None
    fut: asyncio.Future | None = None
    children: dict = field(default_factory=dict)  # Endpoint -> _Hop
    next_of: dict = field(default_factory=dict)  # session -> the child _Hop its row goes on to

    def descendants(self):
        for child in self.children.values():
            yield child
            yield from child.descendants()


_NO_HIDDEN = torch.empty(0)  # a forwarded row's chunk is at the stages, not here


class _Lane:
    """One micro-batch of the step scheduler: its sequences step together, one frame per
    stage replica per round; the lane's task runs its steps back to back."""

    def __init__(self):
        self.seqs: list[_Seq] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.steps = 0  # steps run (a step = every ready sequence of the lane gets one token)
        self.rows = 0  # sequences stepped, summed over steps


async def _concurrently(coros: list) -> list:
    """Await ``coros`` together, in order. A lone one runs inline in the caller's task, so
    the frame it writes leaves before whatever the loop has queued meanwhile (the SSE work
    of the tokens a step just emitted): ``gather`` would start it as a new task behind that
    work, on the critical path of every step."""
    if len(coros) == 1:
        return [await coros[0]]
    return await asyncio.gather(*coros)


class PipelineBackend:
    """:class:`~offramp.protocol.Backend` over stage replicas reached through the channel.

    **Step scheduler.** Requests do not walk the pipeline one by one. Active sequences
    are spread over ``micro_batches`` lanes (a new sequence joins the emptiest lane); a
    lane steps all its ready sequences together: the rows entering a stage replica travel
    in *one* frame (not one call per request per token), continuing rows move on to the
    next stage as the next frame, exited rows leave there. Lanes run concurrently, so with
    two lanes stage ``k+1`` computes one micro-batch while stage ``k`` computes the other
    (pipeline parallelism); at one stream it is the plain sequential walk. Frames say
    ``full`` (the ingress sent every row it had for that replica), so a stage does not
    wait for more rows that are busy elsewhere.

    Per sequence, faults stay that sequence's: a row error fails its request only; a
    replica that fails or times out bans that replica and replays the sequences it held
    (new session, one prefill over the tokens so far) after a backoff, without holding up
    the lane; sequences finished, failed or cancelled are released by their lane after
    the step they were in, so a release never overtakes a step on the wire.

    **Waiting for KV.** A stage replica holds ``max_sequences`` sequences; a row it has no
    slot for is answered ``Overloaded``. That sequence does not fail: it waits, first come
    first served, until its deadline. Whatever KV it took on other stages is released, and
    it is queued in arrival order (so is every request arriving while others wait). The
    first in the queue goes again as soon as a release of this ingress has reached the
    stages (a slot may be free), and otherwise every :data:`SLOT_PROBE_S` (slots that
    other ingress replicas free); one that gets through lets the next one try at once. A
    burst larger than the stages' KV is served in arrival order instead of answered 429;
    ``max_active`` (admitted requests, waiting ones included) still bounds the queue.

    **Stragglers.** The rows of one round of a step go out as one frame per replica; the
    lane goes on when all of them are back. A replica that stalls (frozen, swapping, a
    stuck device) would hold up every sequence of the lane, not only its own, until the
    call timeout. So once the round's first frame is back, the others get
    ``max(STRAGGLER_MIN_S, STRAGGLER_FACTOR x`` its round trip``)``; a frame still out
    then is detached: its sequences finish their step on their own (the frame's answer,
    then their remaining rounds, or the call timeout's ban and replay as before) and the
    lane steps without them until they are back. Nobody is banned or replayed early: a
    detached frame that answers late is taken as usual, so a false alarm costs a frame."""

    def __init__(self, num_stages: int, router: Router, *, eos_token_ids: tuple[int, ...], max_seq: int,
                 vocab_size: int, kv_fill: str = "exact", call_timeout_s: float = 30.0,
                 request_timeout_s: float = 60.0, max_replays: int = 4, default_exit: str = "calibrated",
                 default_threshold: float | None = None, max_active: int = 256, model_name: str = "offramp",
                 audit_rate: float = 0.0, tuner: AgreementTuner | None = None, lease_s: float = DEFAULT_KV_LEASE_S,
                 micro_batches: int = 2, max_draft: int = DEFAULT_MAX_DRAFT, draft_max_active: int | None = None,
                 gate_max_active: int | None = None, chain: bool = True):
        self.num_stages, self.router = num_stages, router
        self.eos_token_ids, self.max_seq, self.vocab_size = eos_token_ids, max_seq, vocab_size
        self.kv_fill, self.call_timeout, self.request_timeout = kv_fill, call_timeout_s, request_timeout_s
        self.max_replays = max_replays
        self.default_exit, self.default_threshold = default_exit, default_threshold
        self.max_draft = max_draft  # speculative requests that do not say
        self.draft_max_active = draft_max_active  # above this many active requests, speculative rows do not draft
        self.gate_max_active = gate_max_active  # above this many, calibrated/threshold rows run full depth
        self.chain = chain  # stages forward continuing rows to the next stage themselves (module docstring)
        self.speculative = DraftCounts()  # this ingress's verify rounds
        self._ids = itertools.count()
        self.calls = [0] * num_stages  # stage visits on this ingress (exit skipping is visible here)
        # forward passes caused per stage: visits, plus the drafting passes a speculative
        # row makes inside stage 0 (the placement controller's arrival rates)
        self.passes = [0] * num_stages
        self.frames = [0] * num_stages  # step frames sent to each stage (a frame carries many rows)
        self.hop_s_sum = [0.0] * num_stages  # summed hop cost of the step calls into each stage
        self.hop_n = [0] * num_stages
        self.emitted = 0  # tokens emitted (cumulative): tokens per stage-0 pass for the placement controller
        self.replays = 0  # sequences rebuilt from their tokens after a replica failed or went away
        self._slot_queue: list[_Seq] = []  # sequences waiting for a KV slot, in arrival order
        self._probe: asyncio.TimerHandle | None = None  # the first waiting one's next try (_probe_soon)
        self._arrivals = itertools.count()
        self.slot_waits = 0  # times a sequence was queued for a KV slot (cumulative)
        self.detached = 0  # rows whose frame straggled and went on outside their lane (cumulative)
        # Server-side latencies as (monotonic time, seconds), bounded: the newest 8192 of
        # each since the last reset. A lock because the registry heartbeat reads them from
        # another thread.
        self.ttft_s: deque[tuple[float, float]] = deque(maxlen=8192)
        self.tpot_s: deque[tuple[float, float]] = deque(maxlen=8192)
        # Per request: (last token - first token) / (tokens - 1), the TPOT a user's SLO is
        # about (a speculative round emits several tokens in one event, so the gaps between
        # tokens are bimodal while a request's mean is what it experiences).
        self.req_tpot_s: deque[tuple[float, float]] = deque(maxlen=8192)
        self._lat_lock = threading.Lock()
        self._reset_at = -float("inf")  # start of the resettable view (stats(reset=True))
        self._background: set[asyncio.Task] = set()
        self.max_active, self.active = max_active, 0
        self.model_name = model_name
        # Online audit of exits (exact backfill): checked against full depth at the last stage.
        self.audit_rate = audit_rate if kv_fill == "exact" else 0.0
        self.tuner = tuner or AgreementTuner(enabled=False)
        # KV leases: the stage replicas reclaim a sequence's KV when nothing for it arrived
        # within lease_s; this ingress renews every live sequence on every replica of its
        # route (also while it waits on other stages or on a slow client) 4x per lease.
        self.lease_s = lease_s
        self._live: dict[str, _Seq] = {}  # session -> sequence
        self._renewer: asyncio.Task | None = None
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches}; use 1 or more")
        self.lanes = [_Lane() for _ in range(micro_batches)]

    async def readiness(self) -> str | None:
        await self.router.ready()  # the first registry read, then the background refresh
        problem = self.router.missing()
        return None if problem is None else f"{problem}: the stages are starting (compiling, loading) or being replaced"

    async def generate(self, request: GenerationRequest):
        prompt = list(request.prompt_ids)
        check_prompt(prompt, request.sampling.max_tokens, self.vocab_size, self.max_seq)
        if self.active >= self.max_active:
            raise errors.Overloaded(f"this ingress replica already runs {self.max_active} requests; retry shortly "
                                    "or add OfframpIngress replicas")
        policy = self._policy(request)
        if policy.speculative:
            check_speculative(policy, self.kv_fill)  # the drafting stage checks its exit head itself
        self.active += 1
        self._start_renewer()
        now = time.monotonic()
        seq = _Seq(request=request, tokens=prompt, prompt_len=len(prompt), sampling=request.sampling, policy=policy,
                   deadline=now + (request.deadline_s or self.request_timeout), last=now)
        seq.arrival = next(self._arrivals)
        self._new_session(seq)
        if self._waiting():  # others wait for a KV slot: behind them, not past them
            self._enqueue(seq)
        self._join(seq)
        try:
            while True:
                event = await seq.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.finish_reason:
                    return
        finally:
            self.active -= 1
            seq.done = True  # its lane releases it after the step it may be in
            self._unqueue(seq)
            if seq.lane is not None:
                seq.lane.wake.set()

    def stats(self, reset: bool = False, window_s: float | None = None) -> dict:
        """Stage calls (cumulative) and TTFT/TPOT percentiles over the samples since the
        last reset (at most the newest 8192), or over the last ``window_s`` seconds
        (whatever any reset did: the heartbeat's view)."""
        def pct(xs, q):
            return round(1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

        now = time.monotonic()
        with self._lat_lock:
            # A reset only moves this view's start: the samples stay, so a client resetting
            # the HTTP stats cannot blank the windowed view the placement controller reads
            # through the registry heartbeat.
            since = self._reset_at if window_s is None else now - window_s
            ttft = [s for t, s in self.ttft_s if t >= since]
            tpot = [s for t, s in self.tpot_s if t >= since]
            req_tpot = [s for t, s in self.req_tpot_s if t >= since]
            if reset:
                self._reset_at = now
        steps = sum(lane.steps for lane in self.lanes)
        return {"stage_calls": list(self.calls), "stage_passes": list(self.passes), "stage_frames": list(self.frames),
                "hop_s_sum": [round(h, 6) for h in self.hop_s_sum],
                "hop_n": list(self.hop_n), "num_stages": self.num_stages, "tokens": len(tpot) + len(ttft),
                "tokens_emitted": self.emitted,
                "replays": self.replays, "kv_waits": self.slot_waits, "waiting_for_kv": self._waiting(),
                "detached_rows": self.detached,
                "scheduler_steps": steps,
                "rows_per_step": round(sum(lane.rows for lane in self.lanes) / steps, 2) if steps else None,
                "exit_audit": self.tuner.snapshot(),
                "speculative": self.speculative.report(),
                "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
                "tpot_ms_p50": pct(tpot, 0.5), "tpot_ms_p99": pct(tpot, 0.99),
                "request_tpot_ms_mean": round(1000 * sum(req_tpot) / len(req_tpot), 3) if req_tpot else None,
                "request_tpot_ms_p99": pct(req_tpot, 0.99), "requests_timed": len(req_tpot)}

    def _policy(self, request: GenerationRequest) -> ExitPolicy:
        mode = request.exit_mode
        if mode == "calibrated" and self.default_exit in ("off", "speculative"):
            mode = self.default_exit
        elif mode == "calibrated" and self.default_exit == "threshold":
            mode = self.default_threshold
        return ExitPolicy.from_request(mode, request.task,
                                       self.max_draft if request.max_draft is None else request.max_draft)

    def _new_session(self, seq: _Seq) -> None:
        seq.session = f"{seq.request.request_id}/{uuid.uuid4().hex[:8]}"
        seq.fed = 0
        seq.route = {}
        self._live[seq.session] = seq

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.25, self.lease_s / 4))
            try:
                self.renew_leases()
            except Exception:  # noqa: BLE001 - never let renewals stop
                log.exception("lease renewal failed")

    def renew_leases(self) -> None:
        """Renew the lease of every live sequence on each replica of its route (one
        fire-and-forget frame per replica)."""
        by_ep: dict[Endpoint, list[str]] = {}
        for session, seq in list(self._live.items()):
            for ep in seq.route.values():
                by_ep.setdefault(ep, []).append(session)
        for ep, sessions in by_ep.items():
            if self.router.known(ep):
                self._spawn(self.router.client(ep).renew(sessions))

    # -- the step scheduler ----------------------------------------------------------
    def _join(self, seq: _Seq) -> None:
        lane = min(self.lanes, key=lambda ln: sum(1 for s in ln.seqs if not s.done))
        lane.seqs.append(seq)
        seq.lane = lane
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._run_lane(lane))
        lane.wake.set()

    async def _run_lane(self, lane: _Lane) -> None:
        while True:
            try:
                for s in lane.seqs:
                    if s.done and not s.detached:  # a detached one: once its step is back
                        self._release(s, frees=True)
                lane.seqs = [s for s in lane.seqs if not s.done or s.detached]
                now = time.monotonic()
                steppable = [s for s in lane.seqs if not s.detached]
                ready = [s for s in steppable if s.retry_at <= now]
                if not ready:  # sleep until a sequence joins, ends or comes back, or a backoff is over
                    lane.wake.clear()
                    if steppable:
                        until = min(s.retry_at for s in steppable)
                        timer = asyncio.get_running_loop().call_later(max(0.0, until - now), lane.wake.set)
                    else:
                        timer = None
                    try:
                        await lane.wake.wait()  # not wait_for: it can swallow a cancellation (3.11)
                    finally:
                        if timer is not None:
                            timer.cancel()
                    continue
                lane.steps += 1
                lane.rows += len(ready)
                await self._step(ready)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a scheduler bug fails the lane's requests, not the replica
                log.exception("pipeline step scheduler failed; failing the requests of this micro-batch")
                self._scheduler_failed(lane.seqs, e)

    def _scheduler_failed(self, seqs: list[_Seq], e: Exception) -> None:
        """A bug in the scheduler (logged by the caller) fails these requests, not the replica."""
        for s in seqs:
            if not s.done:
                self._fail(s, errors.RowFailed(f"the ingress scheduler failed ({type(e).__name__}); "
                                               "it has been logged"))

    async def _step(self, seqs: list[_Seq]) -> None:
        """One token for each of ``seqs``: layer 0 onwards, one frame per replica per round,
        until every row exited at a gate, reached the last stage or failed."""
        await self.router.ready()
        todo: list[tuple[_Seq, StepRow, int]] = []
        running = self.active - self._waiting()
        drafting = self.draft_max_active is None or running <= self.draft_max_active
        gating = self.gate_max_active is None or running <= self.gate_max_active
        for seq in seqs:
            todo.append((seq, seq.row(seq.session, self.max_seq, drafting), 0))
        await self._rounds(todo, gating)

    async def _rounds(self, todo: list[tuple[_Seq, StepRow, int]], gating: bool) -> None:
        """The rounds of a step from ``todo`` on: one frame per replica per round, until
        every row exited at a gate, reached the last stage or failed."""
        last = self.num_stages - 1
        for _ in range(self.router.num_layers or 1_000_000):
            if not todo:
                return
            groups: dict[Endpoint, list[tuple[_Seq, StepRow, int]]] = {}
            now = time.monotonic()
            for seq, row, layer in todo:
                if now >= seq.deadline:
                    if seq.slot_wait:
                        err = errors.Overloaded("no KV slot freed up within the request's deadline; retry later "
                                                "(or add stage replicas, raise max_sequences)")
                    else:
                        err = errors.DeadlineExceeded("the request ran past its deadline")
                    self._fail(seq, err)
                    continue
                try:
                    ep = self._hop(seq, layer)
                except errors.StageUnavailable as e:
                    self._retry(seq, e)
                    continue
                row.layer = None if layer == ep.start else layer
                row.policy = self._gate_policy(seq.policy, ep.end, gating)
                row.verify = ep.stage == last and self._audit(seq)
                groups.setdefault(ep, []).append((seq, row, layer))
            todo = []
            for onward in await self._hops([_Hop(ep, items) for ep, items in groups.items()], gating):
                todo += onward
        for seq, _, _ in todo:
            self._fail(seq, errors.StageUnavailable("the last stage returned no token"))

    async def _hops(self, hops: list[_Hop], gating: bool) -> list[list[tuple[_Seq, StepRow, int]]]:
        """Run one round's frames together; the rows that go on, per frame that came back in
        time. A straggler (class docstring, "Stragglers") is detached: its rows leave the
        round and finish their step in :meth:`_finish_detached`."""
        if len(hops) <= 1:
            return await _concurrently([self._run_hop(h, gating) for h in hops])
        tasks = [asyncio.ensure_future(self._run_hop(h, gating)) for h in hops]
        try:
            t0 = time.monotonic()
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                grace = max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * (time.monotonic() - t0))
                _, pending = await asyncio.wait(pending, timeout=grace)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            raise
        out = []
        for hop, task in zip(hops, tasks):
            if task in pending:
                seqs = [seq for seq, _, _ in hop.items]
                log.warning("stage %d replica %s has not answered a frame of %d rows for %.2f s while the "
                            "step's other frames are back; those rows go on outside their lanes",
                            hop.ep.stage, hop.ep.replica, len(seqs), time.monotonic() - t0)
                self.detached += len(seqs)
                for seq in seqs:
                    seq.detached = True
                self._spawn(self._finish_detached(task, seqs, gating))
            else:
                out.append(task.result())
        return out

    async def _finish_detached(self, task: asyncio.Future, seqs: list[_Seq], gating: bool) -> None:
        """The rest of a detached frame's step: its answer, then its rows' remaining
        rounds; then its sequences are their lanes' again."""
        try:
            onward = await task
            if onward:
                await self._rounds(onward, gating)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - as a lane's step: these requests fail, not the replica
            log.exception("a detached step failed; failing its requests")
            self._scheduler_failed(seqs, e)
        finally:
            for s in seqs:
                s.detached = False
                if s.lane is not None:
                    s.lane.wake.set()

    def _visit(self, ep: Endpoint, items) -> float:
        """Counts a frame and its rows' visits to ``ep``'s stage; returns the frame's time
        limit (its latest deadline, capped by the call timeout)."""
        k = ep.stage
        self.calls[k] += len(items)
        self.passes[k] += len(items)
        self.frames[k] += 1
        now = time.monotonic()
        return max(0.001, min(self.call_timeout, max(seq.deadline - now for seq, _, _ in items)))

    async def _call(self, ep: Endpoint, items: list[tuple[_Seq, StepRow, int]],
                    chains: list | None = None) -> list[StepResult]:
        timeout = self._visit(ep, items)
        try:
            return await self.router.client(ep).step([row for _, row, _ in items], timeout=timeout,
                                                     traces=[seq.request.trace_context for seq, _, _ in items],
                                                     full=True, chains=chains)
        except RETRYABLE as e:
            e.endpoint = ep
            raise

    async def _plan(self, root: _Hop, gating: bool) -> list[list[ChainHop] | None]:
        """Each row's chain beyond ``root.ep``: the rest of its route (picked now, kept for
        the sequence as always), a frame id reserved per next replica, the gate policy and
        audit flag per hop. A hop no live replica holds, or one this ingress cannot reach,
        ends the chain there (the row then comes back and goes on from here)."""
        last, num_layers = self.num_stages - 1, self.router.num_layers
        chains = []
        for seq, _, _ in root.items:
            chain, node, prev = [], root, root.ep
            layer = prev.end
            while prev.stage != last and (num_layers is None or layer < num_layers):
                try:
                    ep = self._hop(seq, layer)
                except errors.StageUnavailable:
                    break
                if ep.end <= layer:
                    break
                child = node.children.get(ep)
                if child is None:
                    try:
                        fid, fut = await self.router.client(ep).expect()
                    except errors.StageUnavailable:
                        break
                    child = node.children[ep] = _Hop(ep, fid=fid, fut=fut)
                node.next_of[seq.session] = child
                chain.append(ChainHop(child.fid, ep.host, ep.port, None if layer == ep.start else layer,
                                      self._gate_policy(seq.policy, ep.end, gating),
                                      ep.stage == last and self._audit(seq)))
                node, prev, layer = child, ep, ep.end
            chains.append(chain or None)
        return chains

    def _forget(self, node: _Hop) -> None:
        """Give up the frames ``node``'s rows would have gone on to (their answers, if any
        still come, are dropped)."""
        for d in node.descendants():
            self.router.client(d.ep).forget(d.fid)

    async def _run_hop(self, node: _Hop, gating: bool) -> list[tuple[_Seq, StepRow, int]]:
        """One frame of a step (its rows' chains planned when chain forwarding is on) and,
        concurrently, the frames its forwarded rows went on to: tokens emitted, errors to
        their requests; returns the rows that came back to go on (the next round's)."""
        try:
            if node.fid is None:
                chains = await self._plan(node, gating) if self.chain else None
                results = await self._call(node.ep, node.items, chains)
            else:
                results = await self._chained(node)
        except asyncio.CancelledError:
            self._forget(node)
            raise
        except Exception as e:  # noqa: BLE001 - the frame failed as a whole: its requests' failure
            self._forget(node)
            for seq, _, _ in node.items:
                (self._retry if isinstance(e, RETRYABLE) else self._fail)(seq, e)
            return []
        # Rows forwarded for sequences that ended meanwhile are still awaited: their
        # release must not overtake the forwarded step on the wire.
        for i, ((seq, row, _), res) in enumerate(zip(node.items, results)):
            if not res.forwarded or res.error is not None:
                continue
            child = node.next_of.get(seq.session)
            if child is None:  # forwarded where this ingress expects no answer: that request's retry
                results[i] = StepResult(res.seq_id, error=errors.StageUnavailable(
                    f"stage {node.ep.stage} forwarded a row off its chain"))
                continue
            child.items.append((seq, row.onward(_NO_HIDDEN, res.drafts), node.ep.end))
        onward = self._take(node.ep, node.items, results, timed=node.fid is None)
        waits = []
        for child in node.children.values():
            if child.items:
                waits.append(child)
            else:
                self.router.client(child.ep).forget(child.fid)
                self._forget(child)
        for more in await self._hops(waits, gating):
            onward += more
        return onward

    async def _chained(self, node: _Hop) -> list[StepResult]:
        """The answer to a frame an earlier stage forwarded to ``node.ep``, in
        ``node.items``' order (a row it does not answer is that request's retry)."""
        timeout = self._visit(node.ep, node.items)
        try:
            got = await self.router.client(node.ep).chained(node.fid, node.fut, timeout)
        except RETRYABLE as e:
            e.endpoint = node.ep
            raise
        by_seq = {r.seq_id: r for r in got}
        return [by_seq.get(row.seq_id) or StepResult(row.seq_id, error=errors.StageUnavailable(
            f"stage {node.ep.stage} did not answer for this request")) for _, row, _ in node.items]

    def _take(self, ep: Endpoint, items, results: list[StepResult],
              timed: bool = True) -> list[tuple[_Seq, StepRow, int]]:
        """Sort one frame's results: tokens emitted, errors to their requests, continuing
        rows (the next round's) returned. ``timed``: a frame this ingress sent itself, whose
        round trip its hop timer counts (a chained frame's answer has none)."""
        k, last = ep.stage, self.num_stages - 1
        onward = []
        for (seq, row, layer), res in zip(items, results):
            if seq.done:
                continue
            kind, nxt = walk.sort(seq, row, res)
            if kind is walk.Kind.FAILED:  # this request's own failure: no ban, no replay
                err = res.error
                if isinstance(err, errors.Overloaded):  # no KV slot there: wait for one
                    self._park(seq, err)
                elif isinstance(err, RETRYABLE):
                    err.endpoint = ep
                    self._retry(seq, err)
                else:
                    self._fail(seq, err)
                continue
            if seq.slot_wait and kind in (walk.Kind.TOKEN, walk.Kind.VERIFIED):  # in: it holds its slots now
                self._unqueue(seq)
                self._next_waiter()  # more slots may be free: the next one tries at once
            if layer == 0:
                seq.fed = len(seq.tokens)
            if timed:
                self.hop_s_sum[k] += res.hop_s
                self.hop_n[k] += 1
            if k == last:
                self._audited(seq, row.position, res.backfill)
            lps = res.logprobs or ()
            if kind is walk.Kind.VERIFIED:  # accepted drafts + one
                self._verified(seq, row, res.tokens, k, lps)
            elif kind is walk.Kind.TOKEN:
                if res.exited and self.kv_fill == "propagate":
                    self._propagate(seq, ep.end, res.hidden, row.position)
                if res.exited:
                    seq.exited[row.position] = (k, ep.end)
                self._emit(seq, res.token, k, logprob=lps[0] if lps else None)
            else:
                if res.drafts is not None:  # the drafting stage's passes beyond the visit
                    self.passes[k] += len(res.drafts)
                if kind is walk.Kind.ONWARD:  # FORWARDED: gone on along its chain (_run_hop awaits it there)
                    onward.append((seq, nxt, ep.end))
        return onward

    def _verified(self, seq: _Seq, row: StepRow, tokens: list[int], stage: int, logprobs=()) -> None:
        """Commit a verify round: the stages roll back the rejected positions when this
        sequence's next row arrives (the last stage already has); the next step feeds
        only the last token."""
        drafted, accepted = len(row.drafts), len(tokens) - 1
        self.speculative.add(drafted, accepted)
        seq.verified(drafted, accepted)
        for i, tok in enumerate(tokens):
            if seq.done:
                break
            self._emit(seq, tok, stage, (drafted, accepted) if i == 0 else None,
                       logprobs[i] if i < len(logprobs) else None)

    def _emit(self, seq: _Seq, token: int, stage: int, verified: tuple[int, int] | None = None,
              logprob: TokenLogprob | None = None) -> None:
        now = time.monotonic()
        first = seq.n_generated == 0
        with self._lat_lock:
            (self.ttft_s if first else self.tpot_s).append((now, now - seq.last))
        if first:
            seq.first_at = now
        (metrics.record_ttft if first else metrics.record_tpot)(self.model_name, now - seq.last)
        metrics.record_tokens(self.model_name, [stage], self.num_stages)
        if verified is not None:
            metrics.record_verify(self.model_name, seq.policy.task, *verified)
        seq.last = now
        self.emitted += 1
        seq.failures = seq.waits = 0
        reason = seq.append(token, self.eos_token_ids, self.max_seq)
        prompt_lp = seq.prompt_logprobs if first else None
        seq.events.put_nowait(TokenEvent(token, stage, reason, verified, logprob, prompt_lp))
        if reason:
            seq.done = True
            if seq.n_generated > 1:
                with self._lat_lock:
                    self.req_tpot_s.append((now, (now - seq.first_at) / (seq.n_generated - 1)))

    def _fail(self, seq: _Seq, e: Exception) -> None:
        if not seq.done:
            seq.done = True
            seq.events.put_nowait(e)

    def _retry(self, seq: _Seq, e: Exception) -> None:
        """A retryable failure of this sequence's step: replay it on live replicas after a
        backoff (new session: one prefill over its tokens so far), or fail it. Failures of
        a replica count against ``max_replays`` per token; "no live replica yet" waits,
        with backoff, until the request's deadline (Serve is starting a replacement)."""
        if seq.done:
            return
        now = time.monotonic()
        if now >= seq.deadline:
            self._fail(seq, errors.DeadlineExceeded("the request ran past its deadline while stage replicas "
                                                    "were unavailable; retry later"))
            return
        failed = getattr(e, "endpoint", None)
        if failed is not None or isinstance(e, KVMissing):
            seq.failures += 1
            if seq.failures > self.max_replays:
                self._fail(seq, errors.StageUnavailable(f"stage replicas kept failing ({e}); retry later"))
                return
            if failed is not None and not isinstance(e, KVMissing):
                self.router.ban(failed)  # dead or hung: route around it until the registry drops it
        # A step that failed part-way left KV in some stages and not others: always replay
        # under a new session (one prefill over the tokens so far).
        log.warning("replaying %s after: %s", seq.request.request_id, e)
        self.replays += 1
        self._release(seq)
        self._new_session(seq)
        seq.waits += 1
        seq.retry_at = now + min(2.0, 0.1 * 2**seq.waits, max(0.0, seq.deadline - now))
        self.router.refresh_soon()

    def _hop(self, seq: _Seq, layer: int) -> Endpoint:
        """The replica this sequence enters at ``layer`` (kept for the sequence: its KV)."""
        ep = seq.route.get(layer)
        if ep is None:
            ep = seq.route[layer] = self.router.pick(layer)
            self.router.load[ep] = self.router.load.get(ep, 0) + 1
        return ep

    def _gate_policy(self, policy: ExitPolicy, layer: int, gating: bool = True) -> ExitPolicy:
        """The request's policy with the online offset of the gate after ``layer``; full
        depth (exits off for this step) when the load rule (``gate_max_active``) says no."""
        if not gating and policy.mode in ("calibrated", "threshold"):
            return dataclasses.replace(policy, mode="off", threshold=None, offset=0.0)
        if policy.mode != "calibrated":
            return policy
        off = self.tuner.offset(layer, policy.task)
        return policy if off == policy.offset else dataclasses.replace(policy, offset=off)

    def _audit(self, seq: _Seq) -> bool:
        """Ask the last stage for the full-depth tokens of this sequence's backfilled
        positions (exited ones, which its next chunk there carries; a chunk of one position
        has none to check and the stage answers none)? Greedy requests without logit
        adjustments only: the audit compares raw argmaxes."""
        sp = seq.sampling
        return (self.audit_rate > 0 and bool(seq.exited) and sp.temperature == 0 and not sp.adjusts_logits
                and random.random() < self.audit_rate)

    def _audited(self, seq: _Seq, position: int, full: list[int] | None) -> None:
        """A row reached the last stage: every exited position before it is now backfilled
        there; compare those the stage checked (``full``: argmax at the chunk's positions
        before the last) with the tokens this sequence emitted from them."""
        if full:
            first = position - len(full)
            for i, tok in enumerate(full):
                p = first + i
                hit = seq.exited.get(p)
                if hit is not None and p + 1 < len(seq.tokens):
                    agreed = tok == seq.tokens[p + 1]
                    self.tuner.observe(hit[1], seq.policy.task, agreed)
                    metrics.record_agreement(hit[0], agreed, seq.policy.task)
        for p in [p for p in seq.exited if p < position]:
            del seq.exited[p]

    def _propagate(self, seq: _Seq, layer: int, hidden: torch.Tensor, position: int) -> None:
        """Approximate K/V for skipped stages, off the critical path (same ordered connection)."""
        while self.router.num_layers is None or layer < self.router.num_layers:
            try:
                ep = self._hop(seq, layer)
            except errors.StageUnavailable:
                return  # the next token's walk replays the sequence
            self._spawn(self.router.client(ep).propagate(seq.session, hidden, position, self.call_timeout,
                                                         None if layer == ep.start else layer))
            if ep.end <= layer or ep.stage == self.num_stages - 1:
                return
            layer = ep.end

    def _release(self, seq: _Seq, frees: bool = False) -> None:
        """Free the sequence's KV on its route: also after a ban or a broken connection
        (a fresh connection) while the replica is registered; what cannot be delivered,
        the replica's KV lease reclaims. ``frees``: the sequence has ended, so once the
        stages have its release the first sequence waiting for a KV slot goes again
        (not for a replay or a park, which take a slot again themselves)."""
        self._live.pop(seq.session, None)
        calls = []
        for ep in seq.route.values():
            self.router.load[ep] = max(0, self.router.load.get(ep, 1) - 1)
            if self.router.known(ep):
                calls.append(self.router.client(ep).release([seq.session]))
        seq.route = {}
        if not calls:
            return
        if not frees:
            for call in calls:
                self._spawn(call)
            return

        async def then_next():
            await asyncio.gather(*calls, return_exceptions=True)
            self._next_waiter()

        self._spawn(then_next())

    # -- waiting for a KV slot (class docstring) -------------------------------------------
    def _waiting(self) -> int:
        return len(self._slot_queue)

    def _unqueue(self, seq: _Seq) -> None:
        """``seq`` waits for a KV slot no more (it got one, or it ended)."""
        if seq.slot_wait:
            seq.slot_wait = False
            if seq in self._slot_queue:  # (not when it was taken out to try)
                self._slot_queue.remove(seq)
                metrics.record_kv_wait(self.model_name, self._waiting(), queued=False)

    def _park(self, seq: _Seq, e: Exception) -> None:
        """A stage had no free KV slot for ``seq`` (``e``): release what it took on other
        stages and queue it for a slot, in its arrival order."""
        if seq.done:
            return
        if time.monotonic() >= seq.deadline:
            self._fail(seq, e)
            return
        self._release(seq)
        self._new_session(seq)  # its next row is one prefill over its tokens so far
        self._enqueue(seq)

    def _enqueue(self, seq: _Seq) -> None:
        """Queue ``seq`` in arrival order; its lane steps it only when :meth:`_next_waiter`
        takes it out, or at its deadline (which fails it)."""
        seq.slot_wait = True
        seq.retry_at = seq.deadline
        bisect.insort(self._slot_queue, seq, key=lambda s: s.arrival)
        self.slot_waits += 1
        metrics.record_kv_wait(self.model_name, self._waiting(), queued=True)
        self._probe_soon()

    def _probe_soon(self) -> None:
        """While sequences wait, the first goes again within :data:`SLOT_PROBE_S` even if
        no release of this ingress says a slot is free (other ingress replicas free slots)."""
        if self._slot_queue and self._probe is None:
            self._probe = asyncio.get_running_loop().call_later(SLOT_PROBE_S, self._probe_due)

    def _probe_due(self) -> None:
        self._probe = None
        self._next_waiter()

    def _next_waiter(self) -> None:
        """A KV slot may be free: the first waiting sequence goes now (if it finds none it
        is queued again in its place)."""
        q = self._slot_queue
        while q and q[0].done:  # ended, its request not closed yet
            q.pop(0)
        if not q:
            return
        seq = q.pop(0)
        metrics.record_kv_wait(self.model_name, self._waiting(), queued=False)
        seq.retry_at = time.monotonic()
        if seq.lane is not None:
            seq.lane.wake.set()
        self._probe_soon()

    def _spawn(self, coro) -> None:
        async def quiet():
            try:
                await coro
            except errors.OfframpError as e:
                log.debug("background stage call failed: %s", e)

        task = asyncio.get_running_loop().create_task(quiet())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
