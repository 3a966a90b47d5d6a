"""What the benches share: JSON on a clean stdout, percentiles, peak memory."""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
from typing import Iterable

APP = "offramp"  # the Serve application name every bench deploys on its own cluster


def local_serve_config(port: int, pools: list[str], app_args: dict) -> dict:
    """The Serve config (the dict of a YAML) a bench deploys on its local pool cluster:
    Serve's HTTP front on 127.0.0.1:``port`` on the head, the ingress (0.25 CPU), and stage
    ``k`` on pool ``pools[k]`` (0.5 CPU and its ``pool_<name>`` resource, one replica);
    ``app_args`` are the app's ``args`` (``num_stages`` is set from ``pools``)."""
    from offramp.deployments.config import INGRESS_NAME, stage_name

    deps = [{"name": INGRESS_NAME, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}]
    deps += [{"name": stage_name(k), "num_replicas": 1,
              "ray_actor_options": {"num_cpus": 0.5, "resources": {f"pool_{p}": 1}}} for k, p in enumerate(pools)]
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "offramp.deployments.app:build_app",
                              "args": {**app_args, "num_stages": len(pools)}, "deployments": deps}]}


@contextlib.contextmanager
def json_stdout(enabled: bool):
    """For ``--json``: while active, everything written to file descriptor 1 (Ray's worker
    log lines echoed by the driver, library prints) goes to stderr instead, so stdout
    carries only the JSON, written with the yielded ``emit(obj)``."""
    if not enabled:
        yield lambda obj: print(json.dumps(obj, indent=2))
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)

    def emit(obj) -> None:
        sys.stdout.flush()
        os.write(saved, (json.dumps(obj, indent=2) + "\n").encode())

    try:
        yield emit
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def percentile(xs: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of the finite values; NaN when there are none.
    p50 of an even count is the lower middle value; p99 of fewer than 100 values is the max."""
    v = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not v:
        return float("nan")
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
