"""A local heterogeneous Ray cluster on one machine: a head, GPU-pool and CPU-pool nodes.

Pools are Ray custom resources (``pool_gpu`` / ``pool_cpu``) plus node labels
(``offramp.io/pool``); a stage is put on a pool by asking for the resource in its
``ray_actor_options``. GPU-pool nodes get the machine's real GPUs when there are any
(otherwise they simulate the pool on CPU). Everything binds to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from offramp.errors import ConfigError

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # makes Ray use 127.0.0.1 as the node IP
# Serve's HAProxy mode: a native HAProxy takes the HTTP/gRPC port and forwards each
# connection to the ingress replica's own listener (Serve's "direct ingress"), so streamed
# tokens skip the Python proxy and its per-chunk Ray object transfer (docs/benchmarks.md:
# +26% to +65% tokens/s at 16 streams on the 2-core machine). Read by the Serve controller
# and replicas when their processes start, so it must be in the environment Ray starts from.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def private_haproxy_env() -> dict[str, str]:
    """:data:`HAPROXY_ENV` for a throwaway cluster beside others on this machine (benches,
    tests): its HAProxy's stats and metrics listeners on free ports (fixed at 8404 and 9101
    otherwise, where a second HAProxy fails to start), and no 30 s ingress drain at shutdown
    (no load balancer is in front of it)."""
    return {**HAPROXY_ENV, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def haproxy_processes() -> dict[int, set[str]]:
    """pid -> ``host:port`` of every ``bind`` line in its config, for each HAProxy running
    on this host (Serve's HAProxy mode starts them with ``-f <config>``; Linux ``/proc``)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if not argv or not argv[0].endswith(b"haproxy") or b"-f" not in argv:
                continue
            text = Path(argv[argv.index(b"-f") + 1].decode()).read_text()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        found[int(cmdline.parent.name)] = {line.split()[1] for line in text.splitlines()
                                           if line.strip().startswith("bind ") and len(line.split()) > 1}
    return found


def _parent_cmdline(pid: int) -> bytes:
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return b""


def reap_orphaned_haproxy(stats_port: int | str | None = None, wait_s: float = 10.0) -> list[int]:
    """Kill the HAProxy processes Serve left behind on this host: those bound to
    ``stats_port`` (default: this process's ``RAY_SERVE_HAPROXY_STATS_PORT``, else Serve's
    8404) whose parent is no longer Serve's HAProxy manager actor. Returns their pids.

    Serve's HAProxy manager kills its HAProxy in the controller's graceful shutdown; when
    that shutdown times out (``serve.shutdown()`` waits 30 s, then ``ray.kill``s the
    controller, seen on loaded 2-core machines) the manager dies with SIGKILL and its
    HAProxy lives on, holding the stats port: the next Serve on the cluster cannot start
    its HAProxy ("cannot bind socket (Address already in use)")."""
    port = str(stats_port or os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"))
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while True:
        orphans = [pid for pid, binds in haproxy_processes().items()
                   if any(b.rsplit(":", 1)[-1] == port for b in binds)
                   and not _parent_cmdline(pid).startswith(b"ray::HAProxyManager")]
        if not orphans:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy processes {orphans} bound to port {port} do not exit")
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.2)


def state_file() -> Path:
    root = Path(os.environ.get("OFFRAMP_CACHE", Path.home() / ".cache" / "offramp"))
    return root / "cluster.json"


@dataclass
class ClusterInfo:
    address: str
    gpu_nodes: int
    cpu_nodes: int
    cpus_per_node: int
    real_gpus: int
    pids: list[int]


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU"))
    except (OSError, subprocess.TimeoutExpired):
        return 0


def free_port() -> int:
    """A TCP port free on loopback now (for a local Serve HTTP listener)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_options(pool: str, cpus: int, gpus: int = 0) -> dict:
    """Arguments of one pool node for ``ray.cluster_utils.Cluster.add_node``."""
    if pool not in ("gpu", "cpu"):
        raise ConfigError(f"pool {pool!r}: use 'gpu' or 'cpu'")
    return {"num_cpus": cpus, "num_gpus": gpus, "node_ip_address": "127.0.0.1",
            "resources": {f"pool_{pool}": 100}, "labels": {"offramp.io/pool": pool}}


@contextlib.contextmanager
def pool_cluster(gpu_nodes: int = 1, cpu_nodes: int = 2, cpus_per_node: int = 4, head_cpus: int = 2,
                 dashboard: bool = False):
    """A throwaway pool cluster on 127.0.0.1 for a bench: head, ``gpu_nodes`` GPU-pool and
    ``cpu_nodes`` CPU-pool nodes; this process is connected to it inside the block, and the
    cluster is gone after it. (The state API, ``ray.util.state``, needs ``dashboard``.)"""
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1",
                                      "include_dashboard": dashboard})
    try:
        for _ in range(gpu_nodes):
            cluster.add_node(**node_options("gpu", cpus_per_node))
        for _ in range(cpu_nodes):
            cluster.add_node(**node_options("cpu", cpus_per_node))
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def deploy_config(config: dict, app: str = "offramp", wait_s: float | None = 240.0) -> None:
    """Apply a Serve config (the dict of a YAML) as ``serve run`` does (the same
    ``serve_start`` + ``deploy_apps``), and wait until ``app`` is RUNNING (``wait_s`` None:
    return at once)."""
    import copy

    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(copy.deepcopy(config))
    grpc = schema.grpc_options.model_dump() if schema.grpc_options and schema.grpc_options.grpc_servicer_functions else None
    client = serve_start(http_options=schema.http_options.model_dump(), grpc_options=grpc,
                         proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    if wait_s is not None:
        wait_running(app, wait_s)


def wait_running(app: str = "offramp", wait_s: float = 240.0) -> None:
    """Until ``app`` is RUNNING; a failed deploy raises at once with Serve's message."""
    import time

    from ray import serve

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            return
        if st is not None and st.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {app!r} failed to deploy: {st.message}")
        time.sleep(0.5)
    raise TimeoutError(f"the app {app!r} is not RUNNING after {wait_s:.0f} s")


def up(gpu_nodes: int = 1, cpu_nodes: int = 2, cpus_per_node: int = 4) -> ClusterInfo:
    if gpu_nodes < 0 or cpu_nodes < 0 or gpu_nodes + cpu_nodes < 1:
        raise ConfigError("a cluster needs at least one GPU-pool or CPU-pool node")
    if state_file().is_file():
        raise ConfigError(f"a local cluster is already recorded in {state_file()}; run `offramp cluster down` first")
    os.environ.update(LOOPBACK_ENV)
    os.environ.update(HAPROXY_ENV)  # Serve on this cluster streams through HAProxy
    from ray.cluster_utils import Cluster

    gpus = _gpu_count()
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
                                      "dashboard_host": "127.0.0.1"})
    for i in range(gpu_nodes):
        per = gpus // gpu_nodes if gpus else 0
        cluster.add_node(**node_options("gpu", cpus_per_node, per))
    for _ in range(cpu_nodes):
        cluster.add_node(**node_options("cpu", cpus_per_node))
    pids = [p.process.pid for node in [cluster.head_node, *cluster.worker_nodes]
            for procs in node.all_processes.values() for p in procs]
    info = ClusterInfo(cluster.address, gpu_nodes, cpu_nodes, cpus_per_node, gpus, pids)
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps(asdict(info)))
    return info


def status() -> dict:
    if not state_file().is_file():
        return {"running": False}
    info = json.loads(state_file().read_text())
    os.environ.update(LOOPBACK_ENV)
    import ray

    try:
        ray.init(address=info["address"], logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - report, don't crash
        return {"running": False, "recorded": info, "error": str(e)}
    nodes = [{"alive": n["Alive"], "pool": next((k.removeprefix("pool_") for k in n["Resources"]
                                                 if k.startswith("pool_")), "head"),
              "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes()]
    ray.shutdown()
    return {"running": True, **info, "nodes": nodes}


def down() -> None:
    """Stop the recorded cluster's processes (only ours: other Ray instances keep running)."""
    import signal
    import time

    if not state_file().is_file():
        return
    pids = _descendants(json.loads(state_file().read_text()).get("pids", []))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    state_file().unlink(missing_ok=True)


def _descendants(roots: list[int]) -> set[int]:
    """The roots and every process below them (Ray workers run as children of raylets)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out
