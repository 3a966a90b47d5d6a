"""The modelled device speed (``AppArgs.emulate_pools``) on a real stage channel.

A replica of an emulated pool must take at least the modelled time per forward pass,
serialise its passes like a busy device, and leave the outputs alone.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from offramp.deployments.channel import StageClient, StageServer
from offramp.deployments.config import AppArgs, EmulatedDevice
from offramp.ops.checkpoint import load_spec
from offramp.ops.stage import load_stage
from offramp.ops.worker import StageWorker, StepRow


def _server(model_dir, emulate: EmulatedDevice | None) -> StageServer:
    spec = load_spec(model_dir)
    stage = load_stage(model_dir, spec, (0, spec.num_layers), first=True, last=True, exits=None)
    worker = StageWorker(stage, 0, 1, None, max_slots=8)
    return StageServer(worker, "tok", batch_wait_timeout_s=0.0, emulate=emulate)


async def _generate(srv: StageServer, seq: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    client = StageClient("127.0.0.1", srv.port, "tok")
    try:
        tokens, times = [], []
        inputs, pos = torch.tensor(prompt), len(prompt) - 1
        for step in range(n):
            t0 = time.perf_counter()
            (res,) = await client.step([StepRow(seq, inputs, pos, step=step)], timeout=30)
            times.append(time.perf_counter() - t0)
            assert 0.0 <= res.hop_s < times[-1]  # the hop is what the server did not spend
            tokens.append(res.token)
            inputs, pos = torch.tensor([res.token]), pos + 1
        return tokens, times
    finally:
        client.close()


def test_emulated_pool_sets_a_floor_on_step_time_and_keeps_outputs(tiny_model_dir):
    prompt = [5, 9, 17, 3]
    plain, emulated = _server(tiny_model_dir, None), _server(tiny_model_dir, EmulatedDevice(step_s=0.05, per_token_s=0.02))
    try:
        ref, _ = asyncio.run(_generate(plain, "a", prompt, 4))
        out, times = asyncio.run(_generate(emulated, "a", prompt, 4))
        assert out == ref  # emulation changes time, never tokens
        assert times[0] >= 0.05 + 0.02 * len(prompt) - 0.005  # prefill: 4 positions
        assert all(t >= 0.07 - 0.005 for t in times[1:])  # decode: 1 position

        # Two sequences at once on one emulated replica: passes are serialised (or batched,
        # paying per position), so together they take longer than one alone.
        async def both():
            t0 = time.perf_counter()
            await asyncio.gather(_generate(emulated, "b", prompt, 3), _generate(emulated, "c", prompt, 3))
            return time.perf_counter() - t0

        emulated.take_max_wait()
        asyncio.run(_generate(emulated, "d", prompt, 3))
        assert emulated.take_max_wait() < 0.03  # one sequence alone never queues behind itself
        assert asyncio.run(both()) >= 3 * (0.05 + 0.02 * 2) - 0.01
        # ... but two do: a row waits for the other's pass - the saturation signal
        assert emulated.take_max_wait() >= 0.04 and emulated.info()["waited_rows"] > 0
    finally:
        plain.close()
        emulated.close()


def test_emulate_pools_config_is_validated():
    args = AppArgs.model_validate({"emulate_pools": {"cpu": {"step_s": 0.01, "per_token_s": 0.002}}})
    assert args.emulate_pools["cpu"].seconds(5) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="emulate_pools"):
        AppArgs.model_validate({"emulate_pools": {"tpu": {"step_s": 0.01}}})
    with pytest.raises(ValueError, match="per_token_s"):
        AppArgs.model_validate({"emulate_pools": {"cpu": {"per_token_s": -1}}})
    assert AppArgs.model_validate({"emulate_link_ms": 2}).emulate_link_ms == 2
    with pytest.raises(ValueError, match="emulate_link_ms"):
        AppArgs.model_validate({"emulate_link_ms": -1})


def test_an_emulated_drafting_stage_pays_every_drafting_pass():
    """A speculative row drafts d tokens inside one channel step: d + 1 forward passes, so an
    emulated replica holds it for d + 1 modelled passes, and its stats count d + 1 passes
    (the placement controller divides busy time by them)."""
    from offramp.ops.engine import StagedModel, resolve_model_dir
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    staged = StagedModel(resolve_model_dir(None), num_stages=2, max_slots=4, max_seq=64)
    calls = []
    srv = StageServer(staged.workers[0], "tok", batch_wait_timeout_s=0.0, emulate=EmulatedDevice(step_s=0.04),
                      stats=lambda *a: calls.append(a))

    async def one():
        client = StageClient("127.0.0.1", srv.port, "tok")
        try:
            row = StepRow("s", torch.tensor([5, 9, 17]), 2, SamplingParams(temperature=0.0),
                          ExitPolicy("speculative", 0.0, max_draft=3), draft=3)
            t0 = time.perf_counter()
            (res,) = await client.step([row], timeout=30)
            return res, time.perf_counter() - t0
        finally:
            client.close()

    try:
        res, took = asyncio.run(one())
    finally:
        srv.close()
    assert res.error is None and len(res.drafts) == 3  # threshold 0: every proposal drafts on
    assert took >= 4 * 0.04 - 0.005  # the chunk's pass and three drafting passes
    rows, positions, _, drafted = calls[-1]
    assert (rows, positions, drafted) == (1, 3, [3])


def test_stage_stats_count_drafting_passes():
    from types import SimpleNamespace

    from offramp.deployments.app import StageDeployment

    fake = SimpleNamespace(steps={k: 0 for k in ("batches", "rows", "positions", "busy_s", "decode_batches", "decode_s",
                                                  "prefill_batches", "prefill_s", "prefill_positions")})
    record = StageDeployment.func_or_class._record
    record(fake, 2, 2, 0.1, [3, 1])  # two rows, one drafted 3 tokens, the other 1: 4 passes
    assert (fake.steps["batches"], fake.steps["rows"], fake.steps["positions"]) == (4, 6, 6)
    assert fake.steps["decode_batches"] == 4 and fake.steps["busy_s"] == pytest.approx(0.1)
    record(fake, 1, 5, 0.2)  # a prefill chunk, no drafts
    assert fake.steps["batches"] == 5 and fake.steps["prefill_positions"] == 5


def test_an_emulated_pool_charges_each_stage_for_its_layers():
    """A pool modelled from a 4-layer stage: a 2-layer stage reads half the weights and
    does half the compute per position, a pass's fixed part is the same; without
    ``layers`` every stage takes the stated times (the older meaning)."""
    dev = EmulatedDevice(step_s=0.01, mem_s=0.02, per_token_s=0.001, layers=4)
    half = dev.for_layers(2)
    assert (half.step_s, half.mem_s, half.per_token_s, half.layers) == (0.01, 0.01, 0.0005, 2)
    assert half.seconds(1) == pytest.approx(0.02) and half.seconds(40) == pytest.approx(0.03)
    assert dev.for_layers(4) is dev and dev.for_layers(8).seconds(1) == pytest.approx(0.05)
    flat = EmulatedDevice(step_s=0.01, mem_s=0.02)
    assert flat.for_layers(2) is flat
    with pytest.raises(ValueError):
        AppArgs.model_validate({"model": "m", "emulate_pools": {"cpu": {"step_s": 0.01, "layers": 0}}})
