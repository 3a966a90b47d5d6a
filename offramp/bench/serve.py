"""``offramp bench serve``: the served pipeline against the contenders a user would choose.

One run, one machine, every contender warm (a warm-up wave each, discarded), the same
prompts (held-out text, every task) and the same ``max_tokens`` everywhere, greedy with
EOS ignored, at concurrency 1 and C. Repeats are interleaved: for each repeat, for each
concurrency, one wave per contender. A wave at concurrency ``c`` sends ``requests``
prompts with at most ``c`` in flight (the batched in-process contenders run them in
groups of ``c`` that start together).

Contenders (see ``CONTENDERS``):

* ``served``            the Offramp app, ``--stages`` stages, exits off, streamed over HTTP
                        (``/v1/completions``) through Serve's proxy (``--proxy``: HAProxy
                        by default, as ``RAY_SERVE_ENABLE_HA_PROXY=1 serve run`` in the
                        README, or Serve's Python proxy);
* ``served_calibrated`` the same app, calibrated exits (with the prompt's task hint);
* ``served_speculative`` the same app, speculative exits (stage 0 drafts, the deep stages
                        verify; output identical to exits off);
* ``served_1stage``     a second Offramp app with one stage, exits off, streamed;
* ``in_process``        ``StagedModel`` in this process, ``--stages`` stages, batched
                        ``generate`` of each group of ``c`` prompts (no Ray, no HTTP);
* ``transformers``      transformers ``generate`` in this process, batched the same way
                        (left padding + attention mask), greedy;
* ``plain_serve``       what a Ray user writes without Offramp: one Serve deployment of the
                        whole transformers model with ``@serve.batch`` (batched ``generate``
                        in a thread), reached over HTTP, not streamed (its TTFT is its whole
                        latency; its TPOT is measured inside the replica).

Per request, on the client: TTFT = first token - send, TPOT = (last token - first token)
/ (n - 1), with the token times of a streamed response taken when each SSE event arrives,
and those of the in-process contenders right after each decode step. Per wave: all tokens
/ wave wall time. Reported per contender and concurrency: p50 and p99 over every request
of every repeat, and the median over repeats of the wave tokens/s; ratios between them,
each with its target.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from offramp.bench.common import json_stdout, percentile
from offramp.protocol import DraftCounts
from offramp.training.data import TASKS  # the held-out tasks prompts come from

# The streamed contenders: the route of their app under the bench's Serve front, and the
# exit mode their requests ask for.
STREAMED = {"served": ("", "off"), "served_calibrated": ("", "calibrated"), "served_speculative": ("", "speculative"),
            "served_1stage": ("/one", "off"), "served_compiled": ("/compiled", "off"),
            "served_unchained": ("/unchained", "off")}
CONTENDERS = {
    "served": "Offramp served, N stages, exits off, HTTP streaming through Serve's proxy (--proxy)",
    "served_calibrated": "the same app, calibrated exits (task hint sent)",
    "served_speculative": "the same app, speculative exits (drafts at stage 0's exit head, verified deep)",
    "served_1stage": "a second Offramp app, 1 stage, exits off, HTTP streaming",
    "in_process": "StagedModel in the driver, N stages, batched generate (no Ray, no HTTP)",
    "transformers": "transformers generate in the driver, batched (left padding), greedy",
    "plain_serve": "one Serve deployment of the whole HF model, @serve.batch, HTTP, not streamed",
    "served_compiled": "--compile: a third Offramp app, N stages, exits off, StageArgs.compile (torch.compile)",
    "in_process_compiled": "--compile: StagedModel(compile=True) in the driver, N stages, batched",
    "served_unchained": "--unchained: a fourth Offramp app, N stages, exits off, chain_forwarding false",
}
COMPILED = ("served_compiled", "in_process_compiled")
PLAIN_BATCH_WAIT_S = 0.005

HELP = """\
Contenders, each warm (one discarded warm-up wave first), same prompts, same max_tokens:
  served             Offramp app with --stages stages, exits off, streamed over HTTP
                     (/v1/completions, stream=true) through Serve's proxy: HAProxy
                     (default, as the README runs it) or Serve's Python proxy (--proxy)
  served_calibrated  the same app with calibrated exits (prompt's task hint sent)
  served_speculative the same app with speculative exits: stage 0 drafts with its exit
                     head, the deep stages verify each draft in one visit (lossless)
  served_1stage      a second Offramp app with 1 stage (against plain_serve)
  in_process         offramp.ops.engine.StagedModel in this process, --stages stages,
                     batched generate over each group of c prompts
  transformers       AutoModelForCausalLM.generate in this process, batched the same
                     way (left padding, attention mask), greedy (--no-transformers skips)
  plain_serve        a plain Ray Serve deployment of the whole HF model with
                     @serve.batch, JSON over HTTP, not streamed: TTFT = full latency
                     (--no-plain skips)
  served_compiled    --compile: the served app again with torch.compile'd decoder
  in_process_compiled  blocks (StageArgs.compile), and the in-process engine likewise;
                     the others stay eager, so one run measures what compiling buys
  served_unchained   --unchained: the served app again with chain_forwarding false
                     (every stage answers the ingress, which sends rows on): what
                     chain forwarding buys, side by side
Prompts: held-out text (offramp prepare-data's split), every task, --prompt-tokens long.
Repeats are interleaved (repeat -> concurrency -> contender); p50/p99 over all requests,
median tokens/s over repeats. Ratios are printed with their targets."""


class _Given(argparse.Action):
    """Stores the value and records that the flag was given (``<dest>_given``), so a flag
    another source also sets (``--stages`` vs ``--config``) can be checked against it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


_APP_DEFAULT = object()  # --gate-max-active not given: the app's own default


def _count_or_none(v: str) -> int | None:
    """``--gate-max-active``: a count >= 0, or 'none'."""
    if v.lower() == "none":
        return None
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"{v!r}: give a count of requests (0, 1, 4, ...) or 'none'")
    return int(v)


def register(bsub) -> None:
    s = bsub.add_parser("serve", help="served pipeline vs in-process, batched transformers, plain Serve",
                        description=HELP, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s.add_argument("--model", help="checkpoint dir (default: the embedded model)")
    s.add_argument("--stages", type=int, default=2, action=_Given, help="pipeline stages of the served app "
                   "(default 2, like configs/local.yaml; with --config, the file's)")
    s.add_argument("--concurrency", type=int, default=16, help="the loaded concurrency C (default 16); "
                   "concurrency 1 is always measured too")
    s.add_argument("--requests", type=int, help="requests per wave at each concurrency (default: C at C, 4 at 1)")
    s.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    s.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    s.add_argument("--no-plain", action="store_true", help="skip the plain Serve deployment")
    s.add_argument("--no-transformers", action="store_true", help="skip batched transformers in the driver")
    s.add_argument("--tracing", action="store_true", help="also measure 100%% tracing (OTLP to a local sink) "
                   "against no tracing, tokens/s at C")
    s.add_argument("--proxy", choices=("haproxy", "python"), default="haproxy",
                   help="Serve's HTTP proxy for every HTTP contender: 'haproxy' (default; Serve's HAProxy mode, "
                   "RAY_SERVE_ENABLE_HA_PROXY=1, how the README runs it) or 'python' (Serve's own proxy actor)")
    s.add_argument("--slow-deep-stages", metavar="STEP_MS,TOKEN_MS",
                   help="put every stage after stage 0 of the served app on an emulated slow pool (the placement "
                        "bench's emulation, AppArgs.emulate_pools): each forward pass there takes at least STEP_MS "
                        "+ TOKEN_MS x positions, e.g. 20,2; the in-process and 1-stage contenders stay unemulated, "
                        "so read the served-vs-served ratios (speculative / calibrated vs off)")
    s.add_argument("--compile", action="store_true",
                   help="also measure torch.compile'd decoder blocks side by side: served_compiled (the N-stage app "
                        "with StageArgs.compile) and in_process_compiled (StagedModel(compile=True)); each compiles "
                        "before its first wave. transformers and plain Serve stay eager: torch.compile of "
                        "transformers' forward under generate's dynamic KV cache measured slower here (batch 1: "
                        "13.7 vs 6.3 ms per token, recompiling as the cache grows)")
    s.add_argument("--unchained", action="store_true",
                   help="also measure the served app without chain forwarding (served_unchained: every stage "
                        "answers the ingress, which sends the rows on), side by side with the default")
    s.add_argument("--config", metavar="SERVE_YAML",
                   help="take the served apps' settings from this Serve config's Offramp application (its args: "
                        "stages, split, per-stage compile/threads/batching, exit, chain_forwarding, micro_batches), "
                        "e.g. configs/local.yaml, so the served figures are those of `serve run SERVE_YAML`; the "
                        "model, model name and API key stay the bench's, and --stages comes from the file. When its "
                        "stages compile, the in-process contender compiles too (the strongest peer); the one-stage "
                        "app takes its first stage's settings")
    s.add_argument("--link-ms", type=int, default=0, metavar="MS",
                   help="emulated distance between the served apps' replicas (AppArgs.emulate_link_ms): every "
                        "stage-channel message arrives MS whole milliseconds late, as between machines (1-2 across "
                        "zones); with --unchained it measures what chain forwarding saves there. "
                        "Only the served apps' stage hops: in-process, transformers and plain Serve stay local, "
                        "and HTTP stays on loopback (default 0: this machine's loopback)")
    s.add_argument("--gate-max-active", metavar="N|none", type=_count_or_none, default=_APP_DEFAULT,
                   help="the served apps' exit.gate_max_active (calibrated exits are tried while at most N requests "
                        "are active; 'none': always); default: the app's default")
    s.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    s.set_defaults(func=run_serve)


# ----------------------------------------------------------------------------- statistics


def request_stats(t_send: float, stamps: list[float], expected: int | None = None,
                  error: str | None = None) -> dict:
    """One request from its send time and the arrival time of each of its tokens.

    TTFT = first token - send; TPOT = (last - first) / (n - 1) (NaN with fewer than two
    tokens). A request fails when it errored, got no token, or (``expected`` given) got a
    different number of tokens."""
    n = len(stamps)
    if error is None and n == 0:
        error = "no tokens"
    if error is None and expected is not None and n != expected:
        error = f"{n} tokens, expected {expected}"
    return {"n": n, "error": error,
            "ttft": stamps[0] - t_send if n else float("nan"),
            "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else float("nan")}


@dataclass
class Wave:
    """One wave of one contender: its requests and its wall time (first send to last token)."""

    wall: float
    requests: list[dict]
    extra: dict = field(default_factory=dict)  # contender-specific (server stats, stage calls)

    @property
    def tokens(self) -> int:
        return sum(r["n"] for r in self.requests if r["error"] is None)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")


def _ms(x: float) -> float | None:
    return round(1000 * x, 3) if x is not None and math.isfinite(x) else None


def summarize(waves: list[Wave], tpot_measured: bool = True) -> dict:
    """p50/p99 TTFT and TPOT over every successful request of every wave, the median over
    waves of the wave tokens/s, and the failures."""
    ok = [r for w in waves for r in w.requests if r["error"] is None]
    bad = [r["error"] for w in waves for r in w.requests if r["error"] is not None]
    tps = [w.tokens_per_s for w in waves]
    out = {"waves": len(waves), "requests": len(ok) + len(bad), "failed": len(bad),
           "errors": sorted(set(bad))[:5],
           "tokens_per_s": round(statistics.median(tps), 2) if tps else None,
           "tokens_per_s_waves": [round(t, 2) for t in tps],
           "ttft_ms_p50": _ms(percentile((r["ttft"] for r in ok), 0.5)),
           "ttft_ms_p99": _ms(percentile((r["ttft"] for r in ok), 0.99)),
           "tpot_ms_p50": _ms(percentile((r["tpot"] for r in ok), 0.5)) if tpot_measured else None,
           "tpot_ms_p99": _ms(percentile((r["tpot"] for r in ok), 0.99)) if tpot_measured else None}
    return out


def evaluate(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 1"``, ``"<= 0.5"``); None without a
    target; False for a missing or non-finite value."""
    if target is None:
        return None
    if value is None or not math.isfinite(value):
        return False
    op, bound = target.split()
    bound = float(bound)
    if op == ">=":
        return value >= bound
    if op == "<=":
        return value <= bound
    raise ValueError(f"target {target!r}: use '>= X' or '<= X'")


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


TPOT, TPS = "tpot_ms_p50", "tokens_per_s"
# The headline ratios: name ("{c}" = the loaded concurrency C), numerator and denominator as
# (contender, concurrency: 1 or "C", statistic), target (None: informative). TPOT ratios
# that compare two served variants put the other variant's TPOT on top, so > 1 always
# means "the first-named is faster".
RATIOS = (
    ("served_tpot_c1_vs_in_process", ("served", 1, TPOT), ("in_process", 1, TPOT), "<= 1.5"),
    ("served_tokens_per_s_c{c}_vs_in_process", ("served", "C", TPS), ("in_process", "C", TPS), ">= 0.6"),
    ("served_1stage_c{c}_vs_plain_serve", ("served_1stage", "C", TPS), ("plain_serve", "C", TPS), ">= 1"),
    ("served_c{c}_vs_transformers_batched", ("served", "C", TPS), ("transformers", "C", TPS), None),
    ("calibrated_vs_off_tokens_per_s_c{c}", ("served_calibrated", "C", TPS), ("served", "C", TPS), ">= 1"),
    ("calibrated_vs_off_tpot_c1", ("served", 1, TPOT), ("served_calibrated", 1, TPOT), ">= 1"),
    ("speculative_vs_off_tpot_c1", ("served", 1, TPOT), ("served_speculative", 1, TPOT), ">= 1.5"),
    ("speculative_vs_off_tokens_per_s_c{c}", ("served_speculative", "C", TPS), ("served", "C", TPS), ">= 1.2"),
    # --compile: what torch.compile buys, served and in process, and the compiled pair's gap
    ("served_compiled_vs_eager_tpot_c1", ("served", 1, TPOT), ("served_compiled", 1, TPOT), None),
    ("served_compiled_vs_eager_tokens_per_s_c{c}", ("served_compiled", "C", TPS), ("served", "C", TPS), None),
    ("in_process_compiled_vs_eager_tpot_c1", ("in_process", 1, TPOT), ("in_process_compiled", 1, TPOT), None),
    ("in_process_compiled_vs_eager_tokens_per_s_c{c}", ("in_process_compiled", "C", TPS), ("in_process", "C", TPS),
     None),
    ("served_compiled_tpot_c1_vs_in_process_compiled", ("served_compiled", 1, TPOT), ("in_process_compiled", 1, TPOT),
     "<= 1.5"),
    ("served_compiled_tokens_per_s_c{c}_vs_in_process_compiled", ("served_compiled", "C", TPS),
     ("in_process_compiled", "C", TPS), ">= 0.6"),
    # --unchained: what chain forwarding buys
    ("chained_vs_unchained_tpot_c1", ("served_unchained", 1, TPOT), ("served", 1, TPOT), ">= 1"),
    ("chained_vs_unchained_tokens_per_s_c{c}", ("served", "C", TPS), ("served_unchained", "C", TPS), ">= 1"),
)


def ratios(summary: dict, c: int) -> dict:
    """The headline ratios (:data:`RATIOS`) from ``summary[contender][f"c{k}"]``, plus the
    served pipeline's overhead per stage call; a ratio whose contender was skipped is left
    out. Each: value, target (None: informative), met."""
    def get(name, k, key):
        return summary.get(name, {}).get(f"c{c if k == 'C' else k}", {}).get(key)

    out: dict[str, dict] = {}

    def put(name, value, target, what):
        if value is None and any(n not in summary for n in what):
            return  # a contender was skipped
        out[name] = {"value": round(value, 3) if value is not None else None, "target": target,
                     "met": evaluate(value, target)}

    for name, top, bottom, target in RATIOS:
        put(name.format(c=c), _div(get(*top), get(*bottom)), target, (top[0], bottom[0]))
    # (served - in-process TPOT at one stream) per stage call of a served token
    s_tpot1, i_tpot1 = get("served", 1, TPOT), get("in_process", 1, TPOT)
    calls = get("served", 1, "stage_calls_per_token")
    overhead = _div(s_tpot1 - i_tpot1, calls) if s_tpot1 is not None and i_tpot1 is not None else None
    put("overhead_per_stage_call_ms", overhead, "<= 0.5", ("served", "in_process"))
    return out


# ----------------------------------------------------------------------------- prompts


def build_prompts(docs: list[dict], encode: Callable[[str], list[int]], n: int, prompt_tokens: int,
                  tasks: tuple[str, ...] = TASKS) -> list[tuple[str, list[int]]]:
    """``n`` (task, token ids) prompts of exactly ``prompt_tokens`` tokens, round-robin over
    the tasks present in ``docs`` (so the first ``len(tasks)`` prompts hold one of each):
    consecutive non-overlapping windows of each document's tokens, documents in order."""
    if prompt_tokens < 1 or n < 0:
        raise ValueError("prompt_tokens must be >= 1 and n >= 0")

    def windows(task):
        for d in docs:
            if d["task"] != task:
                continue
            ids = list(encode(d["text"]))
            for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens):
                yield ids[i:i + prompt_tokens]

    sources = {t: windows(t) for t in tasks if any(d["task"] == t for d in docs)}
    out: list[tuple[str, list[int]]] = []
    while len(out) < n and sources:
        for t in list(sources):
            if len(out) == n:
                break
            w = next(sources[t], None)
            if w is None:
                del sources[t]
            else:
                out.append((t, w))
    if len(out) < n:
        raise ValueError(f"the documents give only {len(out)} prompts of {prompt_tokens} tokens; {n} needed")
    return out


# ----------------------------------------------------------------------------- HTTP contenders


def _session(concurrency: int):
    """The benchmark's HTTP client: aiohttp, no connection cap below the wave's concurrency.
    It shares this machine with the served contenders (the in-process ones have no client),
    so it is the cheapest well-kept client measured: ~40 us of CPU per streamed event on
    uvloop against ~150 us for httpx (docs/benchmarks.md)."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), read_bufsize=1 << 20,
                                 connector=aiohttp.TCPConnector(limit=max(100, concurrency)))


def run_client(coro):
    """Run one wave's client coroutine on uvloop (the loop Serve runs its replicas on)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _stream_one(session, url: str, body: dict, expected: int) -> tuple[dict, list[int]]:
    """One streamed completion: request stats and the exit stage of each token."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    stages: list[int] = []
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                text = await r.text()
                return request_stats(t0, [], error=f"HTTP {r.status}: {text[:120]}"), []
            async for line in r.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter()
                ev = json.loads(line[6:])
                if ev.get("error"):
                    return request_stats(t0, stamps, error=str(ev["error"])[:120]), stages
                if not ev.get("choices"):
                    continue
                off = ev["choices"][0].get("offramp") or {}
                ids = off.get("token_ids")
                ex = off.get("exit_stages") or []
                k = len(ids) if ids is not None else len(ex)
                stamps.extend([now] * k)
                stages.extend(ex)
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return request_stats(t0, stamps, error=f"{type(e).__name__}: {e}"[:120]), stages
    return request_stats(t0, stamps, expected), stages


async def _served_wave(base: str, prompts: list[tuple[str, list[int]]], exit_mode: str, concurrency: int,
                       max_tokens: int, model: str) -> Wave:
    stats_url = f"{base}/v1/offramp/stats"
    sem = asyncio.Semaphore(concurrency)
    async with _session(concurrency) as session:
        async def stats() -> dict:
            async with session.get(stats_url, params={"reset": "true"}) as r:
                return await r.json()

        before = await stats()

        async def one(task, ids):
            async with sem:
                return await _stream_one(session, f"{base}/v1/completions", {
                    "model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "offramp": {"exit": exit_mode, "task": task}}, max_tokens)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(t, p) for t, p in prompts))
        wall = time.perf_counter() - t0
        after = await stats()
    calls = sum(after.get("stage_calls", [])) - sum(before.get("stage_calls", []))
    hop_s = sum(after.get("hop_s_sum", [])) - sum(before.get("hop_s_sum", []))
    hop_n = sum(after.get("hop_n", [])) - sum(before.get("hop_n", []))
    stages = [s for _, st in res for s in st]
    b0, b1 = before.get("speculative") or {}, after.get("speculative") or {}
    spec = DraftCounts(*(b1.get(k, 0) - b0.get(k, 0) for k in ("drafted", "accepted", "verify_rounds")))
    extra = {"stage_calls": calls, "hop_s": hop_s, "hop_n": hop_n, "exit_stages": stages, "speculative": spec,
             **{f"server_{k}": after.get(k) for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")}}
    return Wave(wall, [r for r, _ in res], extra)


async def _plain_wave(url: str, prompts: list[tuple[str, list[int]]], concurrency: int, max_tokens: int) -> Wave:
    sem = asyncio.Semaphore(concurrency)
    async with _session(concurrency) as session:
        async def one(ids):
            async with sem:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json={"prompt": ids, "max_tokens": max_tokens}) as r:
                        if r.status != 200:
                            text = await r.text()
                            return request_stats(t0, [], error=f"HTTP {r.status}: {text[:120]}"), {}
                        body = await r.json()
                    end = time.perf_counter()
                except Exception as e:  # noqa: BLE001
                    return request_stats(t0, [], error=f"{type(e).__name__}: {e}"[:120]), {}
                # Not streamed: every token arrives with the response.
                return request_stats(t0, [end] * int(body["tokens"]), max_tokens), body

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p) for _, p in prompts))
        wall = time.perf_counter() - t0
    batches = {b["batch_id"]: b["batch"] for _, b in res if "batch_id" in b}
    return Wave(wall, [r for r, _ in res], {"server_tpot_s": [b["tpot_s"] for _, b in res if b.get("tpot_s")],
                                            "batch_sizes": [batches[k] for k in sorted(batches)]})


# ----------------------------------------------------------------------------- in-process contenders


def _grouped(prompts: list, c: int) -> list[list]:
    return [prompts[i:i + c] for i in range(0, len(prompts), c)]


def _in_process_wave(model, prompts: list[tuple[str, list[int]]], c: int, max_tokens: int) -> Wave:
    """Groups of ``c`` prompts, each one batched ``generate``; a group's requests start
    together at the group's start, their tokens are timed right after each decode step."""
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    reqs: list[dict] = []
    t_wave = time.perf_counter()
    for group in _grouped(prompts, c):
        stamps: list[float] = []
        t0 = time.perf_counter()
        seqs = model.generate([p for _, p in group], sp, ExitPolicy("off"),
                              on_step=lambda: stamps.append(time.perf_counter()))
        reqs += [request_stats(t0, stamps[:len(s.generated)], max_tokens) for s in seqs]
    return Wave(time.perf_counter() - t_wave, reqs)


def hf_generate(model, prompts: list[list[int]], max_tokens: int, pad_id: int) -> tuple[list[float], int]:
    """Batched greedy transformers ``generate`` of exactly ``max_tokens`` tokens per prompt
    (left padding with an attention mask). Returns the time of each decode step, recorded
    by a logits processor (called once per step, after the forward pass, before the
    token is chosen; it returns the scores unchanged), and the tokens generated per row."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=pad_id, eos_token_id=None,
                       logits_processor=LogitsProcessorList([Stamp()]))
    return stamps, int(out.shape[1] - width)


def _hf_pad_id(model) -> int:
    pad = model.config.pad_token_id
    return int(pad) if pad is not None else 0


def _transformers_wave(model, prompts: list[tuple[str, list[int]]], c: int, max_tokens: int) -> Wave:
    pad = _hf_pad_id(model)
    reqs: list[dict] = []
    t_wave = time.perf_counter()
    for group in _grouped(prompts, c):
        t0 = time.perf_counter()
        stamps, n = hf_generate(model, [p for _, p in group], max_tokens, pad)
        reqs += [request_stats(t0, stamps[:n], max_tokens) for _ in group]
    return Wave(time.perf_counter() - t_wave, reqs)


# ----------------------------------------------------------------------------- plain Serve


def plain_serve_deployment(max_batch_size: int, num_cpus: float, threads: int = 2):
    """The baseline a Ray user writes without Offramp: one deployment holding the whole
    transformers model, requests batched by ``@serve.batch`` and run as one ``generate``
    in a thread. POST ``{"prompt": [ids], "max_tokens": n}`` -> ``{"tokens": n, "tpot_s": s,
    "batch": size, "batch_id": k}`` (the TPOT and size of the batch the request ran in).

    Defined here, on demand, so importing this module does not import Ray Serve."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(name="PlainLM", max_ongoing_requests=256, max_queued_requests=512,
                      ray_actor_options={"num_cpus": num_cpus})
    class PlainLM:
        def __init__(self, model_dir: str):
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(threads)  # Ray set OMP_NUM_THREADS from num_cpus
            self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            self.pad = _hf_pad_id(self.model)
            self.batches = 0

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=PLAIN_BATCH_WAIT_S)
        async def generate(self, bodies: list[dict]) -> list[dict]:
            n = max(int(b["max_tokens"]) for b in bodies)
            stamps, made = await asyncio.to_thread(hf_generate, self.model, [b["prompt"] for b in bodies], n,
                                                   self.pad)
            tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
            self.batches += 1
            return [{"tokens": min(made, int(b["max_tokens"])), "tpot_s": tpot, "batch": len(bodies),
                     "batch_id": self.batches} for b in bodies]

        async def __call__(self, request: Request) -> dict:
            return await self.generate(await request.json())

    return PlainLM


# ----------------------------------------------------------------------------- the run


def _config_app_args(path: str, model: str | None, app_args_type):
    """The Offramp application's ``args`` of the Serve config at ``path``, typed (the
    ``--model`` flag, when given, replaces its model)."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read it as YAML ({e})") from None
    apps = [a for a in (config.get("applications") or []) if isinstance(a, dict)
            and str(a.get("import_path", "")).endswith("offramp.deployments.app:build_app")]
    if not apps:
        raise ValueError(f"--config {path}: no application with import_path offramp.deployments.app:build_app; "
                         "give a Serve config that runs Offramp, e.g. configs/local.yaml")
    raw = dict(apps[0].get("args") or {})
    if model is not None:
        raw["model"] = model
    try:
        return app_args_type.model_validate(raw)
    except ValueError as e:
        raise ValueError(f"--config {path}: its Offramp args are invalid: {e}") from None


def run_serve(args) -> int:
    with json_stdout(args.json) as emit:
        return _run_serve(args, emit)


def _requests_at(args, c: int) -> int:
    if args.requests is not None:
        return args.requests
    return args.concurrency if c == args.concurrency else 4


def _run_serve(args, emit) -> int:
    from offramp.cluster.local import HAPROXY_ENV, LOOPBACK_ENV, private_haproxy_env

    # Read by the processes the cluster below starts (they inherit this environment).
    os.environ.update(LOOPBACK_ENV)
    if args.proxy == "haproxy":
        os.environ.update(private_haproxy_env())
    else:
        os.environ.update({k: "0" for k in HAPROXY_ENV})
    import torch
    from tqdm import tqdm

    from offramp.api.text import load_tokenizer
    from offramp.cluster import rayops
    from offramp.cluster.local import free_port, pool_cluster
    from offramp.deployments.app import OfframpIngress, StageDeployment, build_app
    from offramp.deployments.config import AppArgs, StageArgs
    from offramp.ops.engine import StagedModel, resolve_model_dir
    from offramp.training.data import DataSpec, build_corpus

    C = args.concurrency
    app_base = _config_app_args(args.config, args.model, AppArgs) if args.config else None
    if app_base is not None:
        from offramp.deployments.config import model_facts

        n = len(model_facts(app_base).ranges)
        if getattr(args, "stages_given", False) and args.stages != n:
            raise ValueError(f"--stages {args.stages} and --config {args.config} ({n} stages) disagree; drop "
                             "--stages (the file's split is what `serve run` runs) or edit the file")
        args.stages = n
        args.model = app_base.model  # the file's model (or --model, which replaced it)
    if min(C, args.stages, args.repeats, args.prompt_tokens) < 1 or args.max_tokens < 2 or \
            (args.requests is not None and args.requests < 1):
        raise ValueError("--concurrency, --stages, --repeats, --prompt-tokens and --requests must be >= 1, "
                         "--max-tokens >= 2 (TPOT needs two tokens)")
    levels = [1] if C == 1 else [1, C]
    if not 0 <= args.link_ms <= 1000:
        raise ValueError(f"--link-ms {args.link_ms}: give a one-way delay in whole milliseconds, 0 to 1000")
    slow_deep = None
    if args.slow_deep_stages:
        try:
            slow_deep = tuple(float(x) for x in args.slow_deep_stages.split(","))
        except ValueError:
            slow_deep = ()
        if len(slow_deep) != 2 or min(slow_deep) < 0:
            raise ValueError(f"--slow-deep-stages {args.slow_deep_stages!r}: give STEP_MS,TOKEN_MS, e.g. 20,2")
        if args.stages < 2:
            raise ValueError("--slow-deep-stages needs --stages 2 or more (stage 0 stays fast)")
    names = [n for n in CONTENDERS if not (n == "plain_serve" and args.no_plain)
             and not (n == "transformers" and args.no_transformers) and not (n in COMPILED and not args.compile)
             and not (n == "served_unchained" and not args.unchained)]
    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    heldout = build_corpus(DataSpec(), None)[1]
    n_prompts = max(_requests_at(args, c) for c in levels)
    prompts = build_prompts(heldout, lambda t: tok.encode(t, add_special_tokens=True, verbose=False), n_prompts,
                            args.prompt_tokens)
    ingress_cpus = OfframpIngress.ray_actor_options.get("num_cpus", 0)
    stage_cpus = StageDeployment.ray_actor_options.get("num_cpus", 0)
    plain_cpus = ingress_cpus + args.stages * stage_cpus  # what the served app reserves in all

    bar = tqdm(total=4 + (args.repeats + 1) * (len(levels) * len(names) + (2 if args.tracing else 0)),
               desc="bench serve", file=sys.stderr, disable=args.json)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    model_name = "offramp-default"
    boot = contextlib.ExitStack()
    try:
        boot.enter_context(pool_cluster(gpu_nodes=0, cpu_nodes=1, cpus_per_node=8, head_cpus=2))
        rayops.start_serve(port)

        base_app = app_base or AppArgs(
            num_stages=args.stages, stages=[StageArgs(max_batch_size=max(16, C), max_sequences=max(64, C))] * args.stages)

        def offramp_args(stages: int, slow_deep: tuple[float, float] | None = None, compiled: bool = False,
                         chain: bool | None = None) -> AppArgs:
            """The served app: ``base_app`` (the bench's defaults, or --config's) with ``stages``
            stages (another count than its own: an even split, its first stage's settings),
            and what the contender and the flags change."""
            per = [base_app.stages[k] if k < len(base_app.stages) else StageArgs() for k in range(stages)]
            if stages != args.stages:
                per = [per[0]] * stages
            if compiled:
                per = [sa.model_copy(update={"compile": True}) for sa in per]
            update: dict = {"model": str(model_dir), "model_name": model_name, "api_key_env": "", "stages": per}
            if stages != args.stages:  # its own best lanes too (one stage: one lane)
                update.update(num_stages=stages, split=None, micro_batches=None)
            if chain is not None:
                update["chain_forwarding"] = chain
            if args.link_ms:
                update["emulate_link_ms"] = args.link_ms
            if args.gate_max_active is not _APP_DEFAULT:
                update["exit"] = base_app.exit.model_copy(update={"gate_max_active": args.gate_max_active})
            if slow_deep is not None:
                update["stages"] = [per[0].model_copy(update={"pool": "gpu"})] + \
                    [sa.model_copy(update={"pool": "cpu"}) for sa in per[1:]]
                update["emulate_pools"] = {"cpu": {"step_s": slow_deep[0] / 1000, "per_token_s": slow_deep[1] / 1000}}
            return AppArgs.model_validate({**base_app.model_dump(), **update})

        rayops.run_app(build_app(offramp_args(args.stages, slow_deep)), "offramp", "/")
        bar.update()
        rayops.run_app(build_app(offramp_args(1)), "offramp-1stage", STREAMED["served_1stage"][0])
        if "served_compiled" in names:
            rayops.run_app(build_app(offramp_args(args.stages, slow_deep, compiled=True)), "offramp-compiled",
                           STREAMED["served_compiled"][0])
        if "served_unchained" in names:
            rayops.run_app(build_app(offramp_args(args.stages, slow_deep, chain=False)), "offramp-unchained",
                           STREAMED["served_unchained"][0])
        bar.update()
        if "plain_serve" in names:
            rayops.run_app(plain_serve_deployment(C, plain_cpus).bind(str(model_dir)), "plain", "/plain")
        bar.update()
        # The in-process peer runs the served app's split, compiled when its stages are.
        in_process_compiled = any(sa.compile for sa in base_app.stages)
        staged = StagedModel(model_dir, num_stages=args.stages, split=base_app.split, max_slots=C,
                             compile=in_process_compiled)
        staged_compiled = StagedModel(model_dir, num_stages=args.stages, split=base_app.split, max_slots=C,
                                      compile=True) \
            if "in_process_compiled" in names else None
        hf = None
        if "transformers" in names:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        bar.update()

        def wave(name: str, c: int) -> Wave:
            ps = prompts[:_requests_at(args, c)]
            if name in STREAMED:
                route, mode = STREAMED[name]
                return run_client(_served_wave(base + route, ps, mode, c, args.max_tokens, model_name))
            if name == "in_process":
                return _in_process_wave(staged, ps, c, args.max_tokens)
            if name == "in_process_compiled":
                return _in_process_wave(staged_compiled, ps, c, args.max_tokens)
            if name == "transformers":
                return _transformers_wave(hf, ps, c, args.max_tokens)
            if name == "plain_serve":
                return run_client(_plain_wave(base + "/plain", ps, c, args.max_tokens))
            raise KeyError(name)

        waves: dict[tuple[str, int], list[Wave]] = {}
        for r in range(args.repeats + 1):  # round 0: the warm-up wave of each, discarded
            for c in levels:
                for name in names:
                    w = wave(name, c)
                    if r > 0:
                        waves.setdefault((name, c), []).append(w)
                    bar.update()

        summary: dict[str, dict] = {}
        for (name, c), ws in waves.items():
            s = summarize(ws, tpot_measured=name != "plain_serve")
            if name in STREAMED:
                tokens = sum(w.tokens for w in ws)
                calls = sum(w.extra["stage_calls"] for w in ws)
                hop_n = sum(w.extra["hop_n"] for w in ws)
                stages = [x for w in ws for x in w.extra["exit_stages"]]
                n_st = 1 if name == "served_1stage" else args.stages
                s["stage_calls_per_token"] = round(calls / tokens, 3) if tokens else None
                s["server_hop_ms_mean"] = round(1000 * sum(w.extra["hop_s"] for w in ws) / hop_n, 3) if hop_n else None
                s["exit_histogram"] = [stages.count(k) for k in range(n_st)]
                if name == "served_speculative":
                    total = DraftCounts()
                    for w in ws:
                        total += w.extra["speculative"]
                    s["speculative"] = total.report(tokens)
                s["mean_fraction_of_stages"] = round(statistics.mean((x + 1) / n_st for x in stages), 3) \
                    if stages else None
                for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
                    vals = [w.extra[f"server_{k}"] for w in ws if w.extra.get(f"server_{k}") is not None]
                    s[f"server_{k}"] = round(statistics.median(vals), 3) if vals else None
            if name == "plain_serve":
                tp = [t for w in ws for t in w.extra["server_tpot_s"]]
                s["server_tpot_ms_p50"] = _ms(percentile(tp, 0.5))
                s["server_tpot_ms_p99"] = _ms(percentile(tp, 0.99))
                s["batch_sizes_per_wave"] = [w.extra["batch_sizes"] for w in ws]
            summary.setdefault(name, {})[f"c{c}"] = s

        report: dict[str, Any] = {
            "model": str(model_dir), "stages": args.stages, "concurrency": levels, "proxy": args.proxy,
            "slow_deep_stages_ms": slow_deep, "link_ms": args.link_ms, "config": args.config,
            "in_process_compiled": in_process_compiled,
            "requests_per_wave": {f"c{c}": _requests_at(args, c) for c in levels},
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "prompt_tasks": {t: sum(1 for pt, _ in prompts if pt == t) for t in TASKS},
            "driver_threads": torch.get_num_threads(), "plain_serve_num_cpus": plain_cpus,
            "load_average_at_end": list(os.getloadavg()),
            "contenders": {n: {"description": CONTENDERS[n], **summary[n]} for n in names},
            "ratios": ratios(summary, C),
        }
        if args.tracing:
            report["tracing"] = _tracing_overhead(base, prompts[:_requests_at(args, C)], args, model_name,
                                                  offramp_args(args.stages), bar.update)
            report["ratios"]["tracing_100pct_vs_off_tokens_per_s"] = {
                "value": report["tracing"]["ratio"], "target": ">= 0.95",
                "met": evaluate(report["tracing"]["ratio"], ">= 0.95")}
        bar.close()
        if args.json:
            emit(report)
        else:
            print(_table(report))
    finally:
        bar.close()
        try:
            rayops.shutdown_serve()
        finally:
            boot.close()  # leaves and removes the cluster
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


def _tracing_overhead(base: str, prompts, args, model_name: str, app_args, progress=lambda: None) -> dict:
    """The same app with every request traced (100% sampling, OTLP export to a local sink)
    beside the untraced one: waves at C, exits off, interleaved, warm; median tokens/s."""
    from offramp.cluster import rayops
    from offramp.deployments.app import build_app_with_env

    sink = _otlp_sink()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_address[1]}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_SAMPLER": "always_on",
           "OTEL_SERVICE_NAME": "offramp-bench"}
    rayops.run_app(build_app_with_env(app_args, env), "traced", "/traced")
    try:
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(args.repeats + 1):
            for label, url in (("off", base), ("on", base + "/traced")):
                w = run_client(_served_wave(url, prompts, "off", args.concurrency, args.max_tokens, model_name))
                if r > 0:
                    runs[label].append(w.tokens_per_s)
                progress()
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        return {"tokens_per_s_untraced": round(off, 2), "tokens_per_s_traced": round(on, 2),
                "ratio": round(on / off, 3)}
    finally:
        rayops.delete_app("traced")
        sink.shutdown()


def _fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _table(report: dict) -> str:
    lines = [f"model {report['model']}, {report['stages']} stages, prompts of {report['prompt_tokens']} tokens "
             f"({report['prompt_tasks']}), {report['max_tokens']} tokens/request, {report['repeats']} repeats, "
             f"requests per wave {report['requests_per_wave']}, proxy {report.get('proxy', 'python')}", ""]
    head = f"{'contender':<18}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}" \
           f"{'TPOT p99':>10}{'failed':>8}  notes"
    lines += [head, "-" * len(head)]
    for name, d in report["contenders"].items():
        for key in sorted((k for k in d if k.startswith("c") and k[1:].isdigit()), key=lambda k: int(k[1:])):
            s = d[key]
            notes = []
            if "stage_calls_per_token" in s:
                notes.append(f"stage calls/token {_fmt(s['stage_calls_per_token'])}, server TTFT/TPOT p50 "
                             f"{_fmt(s['server_ttft_ms_p50'])}/{_fmt(s['server_tpot_ms_p50'])} ms")
            if name == "plain_serve":
                notes.append(f"TTFT = full latency; TPOT in replica p50 {_fmt(s['server_tpot_ms_p50'])} ms; "
                             f"batches {s['batch_sizes_per_wave']}")
            lines.append(f"{name:<18}{key[1:]:>5}{_fmt(s['tokens_per_s']):>9}{_fmt(s['ttft_ms_p50']):>10}"
                         f"{_fmt(s['ttft_ms_p99']):>10}{_fmt(s['tpot_ms_p50']):>10}{_fmt(s['tpot_ms_p99']):>10}"
                         f"{s['failed']:>8}  {'; '.join(notes)}")
    lines += ["", "(times in ms; tok/s = median over repeats of a wave's tokens / its wall time)", "", "ratios:"]
    for k, v in report["ratios"].items():
        met = {True: "met", False: "not met", None: "informative"}[v["met"]]
        target = f"target {v['target']}" if v["target"] else "no target"
        lines.append(f"  {k:<40} {_fmt(v['value']):>8}  ({target}: {met})")
    if "tracing" in report:
        lines.append(f"  tracing: {report['tracing']}")
    return "\n".join(lines)
