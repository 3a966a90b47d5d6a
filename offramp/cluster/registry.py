"""The stage registry of one Serve application, as a plain class (no Ray here): stage
replicas publish their channel endpoint (:class:`~offramp.cluster.records.StageRecord`) and
heartbeat their stats; ingress replicas read :meth:`RegistryCore.routing` to route, and
publish their own counters; the placement controller reads both.

:mod:`offramp.cluster.rayops` runs it as a detached, restarting actor per application
(``Registry``); tests use it in-process.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import replace

from offramp.cluster.records import IngressTotals, StageRecord, StageStats

HEARTBEAT_S = 2.0  # how often replicas beat
STALE_S = 8.0  # a replica not heard from for this long is not routed to


class RegistryCore:
    """Who serves which stage, and each replica's latest stats; one detached actor per app
    (:data:`Registry`). Plain class so it can be tested without Ray."""

    def __init__(self):
        # A new epoch per (re)start: an ingress that sees it change keeps its previous
        # endpoints routable while the replicas register again.
        self._epoch = secrets.token_hex(8)
        self._entries: dict[str, StageRecord] = {}
        self._ingress: dict[str, dict] = {}  # ingress replica -> {"stats", "seen"}

    def register(self, record: StageRecord) -> None:
        self._entries[record.replica] = replace(record, seen=time.time())

    def heartbeat(self, replica: str, stats: dict | None = None) -> bool:
        """``stats``: ``StageDeployment.beat_stats()``, parsed here once into a StageStats."""
        e = self._entries.get(replica)
        if e is None:
            return False  # registry restarted: the replica registers again
        e.seen = time.time()
        if stats:
            e.stats = StageStats.from_dict(stats)
        return True

    def deregister(self, replica: str) -> None:
        self._entries.pop(replica, None)
        self._ingress.pop(replica, None)

    def ingress_heartbeat(self, replica: str, stats: dict) -> None:
        """An ingress replica's counters (cumulative ``stage_calls``) and recent TPOT."""
        self._ingress[replica] = {"stats": stats, "seen": time.time()}

    def ingress_totals(self) -> IngressTotals | None:
        """Every live ingress replica's stats combined (:meth:`IngressTotals.combine`)."""
        now = time.time()
        for k in [k for k, e in self._ingress.items() if now - e["seen"] > STALE_S * 4]:
            del self._ingress[k]
        return IngressTotals.combine([e["stats"] for e in self._ingress.values() if now - e["seen"] <= STALE_S])

    def endpoints(self) -> list[StageRecord]:
        """Stage replicas heard from within :data:`STALE_S` (older ones are dropped)."""
        now = time.time()
        for k in [k for k, e in self._entries.items() if now - e.seen > STALE_S * 4]:
            del self._entries[k]
        return [e for e in self._entries.values() if now - e.seen <= STALE_S]

    def routing(self) -> dict:
        """What an ingress routes on: ``{"epoch", "endpoints"}`` (see :meth:`endpoints`)."""
        return {"epoch": self._epoch, "endpoints": self.endpoints()}
