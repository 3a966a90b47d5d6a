"""Shared fixtures. Integration tests (``@pytest.mark.integration``) get one real local
multi-node Ray cluster with the Offramp app per session (``serve_cluster``).

Skipping policy: integration tests are skipped only when Ray itself cannot start on this
machine (the reason says so). Any failure after Ray is up - the app not deploying, a
replica not placing - is an error, never a skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Ray reads this once, when it is first imported (by whichever test imports it first):
# it makes local clusters use 127.0.0.1 as the node address, so nothing binds beyond loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

if str(Path(__file__).parent) not in sys.path:  # `from serve_fixtures import ...` under any import mode
    sys.path.insert(0, str(Path(__file__).parent))

_RAY_START_ERROR: list[str] = []  # set once if Ray could not start; later tests skip at once


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run where CUDA is (a lent GPU machine) and are skipped,
    saying so, everywhere else; the rest of the suite never needs a GPU."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (pytest -m gpu on a GPU machine)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (4 layers, vocab 512, byte tokenizer)."""
    from offramp.ops.presets import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny-serve"), "tiny", seed=11)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster: head + GPU-pool node + two CPU-pool nodes, loopback only."""
    if _RAY_START_ERROR:
        pytest.skip(_RAY_START_ERROR[0])
    from serve_fixtures import RayCannotStart, start_ray_cluster

    try:
        cluster = start_ray_cluster()
    except RayCannotStart as e:  # the one case where skipping is right; anything else is an error
        _RAY_START_ERROR.append(f"Ray cannot start on this machine, integration tests skipped: {e}")
        pytest.skip(_RAY_START_ERROR[0])
    yield cluster
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def _serve_session(ray_cluster, tiny_model_dir):
    """The session's Offramp app: its config and port (started by ``serve_cluster``)."""
    from serve_fixtures import ServeCluster, free_port, serve_config, stop_serve

    port = free_port()
    root = f"http://127.0.0.1:{port}"
    yield ServeCluster(base_url=f"{root}/v1", root_url=root, model_dir=tiny_model_dir, port=port,
                       config=serve_config(tiny_model_dir, port), cluster=ray_cluster)
    stop_serve()


@pytest.fixture
def serve_cluster(_serve_session):
    """The Offramp app (4 stages: 0-1 on the GPU pool, 2-3 on CPU pools) applied from a Serve
    config on the session's cluster; applied again when a fixture with Serve options of its
    own (a gRPC port, the chart's config) replaced it since. A
    :class:`serve_fixtures.ServeCluster`."""
    from serve_fixtures import ensure_serving

    ensure_serving(_serve_session)
    return _serve_session


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def family_checkpoint(request, tmp_path_factory):
    """A tiny random checkpoint of each supported family (with exit heads), seed 7."""
    from offramp.ops.presets import make_checkpoint

    path = tmp_path_factory.mktemp(f"family-{request.param}")
    make_checkpoint(path, "tiny", family=request.param, seed=7)
    return path


@pytest.fixture(scope="session")
def family_hf(family_checkpoint):
    """transformers' model of ``family_checkpoint``, the golden reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_checkpoint, dtype=torch.float32).eval()
