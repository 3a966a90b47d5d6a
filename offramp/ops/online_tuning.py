"""Online audit of early exits, and thresholds that hold the agreement target under drift.

Exact deferred backfill runs every exited token's hidden state through the deep stages
anyway (it rides along with the next token that goes deep). When that chunk reaches the
last stage, one LM-head call on it gives the full-depth greedy token at each backfilled
position - the label the calibration needed, now for live traffic, without labels and
without extra passes through the layers. The ingress compares it with the token it
emitted (:class:`AgreementTuner`), per (exit layer, task type).

Adjustment (Apparate's point: static thresholds lose accuracy under drift): over a
window of checks per gate, a one-sided Wilson interval on the agreement rate decides -
the upper bound below the target means the gate exits too eagerly: raise its threshold
by ``step``; the lower bound above the target and a raised threshold: lower it by one
``step`` again. The offset never goes below 0: the calibrated threshold (with its
Learn-then-Test guarantee on held-out data) is the floor; online tuning only tightens
under drift and relaxes back. After each change the window restarts, so a decision is
always taken on checks made under the current threshold.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


def wilson(agreed: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (``z``: normal quantile, one side)."""
    if n == 0:
        return 0.0, 1.0
    p = agreed / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class _Gate:
    window: deque = field(default_factory=deque)
    checks: int = 0  # cumulative
    agreed: int = 0
    offset: float = 0.0
    changes: int = 0


class AgreementTuner:
    """Per-gate agreement of exited tokens with full depth, and the threshold offsets
    that hold ``target``. Keys are (exit layer, task type or None). Not thread-safe: one
    per ingress event loop."""

    def __init__(self, target: float = 0.98, window: int = 400, min_checks: int = 100, step: float = 0.02,
                 max_offset: float = 0.5, z: float = 1.645, enabled: bool = True):
        if not 0 < target < 1:
            raise ValueError(f"agreement target {target} must be in (0, 1)")
        if not 1 <= min_checks <= window:
            raise ValueError(f"min_checks={min_checks} must be in [1, window={window}]")
        self.target, self.window, self.min_checks = target, window, min_checks
        self.step, self.max_offset, self.z, self.enabled = step, max_offset, z, enabled
        self.gates: dict[tuple[int, str | None], _Gate] = {}

    def observe(self, layer: int, task: str | None, agreed: bool) -> None:
        g = self.gates.setdefault((layer, task), _Gate(deque(maxlen=self.window)))
        g.window.append(bool(agreed))
        g.checks += 1
        g.agreed += bool(agreed)
        if not self.enabled or len(g.window) < self.min_checks:
            return
        lo, hi = wilson(sum(g.window), len(g.window), self.z)
        if hi < self.target and g.offset < self.max_offset:
            g.offset = min(self.max_offset, round(g.offset + self.step, 6))
        elif lo > self.target and g.offset > 0:
            g.offset = max(0.0, round(g.offset - self.step, 6))
        else:
            return
        g.changes += 1
        g.window.clear()  # judge the new threshold on its own checks

    def offset(self, layer: int, task: str | None) -> float:
        g = self.gates.get((layer, task))
        return g.offset if g is not None else 0.0

    def snapshot(self) -> dict[str, dict]:
        """Per gate ``"<layer>/<task>"``: cumulative checks and agreement, the current
        window's rate and the threshold offset in force."""
        out = {}
        for (layer, task), g in sorted(self.gates.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            w = len(g.window)
            out[f"{layer}/{task or 'default'}"] = {
                "checks": g.checks, "agreement": round(g.agreed / g.checks, 4) if g.checks else None,
                "window_checks": w, "window_agreement": round(sum(g.window) / w, 4) if w else None,
                "threshold_offset": g.offset, "changes": g.changes}
        return out
