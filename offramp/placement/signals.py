"""Per-stage-replica load signals over sliding windows (pure; time is injected).

A stage replica owns one :class:`StageRecorder` and calls ``record_*`` on its data path:
each call is O(1) (a few additions into the current time bucket, no allocation once the
buckets exist).  The controller calls :meth:`StageRecorder.snapshot` once per interval;
aggregation happens there.  One writer per recorder; a reader on another thread may see
a bucket mid-update, which only skews one sample of a sliding mean.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


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


class SlidingWindow:
    """Sum / count / max of one quantity over the last ``window_s`` seconds.

    The window is ``buckets`` time buckets in a ring; ``add`` touches one bucket (O(1)),
    reads sum the live buckets (O(buckets)).  Old buckets are reset lazily when reused.
    """

    __slots__ = ("width", "n", "_epoch", "_sum", "_cnt", "_max")

    def __init__(self, window_s: float = 30.0, buckets: int = 10):
        if window_s <= 0 or buckets < 1:
            raise ValueError(f"SlidingWindow(window_s={window_s}, buckets={buckets}): both must be positive.")
        self.width = window_s / buckets
        self.n = buckets
        self._epoch = [-1] * buckets
        self._sum = [0.0] * buckets
        self._cnt = [0] * buckets
        self._max = [-math.inf] * buckets

    def add(self, now: float, value: float = 1.0) -> None:
        e = int(now // self.width)
        i = e % self.n
        if self._epoch[i] != e:
            self._epoch[i], self._sum[i], self._cnt[i], self._max[i] = e, 0.0, 0, -math.inf
        self._sum[i] += value
        self._cnt[i] += 1
        if value > self._max[i]:
            self._max[i] = value

    def _live(self, now: float) -> list[int]:
        e = int(now // self.width)
        return [i for i in range(self.n) if e - self.n < self._epoch[i] <= e]

    def sum(self, now: float) -> float:
        return sum(self._sum[i] for i in self._live(now))

    def count(self, now: float) -> int:
        return sum(self._cnt[i] for i in self._live(now))

    def mean(self, now: float) -> float:
        live = self._live(now)
        c = sum(self._cnt[i] for i in live)
        return sum(self._sum[i] for i in live) / c if c else math.nan

    def max(self, now: float) -> float:
        m = max((self._max[i] for i in self._live(now)), default=-math.inf)
        return m if m > -math.inf else math.nan

    def rate(self, now: float) -> float:
        """Sum per second over the window (the partly filled current bucket counts in full width)."""
        return self.sum(now) / (self.n * self.width)


@dataclass
class StageRecorder:
    """What one stage replica feeds on its data path. All ``now`` are monotonic seconds."""

    stage: int
    replica: str
    window_s: float = 30.0
    buckets: int = 10
    _w: dict[str, SlidingWindow] = field(init=False, repr=False)
    _gauges: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = ("prefill", "decode", "rows", "arrivals", "prefill_tokens", "busy", "hop")
        self._w = {n: SlidingWindow(self.window_s, self.buckets) for n in names}
        self._gauges = {"queue_len": math.nan, "oldest_wait_s": math.nan,
                        "kv_occupancy": math.nan, "memory_headroom_bytes": math.nan}

    def record_step(self, now: float, kind: str, seconds: float, rows: int) -> None:
        """One forward step finished: ``kind`` 'decode' (rows = batch) or 'prefill' (rows = prompt tokens)."""
        if kind == "decode":
            self._w["decode"].add(now, seconds)
            self._w["rows"].add(now, rows)
        else:
            self._w["prefill"].add(now, seconds)
            self._w["prefill_tokens"].add(now, rows)
        self._w["busy"].add(now, seconds)

    def record_arrival(self, now: float, tokens: int = 1) -> None:
        """Decode tokens arrived at this stage (after upstream exits)."""
        self._w["arrivals"].add(now, tokens)

    def record_hop(self, now: float, seconds: float) -> None:
        """Time of the hop that delivered work to this stage."""
        self._w["hop"].add(now, seconds)

    def set_gauges(self, queue_len: float | None = None, oldest_wait_s: float | None = None,
                   kv_occupancy: float | None = None, memory_headroom_bytes: float | None = None) -> None:
        """Latest values of the instantaneous gauges (None leaves one unchanged)."""
        for k, v in (("queue_len", queue_len), ("oldest_wait_s", oldest_wait_s),
                     ("kv_occupancy", kv_occupancy), ("memory_headroom_bytes", memory_headroom_bytes)):
            if v is not None:
                self._gauges[k] = float(v)

    def snapshot(self, now: float) -> StageSignals:
        """Aggregate the window ending at ``now``."""
        w, g = self._w, self._gauges
        span = self.window_s
        return StageSignals(
            stage=self.stage, replica=self.replica, window_s=span,
            prefill_step_s=w["prefill"].mean(now), decode_step_s=w["decode"].mean(now),
            batch_size=w["rows"].mean(now), tokens_per_s=w["rows"].rate(now),
            arrival_tokens_per_s=w["arrivals"].rate(now), prefill_tokens_per_s=w["prefill_tokens"].rate(now),
            busy_fraction=min(1.0, w["busy"].rate(now)), queue_len=g["queue_len"],
            oldest_wait_s=g["oldest_wait_s"], kv_occupancy=g["kv_occupancy"],
            memory_headroom_bytes=g["memory_headroom_bytes"], hop_s=w["hop"].mean(now),
            steps=w["decode"].count(now),
        )


def stage_arrival_rates(signals: list[StageSignals]) -> dict[int, float]:
    """Total post-exit decode arrival rate per stage, summed over its replicas."""
    out: dict[int, float] = {}
    for s in signals:
        if not math.isnan(s.arrival_tokens_per_s):
            out[s.stage] = out.get(s.stage, 0.0) + s.arrival_tokens_per_s
    return dict(sorted(out.items()))
