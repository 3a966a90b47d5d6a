"""Chain forwarding on real stage channels (no Ray): stages send continuing rows straight
on to the next stage, which answers the ingress; outputs are the unchained pipeline's,
the ingress sends no frame to a deep stage once the chain is connected, and a next stage
that goes away costs a replay, not a request."""
from __future__ import annotations

import asyncio

import pytest

from offramp.ops.engine import StagedModel

from test_reliability import _backend, _held, _req, _tokens, _until
from test_split_moves import _Replicas


def _stages(model_dir, n: int, link_delay_s: float = 0.0) -> _Replicas:
    reps = _Replicas(model_dir)
    L = reps.spec.num_layers
    bounds = [L * i // n for i in range(n + 1)]
    for i in range(n):
        reps.add(f"s{i}", i, (bounds[i], bounds[i + 1]), num_stages=n, link_delay_s=link_delay_s)
    return reps


def _backend_n(reps: _Replicas, n: int, link_delay_s: float = 0.0, **kw):
    from offramp.deployments import pipeline as pl

    router = pl.Router(n, "tok", reps.lookup, num_layers=reps.spec.num_layers, link_delay_s=link_delay_s)
    return pl.PipelineBackend(n, router, eos_token_ids=(), max_seq=128, vocab_size=reps.spec.vocab_size,
                              request_timeout_s=30, **kw)


@pytest.mark.parametrize("num_stages", [2, 4])
def test_chained_steps_equal_the_unchained_pipeline_and_the_engine(tiny_model_dir, num_stages):
    reps = _stages(tiny_model_dir, num_stages)
    reqs = [_req(i, 12) for i in range(3)] + [_req(7, 12, temperature=0.9, seed=5)]

    async def run(chain: bool):
        backend = _backend_n(reps, num_stages, chain=chain)
        before = {n: s.forwarded for n, s in reps.servers.items()}
        outs = await asyncio.gather(*(_tokens(backend, r) for r in reqs))
        await _until(lambda: not any(_held(reps).values()))  # every release reached every stage
        return outs, backend, {n: s.forwarded - before[n] for n, s in reps.servers.items()}

    try:
        plain, plain_backend, plain_fwd = asyncio.run(run(False))
        first, _, _ = asyncio.run(run(True))  # opens the stages' connections to their next stages
        chained, backend, fwd = asyncio.run(run(True))
    finally:
        reps.close()
    assert chained == first == plain
    engine = StagedModel(tiny_model_dir, num_stages=1)
    for r, out in zip(reqs[:3], plain):
        assert engine.generate([list(r.prompt_ids)], r.sampling)[0].generated == out
    assert not any(plain_fwd.values())
    tokens = sum(len(o) for o in chained)
    # Connected, every stage but the last forwards every row it does not end; the ingress
    # sends frames to stage 0 only, and still counts every stage's visits.
    assert fwd == {f"s{i}": tokens if i < num_stages - 1 else 0 for i in range(num_stages)}, fwd
    assert backend.hop_n[1:] == [0] * (num_stages - 1) and backend.hop_n[0] == tokens, backend.hop_n
    assert backend.calls == [tokens] * num_stages
    assert plain_backend.hop_n == [tokens] * num_stages


def test_chained_rows_travel_over_the_channels_tls(tiny_model_dir, tmp_path):
    """With channel TLS the stages forward over TLS too (their client context); a stage
    whose next stage refuses its connection (no client certificate) answers rows whole,
    so the output is the same either way."""
    from offramp.cluster.records import StageRecord
    from offramp.deployments import pipeline as pl
    from offramp.deployments.channel import StageServer

    from test_channel_tls import _ca_and_cert
    from test_split_moves import _worker

    tls = _ca_and_cert(tmp_path / "ca", "ours")
    L = 4

    def servers(client_tls: bool):
        return [StageServer(_worker(tiny_model_dir, rng, i, 2), "tok", batch_wait_timeout_s=0.0,
                            ssl_context=tls.server_context(),
                            client_ssl_context=tls.client_context() if client_tls else None)
                for i, rng in enumerate([(0, L // 2), (L // 2, L)])]

    async def run(srvs):
        entries = [StageRecord(i, f"s{i}", "127.0.0.1", s.port, rng)
                   for i, (s, rng) in enumerate(zip(srvs, [(0, L // 2), (L // 2, L)]))]

        async def lookup():
            return {"epoch": "e", "endpoints": entries}

        router = pl.Router(2, "tok", lookup, num_layers=L, ssl_context=tls.client_context())
        backend = pl.PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=512, request_timeout_s=30)
        return await asyncio.gather(*(_tokens(backend, _req(i, 10)) for i in range(2)))

    outs = {}
    for client_tls in (True, False):
        srvs = servers(client_tls)
        try:
            outs[client_tls] = asyncio.run(run(srvs))
            forwarded = srvs[0].forwarded
        finally:
            for s in srvs:
                s.close()
        assert (forwarded > 0) == client_tls, (client_tls, forwarded)
    assert outs[True] == outs[False]


def test_a_next_stage_that_dies_mid_chain_costs_a_replay_not_a_request(tiny_model_dir):
    """Stage 1 has two replicas; one is closed while greedy streams run chained through it.
    The rows forwarded to it fail at the ingress (its connection closes), which replays them
    on the other replica: every request completes with the engine's tokens, and no stage
    holds KV afterwards."""
    reps = _Replicas(tiny_model_dir)
    L = reps.spec.num_layers
    reps.add("s0", 0, (0, L // 2))
    reps.add("s1a", 1, (L // 2, L))
    reps.add("s1b", 1, (L // 2, L))
    reqs = [_req(i, 24) for i in range(4)]

    async def run():
        backend = _backend(reps)
        got = [0]

        async def one(r):
            out = []
            async for ev in backend.generate(r):
                out.append(ev.token_id)
                got[0] += 1
            return out

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        await _until(lambda: got[0] >= 20 and reps.servers["s0"].forwarded > 0)
        reps.remove("s1a")
        outs = await asyncio.gather(*tasks)
        await _until(lambda: not any(_held(reps).values()))
        return outs, backend.replays

    try:
        outs, replays = asyncio.run(run())
    finally:
        reps.close()
    engine = StagedModel(tiny_model_dir, num_stages=1)
    for r, out in zip(reqs, outs):
        assert out == engine.generate([list(r.prompt_ids)], r.sampling)[0].generated
    assert replays >= 1  # the sequences that were on s1a moved


def test_a_chain_a_stage_cannot_follow_leaves_the_row_whole(tiny_model_dir):
    """A malformed chain, or one naming a next stage nobody listens on, never fails the row:
    the stage answers it whole (hidden states back to the ingress), and it does not try an
    unreachable next stage again on every step."""
    import socket

    import torch

    from offramp.deployments import channel as ch
    from offramp.deployments.channel import ChainHop, StageClient, StageServer
    from offramp.ops.worker import ExitPolicy, StepRow

    from test_split_moves import _worker

    srv = StageServer(_worker(tiny_model_dir, (0, 2), 0, 2), "tok", batch_wait_timeout_s=0.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def run():
        client = StageClient("127.0.0.1", srv.port, "tok", key="ingress-1")
        try:
            packer = ch._Packer()
            bad = ch.row_header(StepRow("a", torch.tensor([5, 9, 17]), 2), packer)
            bad["chain"] = [{"fid": "x", "host": None}]
            reply, payload = await client.call({"op": "step", "rows": [bad]}, packer, timeout=10)
            (res,) = [ch.result_from_header(h, payload) for h in reply["results"]]
            assert res.error is None and not res.forwarded and res.hidden is not None
            hop = ChainHop(99, "127.0.0.1", dead_port, None, ExitPolicy("off"))
            attempts = []
            for pos in range(3, 6):  # three steps: the first opens (and fails) the connection
                (res,) = await client.step([StepRow("a", torch.tensor([7]), pos)], timeout=10, chains=[[hop]])
                assert res.error is None and not res.forwarded and res.hidden is not None
                await asyncio.sleep(0.2)
                (opened, _), = srv._hops.values()
                attempts.append(opened)
            assert attempts[0].broken and all(a is attempts[0] for a in attempts)  # not tried again at once
            await client.release(["a"])
        finally:
            client.close()

    try:
        asyncio.run(run())
    finally:
        srv.close()
    assert srv.forwarded == 0


def test_an_emulated_link_delays_every_message_and_chains_cross_fewer(tiny_model_dir):
    """``AppArgs.emulate_link_ms``: every message on a stage channel (ingress to stage,
    stage to stage, stage to ingress) arrives that much late; tokens are unchanged. A token
    crosses 2N links unchained and N + 1 chained, so each run takes at least that many
    delays per token (lower bounds only: the delays add to compute, never replace it)."""
    import time

    delay, n, new = 0.03, 2, 5
    reps = _stages(tiny_model_dir, n, link_delay_s=delay)
    req = _req(1, new)

    async def run(chain: bool):
        backend = _backend_n(reps, n, link_delay_s=delay, chain=chain)
        await _tokens(backend, _req(2, 2))  # chained: the stages' connections to their next open here
        before, t0 = list(backend.hop_n), time.perf_counter()
        out = await _tokens(backend, req)
        return out, time.perf_counter() - t0, [a - b for a, b in zip(backend.hop_n, before)]

    try:
        plain, plain_s, plain_hops = asyncio.run(run(False))
        chained, chained_s, hops = asyncio.run(run(True))
    finally:
        reps.close()
    engine = StagedModel(tiny_model_dir, num_stages=1)
    assert plain == chained == engine.generate([list(req.prompt_ids)], req.sampling)[0].generated
    assert plain_hops == [new] * n and plain_s >= new * 2 * n * delay, (plain_hops, plain_s)
    assert hops == [new] + [0] * (n - 1), hops  # every row went stage to stage: the s0 -> s1 link is crossed
    assert chained_s >= new * (n + 1) * delay, chained_s
