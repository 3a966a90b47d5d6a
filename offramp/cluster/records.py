"""Typed records of what crosses the control plane (Ray actor calls, registry entries), so
readers use attributes instead of re-parsing keys.

* :class:`StageStats` is what a stage replica's heartbeat publishes (``StageDeployment
  .beat_stats``): cumulative counters since the replica started, and gauges. The registry
  parses it once (:meth:`StageStats.from_dict`); a key the replica did not send (an older
  replica, one that has not stepped yet) reads as its default.
* :class:`StageRecord` is a stage replica's registry entry: where its channel listens,
  which layers it holds, its pool, device, precision and start-up profile, and its last
  heartbeat (``seen``, ``stats``). The ingress routes on it, the placement controller
  reads load and profiles from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

_FLOATS = {"busy_s", "decode_s", "prefill_s", "kv_occupancy", "wait_s", "max_wait_s", "memory_headroom_bytes"}


@dataclass
class StageStats:
    busy_s: float | None = None  # forward-pass seconds (None: not reported, so no rate yet)
    batches: int = 0  # forward passes
    rows: int = 0  # rows over all passes
    positions: int = 0  # positions over all passes
    decode_batches: int = 0  # passes of one position per row, and their seconds
    decode_s: float = 0.0
    prefill_batches: int = 0  # the other passes, their seconds and positions
    prefill_s: float = 0.0
    prefill_positions: int = 0
    sequences: int = 0  # gauge: sequences holding KV
    kv_occupancy: float = math.nan  # gauge: share of KV slots in use
    queue: int = 0  # gauge: frames waiting for the batcher
    wait_s: float = 0.0  # queue wait summed over rows, and the rows
    waited_rows: int = 0
    reclaimed: int = 0  # sequences whose KV lease expired
    batch_errors: int = 0  # whole-batch failures retried row by row
    peers_cut: int = 0  # connections cut for not reading their replies
    max_wait_s: float | None = None  # longest queue wait since the previous beat
    memory_headroom_bytes: float | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "StageStats":
        kw = {}
        for f in fields(cls):
            v = (d or {}).get(f.name)
            if v is not None:
                kw[f.name] = float(v) if f.name in _FLOATS else int(v)
        return cls(**kw)


@dataclass
class StageRecord:
    stage: int
    replica: str  # Serve's replica id
    host: str = ""  # the stage channel's listener
    port: int = 0
    layers: tuple[int, int] | None = None  # [start, end) it holds; None: not said
    pool: str = "any"  # the pool_<name> resource it was placed with
    device: str = "cpu"
    dtype: str = "fp32"  # precision of its layers
    profile: tuple[dict, ...] = ()  # start-up step times (placement.cost_model.ProfileSample fields)
    seen: float = 0.0  # registry clock of its last register / heartbeat
    stats: StageStats = field(default_factory=StageStats)  # its last heartbeat
