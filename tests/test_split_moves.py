"""Split-point moves without a stop: a replica entered inside its layer range, routing by
layer, and the two-phase (grow, then shrink) boundary move on real stage channels.

The pipeline part runs real :class:`StageServer` replicas on local threads and a real
:class:`PipelineBackend`; only the registry is a list (no Ray), so every step of a split
move can be staged exactly: old and new replicas side by side, then the old ones gone.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from offramp import errors
from offramp.cluster.records import StageRecord
from offramp.deployments.channel import StageServer
from offramp.deployments.config import parse_layers, stage_range
from offramp.deployments.pipeline import PipelineBackend, Router
from offramp.ops.checkpoint import load_spec
from offramp.ops.stage import load_stage
from offramp.ops.worker import ExitPolicy, KVMissing, StageWorker, StepRow
from offramp.protocol import GenerationRequest, SamplingParams

OFF = ExitPolicy("off")


def _worker(model_dir, rng, index, num_stages):
    spec = load_spec(model_dir)
    stage = load_stage(model_dir, spec, rng, first=rng[0] == 0, last=rng[1] == spec.num_layers, exits=None)
    return StageWorker(stage, index, num_stages, None, max_slots=8)


def _run_chain(workers_and_entries, prompt):
    """Hidden state / token of one prefill through (worker, entry layer) hops."""
    x = torch.tensor(prompt)
    for w, layer in workers_and_entries:
        (res,) = w.step([StepRow("s", x, len(prompt) - 1, policy=OFF, layer=layer)])
        if res.token is not None:
            return res.token
        x = res.hidden
    raise AssertionError("no token")


def test_entering_a_stage_inside_its_range_matches_the_plain_split(tiny_model_dir):
    L = load_spec(tiny_model_dir).num_layers  # 4
    prompt = [5, 9, 17, 3, 44, 2]
    full = _run_chain([(_worker(tiny_model_dir, (0, L), 0, 1), None)], prompt)
    plain = _run_chain([(_worker(tiny_model_dir, (0, 2), 0, 2), None), (_worker(tiny_model_dir, (2, L), 1, 2), None)],
                       prompt)
    # Stage0 already grown to 0-2, the old Stage1 (layers 1-3) entered at layer 3: the
    # state the router builds half-way through a boundary move 1 -> 3.
    grown = _run_chain([(_worker(tiny_model_dir, (0, 3), 0, 2), None), (_worker(tiny_model_dir, (1, L), 1, 2), 3)],
                       prompt)
    assert full == plain == grown

    # Hidden states agree to float precision, not just the argmax.
    a0, b0 = _worker(tiny_model_dir, (0, 3), 0, 2), _worker(tiny_model_dir, (0, 2), 0, 2)
    mid, plain1 = _worker(tiny_model_dir, (1, L - 1), 1, 3), _worker(tiny_model_dir, (2, L - 1), 1, 3)
    x = torch.tensor(prompt)
    (h3,) = a0.step([StepRow("s", x, len(prompt) - 1, policy=OFF)])
    (h2,) = b0.step([StepRow("s", x, len(prompt) - 1, policy=OFF)])
    (via_plain,) = plain1.step([StepRow("s", h2.hidden, len(prompt) - 1, policy=OFF)])
    assert torch.allclose(h3.hidden, via_plain.hidden, atol=1e-5)
    (r,) = mid.step([StepRow("s", h2.hidden, len(prompt) - 1, policy=OFF, layer=2)])
    assert torch.allclose(r.hidden, via_plain.hidden, atol=1e-5)
    assert mid.entry == {"s": 1}


def test_entry_errors_are_clear_and_mixed_entries_batch(tiny_model_dir):
    first = _worker(tiny_model_dir, (0, 3), 0, 2)
    with pytest.raises(errors.BadRequest, match="entered at layer 0 only"):
        first.step([StepRow("a", torch.tensor([1, 2]), 1, policy=OFF, layer=1)])
    w = _worker(tiny_model_dir, (1, 4), 1, 2)
    h = torch.randn(3, load_spec(tiny_model_dir).hidden_size)
    with pytest.raises(errors.BadRequest, match="holds layers 1-3"):
        w.step([StepRow("a", h, 2, policy=OFF, layer=4)])
    # one batch, two entry layers: one pass per entry layer, results in row order
    out = w.step([StepRow("x", h, 2, policy=OFF, layer=2), StepRow("y", h, 2, policy=OFF)])
    assert [r.seq_id for r in out] == ["x", "y"] and w.entry == {"x": 1, "y": 0}
    ref = _worker(tiny_model_dir, (2, 4), 1, 2).step([StepRow("x", h, 2, policy=OFF)])
    assert out[0].token == ref[0].token
    # a sequence that entered at layer 2 cannot continue at layer 1 (its KV starts at 2)
    with pytest.raises(KVMissing, match="replay"):
        w.step([StepRow("x", h[:1], 3, policy=OFF, layer=1)])
    w.release("x")
    assert "x" not in w.entry


def test_stage_layers_override_is_validated():
    assert parse_layers("3:6") == (3, 6)
    assert stage_range((0, 4), 0, 2, 8, None) == (0, 4)
    assert stage_range((0, 4), 0, 2, 8, "0:5") == (0, 5)
    for bad, msg in [("3-6", "start:end"), ("5:5", "start < end"), ("0:9", "8 layers")]:
        with pytest.raises(ValueError, match=msg):
            stage_range((0, 4), 0, 2, 8, bad)
    with pytest.raises(ValueError, match="Stage0 must start at layer 0"):
        stage_range((0, 4), 0, 2, 8, "1:4")
    with pytest.raises(ValueError, match="must end at layer 8"):
        stage_range((4, 8), 1, 2, 8, "4:7")


class _Replicas:
    """Stage replicas on local threads plus the registry's endpoint list."""

    def __init__(self, model_dir):
        self.model_dir, self.spec = model_dir, load_spec(model_dir)
        self.servers: dict[str, StageServer] = {}
        self.entries: list[dict] = []

    def add(self, name: str, index: int, rng: tuple[int, int], num_stages: int = 2,
            link_delay_s: float = 0.0) -> StageServer:
        srv = StageServer(_worker(self.model_dir, rng, index, num_stages), "tok", batch_wait_timeout_s=0.0,
                          link_delay_s=link_delay_s)
        self.servers[name] = srv
        self.entries.append(StageRecord(index, name, "127.0.0.1", srv.port, tuple(rng)))
        return srv

    def remove(self, name: str) -> None:
        self.entries = [e for e in self.entries if e.replica != name]
        self.servers.pop(name).close()

    async def lookup(self):
        return {"epoch": "e", "endpoints": list(self.entries)}

    def close(self):
        for s in self.servers.values():
            s.close()


def _backend(reps: _Replicas) -> PipelineBackend:
    router = Router(2, "tok", reps.lookup, num_layers=reps.spec.num_layers)
    return PipelineBackend(2, router, eos_token_ids=(), max_seq=128, vocab_size=reps.spec.vocab_size,
                           request_timeout_s=30)


def _request(i: int, n: int) -> GenerationRequest:
    return GenerationRequest(f"r{i}", (5 + i, 9, 17, 3 + i), SamplingParams(max_tokens=n, ignore_eos=True),
                             exit_mode="off")


async def _collect(backend, req, on_token=None):
    out = []
    async for ev in backend.generate(req):
        out.append(ev.token_id)
        if on_token is not None:
            await on_token(len(out))
    return out


@pytest.mark.parametrize("old,new", [(2, 3), (2, 1)], ids=["boundary-right", "boundary-left"])
def test_split_move_keeps_every_sequence_and_its_tokens(tiny_model_dir, old, new):
    """Boundary ``old -> new`` between Stage0 and Stage1 while 3 sequences stream: the
    side that gains layers is replaced first (both chains stay complete), then the other;
    every sequence finishes with exactly the tokens of the unmoved pipeline."""
    L = load_spec(tiny_model_dir).num_layers
    n = 14

    async def scenario():
        reps = _Replicas(tiny_model_dir)
        reps.add("s0", 0, (0, old))
        reps.add("s1", 1, (old, L))
        backend = _backend(reps)
        try:
            reference = [await _collect(backend, _request(i, n)) for i in range(3)]
            phase, late_running = asyncio.Event(), asyncio.Event()

            async def mover(count):
                if count != 4:
                    return
                grow, shrink = ("s0", "s1") if new > old else ("s1", "s0")
                idx = {"s0": 0, "s1": 1}
                rng = {"s0": (0, new), "s1": (new, L)}
                # 1) make: the growing side's new replica joins; 2) break: its old one goes
                reps.add(grow + "'", idx[grow], rng[grow])
                await backend.router.refresh()
                await asyncio.sleep(0.05)
                reps.remove(grow)
                await backend.router.refresh()
                phase.set()
                await late_running.wait()
                # 3)-4) the shrinking side, the same way
                reps.add(shrink + "'", idx[shrink], rng[shrink])
                await backend.router.refresh()
                await asyncio.sleep(0.05)
                reps.remove(shrink)
                await backend.router.refresh()

            late_entry, mid_entries = None, []

            async def seen(count):
                if count == 2:  # the late sequence entered one replica inside its range
                    mid_entries.extend(v for s in reps.servers.values() for v in s.worker.entry.values() if v)
                    late_running.set()

            async def late():
                nonlocal late_entry
                await phase.wait()  # starts between the two phases: must use a mid-range entry
                late_entry = await _collect(backend, _request(1, n), seen)

            results = await asyncio.gather(_collect(backend, _request(0, n), mover), _collect(backend, _request(1, n)),
                                           _collect(backend, _request(2, n)), late())
            assert results[:3] == reference
            assert late_entry == reference[1]
            assert mid_entries and set(mid_entries) == {abs(new - old)}
            assert sorted(e.layers for e in reps.entries) == [(0, new), (new, L)]
            # after the move every sequence runs the plain new split
            assert await _collect(backend, _request(2, n)) == reference[2]
            for srv in reps.servers.values():
                assert set(srv.worker.entry.values()) <= {0}
        finally:
            reps.close()

    asyncio.run(scenario())


def test_router_prefers_a_replica_starting_at_the_layer(tiny_model_dir):
    async def lookup():
        return {"epoch": "e", "endpoints": [StageRecord(0, "a", "h", 1, (0, 3)), StageRecord(1, "b", "h", 2, (2, 4)),
                                            StageRecord(1, "c", "h", 3, (3, 4))]}

    r = Router(2, "tok", lookup, num_layers=4)
    asyncio.run(r.refresh())
    assert r.pick(0).replica == "a"
    assert r.pick(3).replica == "c"  # starts at 3: preferred over entering b inside its range
    assert r.pick(2).replica == "b"
    r.ban(r.pick(3))
    assert r.pick(3).replica == "b"  # the fallback while c is gone
    with pytest.raises(errors.StageUnavailable, match="layer 1"):
        r.pick(1)  # only the first stage holds layer 1, and it is entered with token ids


def test_startup_profile_times_bare_layers_and_leaves_no_trace(tiny_model_dir):
    w = _worker(tiny_model_dir, (1, 3), 1, 3)
    samples = w.profile(batches=(1, 4, 16), context=32, repeats=2)
    # 16 capped at the replica's 8 KV slots; all 2 layers and the last one alone
    assert [(s["batch"], s["layers"]) for s in samples] == [(1, 1), (1, 2), (4, 1), (4, 2), (8, 1), (8, 2)]
    assert all(s["context"] == 32 and s["seconds"] > 0 for s in samples)
    assert w.cache.free_slots() == 8 and not w.cache.slot_of and not w.entry and not w.pending
    # the replica serves exactly as before
    h = torch.randn(3, load_spec(tiny_model_dir).hidden_size)
    ref = _worker(tiny_model_dir, (1, 3), 1, 3).step([StepRow("a", h, 2, policy=OFF)])[0].hidden
    assert torch.allclose(w.step([StepRow("a", h, 2, policy=OFF)])[0].hidden, ref)


def test_stage_threads_order_of_precedence():
    from offramp.deployments.config import StageArgs, stage_threads

    assert stage_threads(3, "2", 0.5) == 3  # the stage's own setting wins
    assert stage_threads(None, "2", 0.5) == 2  # then OMP_NUM_THREADS (Ray sets it from num_cpus)
    assert stage_threads(None, None, 2.7) == 2  # then the CPUs reserved, rounded down
    assert stage_threads(None, "0", 0.5) == 1  # never 0 threads
    assert stage_threads(None, "x", None) is None  # nothing known: torch's default
    with pytest.raises(ValueError):
        StageArgs(threads=0)


def test_micro_batches_default_follows_the_stage_count():
    from offramp.deployments.config import AppArgs, default_micro_batches

    assert AppArgs().micro_batches is None
    assert default_micro_batches(None, 1) == 1  # one stage: nothing to overlap, one pass of every sequence
    assert default_micro_batches(None, 2) == 2 and default_micro_batches(None, 4) == 2
    assert default_micro_batches(3, 1) == 3  # an explicit setting wins
    with pytest.raises(ValueError):
        AppArgs(micro_batches=0)
