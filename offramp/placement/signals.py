"""Per-stage-replica load signals: the typed record the placement controller builds from
the stage replicas' heartbeat counters (``controller.SignalCollector``), and their sum per
stage (pure).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class StageSignals:
    """Aggregated signals of one stage replica over the last ``window_s`` seconds.

    Times in seconds, rates per second, memory in bytes. ``nan`` when nothing was seen.
    """

    stage: int  # stage index in the current placement
    replica: str  # replica id (Serve replica tag)
    window_s: float  # length of the window these figures cover
    prefill_step_s: float  # mean wall time of one prefill step
    decode_step_s: float  # mean wall time of one decode step
    batch_size: float  # mean rows per decode step
    tokens_per_s: float  # decode rows finished per second at this replica
    arrival_tokens_per_s: float  # post-exit decode tokens arriving at this stage per second
    prefill_tokens_per_s: float  # prompt tokens processed per second
    busy_fraction: float  # share of the window spent inside steps
    queue_len: float  # latest queue length (gauge)
    oldest_wait_s: float  # longest queue wait of a step in the replica's last heartbeat period
    kv_occupancy: float  # latest fraction of KV slots in use (gauge)
    memory_headroom_bytes: float  # latest free device memory (gauge)
    hop_s: float  # mean time of the hop into this stage
    steps: int  # decode steps in the window

    def to_dict(self) -> dict:
        return asdict(self)


def stage_arrival_rates(signals: list[StageSignals]) -> dict[int, float]:
    """Total post-exit decode arrival rate per stage, summed over its replicas."""
    out: dict[int, float] = {}
    for s in signals:
        if not math.isnan(s.arrival_tokens_per_s):
            out[s.stage] = out.get(s.stage, 0.0) + s.arrival_tokens_per_s
    return dict(sorted(out.items()))
