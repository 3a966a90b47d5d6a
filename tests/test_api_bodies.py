"""Malformed request bodies: every one is a 400 OpenAI error object over HTTP (INVALID_ARGUMENT
over gRPC), never a 500, and the server keeps serving afterwards.

Covers bodies that are not JSON or not UTF-8, byte order marks, invalid and unpaired Unicode
escapes, pathological nesting, numbers out of range (including sampling parameters at their
extremes: a tiny positive temperature would overflow the sampler), wrong types everywhere,
and oversized bodies. The HTTP cases run against the same live server and fake backend as
tests/test_api.py, on both /v1/completions and /v1/chat/completions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import httpx
import pytest

from offramp.api import app as api_app
from offramp.api.app import MAX_JSON_DEPTH, decode_json_body
from offramp.api.errors import ApiError
from offramp.api.frontend import ApiSettings, Frontend
from offramp.api.grpc_service import status_of
from offramp.api.proto import offramp_pb2 as pb
from offramp.api.proto import offramp_pb2_grpc as pb_grpc
from offramp.api.schemas import MIN_TEMPERATURE, CompletionRequest

from test_api import KEY, MODEL, assert_openai_error, env, post, server  # noqa: F401 (env, server: fixtures)
from test_api_helpers import FakeBackend
from test_grpc import Server

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PATHS = [COMPLETIONS, CHAT]
TEXT_PARAM = {COMPLETIONS: "prompt", CHAT: "messages.0.content"}
LIMIT = 4096  # max_body_bytes of test_api's server


def body(path: str, text: bytes = b'"hi"', extra: bytes = b"", model: bytes | None = None) -> bytes:
    """A body for ``path`` with ``text`` as the prompt (completions) or the user message's
    content (chat), and ``extra`` (``b',"k":v'``) appended; otherwise valid."""
    model = model if model is not None else json.dumps(MODEL).encode()
    where = b'"prompt":' + text if path == COMPLETIONS else b'"messages":[{"role":"user","content":' + text + b"}]"
    return b'{"model":' + model + b"," + where + b',"max_tokens":3' + extra + b"}"


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    """``depth`` levels of arrays around ``leaf``."""
    return b"[" * depth + leaf + b"]" * depth


@dataclass
class Case:
    id: str
    make: Callable[[str], bytes]  # path -> raw body
    code: str | None = "?"  # expected error code ("?" = not checked)
    param: Any = "?"  # expected param: a string ("@text" = where the text goes), {path: param}, or "?"
    says: str | None = None  # a word the message must contain

    def expected_param(self, path: str) -> Any:
        if isinstance(self.param, dict):
            return self.param.get(path, "?")
        return TEXT_PARAM[path] if self.param == "@text" else self.param


def raw(data: bytes) -> Callable[[str], bytes]:
    return lambda path: data


def text(t: bytes) -> Callable[[str], bytes]:
    return lambda path: body(path, text=t)


def extra(e: bytes) -> Callable[[str], bytes]:
    return lambda path: body(path, extra=e)


BIG_INT = b"9" * 1000  # beyond the int conversion limit while these tests run (see short_int_limit)

MALFORMED = [
    # -- not JSON / not an object / not UTF-8
    Case("not-json", raw(b"{not json"), "invalid_json"),
    Case("truncated", lambda p: body(p)[:-1], "invalid_json"),
    Case("trailing-garbage", lambda p: body(p) + b" x", "invalid_json"),
    Case("empty", raw(b""), "invalid_json", says="empty"),
    Case("whitespace", raw(b" \r\n\t "), "invalid_json"),
    Case("array", raw(b"[1, 2]"), "invalid_json", says="object"),
    Case("number", raw(b"42"), "invalid_json"),
    Case("string", raw(b'"hello"'), "invalid_json"),
    Case("null", raw(b"null"), "invalid_json"),
    Case("true", raw(b"true"), "invalid_json"),
    Case("nan", extra(b',"temperature":NaN'), "invalid_json", says="NaN"),
    Case("infinity", extra(b',"top_p":-Infinity'), "invalid_json"),
    Case("non-utf8", text(b'"\xff\xfe"'), "invalid_encoding", says="UTF-8"),
    Case("overlong-utf8", text(b'"\xc0\xaf"'), "invalid_encoding"),
    Case("utf8-encoded-surrogate", text(b'"\xed\xa0\x80"'), "invalid_encoding"),
    Case("latin1", text('"café"'.encode("latin-1")), "invalid_encoding"),
    Case("bom", lambda p: b"\xef\xbb\xbf" + body(p), "invalid_encoding", says="byte order mark"),
    Case("utf16", lambda p: body(p).decode().encode("utf-16"), "invalid_encoding"),
    # -- escapes
    Case("bad-u-escape", text(b'"\\uZZZZ"'), "invalid_json"),
    Case("short-u-escape", text(b'"\\u12"'), "invalid_json"),
    Case("x-escape", text(b'"\\x41"'), "invalid_json"),
    Case("lone-high-surrogate", text(b'"\\ud800"'), "invalid_encoding", "@text", "surrogate"),
    Case("lone-low-surrogate", text(b'"a\\udc00b"'), "invalid_encoding", "@text", "surrogate"),
    Case("reversed-pair", text(b'"\\ude00\\ud83d"'), "invalid_encoding", "@text"),
    Case("high-then-text", text(b'"\\uD83Dx"'), "invalid_encoding", "@text"),
    Case("surrogate-in-key", extra(b',"\\ud800":1'), "invalid_encoding", "\\ud800"),
    Case("surrogate-in-stop", extra(b',"stop":["ok","\\udfff"]'), "invalid_encoding", "stop.1"),
    Case("surrogate-in-user", extra(b',"user":"\\udbff"'), "invalid_encoding", "user"),
    Case("surrogate-in-model", lambda p: body(p, model=b'"\\ud800"'), "invalid_encoding", "model"),
    Case("surrogate-in-offramp", extra(b',"offramp":{"task":"\\ud800"}'), "invalid_encoding", "offramp.task"),
    Case("surrogate-in-text-part", raw(b'{"model":"%s","messages":[{"role":"user","content":[{"type":"text",'
                                       b'"text":"\\ud800"}]}]}' % MODEL.encode()),
         "invalid_encoding", "messages.0.content.0.text"),
    # -- nesting
    Case("deep-unclosed", raw(b"[" * 4000), "nesting_too_deep"),
    Case("deep-closed", raw(b'{"model":"%s","prompt":%s}' % (MODEL.encode(), nested(2000))), "nesting_too_deep"),
    Case("deep-objects", extra(b',"logit_bias":' + b'{"a":' * 600 + b"1" + b"}" * 600), "nesting_too_deep"),
    Case("moderately-deep", extra(b',"logit_bias":' + b'{"a":' * 40 + b"1" + b"}" * 40), "nesting_too_deep",
         "logit_bias", "32"),
    Case("deep-prompt", text(nested(MAX_JSON_DEPTH)), "nesting_too_deep", {COMPLETIONS: "prompt", CHAT: "messages"}),
    Case("deep-tools", extra(b',"tools":' + nested(100, b"")), "nesting_too_deep", "tools"),
    # -- numbers out of range
    Case("int-5000-digits", extra(b',"seed":' + BIG_INT), "number_out_of_range", "seed"),
    Case("neg-int-5000-digits", extra(b',"top_k":-' + BIG_INT), "number_out_of_range", "top_k"),
    Case("token-id-5000-digits", raw(b'{"model":"%s","prompt":[1,%s]}' % (MODEL.encode(), BIG_INT)),
         "number_out_of_range", "prompt.1"),
    Case("temperature-1e400", extra(b',"temperature":1e400'), param="temperature"),
    Case("temperature--1e400", extra(b',"temperature":-1e400'), param="temperature"),
    Case("temperature-1e300", extra(b',"temperature":1e300'), param="temperature"),
    Case("temperature-2.5", extra(b',"temperature":2.5'), param="temperature"),
    Case("temperature-1e-300", extra(b',"temperature":1e-300'), param="temperature", says="use 0 for greedy"),
    Case("temperature-5e-324", extra(b',"temperature":5e-324'), param="temperature", says="use 0 for greedy"),
    Case("temperature-0.005", extra(b',"temperature":0.005'), param="temperature", says="use 0 for greedy"),
    Case("temperature--1e-300", extra(b',"temperature":-1e-300'), param="temperature"),
    Case("top_p-0", extra(b',"top_p":0'), param="top_p"),
    Case("top_p--1e-300", extra(b',"top_p":-1e-300'), param="top_p"),
    Case("top_p-1e400", extra(b',"top_p":1e400'), param="top_p"),
    Case("top_p-1.0000001", extra(b',"top_p":1.0000001'), param="top_p"),
    Case("top_k-1e20", extra(b',"top_k":100000000000000000000'), param="top_k"),
    Case("top_k-2^31", extra(b',"top_k":2147483648'), param="top_k"),
    Case("top_k-float", extra(b',"top_k":1e3'), param="top_k"),
    Case("n-1e20", extra(b',"n":100000000000000000000'), param="n"),
    Case("n-5", extra(b',"n":5'), param="n"),
    Case("seed-2^64", extra(b',"seed":18446744073709551616'), param="seed"),
    Case("seed-2^63", extra(b',"seed":9223372036854775808'), param="seed"),
    Case("seed--1", extra(b',"seed":-1'), param="seed"),
    Case("max_tokens-1e30", lambda p: body(p).replace(b'"max_tokens":3', b'"max_tokens":1e30'), param="max_tokens"),
    Case("max_tokens-10^30", lambda p: body(p).replace(b'"max_tokens":3', b'"max_tokens":' + b"1" + b"0" * 30),
         param="max_tokens"),
    Case("max_tokens-2^31", lambda p: body(p).replace(b'"max_tokens":3', b'"max_tokens":2147483648'),
         param="max_tokens"),
    Case("max_tokens-negative", lambda p: body(p).replace(b'"max_tokens":3', b'"max_tokens":-9223372036854775809'),
         param="max_tokens"),
    Case("presence_penalty-1e400", extra(b',"presence_penalty":1e400'), param="presence_penalty"),
    Case("frequency_penalty--3", extra(b',"frequency_penalty":-3'), param="frequency_penalty"),
    Case("logit_bias-inf", extra(b',"logit_bias":{"1":1e400}'), param="logit_bias.1"),
    Case("exit-1e400", extra(b',"offramp":{"exit":1e400}'), param="offramp.exit"),
    Case("exit--1e-320", extra(b',"offramp":{"exit":-1e-320}'), param="offramp.exit"),
    Case("exit-1.0000001", extra(b',"offramp":{"exit":1.0000001}'), param="offramp.exit"),
    Case("max_draft-0", extra(b',"offramp":{"exit":"speculative","max_draft":0}'), param="offramp.max_draft",
         says="max_draft must be 1..32"),
    Case("max_draft-33", extra(b',"offramp":{"exit":"speculative","max_draft":33}'), param="offramp.max_draft",
         says="max_draft must be 1..32"),
    Case("max_draft-10^30", extra(b',"offramp":{"exit":"speculative","max_draft":1' + b"0" * 30 + b"}"),
         param="offramp.max_draft", says="max_draft must be 1..32"),
    Case("max_draft-float", extra(b',"offramp":{"exit":"speculative","max_draft":4.0}'), param="offramp.max_draft"),
    Case("max_draft-string", extra(b',"offramp":{"exit":"speculative","max_draft":"4"}'), param="offramp.max_draft"),
    Case("max_draft-exit-off", extra(b',"offramp":{"exit":"off","max_draft":4}'), param="offramp.max_draft",
         says="set offramp.exit to 'speculative'"),
    Case("max_draft-exit-threshold", extra(b',"offramp":{"exit":0.5,"max_draft":4}'), param="offramp.max_draft",
         says="only to exit 'speculative'"),
    Case("max_draft-exit-default", extra(b',"offramp":{"max_draft":4}'), param="offramp.max_draft",
         says="only to exit 'speculative'"),
    # -- wrong types
    Case("text-dict", text(b'{"text":"hi"}'), param="@text"),
    Case("text-number", text(b"5"), param="@text"),
    Case("text-null", text(b"null"), param="@text"),
    Case("text-list-of-null", text(b"[null]"), param="@text"),
    Case("prompt-float-ids", raw(b'{"model":"%s","prompt":[1.5]}' % MODEL.encode()), param={COMPLETIONS: "prompt"}),
    Case("prompt-bool-ids", raw(b'{"model":"%s","prompt":[true]}' % MODEL.encode()), param={COMPLETIONS: "prompt"}),
    Case("messages-string", raw(b'{"model":"%s","messages":"hi"}' % MODEL.encode()), param={CHAT: "messages"}),
    Case("messages-null-item", raw(b'{"model":"%s","messages":[null]}' % MODEL.encode()), param={CHAT: "messages.0"}),
    Case("messages-int-item", raw(b'{"model":"%s","messages":[1]}' % MODEL.encode()), param={CHAT: "messages.0"}),
    Case("messages-object", raw(b'{"model":"%s","messages":{"role":"user"}}' % MODEL.encode()),
         param={CHAT: "messages"}),
    Case("role-number", raw(b'{"model":"%s","messages":[{"role":1,"content":"hi"}]}' % MODEL.encode()),
         param={CHAT: "messages.0.role"}),
    Case("model-number", lambda p: body(p, model=b"1"), param="model"),
    Case("model-null", lambda p: body(p, model=b"null"), param="model"),
    Case("model-list", lambda p: body(p, model=b'["x"]'), param="model"),
    Case("offramp-string", extra(b',"offramp":"x"'), param="offramp"),
    Case("offramp-list", extra(b',"offramp":[]'), param="offramp"),
    Case("exit-bool", extra(b',"offramp":{"exit":true}'), param="offramp.exit"),
    Case("stop-int-list", extra(b',"stop":[1]'), param="stop"),
    Case("stop-number", extra(b',"stop":5'), param="stop"),
    Case("stop-nested", extra(b',"stop":[["a"]]'), param="stop"),
    Case("stream-yes", extra(b',"stream":"yes"'), param="stream"),
    Case("stream-1", extra(b',"stream":1'), param="stream"),
    Case("stream_options-string", extra(b',"stream":true,"stream_options":"x"'), param="stream_options"),
    Case("temperature-string", extra(b',"temperature":"0.5"'), param="temperature"),
    Case("temperature-bool", extra(b',"temperature":false'), param="temperature"),
    Case("seed-float", extra(b',"seed":1.0'), param="seed"),
    Case("n-bool", extra(b',"n":true'), param="n"),
    Case("user-number", extra(b',"user":5'), param="user"),
    Case("ignore_eos-null-string", extra(b',"ignore_eos":"null"'), param="ignore_eos"),
    Case("logit_bias-list", extra(b',"logit_bias":[1]'), param="logit_bias"),
    # -- size
    Case("oversized", text(b'"' + b"x" * LIMIT + b'"'), "request_too_large", says=str(LIMIT)),
]

# Extremes that are valid: served, with what the backend sees.
SERVED = [
    ("temperature--0.0", b',"temperature":-0.0',
     lambda s: s.temperature == 0.0 and math.copysign(1, s.temperature) > 0),  # +0.0: greedy
    ("temperature-0", b',"temperature":0', lambda s: s.temperature == 0.0),
    ("temperature-min", b',"temperature":%r' % MIN_TEMPERATURE, lambda s: s.temperature == MIN_TEMPERATURE),
    ("temperature-2", b',"temperature":2', lambda s: s.temperature == 2.0),
    ("top_p-1e-300", b',"top_p":1e-300', lambda s: s.top_p == 1e-300),  # keeps only the top token
    ("top_p-5e-324", b',"top_p":5e-324', lambda s: s.top_p > 0),
    ("top_k-int32-max", b',"top_k":2147483647', lambda s: s.top_k == 2**31 - 1),
    ("top_k--1", b',"top_k":-1', lambda s: s.top_k == 0),
    ("seed-int63-max", b',"seed":9223372036854775807', lambda s: s.seed == 2**63 - 1),
    ("seed-0", b',"seed":0', lambda s: s.seed == 0),
    ("exit-1e-320", b',"offramp":{"exit":1e-320}', lambda s: True),
    ("exit--0.0", b',"offramp":{"exit":-0.0}', lambda s: True),
    ("penalties--0.0", b',"presence_penalty":-0.0,"frequency_penalty":0', lambda s: True),
    ("long-float", b',"temperature":0.' + b"5" * 2000, lambda s: s.temperature == 0.5555555555555556),
    ("nul-stop", b',"stop":"\\u0000"', lambda s: True),
]


@pytest.fixture
def short_int_limit():
    """Python refuses to convert integers longer than sys.int_max_str_digits (4300 by default);
    a 4300-digit literal does not fit the test server's 4 KiB body limit, so lower it to 640."""
    import sys

    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("no int_max_str_digits on this Python")
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    yield
    sys.set_int_max_str_digits(old)


def assert_still_serving(url: str, path: str) -> None:
    r = post(url, path, body(path))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", PATHS, ids=["completions", "chat"])
@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_malformed_body_is_400(server, short_int_limit, case: Case, path: str):  # noqa: F811
    url, backend = server[0].url, server[1]
    r = post(url, path, case.make(path))
    err = assert_openai_error(r, 400, param=case.expected_param(path), code=case.code)
    assert err["type"] == "invalid_request_error" and err["message"]
    if case.says:
        assert case.says in err["message"], err
    assert not backend.requests  # nothing reached the backend
    assert_still_serving(url, path)


@pytest.mark.parametrize("path", PATHS, ids=["completions", "chat"])
@pytest.mark.parametrize("name,fields,check", SERVED, ids=[s[0] for s in SERVED])
def test_extreme_but_valid_values_are_served(server, name, fields, check, path):  # noqa: F811
    url, backend = server[0].url, server[1]
    r = post(url, path, body(path, extra=fields))
    assert r.status_code == 200, r.text
    assert check(backend.requests[-1].sampling)


@pytest.mark.parametrize("path", PATHS, ids=["completions", "chat"])
@pytest.mark.parametrize("fields,max_draft", [(b',"offramp":{"exit":"speculative","max_draft":1}', 1),
                                              (b',"offramp":{"exit":"speculative","max_draft":32}', 32),
                                              (b',"offramp":{"exit":"speculative"}', None)])
def test_speculative_exit_reaches_the_backend(server, path, fields, max_draft):  # noqa: F811
    r = post(server[0].url, path, body(path, extra=fields))
    assert r.status_code == 200, r.text
    req = server[1].requests[-1]
    assert (req.exit_mode, req.max_draft) == ("speculative", max_draft)
    assert r.json()["offramp"]["speculative"]["verify_rounds"] == 0  # the fake backend verifies nothing


@pytest.mark.parametrize("path", PATHS, ids=["completions", "chat"])
def test_paired_surrogate_escapes_are_fine(server, path):  # noqa: F811
    """A properly paired escape is one code point (an emoji), not an error; nor is a literal
    backslash followed by "ud800" (the pre-filter sees it, the check does not fire)."""
    url, backend, tok = server[0].url, server[1], server[2]
    r = post(url, path, body(path, text=b'"smile \\ud83d\\ude00 and \\\\ud800"'))
    assert r.status_code == 200, r.text
    if path == COMPLETIONS:
        assert list(backend.requests[-1].prompt_ids) == tok.encode("smile \U0001F600 and \\ud800")


def test_issue_example_tiny_temperature(server):  # noqa: F811
    """The request from the issue: it used to overflow the sampler; now a 400 that says what to do."""
    url, backend = server[0].url, server[1]
    r = post(url, COMPLETIONS, {"model": MODEL, "prompt": "The sun rose over the", "max_tokens": 20,
                                "temperature": 1e-300})
    err = assert_openai_error(r, 400, param="temperature")
    assert "use 0 for greedy" in err["message"]
    assert not backend.requests


def test_streamed_oversized_body_is_400(server):  # noqa: F811
    url = server[0].url
    big = body(COMPLETIONS, text=b'"' + b"y" * (2 * LIMIT) + b'"')

    def chunks():
        for i in range(0, len(big), 512):
            yield big[i:i + 512]

    r = httpx.post(url + COMPLETIONS, content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert "content-length" not in r.request.headers
    err = assert_openai_error(r, 400, code="request_too_large")
    assert str(LIMIT) in err["message"]


# --------------------------------------------------------------------------- decode_json_body


def test_depth_limit_boundary():
    ok = b'{"a":' + nested(MAX_JSON_DEPTH - 1, b"0") + b"}"  # object + 31 arrays = 32 levels
    assert decode_json_body(ok)["a"]
    with pytest.raises(ApiError) as ei:
        decode_json_body(b'{"a":' + nested(MAX_JSON_DEPTH, b"0") + b"}")
    assert ei.value.status == 400 and ei.value.code == "nesting_too_deep" and ei.value.param == "a"
    # Many brackets but shallow: passes the walk.
    flat = {"m": [[i] for i in range(500)]}
    assert decode_json_body(json.dumps(flat).encode()) == flat


def test_recursion_error_is_caught_not_leaked(monkeypatch):
    """json.loads raises RecursionError (not ValueError) on deep input: that must be a 400."""
    with pytest.raises(ApiError) as ei:
        decode_json_body(b"[" * 200_000)
    assert ei.value.code == "nesting_too_deep"

    def boom(*a, **kw):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(api_app.json, "loads", boom)
    with pytest.raises(ApiError) as ei:
        decode_json_body(b'{"a": 1}')
    assert ei.value.code == "nesting_too_deep"


@pytest.mark.parametrize("raw_body", [
    b'{"s": "\\ud800"}', b'{"\\udfff": 1}', b'{"a": [{"b": ["ok", "x\\uDBFFy"]}]}',
])
def test_lone_surrogates_are_rejected_anywhere(raw_body):
    with pytest.raises(ApiError) as ei:
        decode_json_body(raw_body)
    assert ei.value.code == "invalid_encoding"
    # The error must itself be serializable as UTF-8 (a raw surrogate in it would crash the response).
    ei.value.response().body.decode("utf-8")


def test_large_flat_body_decodes():
    ids = list(range(200_000))
    assert decode_json_body(json.dumps({"prompt": ids}).encode())["prompt"] == ids


# --------------------------------------------------------------------------- sampling bounds


@pytest.mark.parametrize("t", [1e-300, 5e-324, 1e-45, 9.999e-3])
def test_tiny_temperature_rejected_by_model(t):
    from offramp.api.errors import from_validation
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as ei:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "temperature": t})
    err = from_validation(ei.value)
    assert err.param == "temperature" and "use 0 for greedy" in err.message


def test_api_temperature_bound_keeps_the_sampler_finite():
    """The API's lower bound is the sampler's: at T = MIN_TEMPERATURE, sampling from extreme
    but finite float32 logits with extreme top_p / top_k gives a valid token, not a crash."""
    torch = pytest.importorskip("torch")
    from offramp.ops import sampling
    from offramp.protocol import SamplingParams

    f32 = torch.finfo(torch.float32)
    logits = torch.tensor([[f32.max, f32.min, 0.0, 1.0], [f32.min, f32.min / 2, f32.min, -1.0]])
    for top_p, top_k in ((1.0, 0), (1e-300, 0), (5e-324, 2**31 - 1), (1.0, 2**31 - 1)):
        p = SamplingParams(max_tokens=1, temperature=MIN_TEMPERATURE, top_p=top_p, top_k=top_k, seed=2**63 - 1)
        out = sampling.choose_tokens(logits, [p, p], [0, 0])
        assert out == [0, 3], out  # the top token: the others are ~exp(-huge) away


# --------------------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def grpc_stub(env):  # noqa: F811
    _, _, tok = env
    backend = FakeBackend(tokens=tok.encode("the quick brown fox ", add_special_tokens=False), eos_id=tok.eos_token_id)
    settings = ApiSettings(model_name=MODEL, max_context=64, max_tokens_cap=40, max_body_bytes=LIMIT)
    srv = Server(Frontend(backend=backend, tokenizer=tok, settings=settings))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield pb_grpc.OfframpStub(channel), channel, backend
    channel.close()
    srv.close()


def req(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt": "hi", "max_tokens": 3, **kw})


GRPC_BAD = [
    ("temperature-1e-300", req(temperature=1e-300), "greedy"),
    ("temperature-5e-324", req(temperature=5e-324), "greedy"),
    ("temperature-inf", req(temperature=float("inf")), "temperature"),
    ("temperature-nan", req(temperature=float("nan")), "temperature"),
    ("temperature-1e300", req(temperature=1e300), "temperature"),
    ("temperature-negative", req(temperature=-1e-300), "temperature"),
    ("top_p-nan", req(top_p=float("nan")), "top_p"),
    ("top_p-negative", req(top_p=-1e-300), "top_p"),
    ("top_p-inf", req(top_p=float("inf")), "top_p"),
    ("top_k-int32-min", req(top_k=-2**31), "top_k"),
    ("seed-uint64-max", req(seed=2**64 - 1), "seed"),
    ("seed-2^63", req(seed=2**63), "seed"),
    ("max_tokens-int32-min", req(max_tokens=-2**31), "max_tokens"),
    ("max_tokens-int32-max", req(max_tokens=2**31 - 1), "max_tokens"),
    ("exit-nan", req(exit_threshold=float("nan")), "exit"),
    ("exit-inf", req(exit_threshold=float("inf")), "exit"),
    ("exit-negative-subnormal", req(exit_threshold=-5e-324), "exit"),
    ("exit_mode-unknown", req(exit_mode=99), "ExitMode"),
    ("max_draft-0", req(exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=0), "max_draft must be 1..32"),
    ("max_draft-33", req(exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=33), "max_draft must be 1..32"),
    ("max_draft-uint32-max", req(exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=2**32 - 1), "max_draft must be 1..32"),
    ("max_draft-exit-off", req(exit_mode=pb.EXIT_MODE_OFF, max_draft=4), "set offramp.exit to 'speculative'"),
    ("max_draft-exit-threshold", req(exit_threshold=0.5, max_draft=4), "only to exit 'speculative'"),
    ("max_draft-exit-unset", req(max_draft=4), "only to exit 'speculative'"),
    ("token-id-int32-min", pb.GenerateRequest(prompt_token_ids=[-2**31], max_tokens=3), "vocabulary"),
]

GOOD_WIRE = req().SerializeToString()
GRPC_BAD_WIRE = [
    ("bad-utf8-prompt", b"\x0a\x02\xff\xfe", "UTF-8"),
    ("corrupt", b"\xff\xff\xff\xff", "not a valid message"),
    ("truncated", GOOD_WIRE[:-1], "not a valid message"),
    ("bad-utf8-stop", GOOD_WIRE + b"\x42\x01\x80", "UTF-8"),
]


def _invalid_argument(call, words: str) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())
    assert words in ei.value.details()


@pytest.mark.parametrize("name,request_,words", GRPC_BAD, ids=[c[0] for c in GRPC_BAD])
def test_grpc_extremes_are_invalid_argument(grpc_stub, name, request_, words):
    stub, _, backend = grpc_stub
    backend.requests.clear()
    _invalid_argument(lambda: stub.Generate(request_, timeout=10), words)
    _invalid_argument(lambda: list(stub.GenerateStream(request_, timeout=10)), words)
    assert not backend.requests
    assert stub.Generate(req(), timeout=10).usage.completion_tokens == 3


@pytest.mark.parametrize("name,wire,words", GRPC_BAD_WIRE, ids=[c[0] for c in GRPC_BAD_WIRE])
def test_grpc_undecodable_request_is_invalid_argument(grpc_stub, name, wire, words):
    """Bytes that are not a GenerateRequest: grpcio's default would be UNKNOWN."""
    stub, channel, _ = grpc_stub
    unary = channel.unary_unary("/offramp.v1.Offramp/Generate")
    stream = channel.unary_stream("/offramp.v1.Offramp/GenerateStream")
    _invalid_argument(lambda: unary(wire, timeout=10), words)
    _invalid_argument(lambda: list(stream(wire, timeout=10)), words)
    assert stub.Generate(req(), timeout=10).usage.completion_tokens == 3


def test_grpc_extremes_that_are_valid(grpc_stub):
    stub, _, backend = grpc_stub
    for r in (req(temperature=-0.0), req(top_p=1e-300), req(top_k=2**31 - 1), req(seed=2**63 - 1),
              req(exit_threshold=1e-320), req(temperature=MIN_TEMPERATURE)):
        assert stub.Generate(r, timeout=10).usage.completion_tokens == 3
    assert backend.requests[-1].sampling.temperature == MIN_TEMPERATURE
    for n in (1, 32):
        stub.Generate(req(exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=n), timeout=10)
        assert (backend.requests[-1].exit_mode, backend.requests[-1].max_draft) == ("speculative", n)


def test_grpc_maps_body_errors_to_invalid_argument():
    for e in (ApiError(400, "request body exceeds the limit of 4096 bytes", code="request_too_large"),
              ApiError(400, "bad", code="invalid_encoding"), ApiError(413, "legacy too large")):
        assert status_of(e).code == grpc.StatusCode.INVALID_ARGUMENT
