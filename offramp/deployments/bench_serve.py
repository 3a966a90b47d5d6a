"""``offramp bench serve``: the served pipeline against transformers, side by side in one run.

Starts a local loopback Ray cluster, serves the model with N stages, and measures, at
concurrency 1 and C: transformers ``generate`` one request at a time (in this process),
Offramp exits off, Offramp exits on (calibrated, or ``--threshold``). Streams every
request over HTTP to time TTFT and TPOT per token. Also times one hop of the stage
channel against one Serve ``DeploymentHandle`` call with the same payload.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time


def register(bsub) -> None:
    s = bsub.add_parser("serve", help="served pipeline vs transformers: tokens/s, TTFT, TPOT, hop cost, agreement")
    s.add_argument("--model", help="checkpoint dir (default: the embedded model)")
    s.add_argument("--stages", type=int, default=4, help="pipeline stages (default 4)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent streams for the loaded run (default 16)")
    s.add_argument("--requests", type=int, default=16, help="requests per contender at each concurrency")
    s.add_argument("--max-tokens", type=int, default=48)
    s.add_argument("--threshold", type=float, help="exit threshold for the exits-on run (default: calibrated)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_serve)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _stream_one(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    final = None
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"]}
            stamps.extend([time.perf_counter()] * len(ev["choices"][0].get("offramp", {}).get("exit_stages", [])))
            final = ev
    n = len(stamps)
    return {"ttft": stamps[0] - t0 if n else float("nan"), "n": n, "total": time.perf_counter() - t0,
            "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else float("nan"), "final": final}


async def _load(base: str, prompts: list[list[int]], exit_mode, concurrency: int, max_tokens: int, model: str):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(p):
            async with sem:
                return await _stream_one(client, f"{base}/v1/completions", {
                    "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                    "offramp": {"exit": exit_mode}})
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    async with httpx.AsyncClient(timeout=30) as client:
        server = (await client.get(f"{base}/v1/offramp/stats", params={"reset": "true"})).json()
    return {"server_tpot_p50_ms": server["tpot_ms_p50"], "server_tpot_p99_ms": server["tpot_ms_p99"],"tokens_per_s": round(sum(r["n"] for r in ok) / wall, 1), "failed": len(res) - len(ok),
            "ttft_p50_ms": round(1000 * _pct([r["ttft"] for r in ok], 0.5), 2),
            "ttft_p99_ms": round(1000 * _pct([r["ttft"] for r in ok], 0.99), 2),
            "tpot_p50_ms": round(1000 * _pct([r["tpot"] for r in ok], 0.5), 2),
            "tpot_p99_ms": round(1000 * _pct([r["tpot"] for r in ok], 0.99), 2)}


async def _exit_stages(base: str, prompts, exit_mode, max_tokens: int, model: str):
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        out = []
        for p in prompts:
            r = await client.post(f"{base}/v1/completions", json={
                "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "offramp": {"exit": exit_mode}})
            if r.status_code != 200:
                raise RuntimeError(f"request failed during the benchmark: {r.status_code} {r.text[:300]}")
            o = r.json()["choices"][0]["offramp"]
            out.append((o["token_ids"], o["exit_stages"]))
        return out


async def _hops(stage0_handle, endpoint: dict, token: str, hidden: int, n: int = 200) -> dict:
    import torch

    from offramp.deployments.channel import StageClient

    x = torch.randn(1, hidden)
    client = StageClient(endpoint["host"], endpoint["port"], token)
    await client.echo(x)
    t0 = time.perf_counter()
    for _ in range(n):
        await client.echo(x)
    chan = (time.perf_counter() - t0) / n
    raw = x.numpy().tobytes()
    await stage0_handle.ping.remote(raw)
    t0 = time.perf_counter()
    for _ in range(n):
        await stage0_handle.ping.remote(raw)
    handle = (time.perf_counter() - t0) / n
    client.close()
    return {"channel_round_trip_ms": round(1000 * chan, 3), "serve_handle_round_trip_ms": round(1000 * handle, 3),
            "speedup": round(handle / chan, 1)}


def run_serve(args) -> int:
    from offramp.bench import json_stdout

    with json_stdout(args.json) as emit:
        return _run_serve(args, emit)


def _run_serve(args, emit) -> int:
    import socket

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import torch
    from ray import serve
    from ray.cluster_utils import Cluster
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from offramp.cluster import rayops
    from offramp.cluster.local import node_options
    from offramp.deployments.app import build_app
    from offramp.deployments.config import AppArgs
    from offramp.ops.engine import StagedModel, resolve_model_dir
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    model_dir = resolve_model_dir(args.model)
    exit_on = args.threshold if args.threshold is not None else "calibrated"
    steps = tqdm(total=9, desc="bench serve", file=sys.stderr, disable=args.json)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1"})
    cluster.add_node(**node_options("cpu", 8))
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(model=str(model_dir), num_stages=args.stages)), name="offramp", route_prefix="/")
    base, name = f"http://127.0.0.1:{port}", "offramp-default"
    steps.update()
    try:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        from offramp.api.text import load_tokenizer

        vocab = min(hf.config.vocab_size, len(load_tokenizer(model_dir)))
        prompts = [torch.randint(3, vocab, (24,)).tolist() for _ in range(args.requests)]
        staged = StagedModel(model_dir, num_stages=args.stages, max_slots=1)
        report: dict = {"model": str(model_dir), "stages": args.stages, "max_tokens": args.max_tokens,
                        "requests": args.requests, "results": {}}

        # transformers, one request at a time (its best case on this machine)
        t0, tpots = time.perf_counter(), []
        for p in prompts[:4]:
            t1 = time.perf_counter()
            with torch.inference_mode():
                hf.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
            tpots.append((time.perf_counter() - t1) / args.max_tokens)
        hf_tps = 4 * args.max_tokens / (time.perf_counter() - t0)
        report["results"]["transformers_one_at_a_time"] = {"tokens_per_s": round(hf_tps, 1),
                                                           "tpot_p50_ms": round(1000 * statistics.median(tpots), 2)}
        steps.update()
        # in-process staged model, concurrency 1 (the hop-overhead baseline)
        t0 = time.perf_counter()
        for p in prompts[:4]:
            staged.generate([p], SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), ExitPolicy("off"))
        inproc_tpot = (time.perf_counter() - t0) / (4 * args.max_tokens)
        report["results"]["offramp_in_process_c1"] = {"tpot_ms": round(1000 * inproc_tpot, 2)}
        steps.update()

        asyncio.run(_load(base, prompts[:2], "off", 1, 8, name))  # warm-up (its stats are reset by _load)
        for label, mode in (("exits_off", "off"), ("exits_on", exit_on)):
            for c in (1, args.concurrency):
                n = 4 if c == 1 else args.requests
                report["results"][f"offramp_{label}_c{c}"] = asyncio.run(
                    _load(base, prompts[:n], mode, c, args.max_tokens, name))
                steps.update()

        off = asyncio.run(_exit_stages(base, prompts[:8], "off", args.max_tokens, name))
        on = asyncio.run(_exit_stages(base, prompts[:8], exit_on, args.max_tokens, name))
        agree = [a == b for (ta, _), (tb, _) in zip(off, on) for a, b in zip(ta, tb)]
        first_div = [next((i for i, (a, b) in enumerate(zip(ta, tb)) if a != b), len(ta)) for (ta, _), (tb, _) in zip(off, on)]
        exits = [s for _, st in on for s in st]
        report["exits"] = {"agreement_positionwise": round(sum(agree) / max(1, len(agree)), 3),
                           "mean_tokens_before_first_divergence": round(statistics.mean(first_div), 1),
                           "exit_histogram": [exits.count(k) for k in range(args.stages)],
                           "mean_fraction_of_stages": round(statistics.mean((s + 1) / args.stages for s in exits), 3)}
        steps.update()

        registry = rayops.registry("offramp")
        ep = next(e for e in ray.get(registry.endpoints.remote()) if e["stage"] == 0)
        handle = serve.get_deployment_handle("Stage0", "offramp")

        async def hops():
            return await _hops(handle, ep, rayops.channel_token("offramp"), staged.spec.hidden_size)

        report["hop"] = asyncio.run(hops())
        report["tracing"] = _tracing_overhead(base, prompts, args, name, model_dir)
        steps.update()
        r = report["results"]
        c = args.concurrency
        pipeline_tpot = r["offramp_exits_off_c1"]["server_tpot_p50_ms"]
        report["ratios"] = {
            "per_hop_overhead_ms (server TPOT - in-process TPOT) / stage calls per token":
                round((pipeline_tpot - 1000 * inproc_tpot) / args.stages, 3),
            "exits_on_vs_off_tpot_c1": round(pipeline_tpot / r["offramp_exits_on_c1"]["server_tpot_p50_ms"], 2),
            f"offramp_c{c}_vs_transformers_tokens_per_s": round(r[f"offramp_exits_on_c{c}"]["tokens_per_s"] / hf_tps, 2),
            f"offramp_exits_off_c{c}_vs_transformers": round(r[f"offramp_exits_off_c{c}"]["tokens_per_s"] / hf_tps, 2),
            "tracing_100pct_vs_off_tokens_per_s": report["tracing"]["ratio"],
        }
        report["targets"] = {"per_hop_overhead_ms": "<= 1", "exits_on_vs_off_tpot_c1": ">= 2",
                             "tracing_100pct_vs_off_tokens_per_s": ">= 0.95",
                             f"offramp_c{c}_vs_transformers_tokens_per_s": ">= 4"}
        steps.update()
        steps.close()
        if args.json:
            emit(report)
        else:
            print(_table(report))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return 0


def _otlp_sink():
    """A local OTLP/HTTP endpoint that accepts and drops spans (the exporter's work is real)."""
    import http.server
    import threading

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _tracing_overhead(base: str, prompts, args, name: str, model_dir) -> dict:
    """The same app with every request traced (100% sampling, OTLP export to a local sink)
    beside the untraced one; loaded runs interleaved, throughput ratio reported."""
    from ray import serve

    from offramp.deployments.app import build_app_with_env
    from offramp.deployments.config import AppArgs

    sink = _otlp_sink()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_SAMPLER": "always_on",
           "OTEL_SERVICE_NAME": "offramp-bench"}
    serve.run(build_app_with_env(AppArgs(model=str(model_dir), num_stages=args.stages), env), name="traced",
              route_prefix="/traced")
    try:
        asyncio.run(_load(base + "/traced", prompts[:2], "off", 1, 8, name))  # warm-up
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(2):
            for label, url in (("off", base), ("on", base + "/traced")):
                res = asyncio.run(_load(url, prompts, "off", args.concurrency, args.max_tokens, name))
                runs[label].append(res["tokens_per_s"])
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        return {"tokens_per_s_untraced": off, "tokens_per_s_traced": on, "ratio": round(on / off, 3)}
    finally:
        serve.delete("traced")
        sink.shutdown()


def _table(report: dict) -> str:
    lines = [f"model {report['model']}, {report['stages']} stages, {report['max_tokens']} tokens/request"]
    for k, v in report["results"].items():
        lines.append(f"  {k:<32} " + ", ".join(f"{a}={b}" for a, b in v.items()))
    lines.append(f"  exits: {report['exits']}")
    lines.append(f"  hop:   {report['hop']}")
    lines.append(f"  tracing: {report['tracing']}")
    lines += [f"  {k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)
