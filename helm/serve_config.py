"""Render the offramp chart and extract its Serve config, so local runs use exactly what the
cluster runs (one source of truth: the chart's serveConfigV2).

    python helm/serve_config.py -f helm/offramp/values-cpu.yaml -o /tmp/serve.yaml --local
    serve run /tmp/serve.yaml

`--local` only rebinds the proxies to loopback (security default off-cluster); everything else
(stages, pools, replicas, args) is the chart's text. The stages ask for the custom Ray resources
`pool_gpu` / `pool_cpu`, so the local Ray must declare them, e.g.
`ray start --head --resources='{"pool_cpu": 100, "pool_gpu": 100}'`, or pass
`--strip-pool-resources` for a plain single-node run.

Also importable (tests use it): `render(...)`, `serve_config(docs)`, `local_serve_config(...)`.
Needs the `helm` binary (.ci/install-helm.sh) and PyYAML.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

CHART_DIR = Path(__file__).resolve().parent / "offramp"


class HelmError(RuntimeError):
    """`helm` failed; the message carries helm's own error text (schema or template failure)."""


def helm_binary() -> str:
    helm = shutil.which("helm")
    if helm is None:
        raise HelmError("helm is not installed: run .ci/install-helm.sh")
    return helm


def render(
    values_files: list[str | Path] = (),
    set_values: list[str] = (),
    release: str = "offramp",
    namespace: str = "default",
    chart: Path = CHART_DIR,
) -> list[dict]:
    """`helm template` the chart; return the rendered Kubernetes objects (empty documents dropped)."""
    cmd = [helm_binary(), "template", release, str(chart), "--namespace", namespace]
    for f in values_files:
        cmd += ["-f", str(f)]
    for s in set_values:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip() or proc.stdout.strip())
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def rayservice(docs: list[dict]) -> dict:
    found = [d for d in docs if d.get("kind") == "RayService"]
    if len(found) != 1:
        raise ValueError(f"expected exactly one RayService in the rendered chart, found {len(found)}")
    return found[0]


def serve_config_text(docs: list[dict]) -> str:
    """serveConfigV2 verbatim: the exact text KubeRay submits to Serve."""
    return rayservice(docs)["spec"]["serveConfigV2"]


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(serve_config_text(docs))


def localize(config: dict, host: str = "127.0.0.1", strip_pool_resources: bool = False) -> dict:
    """The same config for a local `serve run`: proxies on `host`; optionally no pool resources
    (and no GPUs) so it runs on a plain one-node Ray."""
    config = copy.deepcopy(config)
    config.setdefault("http_options", {})["host"] = host
    if strip_pool_resources:
        for app in config.get("applications", []):
            for dep in app.get("deployments", []):
                opts = dep.get("ray_actor_options") or {}
                resources = {k: v for k, v in (opts.get("resources") or {}).items() if not k.startswith("pool_")}
                if resources:
                    opts["resources"] = resources
                else:
                    opts.pop("resources", None)
                opts.pop("num_gpus", None)
    return config


def local_serve_config(values_files=(), set_values=(), **localize_kwargs) -> dict:
    return localize(serve_config(render(values_files, set_values)), **localize_kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    ap.add_argument("--set", action="append", default=[], dest="set_values", help="helm --set (repeatable)")
    ap.add_argument("-o", "--output", help="write here instead of stdout")
    ap.add_argument("--local", action="store_true", help="bind the proxies to 127.0.0.1")
    ap.add_argument("--host", default=None, help="bind the proxies to this host (implies --local)")
    ap.add_argument("--strip-pool-resources", action="store_true", help="drop pool_* resources and num_gpus")
    args = ap.parse_args(argv)
    try:
        docs = render(args.values, args.set_values)
    except HelmError as e:
        print(f"serve_config: {e}", file=sys.stderr)
        return 1
    if args.local or args.host or args.strip_pool_resources:
        text = yaml.safe_dump(
            localize(serve_config(docs), host=args.host or "127.0.0.1", strip_pool_resources=args.strip_pool_resources),
            sort_keys=False,
        )
    else:
        text = serve_config_text(docs)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
