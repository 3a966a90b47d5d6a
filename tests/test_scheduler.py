"""The ingress step scheduler (``PipelineBackend``): many sequences share one frame per
stage replica per step, micro-batches run concurrently, and none of that changes a token.

Stage replicas are real :class:`StageServer` threads on loopback; the reference is the
unsplit in-process model."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from offramp import errors
from offramp.ops.engine import StagedModel
from offramp.ops.worker import ExitPolicy
from offramp.protocol import GenerationRequest, SamplingParams

from test_reliability import _backend, _held, _kv_slots, _two_stages, _until
from test_split_moves import _Replicas


def _prompt(i: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(i)
    return tuple(torch.randint(3, 500, (3 + i % 5,), generator=g).tolist())  # ragged lengths


def _req(i: int, n: int = 10, **sampling) -> GenerationRequest:
    return GenerationRequest(f"q{i}", _prompt(i), SamplingParams(max_tokens=n, ignore_eos=True, **sampling),
                             exit_mode="off")


async def _tokens(backend, req, delay: float = 0.0):
    await asyncio.sleep(delay)
    return [ev.token_id async for ev in backend.generate(req)]


def test_concurrent_sequences_share_frames_and_match_the_unsplit_model(tiny_model_dir):
    """Eight streams, joining at different times and with prompts of different lengths:
    every output equals the unsplit model's, and the rows really travelled together
    (fewer frames than stage calls, more than one row per scheduler step)."""
    whole = StagedModel(tiny_model_dir, num_stages=1)
    ref = [whole.generate([list(_prompt(i))], SamplingParams(max_tokens=10, ignore_eos=True),
                          ExitPolicy("off"))[0].generated for i in range(8)]

    async def scenario(micro_batches):
        reps = _two_stages(tiny_model_dir)
        try:
            backend = _backend(reps, micro_batches=micro_batches)
            outs = await asyncio.gather(*(_tokens(backend, _req(i), delay=0.003 * i) for i in range(8)))
            return outs, backend.stats()
        finally:
            reps.close()

    for micro_batches in (1, 2):
        outs, stats = asyncio.run(scenario(micro_batches))
        assert outs == ref, micro_batches
        assert stats["stage_calls"] == [80, 80]
        assert all(f < c for f, c in zip(stats["stage_frames"], stats["stage_calls"])), stats
        assert stats["rows_per_step"] > 1.5, stats


def test_sampled_streams_are_reproducible_whatever_they_are_batched_with(tiny_model_dir):
    """Seeded sampling (min-p and top-k over the wire too): a stream's tokens do not depend
    on which other rows share its frames, and equal the unsplit model's seeded sample."""
    sampled = dict(temperature=0.9, top_k=50, min_p=0.8, seed=7)
    whole = StagedModel(tiny_model_dir, num_stages=1)

    def unsplit(**kw):
        return whole.generate([list(_prompt(3))], SamplingParams(max_tokens=10, ignore_eos=True, **kw),
                              ExitPolicy("off"))[0]

    ref = unsplit(**sampled)
    assert ref.generated != unsplit(**{**sampled, "min_p": 0.0}).generated  # min_p matters here

    async def scenario():
        reps = _two_stages(tiny_model_dir)
        try:
            backend = _backend(reps)
            alone = await _tokens(backend, _req(3, **sampled))
            crowd = await asyncio.gather(*(_tokens(backend, _req(i, **(sampled if i == 3 else {})))
                                           for i in range(6)))
            return alone, crowd[3]
        finally:
            reps.close()

    alone, crowded = asyncio.run(scenario())
    assert alone == crowded == ref.generated


def test_a_stream_cancelled_mid_step_is_released_and_the_others_finish(tiny_model_dir):
    """A client leaving after two tokens: its sequence leaves its micro-batch after the
    step it was in and its KV is freed on both stages; the streams beside it finish with
    the tokens they would have had alone."""
    async def scenario():
        reps = _two_stages(tiny_model_dir)
        try:
            backend = _backend(reps)
            solo = [await _tokens(backend, _req(i, n=12)) for i in (1, 2)]

            async def leaver():
                gen = backend.generate(_req(0, n=40))
                got = []
                async for ev in gen:
                    got.append(ev.token_id)
                    if len(got) == 2:
                        break
                await gen.aclose()
                return got

            results = await asyncio.gather(leaver(), _tokens(backend, _req(1, n=12)), _tokens(backend, _req(2, n=12)))
            await _until(lambda: all(not s.worker.cache.slot_of for s in reps.servers.values()), timeout=10)
            return solo, results, backend
        finally:
            reps.close()

    solo, (left, one, two), backend = asyncio.run(scenario())
    assert len(left) == 2 and [one, two] == solo
    assert backend.replays == 0 and not backend._live
    assert sum(len(lane.seqs) for lane in backend.lanes) == 0


def test_a_frame_the_ingress_marks_full_does_not_wait_out_the_batch_window(tiny_model_dir):
    """With a long batch window and sequences live on the stage that are not in the frame
    (they are at the other stage), a 'full' frame is served at once, an unmarked one waits."""
    from offramp.deployments.channel import StageClient
    from offramp.ops.worker import StepRow

    reps = _two_stages(tiny_model_dir)
    srv = reps.servers["s0"]
    srv.batch_wait = 0.5

    async def scenario():
        client = StageClient("127.0.0.1", srv.port, "tok")
        try:
            for s in ("idle-a", "idle-b"):  # live sequences that send nothing now
                await client.step([StepRow(s, torch.tensor([5, 9]), 1)], timeout=10, full=True)
            times = {}
            for full in (True, False):
                t0 = time.perf_counter()
                await client.step([StepRow(f"x{full}", torch.tensor([5, 9]), 1)], timeout=10, full=full)
                times[full] = time.perf_counter() - t0
            return times
        finally:
            client.close()

    try:
        times = asyncio.run(scenario())
    finally:
        reps.close()
    assert times[True] < 0.25 <= times[False], times


# -- waiting for a KV slot --------------------------------------------------------------------
def test_a_burst_beyond_the_stages_kv_waits_its_turn_and_matches_the_unsplit_model(tiny_model_dir):
    """Seven requests at once against a last stage with 2 KV slots: none gets 429; the five
    that find no slot wait and start in arrival order (one lane: first tokens in that
    order), every output equals the unsplit model's, and nothing stays held or queued."""
    whole = StagedModel(tiny_model_dir, num_stages=1)
    ref = [whole.generate([list(_prompt(i))], SamplingParams(max_tokens=10, ignore_eos=True),
                          ExitPolicy("off"))[0].generated for i in range(7)]

    async def scenario():
        reps = _two_stages(tiny_model_dir)
        _kv_slots(reps.servers["s1"].worker, 2)
        try:
            backend = _backend(reps, micro_batches=1)
            firsts: list[int] = []

            async def run(i):
                await asyncio.sleep(0.002 * i)  # arrival order 0..6
                out = []
                async for ev in backend.generate(_req(i)):
                    if not out:
                        firsts.append(i)
                    out.append(ev.token_id)
                return out

            outs = await asyncio.gather(*(run(i) for i in range(7)))
            await _until(lambda: not any(_held(reps).values()), timeout=10)
            return outs, firsts, backend.stats()
        finally:
            reps.close()

    outs, firsts, stats = asyncio.run(scenario())
    assert outs == ref
    assert firsts[2:] == sorted(firsts[2:]), firsts  # the waiting ones in arrival order
    assert stats["kv_waits"] >= 5 and stats["waiting_for_kv"] == 0, stats
    assert stats["replays"] == 0, stats


def test_a_request_waiting_for_kv_past_its_deadline_gets_overloaded_and_a_leaver_leaves_the_queue(tiny_model_dir):
    """Slots held by two slow streams (5 ms links, 100 tokens): a waiting request whose deadline passes
    fails with Overloaded naming the fix; one whose client leaves while it waits leaves
    the queue; a patient one gets its slot when a stream ends; nothing stays held."""
    async def scenario():
        reps = _Replicas(tiny_model_dir)
        L = reps.spec.num_layers
        reps.add("s0", 0, (0, L // 2), link_delay_s=0.005)
        _kv_slots(reps.add("s1", 1, (L // 2, L), link_delay_s=0.005).worker, 2)
        try:
            backend = _backend(reps)
            holders = [asyncio.ensure_future(_tokens(backend, _req(i, n=100))) for i in range(2)]
            await _until(lambda: backend.emitted >= 2)
            short = GenerationRequest("short", _prompt(5), SamplingParams(max_tokens=4, ignore_eos=True),
                                      exit_mode="off", deadline_s=0.3)
            short_err = None
            try:
                await _tokens(backend, short)
            except Exception as e:  # noqa: BLE001 - the assertion is about it
                short_err = e

            leaver = backend.generate(_req(6, n=4))
            leaving = asyncio.ensure_future(leaver.__anext__())
            await _until(lambda: backend.stats()["waiting_for_kv"] == 1)
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            await leaver.aclose()
            waiting_after_leave = backend.stats()["waiting_for_kv"]

            patient = await _tokens(backend, _req(7, n=4))
            held = await asyncio.gather(*holders)
            await _until(lambda: not any(_held(reps).values()), timeout=10)
            return short_err, waiting_after_leave, patient, held
        finally:
            reps.close()

    short_err, waiting_after_leave, patient, held = asyncio.run(scenario())
    assert isinstance(short_err, errors.Overloaded) and "KV slot" in str(short_err), short_err
    assert waiting_after_leave == 0
    assert len(patient) == 4 and all(len(h) == 100 for h in held)


@pytest.mark.parametrize("chain", [True, False])
def test_a_frozen_replica_holds_up_only_its_own_sequences(tiny_model_dir, chain):
    """Two replicas of stage 1, one lane for everyone; one replica's event loop freezes for
    3 s mid-generation (a gray failure: alive, not answering). Its frame is detached from
    the step, so the sequences on the other replica keep streaming; the frozen replica's
    own sequences resume when it does (no ban, no replay: 3 s is inside the call timeout),
    and every output equals the unsplit model's."""
    freeze = 3.0
    whole = StagedModel(tiny_model_dir, num_stages=1)
    reqs = [_req(i, n=40) for i in range(6)]
    ref = [whole.generate([list(r.prompt_ids)], r.sampling, ExitPolicy("off"))[0].generated for r in reqs]

    async def scenario():
        reps = _Replicas(tiny_model_dir)
        L = reps.spec.num_layers
        reps.add("s0", 0, (0, L // 2))
        reps.add("s1a", 1, (L // 2, L))
        frozen = reps.add("s1b", 1, (L // 2, L))
        try:
            backend = _backend(reps, micro_batches=1, call_timeout_s=20, chain=chain)
            times: dict[str, list[float]] = {r.request_id: [] for r in reqs}

            async def run(req):
                out = []
                async for ev in backend.generate(req):
                    out.append(ev.token_id)
                    times[req.request_id].append(time.monotonic())
                return out

            tasks = [asyncio.ensure_future(run(r)) for r in reqs]
            await _until(lambda: all(len(t) >= 3 for t in times.values()))
            on_frozen = len(frozen.worker.cache.slot_of)
            frozen.loop.call_soon_threadsafe(time.sleep, freeze)
            outs = await asyncio.gather(*tasks)
            gaps = sorted(max(b - a for a, b in zip(t, t[1:])) for t in times.values())
            return outs, gaps, on_frozen, backend.stats()
        finally:
            reps.close()

    outs, gaps, on_frozen, stats = asyncio.run(scenario())
    assert outs == ref
    assert 0 < on_frozen < 6, "least-loaded routing put sequences on both replicas"
    healthy, stalled = gaps[: 6 - on_frozen], gaps[6 - on_frozen:]
    assert max(healthy) < 1.5, gaps  # before: every sequence of the lane waited out the freeze
    assert min(stalled) > 0.8 * freeze, gaps
    assert stats["detached_rows"] >= on_frozen and stats["replays"] == 0, stats
