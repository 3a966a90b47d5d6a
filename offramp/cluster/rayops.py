"""Every ``ray.*`` call Offramp makes at run time goes through this module, so the rest of
the code (and its unit tests) never needs a cluster.

The registry is a small detached actor per Serve application: stage replicas publish
their data-channel endpoint there and heartbeat; ingress replicas read it to route.
It also mints the application's channel token once, so re-applying a config (e.g. to
scale one stage) changes no deployment's arguments and restarts nothing else.
"""
from __future__ import annotations

import secrets
import time

import ray

NAMESPACE = "offramp"
HEARTBEAT_S = 2.0
STALE_S = 8.0


@ray.remote(num_cpus=0, max_restarts=-1)
class Registry:
    def __init__(self):
        self._token = secrets.token_hex(16)
        self._entries: dict[str, dict] = {}

    def token(self) -> str:
        return self._token

    def register(self, entry: dict) -> None:
        self._entries[entry["replica"]] = {**entry, "seen": time.time()}

    def heartbeat(self, replica: str, stats: dict | None = None) -> bool:
        e = self._entries.get(replica)
        if e is None:
            return False  # registry restarted: the replica registers again
        e["seen"] = time.time()
        if stats:
            e["stats"] = stats
        return True

    def deregister(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def endpoints(self) -> list[dict]:
        now = time.time()
        for k in [k for k, e in self._entries.items() if now - e["seen"] > STALE_S * 4]:
            del self._entries[k]
        return [e for e in self._entries.values() if now - e["seen"] <= STALE_S]


def registry(app_name: str):
    """The application's registry actor, created on first use (by whichever replica is first)."""
    return Registry.options(name=f"registry-{app_name}", namespace=NAMESPACE, lifetime="detached",
                            get_if_exists=True).remote()


def get(ref, timeout: float = 30.0):
    return ray.get(ref, timeout=timeout)


def node_ip() -> str:
    return ray.util.get_node_ip_address()


def replica_context() -> tuple[str, str]:
    """(application name, replica id) of the Serve replica this code runs in."""
    from ray import serve

    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def http_host() -> str | None:
    """The host Serve's HTTP proxies bind, as configured (None if it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - the bind check is then left to the operator
        return None
