"""Fault classes of the request path, on real stage channels (no Ray): a row's error
stays that row's, KV leases reclaim what nobody will finish, a release runs after the
steps queued before it, the batcher and its peers cannot stall or kill each other, the
pre-auth frame is small, client-facing errors name no address, and the ingress keeps
routing through a registry restart.

Replicas are real :class:`StageServer` threads over real sockets and a real
:class:`PipelineBackend`; only the registry is a list (``_Replicas`` in test_split_moves).
"""
from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest
import torch

from offramp import errors
from offramp.cluster.records import StageRecord
from offramp.deployments import channel as ch
from offramp.deployments import pipeline as pl
from offramp.deployments.channel import StageClient, StageServer
from offramp.ops.sampling import choose_tokens
from offramp.ops.worker import StepRow
from offramp.protocol import GenerationRequest, SamplingParams

from test_split_moves import _Replicas, _worker


def _backend(reps: _Replicas, **kw) -> pl.PipelineBackend:
    router = pl.Router(2, "tok", reps.lookup, num_layers=reps.spec.num_layers)
    return pl.PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=reps.spec.vocab_size,
                              request_timeout_s=30, **kw)


def _req(i: int, n: int = 8, **sampling) -> GenerationRequest:
    return GenerationRequest(f"r{i}", (5 + i, 9, 17, 3 + i), SamplingParams(max_tokens=n, ignore_eos=True, **sampling),
                             exit_mode="off")


async def _tokens(backend, req):
    return [ev.token_id async for ev in backend.generate(req)]


def _two_stages(model_dir) -> _Replicas:
    reps = _Replicas(model_dir)
    L = reps.spec.num_layers
    reps.add("s0", 0, (0, L // 2))
    reps.add("s1", 1, (L // 2, L))
    return reps


async def _until(cond, timeout: float = 10.0, every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(every)


def _kv_slots(worker, slots: int) -> None:
    """Give a stage worker (before any traffic) only ``slots`` KV slots."""
    w = worker
    w.cache = type(w.cache)(len(w.stage.layers), slots, w.max_seq, w.stage.spec.num_kv_heads, w.stage.spec.head_dim,
                            w.stage.lm_dtype)


def _held(reps: _Replicas) -> dict[str, int]:
    return {n: len(s.worker.cache.slot_of) + len(s.worker.pending) for n, s in reps.servers.items()}


# -- sampling -----------------------------------------------------------------------------
def test_choose_tokens_isolates_a_bad_row_and_never_overflows():
    logits = torch.randn(4, 50) * 30
    logits[1, 7] = float("nan")
    logits[3] = logits[3] * 1e30  # huge but finite: max-subtraction keeps softmax finite
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=1e-300), SamplingParams(temperature=2.0, seed=3, top_p=1e-300)]
    out = choose_tokens(logits, params, [0, 0, 0, 0])
    assert out[0] == int(logits[0].argmax())
    assert isinstance(out[1], errors.RowFailed) and "non-finite" in str(out[1])
    assert out[2] == int(logits[2].argmax())  # below the sampling floor: greedy, not 1/T overflow
    assert out[3] == int(logits[3].argmax())  # top_p ~ 0 keeps the top token only
    bad_t = choose_tokens(torch.randn(2, 50), [SamplingParams(temperature=float("nan"), seed=1), SamplingParams()],
                          [0, 0])
    assert isinstance(bad_t[0], errors.RowFailed) and isinstance(bad_t[1], int)


# -- one row's error is that row's ----------------------------------------------------------
def test_a_poison_row_fails_alone_without_ban_or_replay(tiny_model_dir):
    """A request whose sampling math breaks at the last stage (NaN temperature sent straight
    to the backend, past the API's validation) fails with RowFailed; four requests batched
    with it get exactly their solo outputs; no replica is banned, nothing is replayed, and
    the next request is served."""
    async def scenario():
        reps = _two_stages(tiny_model_dir)
        try:
            backend = _backend(reps)
            solo = [await _tokens(backend, _req(i)) for i in range(4)]
            results = await asyncio.gather(*(_tokens(backend, _req(i)) for i in range(4)),
                                           _tokens(backend, _req(9, temperature=float("nan"), seed=1)),
                                           return_exceptions=True)
            after = await _tokens(backend, _req(0))
            await _until(lambda: not any(_held(reps).values()))
            return solo, results, after, backend
        finally:
            reps.close()

    solo, results, after, backend = asyncio.run(scenario())
    assert results[:4] == solo
    assert isinstance(results[4], errors.RowFailed), results[4]
    assert after == solo[0]
    assert backend.router.dead == {} and backend.replays == 0


def test_a_batch_that_fails_as_a_whole_is_retried_request_by_request(tiny_model_dir):
    """A forward pass that raises for the whole batch (one request breaks it) fails only
    that request: the stage retries the batch's requests one at a time."""
    async def scenario():
        reps = _two_stages(tiny_model_dir)
        s1 = reps.servers["s1"]
        orig = s1.worker.step

        def step(rows):
            if any(r.seq_id.startswith("r9/") for r in rows):
                raise RuntimeError("kernel fault caused by this request")
            return orig(rows)

        s1.worker.step = step
        s1.batch_wait = 0.05  # let the five requests meet in one batch
        try:
            backend = _backend(reps)
            solo = [await _tokens(backend, _req(i)) for i in range(4)]
            results = await asyncio.gather(*(_tokens(backend, _req(i)) for i in range(5)), _tokens(backend, _req(9)),
                                           return_exceptions=True)
            return solo, results, backend
        finally:
            reps.close()

    solo, results, backend = asyncio.run(scenario())
    assert results[:4] == solo
    assert isinstance(results[5], errors.RowFailed) and "RuntimeError" in str(results[5])
    assert "127.0.0.1" not in str(results[5])
    assert backend.router.dead == {} and backend.replays == 0


def test_a_row_the_stage_cannot_admit_fails_alone_in_its_frame(tiny_model_dir):
    """A frame with established sequences and one that finds no free KV slot (or one whose
    KV the stage lacks): only that row gets its error; the others run in the same pass."""
    w = _worker(tiny_model_dir, (0, 2), 0, 2)
    _kv_slots(w, 2)
    srv = StageServer(w, "tok", batch_wait_timeout_s=0.0)

    async def scenario():
        client = StageClient("127.0.0.1", srv.port, "tok")
        try:
            for seq in ("a", "b"):  # both slots taken
                await client.step([StepRow(seq, torch.tensor([5, 9, 17]), 2)], timeout=10)
            return await client.step([StepRow("a", torch.tensor([4]), 3), StepRow("new", torch.tensor([5, 6]), 1),
                                      StepRow("b", torch.tensor([4]), 9), StepRow("b2", torch.tensor([7, 8]), 1)],
                                     timeout=10)
        finally:
            client.close()

    try:
        a, new, b_gap, b2 = asyncio.run(scenario())
        assert a.error is None and a.hidden is not None
        assert isinstance(new.error, errors.Overloaded)
        assert isinstance(b_gap.error, pl.KVMissing)
        assert isinstance(b2.error, errors.Overloaded)  # a new sequence again: no slot
        assert w.cached_length("a") == 4 and w.cached_length("b") == 3 and "new" not in w.cache.slot_of
    finally:
        srv.close()


# -- KV leases ------------------------------------------------------------------------------
def test_kv_lease_reclaims_abandoned_sequences_and_renewal_keeps_live_ones(tiny_model_dir):
    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0, lease_s=0.6)

    async def scenario():
        client = StageClient("127.0.0.1", srv.port, "tok")
        try:
            for seq in ("abandoned", "live"):
                await client.step([StepRow(seq, torch.tensor([5, 9, 17]), 2)], timeout=10)
            assert set(srv.worker.cache.slot_of) == {"abandoned", "live"}
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:  # the ingress renews "live" only
                await client.renew(["live"])
                await asyncio.sleep(0.1)
            return set(srv.worker.cache.slot_of)
        finally:
            client.close()

    try:
        held = asyncio.run(scenario())
        assert held == {"live"}
        assert srv.reclaimed == 1 and "abandoned" not in srv.worker.pending
        time.sleep(1.5)  # nobody renews "live" any more: reclaimed too
        assert not srv.worker.cache.slot_of and srv.worker.cache.free_slots() == srv.worker.cache.max_slots
    finally:
        srv.close()


def test_the_ingress_renews_leases_of_a_sequence_waiting_on_a_slow_client(tiny_model_dir):
    """A stream whose consumer pauses longer than the lease keeps its KV (the ingress
    renews it) and continues without a replay."""
    async def scenario():
        reps = _two_stages(tiny_model_dir)
        try:
            backend = _backend(reps, lease_s=0.5)
            ref = await _tokens(backend, _req(1))  # also warms the stages up (a cold first pass can outlast 0.5 s)
            for s in reps.servers.values():
                s.lease_s = 0.5
            out = []
            async for ev in backend.generate(_req(1)):
                out.append(ev.token_id)
                if len(out) == 2:
                    await asyncio.sleep(1.5)  # three lease periods without a step
            return ref, out, backend.replays, [s.reclaimed for s in reps.servers.values()]
        finally:
            reps.close()

    ref, out, replays, reclaimed = asyncio.run(scenario())
    assert out == ref and replays == 0 and reclaimed == [0, 0]


def test_release_runs_after_the_steps_queued_before_it(tiny_model_dir):
    """A cancelled prefill: its step and its release land in one batch. The release must
    run after the step, or the step re-allocates a slot nobody frees."""
    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0, lease_s=600)

    class Sink:
        def __init__(self):
            self.sent = []

        def send(self, header, packer=None):
            self.sent.append(header)

    packer = ch._Packer()
    step = {"op": "step", "id": 1, "rows": [ch.row_header(StepRow("c", torch.tensor([5, 9]), 1), packer)],
            "_queued_at": time.monotonic()}
    payload = memoryview(ch.encode({}, packer)[8 + 2:])  # the payload after an empty header "{}"
    release = {"op": "release", "id": 2, "seqs": ["c"]}
    sink = Sink()
    try:
        fut = asyncio.run_coroutine_threadsafe(srv._serve_batch([(step, payload, sink), (release, b"", sink)]),
                                               srv.loop)
        fut.result(30)
        assert [h["id"] for h in sink.sent] == [1, 2] and all(h["ok"] for h in sink.sent)
        assert not srv.worker.cache.slot_of, "the step ran after its release and leaked a slot"
    finally:
        srv.close()


# -- control plane --------------------------------------------------------------------------
def test_batcher_survives_a_failing_batch_and_health_sees_a_dead_one(tiny_model_dir):
    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0)
    orig = srv._run_steps
    calls = []

    async def once_broken(steps):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug outside the forward pass")
        return await orig(steps)

    srv._run_steps = once_broken

    async def scenario():
        client = StageClient("127.0.0.1", srv.port, "tok")
        try:
            with pytest.raises(errors.DeadlineExceeded):
                await client.step([StepRow("a", torch.tensor([5, 9]), 1)], timeout=1.0)
            (res,) = await client.step([StepRow("b", torch.tensor([5, 9]), 1)], timeout=10)
            return res
        finally:
            client.close()

    try:
        res = asyncio.run(scenario())
        assert res.hidden is not None and srv.batch_errors == 1
        assert srv.health() is None
        srv.loop.call_soon_threadsafe(srv._batcher_task.cancel)
        deadline = time.monotonic() + 5
        while srv.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "batcher died" in (srv.health() or "")
    finally:
        srv.close()
    time.sleep(0.2)
    assert srv.health() is not None  # loop stopped: unhealthy


def test_preauth_frame_is_capped_and_a_peer_that_stops_reading_stalls_no_one(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(ch, "WRITE_TIMEOUT_S", 1.0)
    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0)
    try:
        # 1. a hello announcing 10 MiB is refused at once, unread
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(struct.pack("!II", 10 * 2**20, 16))
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the server

        # 2. a peer that sends prefills (each answered with 250 x 64 hidden states, 64 KB)
        # and releases, and never reads its replies
        stuck = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(ch.encode({"op": "hello", "id": 0, "token": "tok"}))
        frames = []
        for i in range(40):
            big = ch._Packer()
            row = ch.row_header(StepRow(f"big{i}", torch.randint(3, 500, (250,)), 249), big)
            frames += [ch.encode({"op": "step", "id": 2 * i + 1, "rows": [row]}, big),
                       ch.encode({"op": "release", "id": 2 * i + 2, "seqs": [f"big{i}"]})]
        frame = b"".join(frames)  # 2.5 MB of replies per send

        async def normal_traffic():
            client = StageClient("127.0.0.1", srv.port, "tok")
            try:
                times = []
                for i in range(6):
                    t0 = time.perf_counter()
                    await client.step([StepRow(f"n{i}", torch.tensor([5, 9]), 1)], timeout=5)
                    times.append(time.perf_counter() - t0)
                    await client.release([f"n{i}"])
                return times
            finally:
                client.close()

        stuck.settimeout(1)
        for _ in range(8):
            try:
                stuck.sendall(frame)
            except OSError:
                break
        times = asyncio.run(normal_traffic())
        assert max(times) < 2.5, times  # never waited out the stuck peer's write timeout
        deadline = time.monotonic() + 10  # its connection is cut once replies sat unread past the timeout
        while srv.peers_cut == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.peers_cut == 1
        stuck.close()
        assert srv.health() is None
    finally:
        srv.close()


def test_client_errors_name_no_internal_address():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()

    async def call():
        c = StageClient("127.0.0.1", p, "tok", label="stage 1")
        with pytest.raises(errors.StageUnavailable) as e:
            await c.step([StepRow("a", torch.tensor([1]), 0)], timeout=2)
        return str(e.value)

    msg = asyncio.run(call())
    assert "stage 1" in msg and "127.0.0.1" not in msg and str(p) not in msg


def test_router_keeps_routing_through_a_registry_restart_and_a_hung_lookup(monkeypatch):
    monkeypatch.setattr(pl, "RESTART_GRACE_S", 0.5)
    monkeypatch.setattr(pl, "LOOKUP_TIMEOUT_S", 0.2)
    a, b = StageRecord(0, "a", "h", 1, (0, 2)), StageRecord(1, "b", "h", 2, (2, 4))
    answers = [{"epoch": "e1", "endpoints": [a, b]}, {"epoch": "e2", "endpoints": []},
               {"epoch": "e2", "endpoints": [b]}, "hang", {"epoch": "e2", "endpoints": [b]}]

    async def lookup():
        got = answers.pop(0)
        if got == "hang":
            await asyncio.sleep(5)
        return got

    async def scenario():
        r = pl.Router(2, "tok", lookup, num_layers=4)
        seen = []
        await r.refresh()
        seen.append(sorted(ep.replica for ep in r.endpoints))
        await r.refresh()  # restarted, nobody registered yet: the old view stays
        seen.append(sorted(ep.replica for ep in r.endpoints))
        await r.refresh()
        seen.append(sorted(ep.replica for ep in r.endpoints))
        t0 = time.monotonic()
        await r.refresh()  # a hung lookup: bounded, the last view stays
        seen.append((sorted(ep.replica for ep in r.endpoints), time.monotonic() - t0 < 1.0))
        await asyncio.sleep(0.6)  # grace over: "a" never came back
        await r.refresh()
        seen.append(sorted(ep.replica for ep in r.endpoints))
        return seen

    assert asyncio.run(scenario()) == [["a", "b"], ["a", "b"], ["a", "b"], (["a", "b"], True), ["b"]]


def test_registry_exposes_an_epoch_per_start():
    from offramp.cluster.registry import RegistryCore

    r1, r2 = RegistryCore(), RegistryCore()
    r1.register(StageRecord(0, "x", "h", 1, (0, 2)))
    got = r1.routing()
    assert [e.replica for e in got["endpoints"]] == ["x"]
    assert r1.heartbeat("x", {"rows": 7, "sequences": 2, "busy_s": 0.5})  # parsed once, typed
    (e,) = r1.endpoints()
    assert (e.stats.rows, e.stats.sequences, e.stats.busy_s) == (7, 2, 0.5)
    assert not r2.heartbeat("x", {"rows": 1})  # unknown there: the replica registers again
    assert got["epoch"] != r2.routing()["epoch"]


def test_row_failed_reaches_clients_with_its_message_not_the_generic_one():
    import grpc

    from offramp.api import errors as api_errors
    from offramp.api.grpc_service import status_of

    e = errors.RowFailed("the model produced non-finite logits for this request")
    err = api_errors.from_offramp(e)
    assert err.status == 500 and err.code == "row_failed" and "non-finite" in err.message
    g = status_of(e)
    assert g.code == grpc.StatusCode.INTERNAL and "non-finite" in g.details
    other = api_errors.from_offramp(errors.OfframpError("secret internal detail at 10.0.0.7:4567"))
    assert "10.0.0.7" not in other.message  # unknown 500s stay generic


def test_in_process_engine_fails_only_the_poison_request(tiny_model_dir):
    """The in-process backend (offramp generate, the golden reference) isolates a row's
    error the same way: the poison request ends with RowFailed, its batch-mate is unchanged."""
    from offramp.ops.engine import InProcessBackend, StagedModel

    backend = InProcessBackend(StagedModel(tiny_model_dir, num_stages=2))

    async def scenario():
        solo = await _tokens(backend, _req(1))
        both = await asyncio.gather(_tokens(backend, _req(1)), _tokens(backend, _req(9, temperature=float("nan"), seed=1)),
                                    return_exceptions=True)
        return solo, both

    solo, (good, poison) = asyncio.run(scenario())
    assert good == solo and isinstance(poison, errors.RowFailed)


def test_a_stats_reset_does_not_blank_what_the_controller_reads():
    """``GET /v1/offramp/stats?reset=true`` starts a new view for whoever resets; the
    heartbeat's windowed view (what the placement controller reads) keeps its samples."""
    router = pl.Router(2, "tok", lambda: None, num_layers=4)
    backend = pl.PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=64)
    now = time.monotonic()
    backend.tpot_s.extend((now - 1.0, 0.010 + i / 1000) for i in range(10))
    assert backend.stats(reset=True)["tpot_ms_p50"] is not None
    assert backend.stats()["tpot_ms_p50"] is None  # the reset view starts after the reset
    assert backend.stats(window_s=30)["tpot_ms_p50"] == pytest.approx(15.0)  # the controller's view is intact
    backend.tpot_s.append((time.monotonic(), 0.020))
    assert backend.stats()["tpot_ms_p50"] == pytest.approx(20.0)


def test_local_config_keeps_every_offramp_listener_on_loopback():
    """`serve run configs/local.yaml` on a laptop: the HTTP API and the stage channels bind
    127.0.0.1 and no Serve gRPC proxy is opened (it would bind every interface)."""
    import ipaddress

    import yaml

    from offramp.deployments.config import AppArgs

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/local.yaml").read_text())
    assert ipaddress.ip_address(cfg["http_options"]["host"]).is_loopback
    assert not (cfg.get("grpc_options") or {}).get("grpc_servicer_functions")
    (app,) = cfg["applications"]
    args = AppArgs.model_validate(app["args"])
    assert args.channel_host != "node" and ipaddress.ip_address(args.channel_host).is_loopback


def test_readiness_names_the_layer_no_live_replica_holds():
    """``GET /health`` answers 503 until live replicas cover a whole walk: while a stage
    starts (loads, compiles), is replaced, or is banned after failing."""
    e = lambda stage, replica, a, b: StageRecord(stage, replica, "h", 1, (a, b))  # noqa: E731
    views = [{"epoch": "e", "endpoints": [e(0, "a", 0, 2)]},
             {"epoch": "e", "endpoints": [e(0, "a", 0, 2), e(1, "b", 2, 4)]}]

    async def lookup():
        return views[0]

    async def scenario():
        router = pl.Router(2, "tok", lookup, num_layers=4)
        backend = pl.PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=64)
        out = [await backend.readiness()]
        views.pop(0)
        await router.refresh()
        out.append(await backend.readiness())
        router.dead["b"] = time.monotonic() + 60  # banned after failing
        out.append(router.missing())
        return out

    starting, ready, banned = asyncio.run(scenario())
    assert starting.startswith("no live replica holds layer 2") and "starting" in starting
    assert ready is None
    assert banned == "no live replica holds layer 2"


class _FakeTransport:
    """Just what _FrameReader touches (unit test: no socket)."""

    def __init__(self):
        self.aborted = False
        self.proto = _FakeStreamProtocol()

    def get_protocol(self):
        return self.proto

    def abort(self):
        self.aborted = True


class _FakeStreamProtocol:
    def __init__(self):
        self.calls = []

    def pause_writing(self):
        self.calls.append("pause")

    def resume_writing(self):
        self.calls.append("resume")

    def connection_lost(self, exc):
        self.calls.append("lost")


def test_frame_reader_parses_split_and_joined_frames_and_drops_bad_ones():
    """The ingress's answer reader: frames split at any byte or several in one read come
    out whole and in order, bytes buffered before it took over come first; an oversized
    length prefix or a header that is not JSON aborts the connection (no partial frame is
    delivered); flow control and loss reach the stream protocol and the client."""
    from offramp.deployments.channel import _FrameReader, _Packer, encode

    frames = []
    lost = []
    p = _Packer()
    t_ref = p.tensor(torch.arange(6, dtype=torch.float32))
    wire = encode({"id": 1, "x": t_ref}, p) + encode({"id": 2, "ok": True}) + encode({"id": 3})
    tr = _FakeTransport()
    r = _FrameReader(tr, lambda h, pl: frames.append((h, bytes(pl))), lambda: lost.append(1), pending=wire[:5])
    for i in range(5, len(wire), 7):  # 7-byte reads, across frame borders
        r.data_received(wire[i:i + 7])
    assert [h["id"] for h, _ in frames] == [1, 2, 3]
    from offramp.deployments.channel import unpack_tensor
    assert torch.equal(unpack_tensor(memoryview(frames[0][1]), frames[0][0]["x"]), torch.arange(6, dtype=torch.float32))
    r.pause_writing()
    r.resume_writing()
    r.connection_lost(None)
    assert tr.proto.calls == ["pause", "resume", "lost"] and lost == [1]

    for bad in (struct.pack("!II", 1 << 31, 4) + b"{}{}",  # longer than any frame may be
                struct.pack("!II", 3, 3) + b"{x}"):  # not JSON
        frames.clear()
        tr = _FakeTransport()
        r = _FrameReader(tr, lambda h, pl: frames.append(h), lambda: None)
        r.data_received(bad + encode({"id": 9}))
        assert tr.aborted and frames == []
