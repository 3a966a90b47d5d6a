"""The Serve config the Helm chart renders is the one that runs: rendered by the real
``helm`` binary from ``values-gpu-cpu.yaml``, applied to a local GPU-pool + CPU-pool
cluster, and serving requests with its stages on the pools the chart put them on.
One source of truth: nothing here restates the chart's deployments or args."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "helm"))

pytestmark = pytest.mark.integration
KEY = "sk-helm-serve-test"


@pytest.fixture
def chart_config(tiny_model_dir):
    if shutil.which("helm") is None:
        pytest.skip("the helm binary is not installed here; `bash .ci/install-helm.sh` installs it (CI does)")
    from serve_config import local_serve_config
    from serve_fixtures import free_port

    config = local_serve_config(
        [str(ROOT / "helm/offramp/values-gpu-cpu.yaml")],
        # The test machine has no GPUs: the GPU pool is simulated by the pool_gpu resource.
        [f"model.path={tiny_model_dir}", "gpuWorkers.gpusPerPod=0"],
    )
    config["http_options"]["port"] = free_port()
    grpc = (config.get("grpc_options") or {}).get("grpc_servicer_functions", [])
    if grpc and importlib.util.find_spec(grpc[0].rsplit(".", 1)[0]) is None:
        config.pop("grpc_options")  # servicer module not generated in this checkout
    elif grpc:
        config["grpc_options"]["port"] = free_port()
    # In the pods the chart's Secret puts the key in every container's environment; here the
    # replicas get it through the app's runtime_env (Serve's gRPC proxy binds [::]: a key is
    # required, and the HTTP API asks for it too).
    app = config["applications"][0]
    env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env[app["args"].get("api_key_env", "OFFRAMP_API_KEY")] = KEY
    return config


def test_chart_serve_config_serves_on_its_pools(ray_cluster, chart_config):
    from openai import OpenAI
    from serve_fixtures import apply_config, fresh_serve, node_pools, replica_actors, stop_serve

    app = chart_config["applications"][0]
    assert app["args"]["model"] and app["import_path"] == "offramp.deployments.app:build_app"
    try:
        fresh_serve()  # the chart's ports: Serve keeps the options of whoever started it
        apply_config(chart_config, wait_s=240)
        base = f"http://127.0.0.1:{chart_config['http_options']['port']}/v1"
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
        out = client.completions.create(model=app["args"]["model_name"], prompt="Hi", max_tokens=6, temperature=0)
        assert out.usage.completion_tokens == 6
        assert len(out.choices[0].model_extra["offramp"]["exit_stages"]) == 6
        chat = client.chat.completions.create(model=app["args"]["model_name"], max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "hello"}])
        assert chat.choices[0].finish_reason in ("length", "stop")

        pools = node_pools()
        for dep in app["deployments"]:
            wanted = [k.removeprefix("pool_") for k in dep.get("ray_actor_options", {}).get("resources", {})
                      if k.startswith("pool_")]
            actors = replica_actors(dep["name"], expect=dep.get("num_replicas", 1), wait_s=60)
            assert len(actors) == dep.get("num_replicas", 1), dep["name"]
            for a in actors:
                if wanted:
                    assert pools[a.node_id] == wanted[0], f"{dep['name']} ran on the {pools[a.node_id]} pool"
    finally:
        stop_serve()  # later files start Serve again with their own config
