"""Hysteresis with the real planner in the loop: a load that swings between needing one
and two replicas, nothing pinned, the default policy. Each scenario also runs with the
rule under test switched off and must then break, so the scenario itself can fail."""
from __future__ import annotations

from offramp.placement.planner import Constraints, Workload, evaluate, plan
from offramp.placement.policy import Policy, PolicyConfig, apply_move

from test_placement_planner import CPU, GPU, M  # the planner tests' model and pools

C = Constraints(tpot_slo_s=0.02)
INTERVAL = 30.0
LOW, HIGH = 1500.0, 3000.0  # one replica at 54% busy / two replicas (one would be 108% busy)


def run(loads: list[float], cfg: PolicyConfig) -> tuple[list[tuple[float, object]], list]:
    """The controller's loop without Ray: each interval, plan for the measured load,
    evaluate the current placement under it (a stage over the busy limit is a breach, as
    the measured busy fraction would be), and let the policy decide. Returns the moves
    that started a transition (completions of a make-before-break are not moves of
    their own) and the final placement."""
    pol = Policy(M.num_layers, cfg)
    state = plan(M, [GPU, CPU], Workload(decode_tokens_per_s=loads[0]), C).deployments()
    moves = []
    for i, load in enumerate(loads):
        w = Workload(decode_tokens_per_s=load)
        target, now = plan(M, [GPU, CPU], w, C), evaluate(M, [GPU, CPU], w, state, C)
        breaches = {(s.start, s.end): f"busy {s.utilisation:.0%}" for s in now.stages
                    if s.utilisation > cfg.max_busy_fraction}
        for d in pol.step(i * INTERVAL, state, target, now, breaches):
            if d.outcome == "apply":
                state = apply_move(state, d.move)
                if "finishing a transition" not in d.reason:
                    moves.append((i * INTERVAL, d.move))
    return moves, state


def gaps(moves) -> list[float]:
    t = [m[0] for m in moves]
    return [b - a for a, b in zip(t, t[1:])]


def swings(n: int, period: int) -> list[float]:
    """``period`` intervals high, ``period`` low, repeated: long enough to sustain a breach."""
    return [HIGH if (i // period) % 2 == 0 else LOW for i in range(n)]


def test_swinging_load_moves_at_most_once_per_cooldown():
    cfg = PolicyConfig()  # the defaults: sustain 3 intervals, min gain 25%, cool-down 300 s
    loads = swings(120, 5)  # one hour; each phase 150 s (< the cool-down)
    moves, _ = run(loads, cfg)
    assert len(moves) >= 2  # it does follow the load
    assert all(g >= cfg.cooldown_s for g in gaps(moves)), gaps(moves)
    assert len(moves) <= 120 * INTERVAL / cfg.cooldown_s + 1
    # the same load without the cool-down flaps with every phase
    flappy, _ = run(loads, cfg.model_copy(update={"cooldown_s": 0.0}))
    assert len(flappy) > len(moves) and min(gaps(flappy)) < cfg.cooldown_s


def test_short_bursts_do_not_move_and_a_sustained_shift_does():
    cfg = PolicyConfig()
    bursts = [HIGH if i % 10 == 5 else LOW for i in range(60)]  # one interval high in ten
    moves, state = run(bursts, cfg)
    assert moves == [] and [d.replicas for d in state] == [1]
    # without the gain/sustain rule every burst scales up (and the next quiet interval down)
    no_rule = cfg.model_copy(update={"sustain_intervals": 1, "min_gain": 0.0})
    assert len(run(bursts, no_rule)[0]) >= 2
    # a lasting shift is acted on, once, after the breach has been sustained
    shift = [LOW] * 10 + [HIGH] * 20
    moves, state = run(shift, cfg)
    assert len(moves) == 1 and moves[0][0] == (10 + cfg.sustain_intervals - 1) * INTERVAL
    assert [d.replicas for d in state] == [2]
    # and back down when it ends (a cost gain of 50% acts at once, after the cool-down)
    moves, state = run(shift + [LOW] * 20, cfg)
    assert len(moves) == 2 and [d.replicas for d in state] == [1]
