"""Helpers for integration tests on a real local multi-node Ray cluster (loopback only).

The cluster mirrors ``offramp cluster up``: a head, one GPU-pool node (custom resource
``pool_gpu``) and two CPU-pool nodes (``pool_cpu``). The Offramp app is applied from a
Serve config dict the way ``serve deploy`` / ``serve run config.yaml`` do it: the dict is
validated as a ``ServeDeploySchema`` and handed to the Serve client's ``deploy_apps``, so
re-applying it with one deployment's ``num_replicas`` changed is exactly a config update.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APP = "offramp"
MODEL_NAME = "offramp-default"
NUM_STAGES = 4
GPU_STAGES = (0, 1)  # stages pinned to the GPU pool; the rest go to the CPU pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(model_dir: Path, port: int, stage1_replicas: int = 1) -> dict[str, Any]:
    """The dict form of a YAML like configs/gpu-cpu.yaml, for the tiny test model."""
    pools = ["gpu" if k in GPU_STAGES else "cpu" for k in range(NUM_STAGES)]
    deployments = [{"name": "OfframpIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}]
    for k, pool in enumerate(pools):
        deployments.append({"name": f"Stage{k}", "num_replicas": stage1_replicas if k == 1 else 1,
                            "ray_actor_options": {"num_cpus": 0.5, "resources": {f"pool_{pool}": 1}}})
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP,
            "route_prefix": "/",
            "import_path": "offramp.deployments.app:build_app",
            "args": {
                "model": str(model_dir),
                "num_stages": NUM_STAGES,
                "stages": [{"pool": p, "dtype": "fp32"} for p in pools],
                "exit": {"mode": "calibrated", "kv_fill": "exact"},  # no exits file: calibrated = no exits
                "api_key_env": "",  # never pick up a key from the test machine's environment
                "request_timeout_s": 30.0,
                "kv_lease_s": 5.0,  # short, so the lease and its renewals are exercised by every test
            },
            "deployments": deployments,
        }],
    }


def apply_config(config: dict[str, Any], wait_s: float | None = 120.0) -> None:
    """Apply a Serve config in-process: what ``serve deploy`` does through the dashboard."""
    from offramp.cluster.local import deploy_config

    deploy_config(config, APP, wait_s=None)
    if wait_s is not None:
        wait_running(wait_s)


def fresh_serve() -> None:
    """Shut Serve down so the next config starts it with its own HTTP/gRPC options (a
    running Serve keeps the options it started with: the config would deploy, and its
    port would not listen). ``serve_cluster`` applies the session app again afterwards."""
    stop_serve()


def stop_serve() -> None:
    """``serve.shutdown()``, and no HAProxy of this cluster outlives it (an orphan would hold
    the cluster's stats port, so the next Serve's HAProxy could not start and every later
    test would error: :func:`offramp.cluster.local.reap_orphaned_haproxy`)."""
    from offramp.cluster.rayops import shutdown_serve

    shutdown_serve(_HAPROXY_STATS[0] if _HAPROXY_STATS else None)


def ensure_serving(sc: "ServeCluster", wait_s: float = 180.0) -> None:
    """Make ``sc``'s app serve on its port: nothing to do when it already does (the usual
    case: one check per test); else Serve is started afresh with its options and the app
    applied (after a fixture that needed options of its own)."""
    import httpx
    from ray import serve

    try:
        st = serve.status().applications.get(APP)
        if st is not None and st.status == "RUNNING" and \
                httpx.get(f"{sc.root_url}/-/healthz", timeout=5).status_code == 200:
            return
    except Exception:  # noqa: BLE001 - Serve not running, or not on this port: start it below
        pass
    stop_serve()
    serve.start(http_options={"host": "127.0.0.1", "port": sc.port}, proxy_location="HeadOnly")
    apply_config(sc.config, wait_s=wait_s)


def wait_running(wait_s: float = 120.0, want: dict[str, int] | None = None) -> None:
    """Until the app is RUNNING (and each deployment in ``want`` has that many running replicas)."""
    from ray import serve

    deadline = time.monotonic() + wait_s
    last = None
    while time.monotonic() < deadline:
        st = serve.status().applications.get(APP)
        last = st
        if st is not None and st.status == "RUNNING":
            if not want or all(st.deployments[d].replica_states.get("RUNNING", 0) == n
                               and sum(st.deployments[d].replica_states.values()) == n for d, n in want.items()):
                return
        if st is not None and st.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app failed to deploy: {st.message}")
        time.sleep(0.5)
    raise TimeoutError(f"app not running with {want} after {wait_s}s: {last}")


def replica_actors(deployment: str | None = None, expect: int | None = None, wait_s: float = 15.0) -> list[Any]:
    """Alive replica actors of the app (``ray.util.state`` ActorState), optionally of one
    deployment. The state API answers through the dashboard, which can time out or return a
    partial list on a loaded 2-core machine: errors are retried, and with ``expect`` the call
    waits (up to ``wait_s``) until that many replicas are listed."""
    from ray.util.state import list_actors

    cls = f"ServeReplica:{APP}:{deployment}" if deployment else None
    filters = [("state", "=", "ALIVE")] + ([("class_name", "=", cls)] if cls else [])
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # Explicit address: looked up from GCS it has come back as the default :8265 under load.
            actors = list_actors(address=_STATE_API[0] if _STATE_API else None, filters=filters, limit=1000,
                                 timeout=10, raise_on_missing_output=True)
            found = [a for a in actors if a.class_name.startswith(f"ServeReplica:{APP}:")]
            if expect is None or len(found) == expect:
                return found
            problem = f"{len(found)} replicas listed, expected {expect}"
        except Exception as e:  # noqa: BLE001 - state API hiccup; retried
            problem = repr(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"replica actors of {deployment or APP}: {problem}")
        time.sleep(0.5)


def node_pools() -> dict[str, str]:
    """node id -> 'gpu' / 'cpu' / 'head', from each node's custom pool resource."""
    import ray

    out = {}
    for n in ray.nodes():
        pool = next((k.removeprefix("pool_") for k in n["Resources"] if k.startswith("pool_")), "head")
        out[n["NodeID"]] = pool
    return out


@dataclass
class ServeCluster:
    """What the session-scoped ``serve_cluster`` fixture hands to tests."""

    base_url: str  # http://127.0.0.1:<port>/v1
    root_url: str  # http://127.0.0.1:<port>
    model_dir: Path
    port: int
    config: dict[str, Any]
    cluster: Any = field(repr=False, default=None)

    def openai(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=kw.pop("timeout", 60), **kw)

    def async_openai(self, **kw):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0,
                           timeout=kw.pop("timeout", 60), **kw)

    def stats(self) -> list[int]:
        import httpx

        r = httpx.get(f"{self.root_url}/v1/offramp/stats", timeout=10)
        r.raise_for_status()
        return list(r.json()["stage_calls"])


_STATE_API: list[str] = []  # the dashboard URL of the cluster started here (state API calls go there)
_HAPROXY_STATS: list[str] = []  # the stats port every HAProxy of that cluster binds


class RayCannotStart(RuntimeError):
    """The Ray head could not start or be joined on this machine (the only reason to skip)."""


def start_ray_cluster():
    """Head + one GPU-pool node + two CPU-pool nodes, all on 127.0.0.1. Returns the Cluster.

    The dashboard (loopback, a free port: other engineers' clusters may hold 8265) is on
    because ``ray.util.state`` - where replicas' nodes are read - is served by it.
    Raises :class:`RayCannotStart` only if the head cannot start or be joined; a pool node
    that fails to join is an ordinary error."""
    from offramp.cluster.local import LOOPBACK_ENV, private_haproxy_env

    os.environ.update(LOOPBACK_ENV)  # makes Ray use 127.0.0.1 as the node IP
    # Serve's HAProxy mode, as the README runs it: read by the processes started below, and
    # only by them (restored after, so a bench a test starts makes its own choice).
    ha_env = private_haproxy_env()
    _HAPROXY_STATS[:] = [ha_env["RAY_SERVE_HAPROXY_STATS_PORT"]]
    saved = {k: os.environ.get(k) for k in ha_env}
    os.environ.update(ha_env)
    try:
        return _start_ray_cluster()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    for attempt in range(2):  # a head can time out once on a loaded shared machine; a second failure is final
        port = free_port()
        try:
            cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                              head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                              "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                              "dashboard_port": port})
            _STATE_API[:] = [f"http://127.0.0.1:{port}"]
            break
        except Exception as e:  # noqa: BLE001 - reported as the skip reason
            if attempt == 1:
                raise RayCannotStart(f"the Ray head did not start (twice): {type(e).__name__}: {e}") from e
            time.sleep(2)
    try:
        try:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        except Exception as e:  # noqa: BLE001
            raise RayCannotStart(f"cannot join the local Ray head at {cluster.address}: {type(e).__name__}: {e}") from e
        cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1", resources={"pool_gpu": 100})
        for _ in range(2):
            cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1", resources={"pool_cpu": 100})
        cluster.wait_for_nodes()
    except BaseException:
        ray.shutdown()
        cluster.shutdown()
        raise
    return cluster


def haproxy_binds() -> set[str]:
    """``host:port`` of every HAProxy ``bind`` line of the running HAProxy processes."""
    from offramp.cluster.local import haproxy_processes

    return set().union(*haproxy_processes().values())


def registry_endpoints() -> list:
    """Live stage endpoints as the ingress sees them (the app's registry actor), with each
    replica's last heartbeat stats (``StageRecord``s: ``e.stats.rows`` served, ...).

    A registry actor that Ray is restarting (a test killed it) answers ``ActorUnavailableError``
    for a moment: asked again until it is back (30 s), as the ingress does."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + 30
    while True:
        reg = ray.get_actor(f"registry-{APP}", namespace="offramp")
        try:
            return ray.get(reg.endpoints.remote(), timeout=10)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def actor_of_replica(deployment: str, replica_id: str):
    """The alive replica actor (ActorState) of ``deployment`` whose Serve replica id is ``replica_id``."""
    found = [a for a in replica_actors(deployment) if a.name.endswith(f"#{replica_id}")]
    assert len(found) == 1, f"{deployment} replica {replica_id}: {[a.name for a in replica_actors(deployment)]}"
    return found[0]
