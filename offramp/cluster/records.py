"""Typed records of what crosses the control plane (Ray actor calls, registry entries), so
readers use attributes instead of re-parsing keys.

* :class:`StageStats` is what a stage replica's heartbeat publishes (``StageDeployment
  .beat_stats``): cumulative counters since the replica started, and gauges. The registry
  parses it once (:meth:`StageStats.from_dict`); a key the replica did not send (an older
  replica, one that has not stepped yet) reads as its default.
* :class:`IngressTotals` is what the placement controller reads of the ingress: every live
  ingress replica's heartbeat combined by the registry, or one replica's
  ``GET /v1/offramp/stats`` (:meth:`IngressTotals.from_dict`, unknown keys ignored).
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


@dataclass
class IngressTotals:
    stage_calls: list[int] = field(default_factory=list)  # cumulative stage calls, per stage
    # cumulative forward passes per stage (stage 0's drafting passes counted); None unless
    # every replica reports them
    stage_passes: list[int] | None = None
    hop_s_sum: list[float] | None = None  # cumulative round-trip seconds per stage, and their count
    hop_n: list[int] | None = None
    tokens: int = 0  # TTFT + TPOT samples in the replicas' windows
    tokens_emitted: int | None = None  # cumulative tokens streamed (None unless every replica reports it)
    replays: int = 0
    replicas: int = 1  # ingress replicas combined
    # latency over the replicas' windows, ms: the worst replica's (a conservative p99)
    ttft_ms_p50: float | None = None
    ttft_ms_p99: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p99: float | None = None
    request_tpot_ms_mean: float | None = None
    request_tpot_ms_p99: float | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stage_calls)

    @classmethod
    def from_dict(cls, d: dict | None) -> "IngressTotals | None":
        if not d:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def combine(cls, stats: list[dict]) -> "IngressTotals | None":
        """Ingress heartbeats (``PipelineBackend.stats``) combined: counters summed per
        stage (``stage_passes`` only when every replica reports them for every stage),
        latency percentiles the worst replica's."""
        if not stats:
            return None
        n = max(len(s.get("stage_calls", ())) for s in stats)

        def summed(key: str) -> list:
            return [sum(s[key][k] for s in stats if len(s.get(key, ())) == n) for k in range(n)]

        def worst(key: str) -> float | None:
            vals = [s[key] for s in stats if s.get(key) is not None]
            return max(vals) if vals else None

        return cls(stage_calls=summed("stage_calls"), hop_s_sum=summed("hop_s_sum"), hop_n=summed("hop_n"),
                   stage_passes=summed("stage_passes") if all(len(s.get("stage_passes", ())) == n for s in stats)
                   else None,
                   tokens=sum(s.get("tokens", 0) for s in stats), replicas=len(stats),
                   replays=sum(s.get("replays", 0) for s in stats),
                   tokens_emitted=sum(s["tokens_emitted"] for s in stats)
                   if all("tokens_emitted" in s for s in stats) else None,
                   **{k: worst(k) for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99",
                                            "request_tpot_ms_mean", "request_tpot_ms_p99")})
