"""The OpenAI-compatible HTTP API end to end: real app under uvicorn, fake backend, real
tokenizer, real `openai` client. No Ray."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from offramp.api.app import create_app
from offramp.api.frontend import ApiSettings, Frontend
from offramp.api.text import load_tokenizer
from offramp.errors import BadRequest, DeadlineExceeded, Overloaded, StageUnavailable

from test_api_helpers import FakeBackend, LiveServer, build_tokenizer, byte_tokens, wait_for

KEY = "sk-test-0123456789"
MODEL = "tiny-offramp"
TEXT = "the quick brown fox jumps over the lazy dog "
CONTEXT = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok = load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))
    backend = FakeBackend(tokens=tok.encode(TEXT, add_special_tokens=False), eos_id=tok.eos_token_id)
    settings = ApiSettings(model_name=MODEL, max_context=CONTEXT, max_tokens_cap=40, api_key=KEY,
                           max_body_bytes=4096, request_timeout_s=10.0)
    app = create_app(Frontend(backend=backend, tokenizer=tok, settings=settings))
    with LiveServer(app) as server:
        yield server, backend, tok


@pytest.fixture
def server(env):
    server, backend, tok = env
    backend.reset(tok.encode(TEXT, add_special_tokens=False))
    return env


def oai(url: str, key: str = KEY, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def post(url: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json", **headers}, **kw)
    return httpx.post(url + path, json=body, headers=headers, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "?", code: str | None = "?") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param != "?":
        assert body["error"]["param"] == param, body
    if code != "?":
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_events(r: httpx.Response) -> list:
    events = []
    for block in r.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --------------------------------------------------------------------------- happy paths


def test_completion_with_openai_client(server):
    url, backend, tok = server[0].url, server[1], server[2]
    resp = oai(url).completions.create(model=MODEL, prompt="hello world", max_tokens=9,
                                       extra_body={"offramp": {"exit": 0.7, "task": "qa"}})
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    choice = resp.choices[0]
    assert choice.text == tok.decode(backend.tokens[:9])
    assert choice.finish_reason == "length"
    prompt_len = len(tok.encode("hello world"))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        prompt_len, 9, prompt_len + 9)
    stages = [0, 3, 1, 2, 0, 3, 1, 2, 0]
    assert resp.offramp == {"num_stages": 4, "exit_stages": stages, "stages_skipped": sum(3 - s for s in stages)}
    assert choice.model_extra["offramp"]["exit_stages"] == stages
    req = backend.requests[-1]
    assert req.exit_mode == 0.7 and req.task == "qa" and req.sampling.max_tokens == 9
    assert req.sampling.stop_token_ids == (tok.eos_token_id,)


def test_completion_token_id_prompt_and_default_max_tokens(server):
    url, backend = server[0].url, server[1]
    resp = oai(url).completions.create(model=MODEL, prompt=[5, 6, 7])
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 16  # OpenAI's default
    assert backend.requests[-1].prompt_ids == (5, 6, 7)


def test_chat_with_template_and_eos(server):
    url, backend, tok = server[0].url, server[1], server[2]
    backend.eos_at = 4
    resp = oai(url).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=20, temperature=0.5, top_p=0.9, seed=3)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == tok.decode(backend.tokens[:4])  # EOS not rendered
    assert resp.choices[0].finish_reason == "stop"
    expected = tok.encode("<|system|>be brief\n<|user|>hi\n<|assistant|>", add_special_tokens=False)
    assert list(backend.requests[-1].prompt_ids) == expected
    s = backend.requests[-1].sampling
    assert (s.temperature, s.top_p, s.seed) == (0.5, 0.9, 3)


def test_chat_stream_with_usage(server):
    url, backend, tok = server[0].url, server[1], server[2]
    chunks = list(oai(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(backend.tokens[:7])
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    streamed_stages = [s for c in chunks if c.choices for s in c.choices[0].model_extra.get("offramp", {}).get("exit_stages", [])]
    assert streamed_stages == [0, 3, 1, 2, 0, 3, 1]


def test_continuous_usage_stats_and_vllm_extras(server):
    """What guidellm and other vLLM clients send: usage in every chunk, and extension
    fields at their neutral values, accepted."""
    url, backend = server[0].url, server[1]
    for path, extra in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        events = sse_events(post(url, path, {
            "model": MODEL, **extra, "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "min_p": 0.0, "min_tokens": 0, "repetition_penalty": 1.0, "skip_special_tokens": True,
            "spaces_between_special_tokens": True, "metadata": {"run": "x"}, "store": False}))
        chunks = events[:-1]
        assert events[-1] == "[DONE]" and all(c["usage"] is not None for c in chunks)
        done = [c["usage"]["completion_tokens"] for c in chunks]
        assert done == sorted(done) and done[-1] == 5  # running counts, then the total
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == (
            chunks[-1]["usage"]["prompt_tokens"] + 5)


def test_stop_token_ids_end_a_choice(server):
    url, backend, tok = server[0].url, server[1], server[2]
    stop = backend.tokens[3]
    resp = oai(url).completions.create(model=MODEL, prompt="hi", max_tokens=10,
                                       extra_body={"stop_token_ids": [stop]})
    assert resp.choices[0].finish_reason == "stop"
    assert stop in backend.requests[-1].sampling.stop_token_ids
    assert tok.eos_token_id in backend.requests[-1].sampling.stop_token_ids  # the model's stay


def test_completion_stream_raw_sse_ends_with_done(server):
    url = server[0].url
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_multibyte_text_is_emitted_only_when_complete(server):
    url, backend, tok = server[0].url, server[1], server[2]
    text = "café 🙂 漢字!"
    backend.tokens = byte_tokens(tok, text)
    n = len(backend.tokens)
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": n, "stream": True})
    pieces = [e["choices"][0]["text"] for e in sse_events(r)[:-1]]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    resp = oai(url).completions.create(model=MODEL, prompt="hi", max_tokens=n)
    assert resp.choices[0].text == text


def test_n_choices_run_as_separate_backend_requests(server):
    url, backend = server[0].url, server[1]
    resp = oai(url).completions.create(model=MODEL, prompt="hi", max_tokens=3, n=3, seed=10)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 9
    assert sorted(r.sampling.seed for r in backend.requests) == [10, 11, 12]
    assert len({r.request_id for r in backend.requests}) == 3
    events = sse_events(post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 2,
                                                      "stream": True}))
    finished = sorted(e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"])
    assert finished == [0, 1] and events[-1] == "[DONE]"


def test_models_and_health(server):
    url = server[0].url
    models = oai(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}  # no key needed
    assert httpx.get(url + "/-/healthz").status_code == 200
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # vLLM's route (readiness), open like the others
    server[1].not_ready = "no live replica holds layer 4"
    try:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json() == {"status": "starting", "detail": "no live replica holds layer 4"}
        assert httpx.get(url + "/healthz").status_code == 200  # liveness does not depend on the stages
    finally:
        server[1].not_ready = None
    assert_openai_error(httpx.get(url + "/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"}),
                        404, code="model_not_found")


# --------------------------------------------------------------------------- stop strings


def test_stop_string_cuts_text_and_cancels_backend(server):
    url, backend, tok = server[0].url, server[1], server[2]
    backend.delay_s = 0.01
    resp = oai(url).completions.create(model=MODEL, prompt="hi", max_tokens=40, stop=["fox", "zzz"])
    assert resp.choices[0].text == "the quick brown "
    assert resp.choices[0].finish_reason == "stop"
    out = backend.outcomes[backend.requests[-1].request_id]
    assert out.closed and out.emitted < 10
    assert resp.usage.completion_tokens == out.emitted


def test_include_stop_str_in_output_keeps_the_matched_stop(server):
    """vLLM's include_stop_str_in_output: the text ends with the stop string it matched,
    streamed and not; finish_reason stop; the backend request is cancelled."""
    url, backend = server[0].url, server[1]
    backend.delay_s = 0.01
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 40, "stop": ["zzz", "brown"],
            "include_stop_str_in_output": True}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "the quick brown"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert wait_for(lambda: backend.outcomes[backend.requests[-1].request_id].closed)
    events = sse_events(post(url, "/v1/completions", {**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "the quick brown"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_streaming_never_leaks_partial_stop(server):
    url, backend = server[0].url, server[1]
    events = sse_events(post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 40, "stop": "lazy dog",
        "stream": True}))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "the quick brown fox jumps over the "
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    assert wait_for(lambda: backend.outcomes[backend.requests[-1].request_id].closed)


# --------------------------------------------------------------------------- auth


def test_api_key_required_except_health(server):
    url = server[0].url
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert_openai_error(post(url, "/v1/completions", body, key=None), 401, code="invalid_api_key")
    assert_openai_error(post(url, "/v1/completions", body, key="sk-wrong"), 401, code="invalid_api_key")
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    assert_openai_error(httpx.get(url + "/nowhere"), 401)  # unknown routes don't leak without a key
    assert post(url, "/v1/completions", body, key=None, headers={"x-api-key": KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        oai(url, key="sk-wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)


# --------------------------------------------------------------------------- bad input

BAD_COMPLETIONS = [
    # (body, param)
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 41}, "max_tokens"),  # over the cap
    ({"model": MODEL, "prompt": "hi " * 30, "max_tokens": 40}, "max_tokens"),  # prompt + max_tokens > context
    ({"model": MODEL, "prompt": "hi " * 80}, "prompt"),  # prompt alone fills the context
    ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -0.1}, "temperature"),
    (b'{"model": "%s", "prompt": "hi", "temperature": 1e999}' % MODEL.encode(), "temperature"),  # parses as inf
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_k": -2}, "top_k"),
    ({"model": MODEL, "prompt": "hi", "top_k": 2.5}, "top_k"),
    ({"model": MODEL, "prompt": "hi", "n": 5}, "n"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "prompt": "hi", "stop": "x" * 65}, "stop"),
    ({"model": MODEL, "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "echo": 1}, "echo"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": [1, -1]}, "prompt"),
    ({"model": MODEL, "prompt": {"text": "hi"}}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ({"model": MODEL, "prompt": "hi", "offramp": {"exit": 1.5}}, "offramp.exit"),
    ({"model": MODEL, "prompt": "hi", "offramp": {"exit": "sometimes"}}, "offramp.exit"),
    ({"model": MODEL, "prompt": "hi", "offramp": {"task": "poetry"}}, "offramp.task"),
    ({"model": MODEL, "prompt": "hi", "offramp": {"exits": "off"}}, "offramp.exits"),
    ({"model": MODEL, "prompt": "hi", "seed": -1}, "seed"),
    # vLLM extensions: refused where ignoring them would change the result
    ({"model": MODEL, "prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"model": MODEL, "prompt": "hi", "min_p": -0.1}, "min_p"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": 3, "max_tokens": 2}, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": MODEL, "prompt": "hi", "repetition_penalty": 11}, "repetition_penalty"),
    ({"model": MODEL, "prompt": "hi", "skip_special_tokens": False}, "skip_special_tokens"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": "3"}, "stop_token_ids"),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": 1}},
     "stream_options.continuous_usage_stats"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completion_requests(server, body, param):
    err = assert_openai_error(post(server[0].url, "/v1/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error" and err["message"]
    assert not server[1].requests  # nothing reached the backend


BAD_CHATS = [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 1}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
      "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}, "max_tokens"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_bad_chat_requests(server, body, param):
    assert_openai_error(post(server[0].url, "/v1/chat/completions", body), 400, param=param)
    assert not server[1].requests


def test_malformed_bodies(server):
    url = server[0].url
    assert_openai_error(post(url, "/v1/completions", b"{not json"), 400, code="invalid_json")
    assert_openai_error(post(url, "/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}'), 400,
                        code="invalid_encoding")
    assert_openai_error(post(url, "/v1/completions", b'{"model": "%s", "prompt": "hi", "temperature": NaN}'
                             % MODEL.encode()), 400, code="invalid_json")
    assert_openai_error(post(url, "/v1/completions", b"[1, 2]"), 400, code="invalid_json")
    assert_openai_error(post(url, "/v1/completions", b""), 400, code="invalid_json")


def test_unknown_model_route_and_method(server):
    url = server[0].url
    auth = {"Authorization": f"Bearer {KEY}"}
    assert_openai_error(post(url, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404,
                        param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        oai(url).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert_openai_error(httpx.get(url + "/v1/nothing", headers=auth), 404)
    r = httpx.get(url + "/v1/completions", headers=auth)
    assert_openai_error(r, 405)
    assert "POST" in r.headers.get("allow", "")


def test_body_too_large(server):
    url = server[0].url
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode()
    err = assert_openai_error(post(url, "/v1/completions", big), 400, code="request_too_large")
    assert "4096" in err["message"]  # names the limit

    def chunks():  # no Content-Length: the streamed size is what counts
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = httpx.post(url + "/v1/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    err = assert_openai_error(r, 400, code="request_too_large")
    assert "4096" in err["message"]


# --------------------------------------------------------------------------- backend failures


@pytest.mark.parametrize("exc,status,retry_after", [
    (Overloaded("all queues full; retry later"), 429, "1"),
    (StageUnavailable("stage 2 has no live replica"), 503, "2"),
    (DeadlineExceeded("too slow"), 504, None),
    (BadRequest("exit threshold not calibrated", param="offramp.exit"), 400, None),
    (RuntimeError("secret internal detail /home/x"), 500, None),
])
@pytest.mark.parametrize("stream", [False, True])
def test_backend_errors_map_to_status(server, exc, status, retry_after, stream):
    url, backend = server[0].url, server[1]
    backend.fail = exc
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": stream})
    err = assert_openai_error(r, status)
    assert r.headers.get("retry-after") == retry_after
    if status == 500:
        assert "secret" not in r.text and err["type"] == "server_error"


def test_openai_client_sees_rate_limit(server):
    server[1].fail = Overloaded("busy")
    with pytest.raises(openai.RateLimitError) as info:
        oai(server[0].url).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert info.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("exc,code", [(StageUnavailable("stage 1 died"), "stage_unavailable"),
                                      (ValueError("boom /secret/path"), "internal_error")])
def test_mid_stream_failure_sends_error_event_then_done(server, exc, code):
    url, backend = server[0].url, server[1]
    backend.fail, backend.fail_at = exc, 3
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 10, "stream": True})
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"} and events[-2]["error"]["code"] == code
    assert all("error" not in e for e in events[:-2])
    assert "secret" not in r.text and "Traceback" not in r.text
    with pytest.raises(openai.APIError):
        for _ in oai(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=10, stream=True):
            pass


def test_front_end_deadline(server):
    _, backend, tok = server
    backend.delay_s = 2.0  # slower than this app's 0.5 s deadline
    settings = ApiSettings(model_name=MODEL, max_context=CONTEXT, request_timeout_s=0.5)
    with LiveServer(create_app(Frontend(backend=backend, tokenizer=tok, settings=settings))) as fast:
        r = post(fast.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert_openai_error(r, 504, code="deadline_exceeded")
        assert backend.requests[-1].deadline_s == 0.5
        assert wait_for(lambda: backend.outcomes[backend.requests[-1].request_id].closed)


# --------------------------------------------------------------------------- cancellation & concurrency


def test_client_disconnect_cancels_stream(server):
    url, backend = server[0].url, server[1]
    backend.delay_s = 0.05
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 40, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    rid = backend.requests[-1].request_id
    assert wait_for(lambda: backend.outcomes[rid].closed)
    assert backend.outcomes[rid].emitted < 40


def test_client_disconnect_cancels_non_streaming(server):
    url, backend = server[0].url, server[1]
    backend.delay_s = 0.25
    # 40 tokens take 10 s: the client leaves at 0.4 s, and the cancel has seconds of slack on
    # a loaded machine (CI once saw all 40 emitted at 0.05 s a token, 2 s, before it landed).
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 40}, timeout=0.4)
    rid = backend.requests[-1].request_id
    assert wait_for(lambda: backend.outcomes[rid].closed)
    assert backend.outcomes[rid].emitted < 40


def test_concurrent_good_requests_survive_bad_ones(server):
    url, backend, tok = server[0].url, server[1], server[2]
    backend.delay_s = 0.01
    expected = tok.decode(backend.tokens[:8])
    results: dict[str, object] = {}

    def good(i: int) -> None:
        client = oai(url)
        if i % 2:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt="hi", max_tokens=8, stream=True))
        else:
            text = client.completions.create(model=MODEL, prompt="hi", max_tokens=8).choices[0].text
        results[f"good{i}"] = text

    def bad(i: int) -> None:
        body = [{"model": MODEL, "prompt": "hi", "top_p": 2}, b"{oops", {"model": "nope", "prompt": "hi"},
                {"model": MODEL, "prompt": "hi", "max_tokens": 10_000}][i % 4]
        results[f"bad{i}"] = post(url, "/v1/completions", body).status_code

    threads = [threading.Thread(target=good, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=bad, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [results[f"good{i}"] for i in range(6)] == [expected] * 6
    assert [results[f"bad{i}"] for i in range(8)] == [400, 400, 404, 400] * 2
    assert len(backend.requests) == 6
    assert all(o.finished and not o.error for o in backend.outcomes.values())


# --------------------------------------------------------------------------- speculative, in-process engine


@pytest.fixture(scope="module")
def engine_server(tiny_model_dir):
    """The app over the in-process engine (tiny model, 2 stages): real TokenEvent.verified."""
    from offramp.ops.engine import InProcessBackend, StagedModel

    staged = StagedModel(tiny_model_dir, num_stages=2)
    settings = ApiSettings(model_name=MODEL, max_context=staged.max_seq, api_key=KEY, request_timeout_s=30.0)
    app = create_app(Frontend(backend=InProcessBackend(staged), tokenizer=load_tokenizer(tiny_model_dir),
                              settings=settings))
    with LiveServer(app) as server:
        yield server.url


def _spec_body(**kw) -> dict:
    return {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "offramp": {"exit": "speculative", "max_draft": 3}, **kw}


def test_speculative_counters_in_the_offramp_block(engine_server):
    off = post(engine_server, "/v1/completions", _spec_body(offramp={"exit": "off"})).json()
    assert "speculative" not in off["offramp"] and "speculative" not in off["choices"][0]["offramp"]
    r = post(engine_server, "/v1/completions", _spec_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["offramp"]["token_ids"] == off["choices"][0]["offramp"]["token_ids"]  # greedy: exact
    spec = body["offramp"]["speculative"]
    d, a, rounds = spec["drafted"], spec["accepted"], spec["verify_rounds"]
    assert 0 < a <= d <= 3 * rounds and rounds + a == 12  # each round commits its accepted drafts + 1
    assert spec["mean_accepted"] == round(a / rounds, 4) and spec["deep_visits_per_token"] == round(rounds / 12, 4)
    assert body["choices"][0]["offramp"]["speculative"] == spec  # n = 1: the choice's block is the whole

    # Streamed: the choice's last chunk and the usage chunk carry the same totals.
    events = sse_events(post(engine_server, "/v1/completions", _spec_body(
        stream=True, stream_options={"include_usage": True})))[:-1]
    last = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert last[0]["choices"][0]["offramp"]["speculative"] == spec
    assert all("speculative" not in e["choices"][0]["offramp"] for e in events if e["choices"] and e not in last)
    assert events[-1]["offramp"]["speculative"] == spec and events[-1]["usage"]["completion_tokens"] == 12

    # n = 2: the top-level block sums the choices.
    two = post(engine_server, "/v1/completions", _spec_body(n=2)).json()
    per = [c["offramp"]["speculative"] for c in two["choices"]]
    total = two["offramp"]["speculative"]
    for key in ("drafted", "accepted", "verify_rounds"):
        assert total[key] == sum(p[key] for p in per)
    assert total["deep_visits_per_token"] == round(total["verify_rounds"] / 24, 4)


def test_min_p_reaches_the_sampler(engine_server):
    """min_p (vLLM extension) is honoured end to end: at 1 only the most likely token
    survives, so a seeded sample at temperature 1 equals greedy, exits off and speculative
    (drafter and verifier both apply it); 0.2 samples, reproducibly per seed."""
    def ids(**kw) -> list[int]:
        r = post(engine_server, "/v1/completions", _spec_body(**kw))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["offramp"]["token_ids"]

    greedy = ids(offramp={"exit": "off"})
    for exit_ in ("off", "speculative"):
        for seed in (1, 2):
            assert ids(temperature=1.0, min_p=1.0, seed=seed, offramp={"exit": exit_}) == greedy
    sampled = {tuple(ids(temperature=1.0, min_p=0.2, seed=s, offramp={"exit": "off"})) for s in range(6)}
    assert len(sampled) > 1, "min_p 0.2 still samples"
    assert ids(temperature=1.0, min_p=0.2, seed=3, offramp={"exit": "off"}) == \
        ids(temperature=1.0, min_p=0.2, seed=3, offramp={"exit": "off"})


def test_handlers_run_on_their_own(server):
    """The handlers are methods of OpenAIRoutes: callable with a bare Starlette Request, no
    app, no server, no middleware; and a client that goes away mid-request cancels it."""
    import asyncio
    import json

    from starlette.requests import Request

    from offramp.api.app import OpenAIRoutes
    from offramp.api.errors import ApiError

    _, backend, tok = server
    routes = OpenAIRoutes(Frontend(backend=backend, tokenizer=tok, settings=ApiSettings(
        model_name=MODEL, max_context=CONTEXT, max_tokens_cap=40, request_timeout_s=10.0)))

    def request(body: dict, then: str = "wait") -> Request:
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            if then == "leave":
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()  # the client stays

        return Request({"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                        "headers": [(b"content-type", b"application/json")]}, receive)

    assert asyncio.run(routes.list_models())["data"][0]["id"] == MODEL
    with pytest.raises(ApiError) as e:
        asyncio.run(routes.get_model("not-" + MODEL))
    assert e.value.status == 404
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 3, "temperature": 0}
    r = asyncio.run(routes.completions_route(request(body)))
    got = json.loads(r.body)
    assert r.status_code == 200 and got["usage"]["completion_tokens"] == 3, got
    assert got["choices"][0]["text"] == tok.decode(tok.encode(TEXT, add_special_tokens=False)[:3])
    bad = asyncio.run(routes.completions_route(request({**body, "max_tokens": 0})))
    assert bad.status_code == 400 and json.loads(bad.body)["error"]["param"] == "max_tokens"
    backend.delay_s = 0.5  # slow enough for the client to leave first
    gone = asyncio.run(routes.completions_route(request(body, then="leave")))
    assert gone.status_code == 499
