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
different sequences and positions share one forward pass), runs the forward pass in a
worker thread, and answers each caller. Client side (:class:`StageClient`): one
multiplexed connection per stage replica, a timeout on every call.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
import threading
import time
from dataclasses import asdict
from typing import Any

import torch

from offramp import errors
from offramp.observability import metrics, tracing
from offramp.ops.worker import ExitPolicy, KVMissing, StageWorker, StepRow
from offramp.protocol import SamplingParams

log = logging.getLogger(__name__)
_HDR = struct.Struct("!II")
MAX_FRAME = 256 * 2**20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
ERRORS = {c.__name__: c for c in (errors.BadRequest, errors.Overloaded, errors.StageUnavailable,
                                    errors.DeadlineExceeded, KVMissing)}


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
    dtype = DTYPES.get(ref["dtype"])
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


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, memoryview]:
    total, hlen = _HDR.unpack(await reader.readexactly(_HDR.size))
    if total > MAX_FRAME or hlen > total:
        raise ConnectionError(f"frame of {total} bytes refused (limit {MAX_FRAME})")
    body = memoryview(await reader.readexactly(total))
    return json.loads(bytes(body[:hlen])), body[hlen:]


def row_header(row: StepRow, packer: _Packer, trace: dict[str, str] | None = None) -> dict:
    h = {"seq": row.seq_id, "x": packer.tensor(row.inputs), "pos": row.position, "step": row.step,
         "flush": row.flush, "sampling": asdict(row.sampling), "policy": asdict(row.policy)}
    if row.layer is not None:
        h["layer"] = row.layer
    if row.verify:
        h["verify"] = True
    if trace:
        h["trace"] = trace  # W3C carrier: the stage span becomes a child of the request span
    return h


def row_from_header(h: dict, payload: memoryview) -> StepRow:
    s = dict(h["sampling"])
    s["stop_token_ids"] = tuple(s.get("stop_token_ids", ()))
    return StepRow(str(h["seq"]), unpack_tensor(payload, h["x"]), int(h["pos"]), SamplingParams(**s),
                   ExitPolicy(**h["policy"]), int(h["step"]), bool(h.get("flush", False)),
                   None if h.get("layer") is None else int(h["layer"]), bool(h.get("verify", False)))


# -- server -------------------------------------------------------------------------------
class StageServer:
    """Serves one :class:`StageWorker` on ``host:port`` from a background thread."""

    def __init__(self, worker: StageWorker, token: str, host: str = "127.0.0.1", port: int = 0,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.002, stats=None,
                 labels: dict | None = None, emulate=None):
        self.worker, self.token = worker, token
        self.emulate = emulate  # optional EmulatedDevice: modelled minimum step time
        # Queue wait of step rows (enqueued -> their forward pass starts): the saturation
        # signal that busy fraction is not (one closed-loop stream keeps a dominant stage
        # busy without ever queueing). Cumulative sum/count, and the max since take_max_wait().
        self.wait_s, self.waited_rows, self._max_wait = 0.0, 0, 0.0
        self.labels = {"pool": "any", "replica": None, "precision": None, **(labels or {})}
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_timeout_s
        self.stats = stats  # optional callback(batch_rows, n_positions, seconds)
        self.host, self.port = host, port
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"offramp-stage{worker.index}")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("stage channel server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, self.host, self.port))
        self.port = server.sockets[0].getsockname()[1]
        self.loop.create_task(self._batcher())
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
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello, _ = await asyncio.wait_for(read_frame(reader), 10)
            if hello.get("op") != "hello" or not hmac.compare_digest(str(hello.get("token", "")), self.token):
                writer.write(encode({"id": hello.get("id"), "ok": False, "error": {"type": "StageUnavailable",
                                     "message": "bad cluster token"}}))
                return
            writer.write(encode({"id": hello.get("id"), "ok": True, "stage": self.worker.index}))
            lock = asyncio.Lock()
            while True:
                header, payload = await read_frame(reader)
                header["_queued_at"] = time.monotonic()  # local only: queue-wait signal
                self.queue.put_nowait((header, payload, writer, lock))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, json.JSONDecodeError):
            pass
        finally:
            writer.close()

    async def _reply(self, writer, lock, header: dict, packer: _Packer | None = None) -> None:
        try:
            async with lock:
                writer.write(encode(header, packer))
                await writer.drain()
        except ConnectionError:
            pass

    async def _batcher(self) -> None:
        while True:
            items = [await self.queue.get()]
            rows = self._count_rows(items)
            deadline = time.monotonic() + self.batch_wait
            # Wait for more rows only while other live sequences could still send theirs.
            while rows < self.max_batch_size:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    rows = self._count_rows(items)
                    continue
                live = len(self.worker.cache.slot_of)
                left = deadline - time.monotonic()
                if rows >= live or left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                    rows = self._count_rows(items)
                except asyncio.TimeoutError:
                    break
            await self._serve_batch(items)

    @staticmethod
    def _count_rows(items) -> int:
        return sum(len(h.get("rows", ())) for h, *_ in items)

    async def _serve_batch(self, items) -> None:
        steps: list[tuple] = []  # (item, rows, carriers)
        for item in items:
            header, payload, writer, lock = item
            op = header.get("op")
            try:
                if op == "step":
                    steps.append((item, [row_from_header(r, payload) for r in header["rows"]],
                                  [r.get("trace") for r in header["rows"]]))
                elif op == "propagate":
                    x = unpack_tensor(payload, header["x"])
                    layer = None if header.get("layer") is None else int(header["layer"])
                    await self.loop.run_in_executor(None, self.worker.propagate, header["seq"], x,
                                                    int(header["pos"]), layer)
                    await self._reply(writer, lock, {"id": header["id"], "ok": True})
                elif op == "release":
                    for seq in header["seqs"]:
                        self.worker.release(str(seq))
                    await self._reply(writer, lock, {"id": header["id"], "ok": True})
                elif op == "echo":  # hop benchmark: the payload goes there and back
                    packer = _Packer()
                    ref = packer.tensor(unpack_tensor(payload, header["x"]))
                    await self._reply(writer, lock, {"id": header["id"], "ok": True, "x": ref}, packer)
                elif op == "info":
                    await self._reply(writer, lock, {"id": header["id"], "ok": True, **self.info()})
                else:
                    raise errors.BadRequest(f"unknown channel op {op!r}")
            except Exception as e:  # noqa: BLE001 - answer the caller, keep serving others
                await self._reply(writer, lock, _error_header(header.get("id"), e))
        if not steps:
            return
        good, seen = [], set()
        for item, rows, carriers in steps:
            err = self._check(rows, seen, new_slots=sum(1 for s in seen if s not in self.worker.cache.slot_of))
            if err is not None:
                await self._reply(item[2], item[3], _error_header(item[0].get("id"), err))
            else:
                good.append((item, rows, carriers))
        if not good:
            return
        flat = [r for _, rows, _ in good for r in rows]
        carriers = [c for _, _, cs in good for c in cs]
        lengths = [r.inputs.shape[0] for r in flat]  # positions per row
        now = time.monotonic()
        for (header, *_), rows, _ in good:
            wait = max(0.0, now - header.get("_queued_at", now))
            self.wait_s += wait * len(rows)
            self.waited_rows += len(rows)
            self._max_wait = max(self._max_wait, wait)
        t0 = time.perf_counter()
        w, lb = self.worker, self.labels
        with tracing.stage_spans(carriers, w.index, list(w.stage.layer_range), lb["pool"], lb["replica"],
                                 lb["precision"], lengths) as spans:
            try:
                results = await self.loop.run_in_executor(None, w.step, flat)
                if self.emulate is not None:  # a modelled slower device: hold the replica, not a core
                    left = self.emulate.seconds(sum(lengths)) - (time.perf_counter() - t0)
                    if left > 0:
                        await asyncio.sleep(left)
            except Exception as e:  # noqa: BLE001
                log.exception("stage %d forward failed", w.index)
                for item, _, _ in good:
                    await self._reply(item[2], item[3], _error_header(item[0].get("id"), e))
                return
            for span, row, res in zip(spans, flat, results):
                if res.exited:
                    tracing.exit_event(span, w.index, res.confidence, w.threshold(row.policy), row.policy.task)
        seconds = time.perf_counter() - t0
        if self.stats:
            self.stats(len(flat), sum(lengths), seconds)
        metrics.record_step(w.index, lb["pool"], seconds, len(flat), queue_depth=self.queue.qsize())
        if not w.stage.last:
            live = [(row, res) for row, res in zip(flat, results) if not row.flush]
            metrics.record_gate(w.index, evaluated=len(live), exited=sum(res.exited for _, res in live))
        i = 0
        for (header, _, writer, lock), rows, _ in good:
            packer = _Packer()
            out = []
            for res in results[i: i + len(rows)]:
                out.append({"seq": res.seq_id, "token": res.token, "exited": res.exited, "conf": res.confidence,
                            "h": packer.tensor(res.hidden) if res.hidden is not None else None})
                if res.backfill is not None:
                    out[-1]["bf"] = res.backfill
            i += len(rows)
            # server_s: arrival -> reply on this server, so the caller can tell the hop (wire,
            # framing, event loops) from the stage's own time
            server_s = time.monotonic() - header.get("_queued_at", time.monotonic())
            await self._reply(writer, lock, {"id": header["id"], "ok": True, "results": out,
                                             "server_s": round(server_s, 6)}, packer)

    def _check(self, rows: list[StepRow], seen: set, new_slots: int) -> Exception | None:
        for r in rows:
            if r.seq_id in seen:
                return errors.BadRequest(f"sequence {r.seq_id} sent twice in one batch")
            err = self.worker.entry_error(r)
            if err is not None:
                return err
            have = self.worker.cached_length(r.seq_id)
            if have + r.inputs.shape[0] != r.position + 1:
                return KVMissing(f"stage {self.worker.index} holds {have} positions of {r.seq_id}; replay it")
        new = sum(1 for r in rows if r.seq_id not in self.worker.cache.slot_of)
        if self.worker.cache.free_slots() < new + new_slots:
            return errors.Overloaded(f"stage {self.worker.index} has no free KV slot; retry later")
        seen.update(r.seq_id for r in rows)
        return None

    def info(self) -> dict:
        w = self.worker
        return {"stage": w.index, "layers": list(w.stage.layer_range), "sequences": len(w.cache.slot_of),
                "kv_occupancy": w.cache.occupancy(), "queue": self.queue.qsize(),
                "wait_s": self.wait_s, "waited_rows": self.waited_rows}

    def take_max_wait(self) -> float:
        """Longest queue wait of a step since the last call (the heartbeat's period)."""
        m, self._max_wait = self._max_wait, 0.0
        return m


def _error_header(msg_id, e: Exception) -> dict:
    name = type(e).__name__ if type(e).__name__ in ERRORS else "StageUnavailable"
    message = str(e) if name in ERRORS and type(e).__name__ in ERRORS else f"stage error: {type(e).__name__}"
    return {"id": msg_id, "ok": False, "error": {"type": name, "message": message}}


# -- client -------------------------------------------------------------------------------
class StageClient:
    """One multiplexed connection to a stage replica; every call has a timeout."""

    def __init__(self, host: str, port: int, token: str):
        self.host, self.port, self.token = host, port, token
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._connecting: asyncio.Lock | None = None
        self.broken = False

    async def _ensure(self) -> None:
        if self._writer is not None:
            return
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
            writer.write(encode({"op": "hello", "id": 0, "token": self.token}))
            await writer.drain()
            hello, _ = await asyncio.wait_for(read_frame(reader), 5)
            if not hello.get("ok"):
                writer.close()
                raise errors.StageUnavailable(f"stage at {self.host}:{self.port} refused the connection: "
                                              f"{hello.get('error', {}).get('message')}")
            self._writer = writer
            asyncio.get_running_loop().create_task(self._read_loop(reader))

    async def _read_loop(self, reader) -> None:
        try:
            while True:
                header, payload = await read_frame(reader)
                fut = self._pending.pop(header.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.broken = True
            self._writer = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(errors.StageUnavailable(f"stage at {self.host}:{self.port} went away"))
            self._pending.clear()

    async def call(self, header: dict, packer: _Packer | None = None, timeout: float = 30.0):
        try:
            await self._ensure()
        except (OSError, asyncio.TimeoutError) as e:
            self.broken = True
            raise errors.StageUnavailable(f"cannot reach stage at {self.host}:{self.port}: {e}") from None
        self._next += 1
        header = {**header, "id": self._next}
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        try:
            self._writer.write(encode(header, packer))
            await self._writer.drain()
            reply, payload = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(header["id"], None)
            raise errors.DeadlineExceeded(f"stage at {self.host}:{self.port} did not answer within {timeout:.1f}s")
        except (ConnectionError, AttributeError) as e:
            self.broken = True
            raise errors.StageUnavailable(f"stage at {self.host}:{self.port} went away: {e}") from None
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise ERRORS.get(err.get("type"), errors.StageUnavailable)(err.get("message", "stage error"))
        return reply, payload

    async def step(self, rows: list[StepRow], timeout: float, trace: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Results per row; each carries ``hop_s``: this call's round trip minus the server's
        own time (queue + forward pass), i.e. what the hop itself cost."""
        packer = _Packer()
        t0 = time.perf_counter()
        reply, payload = await self.call({"op": "step", "rows": [row_header(r, packer, trace) for r in rows]},
                                         packer, timeout)
        hop = max(0.0, time.perf_counter() - t0 - float(reply.get("server_s") or 0.0))
        out = reply["results"]
        for r in out:
            r["h"] = unpack_tensor(payload, r["h"]) if r["h"] is not None else None
            r["hop_s"] = hop
        return out

    async def propagate(self, seq: str, hidden: torch.Tensor, position: int, timeout: float,
                        layer: int | None = None) -> None:
        packer = _Packer()
        await self.call({"op": "propagate", "seq": seq, "pos": position, "layer": layer, "x": packer.tensor(hidden)},
                        packer, timeout)

    async def echo(self, x: torch.Tensor, timeout: float = 10.0) -> torch.Tensor:
        packer = _Packer()
        reply, payload = await self.call({"op": "echo", "x": packer.tensor(x)}, packer, timeout)
        return unpack_tensor(payload, reply["x"])

    async def release(self, seqs: list[str], timeout: float = 5.0) -> None:
        await self.call({"op": "release", "seqs": seqs}, None, timeout)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
