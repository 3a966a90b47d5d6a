"""The fault and soak benches' bookkeeping (the runs themselves start a cluster: they
are commands, measured in docs/reliability.md)."""
from __future__ import annotations

from offramp.bench.faults import Outcome, _window
from offramp.bench.soak import knee, window_stats


def test_fault_window_counts_by_end_time_and_keeps_errors():
    outs = [Outcome(0, 0.0, 1.0, "ok"), Outcome(1, 0.5, 2.5, "failed", "SSE error: x"),
            Outcome(2, 2.0, 3.0, "wrong", "'a' != 'b'"), Outcome(3, 1.0, 9.0, "hung", "no end"),
            Outcome(4, 5.0, 6.0, "ok")]
    outs[4].max_gap = 1.7
    w = _window(outs, 2.0, 6.0)
    assert (w["ok"], w["wrong"], w["failed"], w["hung"]) == (1, 1, 1, 0)
    assert w["errors"] == ["failed: SSE error: x", "wrong: 'a' != 'b'"]
    assert (w["paused_over_1s"], w["longest_pause_s"]) == (1, 1.7)


def test_tpot_and_soak_windows():
    o = Outcome(0, 0.0, 3.0, "ok", first=1.0, chunks=5)
    assert o.tpot_s == 0.5  # 4 gaps after the first token over 2 s
    assert Outcome(0, 0.0, 1.0, "ok", first=0.5, chunks=1).tpot_s is None
    outs = [o, Outcome(1, 0.0, 3.5, "failed"), Outcome(2, 0.0, 10.0, "ok", first=9.0, chunks=3)]
    assert window_stats(outs, 0.0, 5.0) == {"requests": 2, "errors": 1, "tpot_ms_p99": 500.0}


def test_knee_is_where_more_streams_stop_paying():
    assert knee([(1, 2.0), (2, 3.9), (4, 6.0), (8, 6.3), (16, 6.5)]) == (4, 6.0)
    assert knee([(1, 2.0), (2, 1.5)]) == (1, 2.0)
    assert knee([(1, 2.0), (2, 4.0), (4, 8.0)]) == (4, 8.0)
