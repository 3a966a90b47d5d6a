"""The served pipeline on a real local multi-node Ray cluster, through real HTTP and the
real ``openai`` client. One cluster and app for the whole module (``serve_cluster``);
tests run in file order, and the two that change the deployment (scaling, replica kill)
come last.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from serve_fixtures import (GPU_STAGES, MODEL_NAME, NUM_STAGES, actor_of_replica, apply_config, haproxy_binds,
                            node_pools, registry_endpoints, replica_actors, serve_config, wait_running)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Token ids below 259: the byte tokenizer's size (the server rejects ids it cannot decode).
PROMPTS = [[5, 17, 99, 250, 42, 7], [3, 4, 5, 6], [200, 100, 30, 77, 12, 9, 44, 31, 8]]
MAX_TOKENS = 16


# ------------------------------------------------------------------ in-process references


@pytest.fixture(scope="module")
def staged(tiny_model_dir):
    """The in-process reference: the same checkpoint, same 4-stage split, no Ray."""
    import torch

    from offramp.ops.engine import StagedModel

    torch.set_num_threads(1)  # 2 shared cores: leave room for the cluster
    return StagedModel(tiny_model_dir, num_stages=NUM_STAGES)


def reference(staged, prompt, max_tokens, policy):
    from offramp.protocol import SamplingParams

    (s,) = staged.generate([list(prompt)], SamplingParams(max_tokens=max_tokens, ignore_eos=True), policy)
    return s


@pytest.fixture(scope="module")
def mixed_threshold(staged):
    """(prompt, threshold) giving both early and full-depth tokens. A random model's exit
    confidences all sit near 1/vocab, so the scan is fine-grained, and the threshold is kept
    only if nudging it by ±0.1% changes nothing (no confidence sits on the edge, so float
    noise between the distributed and in-process runs cannot flip a decision)."""
    from offramp.ops.worker import ExitPolicy

    def run(prompt, thr):
        s = reference(staged, prompt, 24, ExitPolicy("threshold", float(thr)))
        return s.generated, s.exit_stages

    best = None
    for prompt in PROMPTS:
        for thr in np.linspace(0.0029, 0.0037, 33):
            toks, stages = run(prompt, thr)
            deep = sum(st == NUM_STAGES - 1 for st in stages)
            early = len(stages) - deep
            if not (deep >= 3 and early >= 3):
                continue
            if run(prompt, thr * 0.999) != (toks, stages) or run(prompt, thr * 1.001) != (toks, stages):
                continue
            score = min(deep, early) + len(set(stages))
            if best is None or score > best[0]:
                best = (score, prompt, float(thr))
        if best is not None and best[0] >= 10:
            break
    assert best is not None, "no threshold in the scanned range gives a robust mix of early and full-depth exits"
    return best[1], best[2]


def offramp_of(choice):
    return choice.model_extra["offramp"]


def completion(client, prompt, max_tokens=MAX_TOKENS, exit="off", **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"offramp": {"exit": exit}, "ignore_eos": True}, **kw)


# ------------------------------------------------------------------ 1. placement


def test_stages_land_on_their_pools(serve_cluster):
    pools = node_pools()
    assert sorted(pools.values()) == ["cpu", "cpu", "gpu", "head"]
    for k in range(NUM_STAGES):
        actors = replica_actors(f"Stage{k}", expect=1)
        want = "gpu" if k in GPU_STAGES else "cpu"
        assert {pools[a.node_id] for a in actors} == {want}, f"Stage{k} placed off its {want} pool"


# ------------------------------------------------------------------ 2. OpenAI surface


def test_http_reaches_the_ingress_through_haproxy(serve_cluster):
    """The session cluster runs Serve's HAProxy mode (as the README's `serve run` does): the
    API port is HAProxy's, not the Python proxy's, so every HTTP test below goes through it."""
    assert f"127.0.0.1:{serve_cluster.port}" in haproxy_binds()
    # readiness through it: the app is RUNNING, so live replicas cover every stage
    assert httpx.get(f"{serve_cluster.root_url}/health", timeout=30).json() == {"status": "ok"}


def test_completions_chat_and_streaming_with_openai_client(serve_cluster):
    client = serve_cluster.openai()
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]

    r = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    (c,) = r.choices
    assert c.text and c.finish_reason == "length"
    assert r.usage.completion_tokens == 8 == len(offramp_of(c)["token_ids"])
    assert r.usage.prompt_tokens == len("Hello there")  # byte tokenizer, no BOS added by this tokenizer
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(offramp_of(c)["exit_stages"]) == 8

    msgs = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    (c,) = r.choices
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 == len(offramp_of(c)["token_ids"])
    assert r.usage.prompt_tokens > len("Say something")  # the chat template adds role markers
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chat_ids = offramp_of(c)["token_ids"]

    stream = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)  # the client stops at `data: [DONE]`; an error event would raise here
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert content == c.message.content  # greedy: the stream says what the JSON said
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"  # the role chunk carries no tokens
    streamed_stages = [s for ch in with_choices[1:] for s in offramp_of(ch.choices[0])["exit_stages"]]
    assert len(streamed_stages) == len(chat_ids)


# ------------------------------------------------------------------ 3. exits off == in-process


def test_exits_off_equals_in_process_greedy(serve_cluster, staged):
    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai()
    for p in PROMPTS:
        ref = reference(staged, p, MAX_TOKENS, ExitPolicy("off"))
        r = completion(client, p, exit="off")
        extra = offramp_of(r.choices[0])
        assert extra["token_ids"] == ref.generated, f"prompt {p}"
        assert extra["exit_stages"] == [NUM_STAGES - 1] * MAX_TOKENS
        assert extra["stages_skipped"] == 0
    before = serve_cluster.stats()
    completion(client, PROMPTS[0], exit="off")
    assert [a - b for a, b in zip(serve_cluster.stats(), before)] == [MAX_TOKENS] * NUM_STAGES


# ------------------------------------------------------------------ 4. exits on: distributed == in-process


def test_exits_on_matches_in_process_and_skips_stages(serve_cluster, staged, mixed_threshold):
    import torch
    from transformers import AutoModelForCausalLM

    from offramp.ops.worker import ExitPolicy

    (prompt, threshold), n = mixed_threshold, 24
    ref = reference(staged, prompt, n, ExitPolicy("threshold", threshold))
    client = serve_cluster.openai()
    before = serve_cluster.stats()
    r = completion(client, prompt, max_tokens=n, exit=threshold)
    after = serve_cluster.stats()
    extra = offramp_of(r.choices[0])
    ids, stages = extra["token_ids"], extra["exit_stages"]

    assert ids == ref.generated
    assert stages == ref.exit_stages
    assert 0 < sum(s < NUM_STAGES - 1 for s in stages) < n, "the threshold must give a mix of exits"
    assert extra["stages_skipped"] == sum(NUM_STAGES - 1 - s for s in stages)

    # Stage k was visited once per token whose exit stage is >= k, never for tokens that exited before it.
    calls = [a - b for a, b in zip(after, before)]
    assert calls == [sum(s >= k for s in stages) for k in range(NUM_STAGES)]

    # The stream reports the same exit stage per token as the JSON response.
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
        extra_body={"offramp": {"exit": threshold}, "ignore_eos": True}))
    assert [s for ch in chunks for s in offramp_of(ch.choices[0])["exit_stages"]] == stages

    # Exact deferred backfill: every full-depth token is the full model's greedy token for its prefix.
    hf = AutoModelForCausalLM.from_pretrained(str(serve_cluster.model_dir)).eval()
    tokens = list(prompt) + ids
    with torch.no_grad():
        greedy = hf(torch.tensor([tokens])).logits[0].argmax(-1).tolist()
    deep = [i for i, s in enumerate(stages) if s == NUM_STAGES - 1]
    assert any(i > min(j for j, s in enumerate(stages) if s < NUM_STAGES - 1) for i in deep), \
        "need a full-depth token after an early exit to test the backfill"
    for i in deep:
        pos = len(prompt) + i
        assert tokens[pos] == greedy[pos - 1], f"full-depth token {i} differs from the full model's greedy token"


def test_speculative_equals_exits_off_over_http(serve_cluster, staged):
    """Speculative exits through the whole served path (HAProxy, ingress, stage replicas):
    the greedy tokens equal the in-process model's with exits off, non-streamed and
    streamed; the deep stage is visited once per verify round, not once per token."""
    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai()
    n = 20
    for p in PROMPTS:
        ref = reference(staged, p, n, ExitPolicy("off"))
        before = serve_cluster.stats()
        r = client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=n, temperature=0,
                                      extra_body={"offramp": {"exit": "speculative", "max_draft": 3},
                                                  "ignore_eos": True})
        after = serve_cluster.stats()
        extra = offramp_of(r.choices[0])
        assert extra["token_ids"] == ref.generated, f"prompt {p}"
        spec = extra["speculative"]
        assert spec["verify_rounds"] + spec["accepted"] == n
        assert spec["drafted"] <= 3 * spec["verify_rounds"]
        assert after[-1] - before[-1] == spec["verify_rounds"], "one deep visit per verify round"
        chunks = list(client.completions.create(
            model=MODEL_NAME, prompt=p, max_tokens=n, temperature=0, stream=True,
            extra_body={"offramp": {"exit": "speculative", "max_draft": 3}, "ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    bad = httpx.post(f"{serve_cluster.base_url}/completions", json={
        "model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4,
        "offramp": {"exit": "speculative", "max_draft": 99}}, timeout=30)
    assert bad.status_code == 400 and "max_draft" in bad.json()["error"]["message"]


def test_logprobs_and_echo_over_the_served_pipeline(serve_cluster, staged, mixed_threshold):
    """Logprobs cross the stage channels: exits off, with a mix of gate exits, and
    speculative, each equal to the in-process engine's (which test_logprobs checks against
    transformers); echo's prompt logprobs come from a full-depth prefill."""
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    client = serve_cluster.openai()
    prompt, threshold = mixed_threshold
    sp = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    for exit in ("off", threshold, "speculative"):
        (ref,) = staged.generate([list(prompt)], sp, ExitPolicy.from_request(exit, None))
        r = completion(client, prompt, max_tokens=12, exit=exit, logprobs=2, echo=True)
        lp, extra = r.choices[0].logprobs, offramp_of(r.choices[0])
        assert extra["token_ids"] == ref.generated, exit
        assert extra["logprob_stages"] == ref.exit_stages
        want = [None] + [x.logprob for x in ref.prompt_logprobs[1:]] + [x.logprob for x in ref.logprobs]
        assert lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4), exit
        # keyed by token text (several byte tokens of this tokenizer decode alike): the best value is there
        assert max(lp.top_logprobs[-1].values()) == pytest.approx(ref.logprobs[-1].top[0][1], abs=1e-4)


# ------------------------------------------------------------------ 5. concurrency


def test_concurrent_greedy_requests_match_references(serve_cluster, staged):
    from offramp.ops.worker import ExitPolicy

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 259, size=int(rng.integers(3, 12))).tolist() for _ in range(8)]
    refs = [reference(staged, p, 12, ExitPolicy("off")).generated for p in prompts]

    async def run():
        client = serve_cluster.async_openai()
        try:
            return await asyncio.gather(*[
                client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0,
                                          extra_body={"offramp": {"exit": "off"}, "ignore_eos": True})
                for p in prompts])
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [offramp_of(r.choices[0])["token_ids"] for r in results] == refs


def test_seeded_sampling_equals_in_process(serve_cluster, staged):
    """Sampling (temperature, top_p, top_k, seed) over the distributed stages draws the same
    tokens as the in-process run: seeded requests stay reproducible across replays."""
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    p = PROMPTS[0]
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    (ref,) = staged.generate([p], sp, ExitPolicy("off"))
    r = serve_cluster.openai().completions.create(
        model=MODEL_NAME, prompt=p, max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
        extra_body={"top_k": 50, "ignore_eos": True, "offramp": {"exit": "off"}})
    assert offramp_of(r.choices[0])["token_ids"] == ref.generated


def test_client_disconnect_mid_stream_frees_stage_kv(serve_cluster):
    """A client that hangs up mid-stream cancels its request: every stage replica frees its KV
    (heartbeat stats in the registry report no sequences left)."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{serve_cluster.base_url}/completions", json=body) as resp:
            assert resp.status_code == 200
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 5:
                    break
    deadline = time.monotonic() + 15
    while True:
        time.sleep(1.0)
        held = {e.replica: e.stats.sequences for e in registry_endpoints()}
        if held and all(v == 0 for v in held.values()):
            break
        assert time.monotonic() < deadline, f"KV still held after the client left: {held}"


# ------------------------------------------------------------------ 7. bad input beside good traffic


def _assert_openai_error(resp: httpx.Response, status: int):
    assert resp.status_code == status, resp.text
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "type" in err
    assert "Traceback" not in resp.text and 'File "' not in resp.text


def test_bad_requests_during_a_long_stream(serve_cluster, staged):
    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai(timeout=120)
    prompt, n = PROMPTS[1], 200
    ref = reference(staged, prompt, n, ExitPolicy("off")).generated
    got: dict = {}

    def long_stream():
        try:
            chunks = list(client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                extra_body={"offramp": {"exit": "off"}, "ignore_eos": True}))
            got["stages"] = [s for ch in chunks for s in offramp_of(ch.choices[0])["exit_stages"]]
            got["finish"] = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
            got["text"] = "".join(ch.choices[0].text for ch in chunks)
        except Exception as e:  # noqa: BLE001 - reported below
            got["error"] = e

    t = threading.Thread(target=long_stream)
    t.start()
    url = f"{serve_cluster.base_url}/completions"
    good = {"model": MODEL_NAME, "prompt": [5, 6, 7], "temperature": 0}
    bad = [
        ({**good, "max_tokens": 0}, 400),
        ({**good, "prompt": [5] * 300, "max_tokens": 4}, 400),  # longer than the 256-token context
        ({**good, "model": "no-such-model", "max_tokens": 4}, 404),
        ({**good, "temperature": -1, "max_tokens": 4}, 400),
        ({**good, "top_p": 0, "max_tokens": 4}, 400),
    ]
    with httpx.Client(timeout=30) as http:
        for body, status in bad:
            _assert_openai_error(http.post(url, json=body), status)
        _assert_openai_error(http.post(url, content=b'{"model": "offramp-default", "prompt": [5,',
                                       headers={"content-type": "application/json"}), 400)
        chat = http.post(f"{serve_cluster.base_url}/chat/completions",
                         json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
        _assert_openai_error(chat, 400)
        still_streaming = t.is_alive()
    t.join(120)
    assert not t.is_alive()
    assert "error" not in got, got.get("error")
    assert got["finish"] == ["length"] and len(got["stages"]) == n
    assert got["text"] == staged_text(serve_cluster, ref)
    assert still_streaming, "the long stream ended before the bad requests; lengthen it to test overlap"


def test_poison_request_beside_normal_streams(serve_cluster, staged):
    """temperature=1e-300 once overflowed the sampler, failed every row of the batch and
    killed a stage's batcher for good. Now: among 8 greedy streams the poison request alone
    fails, with a 400; the 8 complete with unchanged outputs, nothing is replayed, no
    replica is banned, and the next request succeeds. Same for other extremes."""
    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai(timeout=120)
    refs = [reference(staged, PROMPTS[i % len(PROMPTS)], 40, ExitPolicy("off")).generated for i in range(8)]
    replays = httpx.get(f"{serve_cluster.root_url}/v1/offramp/stats", timeout=10).json()["replays"]
    out: dict[int, object] = {}

    def stream(i):
        try:
            chunks = list(client.completions.create(
                model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=40, temperature=0, stream=True,
                extra_body={"offramp": {"exit": "off"}, "ignore_eos": True}))
            out[i] = [s for ch in chunks for s in offramp_of(ch.choices[0])["exit_stages"]], "".join(
                ch.choices[0].text for ch in chunks)
        except Exception as e:  # noqa: BLE001 - reported below
            out[i] = e

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    url = f"{serve_cluster.base_url}/completions"
    poisons = [{"temperature": 1e-300}, {"temperature": 1e300}, {"temperature": 5e-324}, {"top_p": 1e-300,
               "temperature": 1e-300}, {"top_k": 2**62}, {"seed": 2**64}, {"max_tokens": 10**30},
               {"offramp": {"exit": 1e300}}, {"presence_penalty": 1e300}]
    with httpx.Client(timeout=30) as http:
        for extra in poisons:
            body = {"model": MODEL_NAME, "prompt": "The sun rose over the", "max_tokens": 20, **extra}
            _assert_openai_error(http.post(url, json=body), 400)
    for t in threads:
        t.join(120)
    for i in range(8):
        assert not isinstance(out.get(i), Exception), out.get(i)
        stages, text = out[i]
        assert len(stages) == 40 and text == staged_text(serve_cluster, refs[i])
    # the sampler's own floor: a tiny but accepted temperature samples without overflow
    ok = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.01, seed=3,
                                   extra_body={"ignore_eos": True})
    assert len(offramp_of(ok.choices[0])["token_ids"]) == 8
    assert offramp_of(completion(client, PROMPTS[1], max_tokens=8).choices[0])["token_ids"] == \
        reference(staged, PROMPTS[1], 8, ExitPolicy("off")).generated
    after = httpx.get(f"{serve_cluster.root_url}/v1/offramp/stats", timeout=10).json()["replays"]
    assert after == replays, "a poison request made healthy sequences replay"


def test_registry_actor_kill_fails_no_request(serve_cluster, staged):
    """Kill (Ray restarts it) the app's registry actor while greedy streams run: no request
    fails or changes, the channel token is the same afterwards (old and new replicas still
    accept each other: the replica-kill tests below start new ones), and routing resumes."""
    import ray

    from offramp.cluster import rayops
    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai(timeout=120)
    token = rayops.channel_token("offramp")
    ref = reference(staged, PROMPTS[2], 60, ExitPolicy("off")).generated
    out: list[object] = []

    def run():
        for _ in range(2):
            try:
                out.append(offramp_of(completion(client, PROMPTS[2], max_tokens=60).choices[0])["token_ids"])
            except Exception as e:  # noqa: BLE001 - reported below
                out.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor("registry-offramp", namespace="offramp"), no_restart=False)
    for t in threads:
        t.join(120)
    assert len(out) == 6 and all(r == ref for r in out), [type(r).__name__ for r in out]
    assert rayops.channel_token("offramp") == token
    deadline = time.monotonic() + 30
    while len(registry_endpoints()) < NUM_STAGES:  # every replica registered again with the new actor
        assert time.monotonic() < deadline, registry_endpoints()
        time.sleep(0.5)
    assert offramp_of(completion(client, PROMPTS[0], max_tokens=8).choices[0])["token_ids"] == \
        reference(staged, PROMPTS[0], 8, ExitPolicy("off")).generated


def staged_text(serve_cluster, ids):
    from offramp.api.text import load_tokenizer

    return load_tokenizer(serve_cluster.model_dir).decode(ids)


# ------------------------------------------------------------------ 6. scale one stage by config


def _replica_ids(expect: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a in replica_actors(expect=expect):
        out.setdefault(a.class_name.rsplit(":", 1)[1], set()).add(a.actor_id)
    return out


def test_scale_one_stage_by_reapplying_config(serve_cluster, staged):
    from offramp.ops.worker import ExitPolicy

    before = _replica_ids(expect=NUM_STAGES + 1)
    assert {d: len(v) for d, v in before.items()} == {"OfframpIngress": 1, **{f"Stage{k}": 1 for k in range(4)}}
    client = serve_cluster.openai()
    prompt = PROMPTS[2]
    ref = reference(staged, prompt, 8, ExitPolicy("off")).generated
    failures, done = [], [0]
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                ids = offramp_of(completion(client, prompt, max_tokens=8).choices[0])["token_ids"]
                if ids != ref:
                    failures.append(f"wrong ids {ids}")
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(e))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        at_apply = done[0]
        scaled = serve_config(serve_cluster.model_dir, serve_cluster.port, stage1_replicas=2)
        apply_config(scaled, wait_s=None)
        wait_running(120, want={"Stage1": 2})
        during = done[0] - at_apply  # requests that completed while the new replica started
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(60)
    serve_cluster.config = scaled
    assert not failures, failures[:3]
    assert during >= 1
    after = _replica_ids(expect=NUM_STAGES + 2)
    assert len(after["Stage1"]) == 2 and before["Stage1"] < after["Stage1"]
    for d in ["OfframpIngress", "Stage0", "Stage2", "Stage3"]:
        assert after[d] == before[d], f"{d} was restarted by a config change that did not touch it"
    pools = node_pools()
    assert {pools[a.node_id] for a in replica_actors("Stage1", expect=2)} == {"gpu"}
    # After the change, concurrent sequences spread over both Stage1 replicas (least-loaded
    # routing) and all get correct tokens; the registry's heartbeat stats show both served rows.
    refs = [reference(staged, p, MAX_TOKENS, ExitPolicy("off")).generated for p in PROMPTS * 2]

    async def run():
        aclient = serve_cluster.async_openai()
        try:
            return await asyncio.gather(*[
                aclient.completions.create(model=MODEL_NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"offramp": {"exit": "off"}, "ignore_eos": True})
                for p in PROMPTS * 2])
        finally:
            await aclient.close()

    assert [offramp_of(r.choices[0])["token_ids"] for r in asyncio.run(run())] == refs
    deadline = time.monotonic() + 15
    while True:
        rows = {e.replica: e.stats.rows for e in registry_endpoints() if e.stage == 1}
        if len(rows) == 2 and all(rows.values()):
            break
        assert time.monotonic() < deadline, f"Stage1 replicas' served rows (from heartbeats): {rows}"
        time.sleep(0.5)


# ------------------------------------------------------------------ 8. replica kill (destructive: last)


def _wait_recovered(client, prompt, ref, dead_actor_id, deployment, wait_s=60.0):
    """Until a request succeeds with the right tokens and the dead replica has a replacement."""
    deadline = time.monotonic() + wait_s
    last = None
    while time.monotonic() < deadline:
        try:
            ids = offramp_of(completion(client, prompt, max_tokens=len(ref)).choices[0])["token_ids"]
            if ids == ref and any(a.actor_id != dead_actor_id for a in replica_actors(deployment)):
                return
            last = f"ids {ids}"
        except Exception as e:  # noqa: BLE001
            last = repr(e)
        time.sleep(1.0)
    pytest.fail(f"requests did not recover within {wait_s:g} s of the kill; last: {last}")


def test_request_after_killing_one_of_two_replicas_succeeds(serve_cluster, staged):
    """With two Stage1 replicas, killing the one new sequences prefer must not fail a request:
    the router has a live replica to replay on. (Regression: before 9e016f4 the dead replica
    was never banned, least-loaded routing kept picking it and the request got a 503.)"""
    import ray

    from offramp.ops.worker import ExitPolicy

    if len(replica_actors("Stage1", expect=None)) < 2:  # the scaling test did not run first
        apply_config(serve_config(serve_cluster.model_dir, serve_cluster.port, stage1_replicas=2), wait_s=None)
        wait_running(120, want={"Stage1": 2})
        time.sleep(3)  # a heartbeat: the registry lists the new replica
    client = serve_cluster.openai(timeout=60)
    ref = reference(staged, PROMPTS[1], 8, ExitPolicy("off")).generated
    stage1 = sorted(e.replica for e in registry_endpoints() if e.stage == 1)
    assert len(stage1) == 2
    victim = actor_of_replica("Stage1", stage1[0])  # ties in load go to the smaller replica id
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    try:
        r = completion(client, PROMPTS[1], max_tokens=8)
        assert offramp_of(r.choices[0])["token_ids"] == ref
    finally:
        _wait_recovered(client, PROMPTS[1], ref, victim.actor_id, "Stage1")
        wait_running(60, want={"Stage1": 2})




_KILLED: dict[str, object] = {}  # the kill test's victim, for the recovery test after it


def test_killing_a_stage_replica_mid_request(serve_cluster, staged):
    """Kill the only Stage2 replica while a request decodes: the in-flight request and one sent
    right after either complete with the right tokens (replay) or fail with a clean 5xx
    OpenAI error within their timeout - never a 4xx blaming the client, never a hang.
    (Regression: before b76891e a replay that walked stages 0-1 and then found no live Stage2
    sent stage 0 an empty row on the next try, and the client got a 400.)"""
    import openai
    import ray

    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai(timeout=90)
    long_prompt, n = PROMPTS[0], 150
    long_ref = reference(staged, long_prompt, n, ExitPolicy("off")).generated
    short_ref = reference(staged, PROMPTS[1], 8, ExitPolicy("off")).generated
    stop = threading.Event()
    calls: list[tuple[float, float, object]] = []  # (start, end, token ids or exception)

    def in_flight():
        # Back to back until the kill: whatever the timing of this machine, a request is
        # decoding when the replica dies (two threads, so a gap between requests of one
        # thread cannot line up with the kill).
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                res = offramp_of(completion(client, long_prompt, max_tokens=n).choices[0])["token_ids"]
            except Exception as e:  # noqa: BLE001 - examined below
                res = e
            calls.append((t0, time.monotonic(), res))

    (victim,) = replica_actors("Stage2", expect=1)
    threads = [threading.Thread(target=in_flight) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    kill_t = time.monotonic()
    stop.set()  # each thread finishes the request it has in flight, then stops
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    _KILLED["Stage2"] = victim.actor_id

    # Another request concurrent with the failure: same contract as the in-flight one.
    try:
        other = offramp_of(completion(client, PROMPTS[1], max_tokens=8).choices[0])["token_ids"]
    except Exception as e:  # noqa: BLE001
        other = e
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "the in-flight request hung past its timeout"
    spanning = [(t1 - t0, res) for t0, t1, res in calls if t0 < kill_t < t1]
    assert spanning, "no request was in flight at the kill"
    assert all(res == long_ref for t0, t1, res in calls if t1 < kill_t), "a request before the kill was wrong"
    print(f"replica kill outcome: in-flight={[(_outcome(r), round(d, 1)) for d, r in spanning]}, "
          f"concurrent={_outcome(other)}")

    checked = [(f"in_flight{i}", res, long_ref) for i, (_, res) in enumerate(spanning)]
    for name, res, ref in [*checked, ("concurrent", other, short_ref)]:
        if isinstance(res, list):
            assert res == ref, f"{name}: a replayed request returned different tokens"
        else:
            assert isinstance(res, openai.APIStatusError), f"{name}: {res!r}"
            assert 500 <= res.status_code < 600, f"{name}: {res.status_code} {res.message}"
            assert isinstance(res.body, dict) and res.body.get("message"), f"{name}: not an OpenAI error: {res.body}"
            assert "Traceback" not in str(res.response.text)


def test_requests_recover_after_replica_kill(serve_cluster, staged):
    """After the kill above, Serve replaces the replica and requests succeed again within 60 s
    with the right tokens. (Kills the Stage2 replica itself if the kill test did not run.)"""
    import ray

    from offramp.ops.worker import ExitPolicy

    client = serve_cluster.openai(timeout=60)
    dead = _KILLED.get("Stage2")
    if dead is None:
        (victim,) = replica_actors("Stage2", expect=1)
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        dead = victim.actor_id
    short_ref = reference(staged, PROMPTS[1], 8, ExitPolicy("off")).generated
    _wait_recovered(client, PROMPTS[1], short_ref, dead, "Stage2")
    for p in PROMPTS:
        assert offramp_of(completion(client, p).choices[0])["token_ids"] == \
            reference(staged, p, MAX_TOKENS, ExitPolicy("off")).generated
    wait_running(60, want={"Stage2": 1})


def _outcome(res) -> str:
    return "completed" if isinstance(res, list) else f"{type(res).__name__}({getattr(res, 'status_code', '')})"


def test_no_stage_holds_kv_once_idle_after_the_faults(serve_cluster):
    """After every fault above (disconnects, poison requests, registry and replica kills),
    an idle app holds no KV anywhere: the leases (5 s here) reclaim what no release freed."""
    deadline = time.monotonic() + 40
    while True:
        held = {e.replica: e.stats.sequences for e in registry_endpoints()}
        if held and all(v == 0 for v in held.values()):
            return
        assert time.monotonic() < deadline, f"KV still held when idle: {held}"
        time.sleep(1.0)


# ------------------------------------------------------------------ lm-eval as a client
# lm-eval (EleutherAI's harness, a client Offramp did not write): model type
# ``local-completions`` over the real HTTP path, the shipped task files
# (``offramp/evals/lm_eval_tasks``: a loglikelihood and a generate-until task, data made from
# the held-out arithmetic), scored equal to lm-eval's own transformers backend (``hf``) on
# the same checkpoint. The session app has no exit heads (its default policy is full depth)
# and prompt logprobs are a full-depth prefill whatever the policy. lm-eval runs in a child
# process, as a user runs it.

LM_EVAL_TASKS = ["offramp_arith_mc", "offramp_arith_gen"]
LM_EVAL_LIMIT = 24

_EVALUATE = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
from offramp.evals import LM_EVAL_TASKS
model, model_args, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
r = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=json.loads(sys.argv[4]), limit=int(sys.argv[5]),
                            log_samples=True, task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)), **extra)
out = {"results": r["results"],
       "samples": {t: [{"doc": s["doc"], "resps": s["resps"], "filtered_resps": s["filtered_resps"]} for s in ss]
                   for t, ss in r["samples"].items()}}
print("LMEVAL-JSON " + json.dumps(out, default=str))
"""


def _lm_evaluate(model: str, model_args: str, **extra) -> dict:
    p = subprocess.run([sys.executable, "-c", _EVALUATE, model, model_args, json.dumps(extra), json.dumps(LM_EVAL_TASKS),
                        str(LM_EVAL_LIMIT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("LMEVAL-JSON "))
    return json.loads(line[len("LMEVAL-JSON "):])


@pytest.mark.timeout(900)
def test_lm_eval_scores_served_equal_transformers(serve_cluster):
    from offramp.api.text import load_tokenizer

    model_dir = serve_cluster.model_dir
    tok = load_tokenizer(model_dir)
    bos = tok("a").input_ids[0] == tok.bos_token_id  # the client adds BOS iff the model's tokenizer does
    served = _lm_evaluate("local-completions",
                       f"model={MODEL_NAME},base_url={serve_cluster.base_url}/completions,"
                       f"tokenizer={model_dir},tokenized_requests=True,add_bos_token={bos},num_concurrent=2,"
                       "max_retries=1")
    ref = _lm_evaluate("hf", f"pretrained={model_dir},dtype=float32", device="cpu", batch_size=1)

    assert served["results"]["offramp_arith_mc"]["acc,none"] == ref["results"]["offramp_arith_mc"]["acc,none"]
    assert served["results"]["offramp_arith_gen"]["exact_match,none"] == \
        ref["results"]["offramp_arith_gen"]["exact_match,none"]
    # Per document, not just the mean: every choice's loglikelihood, every generation.
    for a, b in zip(served["samples"]["offramp_arith_mc"], ref["samples"]["offramp_arith_mc"], strict=True):
        assert a["doc"] == b["doc"]
        got, want = [float(r[0][0]) for r in a["resps"]], [float(r[0][0]) for r in b["resps"]]
        assert got == pytest.approx(want, abs=1e-3), a["doc"]
    for a, b in zip(served["samples"]["offramp_arith_gen"], ref["samples"]["offramp_arith_gen"], strict=True):
        assert a["filtered_resps"] == b["filtered_resps"], a["doc"]
