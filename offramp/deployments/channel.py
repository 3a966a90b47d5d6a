"""The stage-to-stage data path: a small framed protocol over TCP, behind one interface.

Why not a Serve handle per hop: a chained ``DeploymentHandle`` call costs ~3.9 ms here,
more than a small model's whole forward pass. Serve still owns the stage replicas
(placement, replicas, health, restarts); only the hot path - rows of hidden states -
goes over this channel. ``offramp bench serve`` measures both side by side.

Frame: ``u32 total | u32 header_len | header (JSON) | payload`` where tensors are raw
bytes in the payload, referenced by ``{"off", "dtype", "shape"}``. Nothing is unpickled:
a peer can only send JSON and numbers. The first frame on a connection must carry the
cluster token (constant-time compared); anything else closes the connection.

Server side (:class:`StageServer`): an asyncio loop in its own thread parses frames into
one queue; a batcher drains it into ragged batches (continuous batching: rows of
different sequences and positions share one forward pass), runs the forward pass (on the
loop's thread when it is short, see ``INLINE_MAX_POSITIONS``; else in a worker thread),
and answers each caller. A frame marked ``full`` (the ingress's step
scheduler sends every row it has for this replica in one) ends the batch wait at once.
Client side (:class:`StageClient`): one multiplexed connection per stage replica, a
timeout on every call.

**Chain forwarding.** A step row may carry its ``chain``: the stages after this one on
its route, each with the frame id the ingress expects that stage's answer under. A stage
answers its caller as always, but sends every continuing row straight on to the next
stage of its chain (one ``full`` frame per next replica, ``reply`` naming the ingress's
connection key), and answers that row with a ``fwd`` marker instead of its hidden
states. The next stage answers the ingress directly, on the connection the ingress keyed
in its hello. A deep token then costs ``stages + 1`` messages on its critical path instead
of ``2 × stages`` (ingress → stage 0 → stage 1 → ingress). Forwarding never waits: a
next stage not connected yet (the connection is opened in the background), or one whose
connection fails, gets nothing, and the row is answered in full, so the ingress sends it
on itself. Only peers holding the cluster token can ask a stage to forward.

Faults stay where they belong:

* **One row's error is that row's** (sampling math, non-finite logits): it comes back
  in that row's result (``error``), the batch's other rows are answered normally. A
  forward pass that fails as a whole is retried one request at a time, so only the
  request that breaks it fails. Errors the stage does not know are ``RowFailed``
  (non-retryable), never "stage unavailable": a healthy replica is not banned for them.
* **KV leases.** Every sequence's KV and parked chunks are reclaimed when nothing for
  it (a step, a propagate, the ingress's ``renew``) arrived within ``lease_s``: a dead
  ingress, a lost release or a cancelled request cannot leak slots. A ``release`` runs
  after every step queued before it (a cancelled prefill is freed, not re-allocated).
* **Nothing blocks the batcher.** Replies are written without awaiting the peer; a peer
  that stops reading for ``WRITE_TIMEOUT_S`` (or lets ``WRITE_BUFFER_CAP`` pile up) loses
  its connection, the others go on. The batcher survives any exception of a batch, and
  :meth:`StageServer.health` fails when the loop or the batcher died, so Serve replaces
  the replica.
* The pre-auth hello frame may be at most ``HELLO_MAX_FRAME`` bytes; errors sent to
  clients never name internal addresses (those go to the log).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from offramp import errors
from offramp.deployments.config import DEFAULT_KV_LEASE_S
from offramp.observability import metrics, tracing
from offramp.ops.worker import ExitPolicy, KVMissing, StageWorker, StepResult, StepRow
from offramp.protocol import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)
_HDR = struct.Struct("!II")
MAX_FRAME = 256 * 2**20
HELLO_MAX_FRAME = 4096  # before the token is checked, a peer may send no more than this
WRITE_TIMEOUT_S = 10.0  # a peer that reads nothing for this long loses its connection
WRITE_BUFFER_CAP = 64 * 2**20  # replies a peer may leave unread before it is cut off
# A pass over at most this many positions (decode steps, short chunks) runs on the channel
# loop's own thread: handing it to a worker thread costs two thread switches and, while it
# runs, the loop thread and the pass contend for the GIL (a small model's forward is mostly
# Python dispatch). Measured +13-34% tokens/s at 16 streams on the 2-core machine
# (docs/benchmarks.md). Longer passes (prefills) still go to a worker thread, so the loop
# keeps answering frames and health checks while they run.
INLINE_MAX_POSITIONS = 64
HOP_RETRY_S = 5.0  # a stage whose connection to a next stage failed tries it again after this long
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
ERRORS = {c.__name__: c for c in (errors.BadRequest, errors.Overloaded, errors.StageUnavailable,
                                    errors.DeadlineExceeded, errors.RowFailed, KVMissing)}


# -- framing ----------------------------------------------------------------------------
class _Packer:
    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def tensor(self, t: torch.Tensor) -> dict:
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        ref = {"off": self.size, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        self.parts.append(raw)
        self.size += len(raw)
        return ref


def encode(header: dict, packer: _Packer | None = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join(packer.parts) if packer else b""
    return _HDR.pack(len(h) + len(payload), len(h)) + h + payload


def unpack_tensor(payload: memoryview, ref: dict) -> torch.Tensor:
    dtype = WIRE_DTYPES.get(ref["dtype"])
    if dtype is None:
        raise errors.BadRequest(f"unsupported tensor dtype {ref['dtype']!r} on the stage channel")
    shape = [int(s) for s in ref["shape"]]
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload[ref["off"]: ref["off"] + count * dtype.itemsize]),
                            dtype=dtype).reshape(shape)


def _frame_size(prefix, limit: int) -> tuple[int, int]:
    """(body bytes, header bytes) from a frame's length prefix; ConnectionError if the
    frame is larger than ``limit`` or its header longer than its body."""
    total, hlen = _HDR.unpack_from(prefix)
    if total > limit or hlen > total:
        raise ConnectionError(f"frame of {total} bytes refused (limit {limit})")
    return total, hlen


def _split_frame(body: memoryview, hlen: int) -> tuple[dict, memoryview]:
    """A frame's body as (JSON header, payload); ValueError if the header is not JSON."""
    return json.loads(bytes(body[:hlen])), body[hlen:]


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> tuple[dict, memoryview]:
    total, hlen = _frame_size(await reader.readexactly(_HDR.size), limit)
    return _split_frame(memoryview(await reader.readexactly(total)), hlen)


@dataclass(frozen=True)
class ChainHop:
    """One later stage of a row's chain (chain forwarding): where its continuing chunk
    goes, the frame id the ingress expects that stage's answer under, and how the row
    enters there (entry layer when not the replica's first, the gate policy, the audit)."""
    fid: int
    host: str
    port: int
    layer: int | None
    policy: ExitPolicy
    verify: bool = False

    def wire(self) -> dict:
        return {"fid": self.fid, "host": self.host, "port": self.port, "layer": self.layer,
                "policy": vars(self.policy), "verify": self.verify}

    @classmethod
    def from_wire(cls, h: dict) -> "ChainHop":
        return cls(int(h["fid"]), str(h["host"]), int(h["port"]), None if h.get("layer") is None else int(h["layer"]),
                   ExitPolicy(**h["policy"]), bool(h.get("verify", False)))

    def enter(self, row: StepRow) -> StepRow:
        """``row`` (a continuing chunk made by :meth:`StepRow.onward`) set to enter this hop."""
        row.layer, row.policy, row.verify = self.layer, self.policy, self.verify
        return row


def chain_from_wire(raw) -> list[ChainHop] | None:
    """A row's ``chain`` as sent; None when absent or malformed (the row is then answered
    whole, never failed, for it)."""
    if not raw:
        return None
    try:
        return [ChainHop.from_wire(h) for h in raw]
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def row_header(row: StepRow, packer: _Packer, trace: dict[str, str] | None = None) -> dict:
    h = {"seq": row.seq_id, "x": packer.tensor(row.inputs), "pos": row.position, "step": row.step,
         "flush": row.flush, "sampling": vars(row.sampling), "policy": vars(row.policy)}  # flat dataclasses: no deep copy
    if row.layer is not None:
        h["layer"] = row.layer
    if row.verify:
        h["verify"] = True
    if row.draft:
        h["draft"] = row.draft
    if row.drafts:
        h["drafts"] = list(row.drafts)
    if row.draft_probs is not None:
        h["dq"] = packer.tensor(row.draft_probs)
    if row.score:
        h["score"] = list(row.score)
    if row.history:
        h["hist"] = list(row.history)
    if trace:
        h["trace"] = trace  # W3C carrier: the stage span becomes a child of the request span
    return h


def row_from_header(h: dict, payload: memoryview) -> StepRow:
    s = dict(h["sampling"])
    s["stop_token_ids"] = tuple(s.get("stop_token_ids", ()))
    s["logit_bias"] = tuple((int(t), float(b)) for t, b in s.get("logit_bias", ()))
    return StepRow(str(h["seq"]), unpack_tensor(payload, h["x"]), int(h["pos"]), SamplingParams(**s),
                   ExitPolicy(**h["policy"]), int(h["step"]), bool(h.get("flush", False)),
                   None if h.get("layer") is None else int(h["layer"]), bool(h.get("verify", False)),
                   draft=int(h.get("draft", 0)), drafts=tuple(int(t) for t in h.get("drafts", ())),
                   draft_probs=unpack_tensor(payload, h["dq"]) if h.get("dq") is not None else None,
                   score=tuple(int(t) for t in h.get("score", ())), history=tuple(int(t) for t in h.get("hist", ())))


def result_header(res: StepResult, packer: _Packer) -> dict:
    """One row's :class:`StepResult` as it travels back (:func:`result_from_header` reads it)."""
    if res.error is not None:
        return {"seq": res.seq_id, "error": error_body(res.error)}
    if res.forwarded:  # the chunk went on to the next stage; only what the ingress counts
        return {"seq": res.seq_id, "fwd": True, **({"drafts": res.drafts} if res.drafts else {})}
    h: dict[str, Any] = {"seq": res.seq_id, "token": res.token, "exited": res.exited, "conf": res.confidence}
    if res.hidden is not None:
        h["h"] = packer.tensor(res.hidden)
    if res.backfill is not None:
        h["bf"] = res.backfill
    if res.drafts is not None:
        h["drafts"] = res.drafts
    if res.draft_probs is not None:
        h["dq"] = packer.tensor(res.draft_probs)
    if res.tokens is not None:
        h["tokens"] = res.tokens
    if res.logprobs is not None:
        h["lp"] = [x.wire() for x in res.logprobs]
    if res.prompt_logprobs is not None:
        h["plp"] = [x.wire() for x in res.prompt_logprobs]
    return h


def result_from_header(h: dict, payload: memoryview) -> StepResult:
    if h.get("error") is not None:
        return StepResult(str(h["seq"]), error=error_from_body(h["error"]))

    def ints(key):
        return None if h.get(key) is None else [int(t) for t in h[key]]

    def logprobs(key):
        return None if h.get(key) is None else [TokenLogprob.from_wire(x) for x in h[key]]

    def tensor(key):
        return None if h.get(key) is None else unpack_tensor(payload, h[key])

    if h.get("fwd"):
        return StepResult(str(h["seq"]), forwarded=True, drafts=ints("drafts"))
    return StepResult(str(h["seq"]), token=None if h.get("token") is None else int(h["token"]),
                      hidden=tensor("h"), exited=bool(h.get("exited")), confidence=h.get("conf"),
                      backfill=ints("bf"), drafts=ints("drafts"), draft_probs=tensor("dq"), tokens=ints("tokens"),
                      logprobs=logprobs("lp"), prompt_logprobs=logprobs("plp"))


def error_body(e: Exception) -> dict:
    """An exception as it travels on the channel. Types the ingress knows keep their type
    and message; anything else is this request's ``RowFailed`` with a generic message
    (details in this replica's log), so it is never retried as a replica failure."""
    if type(e).__name__ in ERRORS:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": "RowFailed", "message": f"a stage failed while computing this request ({type(e).__name__}); "
                                            "it has been logged"}


def _error_header(msg_id, e: Exception) -> dict:
    return {"id": msg_id, "ok": False, "error": error_body(e)}


def error_from_body(err: dict) -> Exception:
    return ERRORS.get(err.get("type"), errors.RowFailed)(err.get("message", "stage error"))


class _Conn:
    """The server's side of one client connection: replies are written without awaiting
    the peer; a peer that stops reading is cut off instead of stalling the batcher."""

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop, on_cut=None):
        self.writer, self.loop, self.on_cut = writer, loop, on_cut
        self._drainer: asyncio.Task | None = None
        self.key: str | None = None  # the peer's connection key (hello ``key``): chained answers find it by this

    def send(self, header: dict, packer: _Packer | None = None) -> None:
        if self.writer.is_closing():
            return
        try:
            self.writer.write(encode(header, packer))
        except Exception as e:  # noqa: BLE001 - a dead transport is the peer's problem, not the batch's
            log.debug("stage channel reply failed: %s", e)
            self.abort()
            return
        buffered = self.writer.transport.get_write_buffer_size()
        if buffered > WRITE_BUFFER_CAP:
            log.warning("stage channel peer %s left %d bytes unread; closing its connection",
                        self.writer.get_extra_info("peername"), buffered)
            self.abort()
        elif buffered and self._drainer is None:
            self._drainer = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout or reset: this peer is gone
            log.warning("stage channel peer %s did not read for %.0f s (%s); closing its connection",
                        self.writer.get_extra_info("peername"), WRITE_TIMEOUT_S, type(e).__name__)
            self.abort()
        finally:
            self._drainer = None

    def abort(self) -> None:
        if self.writer.is_closing():
            return
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001 - already closed
            pass
        if self.on_cut is not None:
            self.on_cut()


# -- server -------------------------------------------------------------------------------
@dataclass
class _StepFrame:
    """A step frame in a batch: per row, the row, its trace carrier and its chain. Once
    admitted (:meth:`StageServer._run_steps`) these hold the admitted rows only, and
    ``order`` says, per row sent, its index among them or its own error."""
    header: dict
    conn: "_Conn"
    rows: list[StepRow]
    traces: list
    chains: list
    order: list = field(default_factory=list)

    def in_order(self, results: list[StepResult]) -> list[StepResult]:
        """The frame's answer in its rows' order: ``results`` (of the admitted rows) and
        the refused rows' own errors."""
        return [results[o] if isinstance(o, int) else o for o in self.order]


class StageServer:
    """Serves one :class:`StageWorker` on ``host:port`` from a background thread."""

    def __init__(self, worker: StageWorker, token: str, host: str = "127.0.0.1", port: int = 0,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.002, stats=None,
                 labels: dict | None = None, emulate=None, lease_s: float = DEFAULT_KV_LEASE_S,
                 ssl_context=None, client_ssl_context=None, link_delay_s: float = 0.0):
        self.worker, self.token = worker, token
        # Emulated distance (AppArgs.emulate_link_ms): each frame that arrives here is taken
        # in this much later (the stage it forwards to delays what it receives itself).
        self.link_delay_s = link_delay_s
        self.ssl_context = ssl_context  # server-side TLS (ChannelTLS.server_context()); None = plain TCP
        self.client_ssl_context = client_ssl_context  # TLS of the connections this stage forwards on
        self.peers: dict[str, _Conn] = {}  # connection key -> the keyed peer's connection (chained answers)
        self._hops: dict[tuple[str, int], tuple] = {}  # next stages this one forwards to: (StageClient, opened at)
        self.forwarded = 0  # rows sent straight on to the next stage of their chain
        self.emulate = emulate  # optional EmulatedDevice: modelled minimum step time
        # Queue wait of step rows (enqueued -> their forward pass starts): the saturation
        # signal that busy fraction is not (one closed-loop stream keeps a dominant stage
        # busy without ever queueing). Cumulative sum/count, and the max since take_max_wait().
        self.wait_s, self.waited_rows, self._max_wait = 0.0, 0, 0.0
        self.labels = {"pool": "any", "replica": None, "precision": None, **(labels or {})}
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_timeout_s
        self.stats = stats  # optional callback(batch_rows, n_positions, seconds)
        self.host, self.port = host, port
        self.lease_s = lease_s
        self.reclaimed = 0  # sequences whose lease ran out (KV freed without a release)
        self.batch_errors = 0  # batches whose handling raised (the batcher kept going)
        self.peers_cut = 0  # connections closed because the peer stopped reading
        self._last_reap = time.monotonic()
        self._batcher_task: asyncio.Task | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"offramp-stage{worker.index}")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("stage channel server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, self.host, self.port,
                                                                   ssl=self.ssl_context))
        self.port = server.sockets[0].getsockname()[1]
        self._batcher_task = self.loop.create_task(self._batcher())
        self._ready.set()
        self.loop.run_forever()
        # close(): stop serving, let every pending task see its cancellation, then close.
        server.close()
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)

    def health(self, timeout: float = 10.0) -> str | None:
        """Why this server cannot serve (None: it can): its thread or batcher died, or its
        loop did not answer within ``timeout`` (wedged)."""
        if not self._thread.is_alive() or self.loop.is_closed():
            return "the stage channel server thread died"
        task = self._batcher_task
        if task is None or task.done():
            return "the stage channel batcher died"
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(timeout)
        except Exception:  # noqa: BLE001 - timeout or loop gone
            return f"the stage channel loop did not answer within {timeout:g} s"
        return None

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, self.loop, on_cut=self._peer_cut)
        try:
            hello, _ = await asyncio.wait_for(read_frame(reader, HELLO_MAX_FRAME), 10)
            if hello.get("op") != "hello" or not hmac.compare_digest(str(hello.get("token", "")), self.token):
                conn.send({"id": hello.get("id"), "ok": False,
                           "error": {"type": "StageUnavailable", "message": "bad cluster token"}})
                return
            key = hello.get("key")
            if isinstance(key, str) and 0 < len(key) <= 64:
                conn.key = key
                self.peers[key] = conn
            conn.send({"id": hello.get("id"), "ok": True, "stage": self.worker.index})
            while True:
                header, payload = await read_frame(reader)
                if self.link_delay_s:
                    self.loop.call_later(self.link_delay_s, self._arrive, header, payload, conn)
                else:
                    self._arrive(header, payload, conn)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, json.JSONDecodeError,
                UnicodeDecodeError, AttributeError, TypeError):
            pass
        finally:
            if conn.key is not None and self.peers.get(conn.key) is conn:
                del self.peers[conn.key]
            writer.close()

    def _arrive(self, header: dict, payload: memoryview, conn: _Conn) -> None:
        """Take in one frame read from ``conn``: a lease renewal at once, anything else
        (its rows' leases touched) onto the batcher's queue."""
        now = time.monotonic()
        op = header.get("op")
        if op == "renew":  # lease renewal of live sequences: no reply, no queue
            for seq in header.get("seqs", ()):
                seq = str(seq)  # held, or known (its first step may still be queued or running)
                if self.worker.holds(seq) or seq in self.worker.touched:
                    self.worker.touch(seq, now)
            return
        if op == "step":
            for r in header.get("rows", ()):
                self.worker.touch(str(r.get("seq")), now)
        elif op == "propagate":
            self.worker.touch(str(header.get("seq")), now)
        header["_queued_at"] = now  # local only: queue-wait signal
        self.queue.put_nowait((header, payload, conn))

    async def _batcher(self) -> None:
        while True:
            try:
                items = await self._collect()
                if items:
                    await self._serve_batch(items)
                self._reap()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad batch must not end the replica
                self.batch_errors += 1
                log.exception("stage %d: a batch failed outside the forward pass; serving on", self.worker.index)

    async def _collect(self) -> list:
        """The next batch: the first item (waiting at most a lease-reaping period), then
        whatever arrives within the batch wait while other live sequences could still send."""
        try:
            async with asyncio.timeout(self._reap_period()):  # not wait_for: no task per batch
                items = [await self.queue.get()]
        except TimeoutError:
            return []
        rows = self._count_rows(items)
        deadline = time.monotonic() + self.batch_wait
        while rows < self.max_batch_size:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                rows = self._count_rows(items)
                continue
            live = len(self.worker.cache.slot_of)
            left = deadline - time.monotonic()
            # A scheduler's frame is "full": its sender has no more rows for us now (the
            # live sequences missing from it are at other stages), so waiting only adds latency.
            if rows >= live or left <= 0 or all(h.get("full") for h, *_ in items):
                break
            try:
                async with asyncio.timeout(left):
                    items.append(await self.queue.get())
                rows = self._count_rows(items)
            except TimeoutError:
                break
        return items

    def _peer_cut(self) -> None:
        self.peers_cut += 1

    def _reap_period(self) -> float:
        return max(0.25, self.lease_s / 4)

    def _reap(self, now: float | None = None) -> None:
        """Free the KV of sequences whose lease ran out (runs between batches, so never
        under a forward pass)."""
        now = time.monotonic() if now is None else now
        if now - self._last_reap < self._reap_period():
            return
        self._last_reap = now
        gone = self.worker.expired(self.lease_s, now)
        for seq in gone:
            self.worker.release(seq)
        if gone:
            self.reclaimed += len(gone)
            log.info("stage %d: reclaimed the KV of %d sequences idle for over %.0f s", self.worker.index,
                     len(gone), self.lease_s)

    @staticmethod
    def _count_rows(items) -> int:
        return sum(len(h.get("rows", ())) for h, *_ in items)

    async def _serve_batch(self, items) -> None:
        steps: list[_StepFrame] = []
        releases: list[tuple] = []  # run after the steps queued before them
        try:
            for item in items:
                header, payload, conn = item
                op = header.get("op")
                try:
                    if op == "step":
                        rows = header["rows"]
                        steps.append(_StepFrame(header, conn, [row_from_header(r, payload) for r in rows],
                                                [r.get("trace") for r in rows],
                                                [chain_from_wire(r.get("chain")) for r in rows]))
                    elif op == "release":
                        releases.append(item)
                    elif op == "propagate":
                        x = unpack_tensor(payload, header["x"])
                        layer = None if header.get("layer") is None else int(header["layer"])
                        await self.loop.run_in_executor(None, self.worker.propagate, str(header["seq"]), x,
                                                        int(header["pos"]), layer)
                        conn.send({"id": header.get("id"), "ok": True})
                    elif op == "info":
                        conn.send({"id": header.get("id"), "ok": True, **self.info()})
                    else:
                        raise errors.BadRequest(f"unknown channel op {op!r}")
                except Exception as e:  # noqa: BLE001 - answer the caller, keep serving others
                    to = self._reply_conn(header, conn)
                    if to is not None:
                        to.send(_error_header(header.get("id"), e))
            if steps:
                await self._run_steps(steps)
        finally:
            for header, _, conn in releases:
                try:
                    for seq in header["seqs"]:
                        self.worker.release(str(seq))
                    conn.send({"id": header.get("id"), "ok": True})
                except Exception as e:  # noqa: BLE001
                    conn.send(_error_header(header.get("id"), e))

    async def _run_steps(self, steps: list[_StepFrame]) -> None:
        """One forward pass over the admitted rows of every frame. A row that cannot be
        admitted (KV it lacks, no free slot, sent twice) gets its own error in its frame's
        answer; the frame's other rows run (a new sequence finding no slot fails alone, not
        the established sequences it shares a frame with)."""
        good, seen, new = [], set(), set()
        for f in steps:
            kept = []
            for i, r in enumerate(f.rows):
                err = self._check_row(r, seen, new)
                f.order.append(StepResult(r.seq_id, error=err) if err is not None else len(kept))
                if err is None:
                    kept.append(i)
            f.rows, f.traces, f.chains = [f.rows[i] for i in kept], [f.traces[i] for i in kept], \
                [f.chains[i] for i in kept]
            if not kept:
                self._answer(f.header, f.conn, f.in_order([]))
                continue
            good.append(f)
        if not good:
            return
        flat = [r for f in good for r in f.rows]
        carriers = [c for f in good for c in f.traces]
        lengths = [r.inputs.shape[0] for r in flat]  # positions per row
        now = time.monotonic()
        for f in good:
            wait = max(0.0, now - f.header.get("_queued_at", now))
            self.wait_s += wait * len(f.rows)
            self.waited_rows += len(f.rows)
            self._max_wait = max(self._max_wait, wait)
        t0 = time.perf_counter()
        w, lb = self.worker, self.labels
        with tracing.stage_spans(carriers, w.index, list(w.stage.layer_range), lb["pool"], lb["replica"],
                                 lb["precision"], lengths) as spans:
            try:
                if sum(lengths) <= INLINE_MAX_POSITIONS:
                    results = w.step(flat)
                else:
                    results = await self.loop.run_in_executor(None, w.step, flat)
            except Exception as e:  # noqa: BLE001
                if len(flat) == 1:
                    log.exception("stage %d forward failed", w.index)
                    f = good[0]
                    self._answer(f.header, f.conn, f.in_order([StepResult(flat[0].seq_id, error=e)]))
                    return
                # The batch as a whole failed: one sequence at a time, so only the row that
                # breaks it fails (the others' KV is untouched by a failed pass).
                log.warning("stage %d: a batch of %d rows failed (%s); retrying them one by one",
                            w.index, len(flat), type(e).__name__)
                await self._one_by_one(good)
                return
            drafted = [len(res.drafts or ()) for res in results]  # drafting rows ran one pass per draft
            if self.emulate is not None:  # benches: a modelled slower device (EmulatedDevice.hold)
                await self.emulate.hold(lengths, drafted, t0)
            for span, row, res in zip(spans, flat, results):
                if res.exited and res.error is None:
                    tracing.exit_event(span, w.index, res.confidence, w.threshold(row.policy), row.policy.task)
                elif res.tokens is not None:
                    tracing.verify_event(span, len(row.drafts), len(res.tokens) - 1)
        seconds = time.perf_counter() - t0
        if self.stats:
            self.stats(len(flat), sum(lengths), seconds, drafted)
        metrics.record_step(w.index, lb["pool"], seconds, len(flat), queue_depth=self.queue.qsize())
        if not w.stage.last:
            live = [(row, res) for row, res in zip(flat, results) if not row.flush]
            metrics.record_gate(w.index, evaluated=len(live), exited=sum(res.exited for _, res in live))
        i = 0
        for f in good:
            self._reply(f, results[i: i + len(f.rows)])
            i += len(f.rows)

    async def _one_by_one(self, good: list[_StepFrame]) -> None:
        """After a whole-batch failure: every row (one sequence) alone, so only the rows
        that break the pass fail; each frame is answered with its rows' results."""
        for f in good:
            results = []
            for row in f.rows:
                try:
                    (res,) = await self.loop.run_in_executor(None, self.worker.step, [row])
                except Exception as e:  # noqa: BLE001
                    log.exception("stage %d forward failed for sequence %s", self.worker.index, row.seq_id)
                    res = StepResult(row.seq_id, error=e)
                results.append(res)
            self._reply(f, results)

    def _reply(self, f: _StepFrame, results: list[StepResult]) -> None:
        """Answer a step frame with its admitted rows' ``results``, after forwarding the
        continuing rows that carry a chain."""
        self._answer(f.header, f.conn, f.in_order(self._forward(f, results)))

    def _reply_conn(self, header: dict, conn: _Conn) -> _Conn | None:
        """Where a frame's answer goes: the keyed peer a forwarded frame names (the ingress
        that expects it), else the connection it came on."""
        key = header.get("reply")
        return conn if key is None else self.peers.get(str(key))

    def _forward(self, f: _StepFrame, results: list[StepResult]) -> list[StepResult]:
        """Send the continuing rows that carry a ``chain`` straight on to its next stage (one
        frame per next replica); their results become ``forwarded`` markers. Never waits: a
        next stage without a live connection, or a malformed chain, leaves the row's result
        whole (the ingress sends it on itself)."""
        chains = f.chains
        if not any(chains):
            return results
        key = f.header.get("reply") or f.conn.key
        if key is None:
            return results
        groups: dict[tuple, list[int]] = {}  # (next replica, frame id) -> rows
        for i, (res, chain) in enumerate(zip(results, chains)):
            if chain and res.error is None and res.token is None and res.tokens is None and res.hidden is not None:
                groups.setdefault((chain[0].host, chain[0].port, chain[0].fid), []).append(i)
        out = list(results)
        for (host, port, fid), idx in groups.items():
            try:
                client = self._hop_client(host, port)
                if client is None:
                    continue
                packer = _Packer()
                frame_rows = []
                for i in idx:
                    res, (hop, *rest) = results[i], chains[i]
                    h = row_header(hop.enter(f.rows[i].onward(res.hidden, res.drafts, res.draft_probs)), packer,
                                   f.traces[i])
                    if rest:
                        h["chain"] = [c.wire() for c in rest]
                    frame_rows.append(h)
                frame = {"op": "step", "id": fid, "reply": key, "rows": frame_rows, "full": True}
                if not client.send_nowait(frame, packer):
                    continue
            except Exception as e:  # noqa: BLE001 - a malformed chain: answer the rows whole
                log.debug("stage %d: not forwarding %d rows: %r", self.worker.index, len(idx), e)
                continue
            self.forwarded += len(idx)
            for i in idx:
                out[i] = StepResult(results[i].seq_id, forwarded=True, drafts=results[i].drafts)
        return out

    def _hop_client(self, host: str, port: int) -> "StageClient | None":
        """This stage's connection to a next stage, if it is open; else None, and it is
        opened in the background (the first rows for a new next stage go back to the ingress)."""
        now = time.monotonic()
        c, since = self._hops.get((host, port), (None, 0.0))
        if c is not None and not c.broken:
            return c if c.connected else None
        if c is not None and now - since < HOP_RETRY_S:  # failed lately (gone, or TLS/token mismatch): not yet
            return None
        if len(self._hops) >= 64:  # replicas come and go: drop the dead ones first
            self._hops = {k: v for k, v in self._hops.items() if not v[0].broken}
            if len(self._hops) >= 64:
                return None
        c = StageClient(host, port, self.token, label=f"stage after {self.worker.index}",
                        ssl_context=self.client_ssl_context)
        self._hops[(host, port)] = (c, now)
        self.loop.create_task(c.open())
        return None

    def _answer(self, header: dict, conn: _Conn, results) -> None:
        conn = self._reply_conn(header, conn)
        if conn is None:  # the ingress that expects it has no connection here any more: it retries on its own
            log.debug("stage %d: no connection for the answer to frame %s", self.worker.index, header.get("id"))
            return
        packer = _Packer()
        for res in results:
            if res.error is not None and type(res.error).__name__ not in ERRORS:
                log.warning("stage %d: request row %s failed: %r", self.worker.index, res.seq_id, res.error)
        out = [result_header(res, packer) for res in results]
        # server_s: arrival -> reply on this server, so the caller can tell the hop (wire,
        # framing, event loops) from the stage's own time
        server_s = time.monotonic() - header.get("_queued_at", time.monotonic())
        conn.send({"id": header.get("id"), "ok": True, "results": out, "server_s": round(server_s, 6)}, packer)

    def _check_row(self, r: StepRow, seen: set, new: set) -> Exception | None:
        """Why one row cannot join this pass (None: it can). ``seen``: sequences already in
        the pass; ``new``: those among them that take a free KV slot."""
        if r.seq_id in seen:
            return errors.BadRequest(f"sequence {r.seq_id} sent twice in one batch")
        err = self.worker.entry_error(r)
        if err is not None:
            return err
        if not self.worker.fits_cache(r):
            return KVMissing(f"stage {self.worker.index} holds {self.worker.cached_length(r.seq_id)} positions "
                             f"of {r.seq_id}; replay it")
        if r.seq_id not in self.worker.cache.slot_of:
            if self.worker.cache.free_slots() <= len(new):
                return errors.Overloaded(f"stage {self.worker.index} has no free KV slot; retry later")
            new.add(r.seq_id)
        seen.add(r.seq_id)
        return None

    def info(self) -> dict:
        w = self.worker
        return {"stage": w.index, "layers": list(w.stage.layer_range), "sequences": len(w.cache.slot_of),
                "kv_occupancy": w.cache.occupancy(), "queue": self.queue.qsize(),
                "wait_s": self.wait_s, "waited_rows": self.waited_rows, "reclaimed": self.reclaimed,
                "batch_errors": self.batch_errors, "peers_cut": self.peers_cut, "forwarded": self.forwarded}

    def take_max_wait(self) -> float:
        """Longest queue wait of a step since the last call (the heartbeat's period)."""
        m, self._max_wait = self._max_wait, 0.0
        return m


# -- client -------------------------------------------------------------------------------
class _FrameReader(asyncio.Protocol):
    """A client connection's reading side once its hello is done: frames are parsed in
    ``data_received`` and handed to ``on_frame`` there, so an answer's waiter is resolved
    in the callback that read its bytes. A ``StreamReader`` read loop takes one more
    event-loop turn per answer (the loop task wakes, then the waiter), and under load
    each turn queues behind whatever else the ingress's loop holds (its SSE work).
    Flow control and connection loss still go to the stream protocol the connection was
    opened with, so the ``StreamWriter``'s ``drain`` keeps working."""

    def __init__(self, transport: asyncio.Transport, on_frame: Callable[[dict, memoryview], None],
                 on_lost: Callable[[], None], pending: bytes = b"", limit: int = MAX_FRAME):
        self._transport, self._stream = transport, transport.get_protocol()
        self._on_frame, self._on_lost, self._limit = on_frame, on_lost, limit
        self._buf = bytearray()
        self._dead = False
        if pending:  # bytes the stream reader had buffered past the hello
            self.data_received(pending)

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        buf = self._buf
        buf += data
        while len(buf) >= _HDR.size:
            try:
                total, hlen = _frame_size(buf, self._limit)
                end = _HDR.size + total
                if len(buf) < end:
                    return
                body = memoryview(buf[_HDR.size:end])  # the frame's one copy out of the buffer
                del buf[:end]
                header, payload = _split_frame(body, hlen)
            except (ConnectionError, ValueError) as e:
                log.warning("stage channel: %s; dropping the connection", e)
                return self._fail()
            self._on_frame(header, payload)

    def _fail(self) -> None:
        self._dead = True
        self._transport.abort()  # connection_lost follows

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self._stream.connection_lost(exc)  # wakes a drain waiting on this connection
        self._on_lost()


class StageClient:
    """One multiplexed connection to a stage replica; every call and write has a timeout.

    ``label`` names the replica in errors the client may see ("stage 1"); the address
    only goes to the log."""

    def __init__(self, host: str, port: int, token: str, label: str = "a stage replica", ssl_context=None,
                 key: str | None = None, link_delay_s: float = 0.0):
        self.host, self.port, self.token, self.label = host, port, token, label
        self.link_delay_s = link_delay_s  # emulated distance: answers are taken in this much later
        self.ssl_context = ssl_context  # client-side TLS (ChannelTLS.client_context()); None = plain TCP
        self.key = key  # this connection's key in the hello: stages answer chained frames to it
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._connecting: asyncio.Lock | None = None
        self._nowait: _Conn | None = None  # send_nowait's view of the connection
        self.broken = False

    async def _ensure(self) -> None:
        if self._writer is not None:
            return
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.ssl_context,
                                            server_hostname="" if self.ssl_context else None), 5)
            except ssl.SSLError as e:  # a peer outside the channel CA, or one side without TLS
                log.error("TLS with the stage at %s:%d failed: %s", self.host, self.port, e)
                raise errors.StageUnavailable(f"{self.label} failed the channel's TLS handshake") from e
            hello = {"op": "hello", "id": 0, "token": self.token}
            if self.key:
                hello["key"] = self.key
            writer.write(encode(hello))
            await asyncio.wait_for(writer.drain(), 5)
            hello, _ = await asyncio.wait_for(read_frame(reader), 5)
            if not hello.get("ok"):
                writer.close()
                log.error("stage at %s:%d refused the connection: %s", self.host, self.port,
                          hello.get("error", {}).get("message"))
                raise errors.StageUnavailable(f"{self.label} refused the connection "
                                              f"({hello.get('error', {}).get('message')})")
            self._writer = writer
            # From here on answers are parsed where their bytes arrive (no read-loop task).
            # (The stream reader's own buffer, private but stable across Pythons, may
            # already hold bytes past the hello.)
            writer.transport.set_protocol(_FrameReader(writer.transport, self._on_frame, self._on_lost,
                                                       bytes(reader._buffer)))

    def _on_frame(self, header: dict, payload: memoryview) -> None:
        if self.link_delay_s:
            asyncio.get_running_loop().call_later(self.link_delay_s, self._deliver, header, payload)
        else:
            self._deliver(header, payload)

    def _on_lost(self) -> None:
        self.broken = True
        self._writer = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(errors.StageUnavailable(f"{self.label} went away"))
        self._pending.clear()

    def _deliver(self, header: dict, payload: memoryview) -> None:
        fut = self._pending.pop(header.get("id"), None)
        if fut is not None and not fut.done():
            fut.set_result((header, payload))

    async def _write(self, data: bytes, timeout: float) -> None:
        writer = self._writer
        if writer is None:
            raise ConnectionError("not connected")
        writer.write(data)
        if not writer.transport.get_write_buffer_size():
            return  # all of it went to the socket: nothing to drain
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
        except TimeoutError:
            log.warning("stage at %s:%d did not read for %.1f s; dropping the connection", self.host, self.port,
                        timeout)
            self.broken = True
            self.close()
            raise errors.StageUnavailable(f"{self.label} stopped reading its connection") from None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self.broken

    async def open(self) -> bool:
        """Connect now (a stage's connection to the next stage of a chain); False if it failed."""
        try:
            await self._connect()
            return True
        except errors.StageUnavailable:
            return False

    async def _connect(self) -> None:
        try:
            await self._ensure()
        except (OSError, asyncio.TimeoutError) as e:
            self.broken = True
            log.warning("cannot reach stage at %s:%d: %s", self.host, self.port, e)
            raise errors.StageUnavailable(f"cannot reach {self.label}") from None

    async def expect(self) -> tuple[int, asyncio.Future]:
        """Connect, and reserve a frame id whose answer will come on this connection
        although this client sends no frame under it (chain forwarding: an earlier stage
        sends the frame, this stage answers here). :meth:`wait` awaits it, :meth:`forget`
        gives it up."""
        await self._connect()
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        return self._next, fut

    def forget(self, msg_id: int) -> None:
        fut = self._pending.pop(msg_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def _gone(self, e: Exception) -> errors.StageUnavailable:
        """The connection failed under a call: marked broken, logged with the address, and
        the error the caller raises (which names no address)."""
        self.broken = True
        log.warning("stage at %s:%d went away: %s", self.host, self.port, e)
        return errors.StageUnavailable(f"{self.label} went away")

    async def wait(self, msg_id: int, fut: asyncio.Future, timeout: float):
        """The answer to frame ``msg_id``: (header, payload); the call's errors as :meth:`call`."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: no extra callback hop per answer
                reply, payload = await fut
        except TimeoutError:
            raise errors.DeadlineExceeded(f"{self.label} did not answer within {timeout:.1f}s") from None
        except (ConnectionError, AttributeError, OSError) as e:
            raise self._gone(e) from None
        finally:
            self._pending.pop(msg_id, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # failed while we were still writing: retrieved, not logged as lost
        if not reply.get("ok"):
            raise error_from_body(reply.get("error", {}))
        return reply, payload

    async def call(self, header: dict, packer: _Packer | None = None, timeout: float = 30.0):
        msg_id, fut = await self.expect()
        try:
            await self._write(encode({**header, "id": msg_id}, packer), min(timeout, WRITE_TIMEOUT_S))
        except BaseException as e:
            self.forget(msg_id)
            if isinstance(e, (ConnectionError, AttributeError, OSError)):
                raise self._gone(e) from None
            raise
        return await self.wait(msg_id, fut, timeout)

    def send_nowait(self, header: dict, packer: _Packer | None = None) -> bool:
        """Send a frame without waiting for the peer (a stage forwarding rows: its batcher
        never blocks on the next stage), as a stage answers its own peers (:class:`_Conn`:
        a peer that reads nothing for ``WRITE_TIMEOUT_S`` or leaves ``WRITE_BUFFER_CAP``
        unread loses the connection); False when the connection is not open or was cut."""
        writer = self._writer
        if writer is None or self.broken:
            return False
        if self._nowait is None or self._nowait.writer is not writer:
            self._nowait = _Conn(writer, asyncio.get_running_loop(), on_cut=self._cut)
        self._nowait.send(header, packer)
        return not (self.broken or writer.is_closing())

    def _cut(self) -> None:
        self.broken = True

    async def notify(self, header: dict, timeout: float = 5.0) -> bool:
        """Send a frame that gets no reply (lease renewals); False if it could not be sent."""
        try:
            await self._ensure()
            await self._write(encode(header), timeout)
            return True
        except (OSError, asyncio.TimeoutError, errors.OfframpError) as e:
            log.debug("notify to stage at %s:%d failed: %s", self.host, self.port, e)
            return False

    async def step(self, rows: list[StepRow], timeout: float, traces: list[dict[str, str] | None] | None = None,
                   full: bool = False, chains: list[list[ChainHop] | None] | None = None) -> list[StepResult]:
        """Results per row; each carries ``hop_s``: this call's round trip minus the server's
        own time (queue + forward pass), i.e. what the hop itself cost. A row that failed on
        its own carries ``error`` (the exception to raise for that request).

        ``traces``: each row's W3C carrier (its request's span), or none. ``full``: this
        frame holds every row the caller has for this replica now (a step scheduler's
        frame), so the replica's batcher does not wait for more from it. ``chains``: per row,
        the stages after this one that the row's continuing chunk goes to straight from
        this stage (chain forwarding, module docstring), or None."""
        packer = _Packer()
        t0 = time.perf_counter()
        traces = traces if traces is not None else [None] * len(rows)
        header = {"op": "step", "rows": [row_header(r, packer, t) for r, t in zip(rows, traces)]}
        for h, chain in zip(header["rows"], chains or ()):
            if chain:
                h["chain"] = [c.wire() for c in chain]
        if full:
            header["full"] = True
        reply, payload = await self.call(header, packer, timeout)
        hop = max(0.0, time.perf_counter() - t0 - float(reply.get("server_s") or 0.0))
        out = [result_from_header(h, payload) for h in reply["results"]]
        for r in out:
            r.hop_s = hop
        return out

    async def chained(self, msg_id: int, fut: asyncio.Future, timeout: float) -> list[StepResult]:
        """The results of a step frame an earlier stage forwarded here under ``msg_id``
        (reserved with :meth:`expect`), answered on this connection."""
        reply, payload = await self.wait(msg_id, fut, timeout)
        return [result_from_header(h, payload) for h in reply["results"]]

    async def propagate(self, seq: str, hidden: torch.Tensor, position: int, timeout: float,
                        layer: int | None = None) -> None:
        packer = _Packer()
        await self.call({"op": "propagate", "seq": seq, "pos": position, "layer": layer, "x": packer.tensor(hidden)},
                        packer, timeout)

    async def release(self, seqs: list[str], timeout: float = 5.0) -> None:
        await self.call({"op": "release", "seqs": seqs}, None, timeout)

    async def renew(self, seqs: list[str], timeout: float = 5.0) -> bool:
        """Extend the KV lease of ``seqs`` on this replica (fire and forget)."""
        return await self.notify({"op": "renew", "seqs": seqs}, timeout)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
