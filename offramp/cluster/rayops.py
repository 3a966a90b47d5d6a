"""Every ``ray.*`` call Offramp makes at run time goes through this module, so the rest of
the code (and its unit tests) never needs a cluster (``tests/test_architecture.py`` lists
the few exceptions, each with its reason).

The registry (:class:`~offramp.cluster.registry.RegistryCore`, pure) runs here as a small
detached, restarting actor per Serve application (:func:`registry`); :class:`Heartbeat`
beats to it from each replica.

The application's channel token lives in Ray's internal KV (kept by the GCS), minted once
by whichever replica asks first (:func:`channel_token`): it survives a restart of the
registry actor (old and new replicas still accept each other), and re-applying a config
(e.g. to scale one stage) changes no deployment's arguments and restarts nothing else.
"""
from __future__ import annotations

import copy
import logging
import secrets
import threading
from typing import Any

import ray

from offramp.cluster.records import IngressTotals, StageRecord
from offramp.cluster.registry import HEARTBEAT_S, RegistryCore

NAMESPACE = "offramp"
log = logging.getLogger("offramp")


Registry = ray.remote(num_cpus=0, max_restarts=-1)(RegistryCore)


TOKEN_KV_NAMESPACE = "offramp-channel"


def channel_token(app_name: str) -> str:
    """The application's stage-channel token, minted once and kept in the GCS's internal
    KV (outlives the registry actor and every replica); concurrent first callers agree."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    key = f"token/{app_name}"
    tok = _internal_kv_get(key, namespace=TOKEN_KV_NAMESPACE)
    if tok is None:
        _internal_kv_put(key, secrets.token_hex(16).encode(), overwrite=False, namespace=TOKEN_KV_NAMESPACE)
        tok = _internal_kv_get(key, namespace=TOKEN_KV_NAMESPACE)
    return tok.decode()


def registry(app_name: str):
    """The application's registry actor, created on first use (by whichever replica is first)."""
    return Registry.options(name=f"registry-{app_name}", namespace=NAMESPACE, lifetime="detached",
                            get_if_exists=True).remote()


class Heartbeat:
    """Calls ``beat(registry_actor)`` every :data:`HEARTBEAT_S` from a daemon thread, for
    one replica of ``app_name``; a failed beat reconnects to the (restarting) registry.
    :meth:`stop` ends the beats and deregisters the replica."""

    def __init__(self, app_name: str, replica: str, beat, name: str):
        self.app_name, self.replica, self.beat = app_name, replica, beat
        self.registry = registry(app_name)
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name=name).start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat(self.registry)
            except Exception as e:  # noqa: BLE001 - registry restarting; try again next beat
                log.warning("registry heartbeat of %s failed: %s", self.replica, e)
                self.registry = registry(self.app_name)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.deregister.remote(self.replica)
        except Exception:  # noqa: BLE001 - shutting down
            pass


def get(ref, timeout: float = 30.0):
    return ray.get(ref, timeout=timeout)


def node_ip() -> str:
    return ray.util.get_node_ip_address()


def replica_context() -> tuple[str, str]:
    """(application name, replica id) of the Serve replica this code runs in."""
    from ray import serve

    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


def http_host() -> str | None:
    """The host Serve's HTTP proxies bind, as configured (None if it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - the bind check is then left to the operator
        return None


def grpc_serving() -> bool | None:
    """Whether Serve's gRPC proxy is on (servicer functions configured): it binds every
    interface (``[::]:port``) whatever the HTTP host. None if it cannot be read."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        cfg = ray.get(client._controller.get_grpc_config.remote(), timeout=10)
        return bool(cfg.grpc_servicer_functions)
    except Exception:  # noqa: BLE001 - the bind check is then left to the operator
        return None


# -- placement controller: Serve config, deployment state, durable intent ----------------
# (Everything below is used by offramp.placement; callers see plain dicts.)
PLACEMENT_KV_NAMESPACE = "offramp-placement"


def _serve_client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def serve_details() -> dict:
    """``ServeInstanceDetails`` as a dict (what ``serve status``/``serve config`` read)."""
    return _serve_client().get_serve_details()


def deployed_app_config(app_name: str) -> dict | None:
    """The config the Serve controller last applied for ``app_name`` (``serve config``), or None
    when the app was deployed imperatively (``serve.run``) or does not exist."""
    app = serve_details().get("applications", {}).get(app_name)
    return None if app is None else app.get("deployed_app_config")


def deploy_app_config(app_name: str, app_config: dict) -> None:
    """Apply ``app_config`` for one application - the in-process ``serve deploy``. Everything
    else the operator set is re-sent as it is live: the other applications' last applied
    configs, the proxy location, HTTP and gRPC options, the target capacity and the tracing
    config (a ServeDeploySchema replaces the whole declarative set, and an omitted
    ``target_capacity`` would mean 100%)."""
    details = serve_details()
    apps = []
    for name, app in details.get("applications", {}).items():
        if name == app_name:
            continue
        if app.get("deployed_app_config") is None:
            raise RuntimeError(f"application {name!r} was deployed with serve.run, not a config; the placement "
                               "controller can only re-apply configs when every app is config-deployed")
        apps.append(app["deployed_app_config"])
    apps.append(copy.deepcopy(app_config))
    _serve_client().deploy_apps(redeploy_schema(details, apps, _tracing_config()), _blocking=False)


def redeploy_schema(details: dict, apps: list[dict], tracing: dict | None = None):
    """The ServeDeploySchema that re-applies ``apps`` over the live instance ``details``
    (``ServeInstanceDetails`` as a dict) and changes nothing else."""
    from ray.serve.schema import ServeDeploySchema

    schema: dict[str, Any] = {"applications": apps}
    if details.get("proxy_location"):
        schema["proxy_location"] = details["proxy_location"]
    for key in ("http_options", "grpc_options"):  # the same schema classes in details and deploy configs
        kept = {k: v for k, v in (details.get(key) or {}).items() if v is not None}
        if kept:
            schema[key] = kept
    if details.get("target_capacity") is not None:
        schema["target_capacity"] = details["target_capacity"]
    if tracing:
        schema["tracing_config"] = tracing
    return ServeDeploySchema.model_validate(schema)


def _tracing_config() -> dict | None:
    """The Serve controller's global tracing config as a dict (None if unset or unreadable)."""
    try:
        cfg = get(_serve_client()._controller.get_tracing_config.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - an older controller: leaving it out keeps the live one
        return None
    if cfg is None:
        return None
    return cfg.model_dump(exclude_unset=True) if hasattr(cfg, "model_dump") else dict(cfg)


def _enum_str(v) -> str:
    """'HEALTHY' whether Serve hands back the enum or its value."""
    return str(getattr(v, "value", v))


def deployment_states(app_name: str) -> dict[str, dict]:
    """Per deployment of ``app_name``: ``{"status", "target", "running": [replica ids], "replicas":
    {state: n}}`` from the Serve controller."""
    app = serve_details().get("applications", {}).get(app_name)
    if app is None:
        return {}
    out = {}
    for name, d in app.get("deployments", {}).items():
        states: dict[str, int] = {}
        for r in d.get("replicas", []):
            states[_enum_str(r["state"])] = states.get(_enum_str(r["state"]), 0) + 1
        out[name] = {"status": _enum_str(d.get("status")), "target": d.get("target_num_replicas"),
                     "running": sorted(r["replica_id"] for r in d.get("replicas", [])
                                       if _enum_str(r["state"]) == "RUNNING"),
                     "replicas": states}
    return out


def app_status(app_name: str) -> str | None:
    app = serve_details().get("applications", {}).get(app_name)
    return None if app is None else _enum_str(app.get("status"))


def http_root(app_name: str) -> str | None:
    """``http://host:port<route_prefix>`` of the app's HTTP ingress (None when not on HTTP)."""
    details = serve_details()
    app = details.get("applications", {}).get(app_name)
    http = details.get("http_options") or {}
    if app is None or app.get("route_prefix") is None or not http.get("port"):
        return None
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http['port']}{app['route_prefix'].rstrip('/')}"


def registry_ingress(app_name: str, timeout: float = 10.0) -> IngressTotals | None:
    """Combined stats of every live ingress replica of the app (None: none reported)."""
    try:
        reg = ray.get_actor(f"registry-{app_name}", namespace=NAMESPACE)
    except ValueError:
        return None
    return ray.get(reg.ingress_totals.remote(), timeout=timeout)


def registry_endpoints(app_name: str, timeout: float = 10.0) -> list[StageRecord]:
    """Live stage endpoints of the app's registry (with each replica's last heartbeat stats)."""
    try:
        reg = ray.get_actor(f"registry-{app_name}", namespace=NAMESPACE)
    except ValueError:
        return []
    return ray.get(reg.endpoints.remote(), timeout=timeout)


def assigned_pool(default: str) -> str:
    """The pool this actor was scheduled on: the ``pool_<name>`` custom resource it holds
    (the placement mover moves a stage by changing that resource), else ``default``."""
    from offramp.cluster import pool_of

    try:
        held = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return default
    return pool_of(held, default)


def assigned_cpus() -> float | None:
    """CPU cores Ray reserved for this actor (its ``num_cpus``), None outside a Ray worker."""
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None


def pool_capacity() -> dict[str, int]:
    """Units of each ``pool_<name>`` custom resource in the cluster."""
    return {k.removeprefix("pool_"): int(v) for k, v in ray.cluster_resources().items() if k.startswith("pool_")}


def kv_get(key: str) -> bytes | None:
    """Ray's internal KV (kept by the GCS: outlives any actor)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=PLACEMENT_KV_NAMESPACE)


def kv_put(key: str, value: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=PLACEMENT_KV_NAMESPACE)


def kv_del(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=PLACEMENT_KV_NAMESPACE)


def start_detached(cls, name: str, *args, num_cpus: float = 0, max_concurrency: int = 4):
    """A detached, restarting actor of plain class ``cls`` named ``name`` (the existing one if alive)."""
    remote = ray.remote(num_cpus=num_cpus, max_restarts=-1, max_task_retries=0, max_concurrency=max_concurrency)(cls)
    return remote.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(*args)


def get_actor(name: str, namespace: str = NAMESPACE):
    """The named actor in Offramp's namespace (or ``namespace``: "serve" for replicas), or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def kill_actor(handle, restart: bool = False) -> None:
    """Kill an actor; ``restart=True`` lets Ray restart it (a crash, as far as the actor knows)."""
    ray.kill(handle, no_restart=not restart)


def call(handle, method: str, *args, timeout: float = 30.0):
    return ray.get(getattr(handle, method).remote(*args), timeout=timeout)


def start_serve(port: int, host: str = "127.0.0.1") -> None:
    """Start Serve on the connected cluster, its HTTP front on the head only (the benches')."""
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})


def run_app(app, name: str, route_prefix: str) -> None:
    """Deploy a built application imperatively (``serve.run``); returns once it runs."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix)


def delete_app(name: str) -> None:
    from ray import serve

    serve.delete(name)


def shutdown_serve(haproxy_stats_port: int | str | None = None) -> None:
    """Remove Serve and its apps from the connected cluster, and any HAProxy it leaves
    behind on this host (:func:`offramp.cluster.local.reap_orphaned_haproxy`: its stats
    port would stop the next Serve's HAProxy); nothing when not connected."""
    from ray import serve

    from offramp.cluster.local import reap_orphaned_haproxy

    if ray.is_initialized():
        serve.shutdown()
        reap_orphaned_haproxy(haproxy_stats_port)


def connect(address: str | None = None) -> None:
    """Join a running cluster from a CLI process (no-op when already connected)."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
