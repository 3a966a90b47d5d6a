"""The gRPC API (offramp.v1.Offramp) end to end: generated client stub -> standalone grpc.aio
server on 127.0.0.1 -> GrpcIngressMixin -> InProcessBackend over the tiny model. No Ray."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from offramp.api.frontend import ApiSettings, Frontend
from offramp.api.grpc_service import GrpcError, serve_standalone, status_of
from offramp.api.proto import offramp_pb2 as pb
from offramp.api.proto import offramp_pb2_grpc as pb_grpc
from offramp.errors import BadRequest, DeadlineExceeded, Overloaded, StageUnavailable
from otlp_receiver import otlp_receiver  # noqa: F401  (fixture)

KEY = "grpc-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


class Server:
    """The standalone server on its own event loop thread."""

    def __init__(self, frontend: Frontend):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(serve_standalone(frontend, 0), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from offramp.api.text import load_tokenizer
    from offramp.ops.engine import InProcessBackend, StagedModel

    staged = StagedModel(tiny_model_dir, num_stages=2)
    return InProcessBackend(staged), load_tokenizer(tiny_model_dir), staged


def make_server(model, **settings) -> Server:
    backend, tok, staged = model
    s = ApiSettings(model_name="tiny", max_context=staged.max_seq, api_key=KEY, **settings)
    return Server(Frontend(backend=backend, tokenizer=tok, settings=s))


@pytest.fixture(scope="module")
def stub(model):
    srv = make_server(model)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield pb_grpc.OfframpStub(channel)
    channel.close()
    srv.close()


def greedy(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"prompt": "hello world", "max_tokens": 12, "temperature": 0.0,
                                 "exit_mode": pb.EXIT_MODE_OFF, **kw})


def test_unary_generate(stub):
    r = stub.Generate(greedy(), metadata=AUTH, timeout=30)
    assert r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.finish_reason in ("stop", "length")
    assert len(r.token_ids) == len(r.exit_stages) == r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.num_stages == 2 and all(s == 1 for s in r.exit_stages)  # exits off: full depth
    assert r.usage.stages_skipped == 0
    # Greedy is deterministic, token-id prompts work, x-api-key works.
    again = stub.Generate(greedy(), metadata=(("x-api-key", KEY),), timeout=30)
    assert list(again.token_ids) == list(r.token_ids) and again.text == r.text


def test_stream_equals_unary(stub):
    unary = stub.Generate(greedy(), metadata=AUTH, timeout=30)
    msgs = list(stub.GenerateStream(greedy(), metadata=AUTH, timeout=30))
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert [s for m in msgs for s in m.exit_stages] == list(unary.exit_stages)
    assert msgs[-1].finish_reason == unary.finish_reason and all(not m.finish_reason for m in msgs[:-1])
    assert msgs[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert len({m.id for m in msgs}) == 1


def test_token_id_prompt_and_threshold_exit(stub):
    r = stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=3, temperature=0.0,
                                         exit_threshold=0.0, task="qa"), metadata=AUTH, timeout=30)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens >= 1


def test_speculative_exit_mode_and_max_draft(stub):
    """EXIT_MODE_SPECULATIVE with max_draft: greedy output equals exits off, and Usage.speculative
    counts the drafts (the tiny model has no draft thresholds: every draft runs to max_draft)."""
    assert pb.EXIT_MODE_SPECULATIVE == 3 and pb.GenerateRequest.DESCRIPTOR.fields_by_name["max_draft"].number == 14
    off = stub.Generate(greedy(max_tokens=16, ignore_eos=True), metadata=AUTH, timeout=30)
    assert not off.usage.HasField("speculative")
    spec_req = greedy(max_tokens=16, ignore_eos=True, exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=3)
    r = stub.Generate(spec_req, metadata=AUTH, timeout=30)
    assert list(r.token_ids) == list(off.token_ids) and r.usage.HasField("speculative")
    s = r.usage.speculative
    assert 0 < s.accepted <= s.drafted <= 3 * s.verify_rounds
    assert s.verify_rounds + s.accepted == r.usage.completion_tokens == 16  # a round commits accepted + 1
    msgs = list(stub.GenerateStream(spec_req, metadata=AUTH, timeout=30))
    assert [t for m in msgs for t in m.token_ids] == list(r.token_ids)
    assert msgs[-1].usage.speculative == s and not any(m.HasField("usage") for m in msgs[:-1])


@pytest.mark.parametrize("req, words", [
    (greedy(max_tokens=0), "max_tokens"),
    (greedy(temperature=-1.0), "temperature"),
    (greedy(prompt="x " * 400), "context"),
    (greedy(top_p=0.0), "top_p"),
    (greedy(exit_threshold=1.5), "threshold"),
    (greedy(exit_mode=pb.EXIT_MODE_SPECULATIVE, max_draft=33), "max_draft must be 1..32"),
    (greedy(max_draft=4), "max_draft applies only to exit 'speculative'"),
    (greedy(task="poetry"), "task"),
    (greedy(stop=["a"] * 9), "stop"),
    (pb.GenerateRequest(max_tokens=2), "prompt"),
    (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1], max_tokens=2), "prompt"),
    (pb.GenerateRequest(prompt_token_ids=[99999], max_tokens=2), "vocabulary"),
])
def test_bad_arguments_are_invalid_argument(stub, req, words):
    for call in (lambda: stub.Generate(req, metadata=AUTH, timeout=30),
                 lambda: list(stub.GenerateStream(req, metadata=AUTH, timeout=30))):
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
        assert words in ei.value.details()


def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(greedy(model="gpt-4"), metadata=AUTH, timeout=30)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope"),), (("x-api-key", KEY[:-1]),)])
def test_missing_or_wrong_key_is_unauthenticated(stub, metadata):
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(greedy(), metadata=metadata, timeout=30)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as ei:
        list(stub.GenerateStream(greedy(), metadata=metadata, timeout=30))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_deadline(stub):
    with pytest.raises(grpc.RpcError) as ei:
        stub.Generate(greedy(max_tokens=200), metadata=AUTH, timeout=0.001)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stub.Generate(greedy(max_tokens=2), metadata=AUTH, timeout=30)  # the server is fine afterwards


class SlowBackend:
    """Wraps a backend; waits before every token."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s, self.num_stages = inner, delay_s, inner.num_stages

    async def generate(self, request):
        async for ev in self.inner.generate(request):
            await asyncio.sleep(self.delay_s)
            yield ev


def test_server_request_timeout_is_deadline_exceeded(model):
    backend, tok, staged = model
    s = ApiSettings(model_name="tiny", max_context=staged.max_seq, request_timeout_s=0.2)
    srv = Server(Frontend(backend=SlowBackend(backend, 0.1), tokenizer=tok, settings=s))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            with pytest.raises(grpc.RpcError) as ei:
                pb_grpc.OfframpStub(ch).Generate(greedy(max_tokens=50), timeout=30)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline" in ei.value.details()
    finally:
        srv.close()


def test_health_is_open(stub):
    h = stub.Health(pb.HealthRequest(), timeout=10)
    assert h.status == pb.HealthResponse.SERVING and h.model == "tiny" and h.num_stages == 2
    assert h.max_context > 0


@pytest.mark.parametrize("exc, code", [
    (BadRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StageUnavailable("dead"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
])
def test_error_mapping(exc, code):
    err = status_of(exc)
    assert err.code == code
    if code == grpc.StatusCode.INTERNAL:
        assert "secret" not in err.details
    import pickle

    back = pickle.loads(pickle.dumps(err))  # crosses Ray's process boundary in Serve
    assert isinstance(back, GrpcError) and back.code == code


def test_backend_errors_reach_the_client(model):
    backend, tok, staged = model

    class Failing:
        num_stages = 2

        def __init__(self, exc):
            self.exc = exc

        async def generate(self, request):
            raise self.exc
            yield  # noqa: unreachable - makes this an async generator

    s = ApiSettings(model_name="tiny", max_context=staged.max_seq)
    for exc, code in ((Overloaded("queues full; retry"), grpc.StatusCode.RESOURCE_EXHAUSTED),
                      (StageUnavailable("stage 1 down"), grpc.StatusCode.UNAVAILABLE)):
        srv = Server(Frontend(backend=Failing(exc), tokenizer=tok, settings=s))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                with pytest.raises(grpc.RpcError) as ei:
                    pb_grpc.OfframpStub(ch).Generate(greedy(), timeout=30)
                assert ei.value.code() == code and str(exc) in ei.value.details()
                with pytest.raises(grpc.RpcError) as ei:
                    list(pb_grpc.OfframpStub(ch).GenerateStream(greedy(), timeout=30))
                assert ei.value.code() == code
        finally:
            srv.close()


def test_traceparent_metadata_starts_request_span_and_reaches_backend(model, monkeypatch):
    """The gRPC front end opens the request span under the caller's traceparent and hands
    the backend a carrier naming that span (so stage spans become its children)."""
    from offramp.observability import tracing
    from otlp_receiver import OtlpReceiver

    backend, tok, staged = model
    seen: list = []

    class Recording:
        num_stages = backend.num_stages

        async def generate(self, request):
            seen.append(request.trace_context)
            async for ev in backend.generate(request):
                yield ev

    receiver = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    tracing.setup_tracing(force=True)
    s = ApiSettings(model_name="tiny", max_context=staged.max_seq)
    srv = Server(Frontend(backend=Recording(), tokenizer=tok, settings=s))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            md = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
            r = pb_grpc.OfframpStub(ch).Generate(greedy(max_tokens=3), metadata=md, timeout=30)
        tracing.force_flush()
        (span,) = receiver.wait_for(lambda sp: len(sp) >= 1)
        assert span.trace_id == trace_id and span.parent_span_id == "00f067aa0ba902b7"
        assert span.attributes["gen_ai.response.id"] == r.id
        assert span.attributes["gen_ai.usage.output_tokens"] == r.usage.completion_tokens
        assert span.attributes["gen_ai.request.max_tokens"] == 3
        assert seen[0]["traceparent"] == f"00-{trace_id}-{span.span_id}-01"
    finally:
        srv.close()
        receiver.stop()
        tracing.shutdown_tracing()


def test_logprobs_and_logit_adjustments_over_grpc(stub, model):
    """The HTTP API's logprobs, penalties, logit_bias, min_tokens and stop_token_ids
    fields over gRPC: unary and streamed equal the in-process engine's."""
    from offramp.ops.worker import ExitPolicy
    from offramp.protocol import SamplingParams

    _, _, staged = model
    prompt = [5, 6, 7, 8, 5, 6]
    eos = staged.spec.eos_token_ids[0]
    kw = dict(prompt_token_ids=prompt, max_tokens=10, logprobs=2, presence_penalty=0.3, frequency_penalty=0.4,
              repetition_penalty=1.4, logit_bias={17: 2.5, eos: 50.0}, min_tokens=4)
    sp = SamplingParams(max_tokens=10, logprobs=2, presence_penalty=0.3, frequency_penalty=0.4, repetition_penalty=1.4,
                        logit_bias=((17, 2.5), (eos, 50.0)), min_tokens=4, stop_token_ids=tuple(staged.spec.eos_token_ids))
    (ref,) = staged.generate([prompt], sp, ExitPolicy("off"))
    assert len(ref.generated) == 5 and ref.generated[-1] == eos, "the bias ends the output right after min_tokens"
    r = stub.Generate(greedy(**{k: v for k, v in kw.items()}, prompt=""), metadata=AUTH, timeout=30)
    assert list(r.token_ids) == ref.generated
    assert [x.token_id for x in r.logprobs] == ref.generated
    assert [x.logprob for x in r.logprobs] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert all(len(x.top) == 2 for x in r.logprobs)
    streamed = [x for m in stub.GenerateStream(greedy(**kw, prompt=""), metadata=AUTH, timeout=30) for x in m.logprobs]
    assert [x.token_id for x in streamed] == ref.generated
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(greedy(prompt_token_ids=prompt, prompt="", logprobs=21), metadata=AUTH, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in e.value.details()


def test_min_p_over_grpc(stub):
    """min_p 1 keeps only the most likely token: a seeded sample at temperature 1 is greedy."""
    ref = list(stub.Generate(greedy(), metadata=AUTH, timeout=30).token_ids)
    for seed in (1, 2, 3):
        r = stub.Generate(greedy(temperature=1.0, min_p=1.0, seed=seed), metadata=AUTH, timeout=30)
        assert list(r.token_ids) == ref
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(greedy(min_p=2.0), metadata=AUTH, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_p" in e.value.details()


def test_stop_strings_over_grpc_cut_or_kept(stub):
    """A stop string is cut from the text; with include_stop_str_in_output it ends it."""
    full = stub.Generate(greedy(max_tokens=24), metadata=AUTH, timeout=30).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    head = full[: full.index(stop)]
    cut = stub.Generate(greedy(max_tokens=24, stop=[stop]), metadata=AUTH, timeout=30)
    kept = stub.Generate(greedy(max_tokens=24, stop=[stop], include_stop_str_in_output=True), metadata=AUTH,
                         timeout=30)
    assert (cut.text, cut.finish_reason) == (head, "stop")
    assert (kept.text, kept.finish_reason) == (head + stop, "stop")


def test_http_and_grpc_build_the_same_request(model, otlp_receiver, monkeypatch):
    """One builder (Frontend.generation) behind both front ends: the same greedy request over
    HTTP and over gRPC (unary and streamed) gives the same tokens and a request span with the
    same request attributes, child of the caller's traceparent, ended with its response
    attributes; only ``offramp.rpc`` tells them apart."""
    import httpx

    from offramp.api.app import create_app
    from offramp.observability import tracing
    from test_api_helpers import LiveServer

    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    tracing.shutdown_tracing()
    assert tracing.setup_tracing(force=True)
    backend, tok, staged = model
    fe = Frontend(backend=backend, tokenizer=tok,
                  settings=ApiSettings(model_name="tiny", max_context=staged.max_seq, api_key=KEY))
    srv = Server(fe)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    traces = {how: f"{i + 1:032x}" for i, how in enumerate(("http", "unary", "stream"))}

    def meta(how: str) -> tuple:
        return (*AUTH, ("traceparent", f"00-{traces[how]}-00f067aa0ba902b7-01"))

    try:
        with LiveServer(create_app(fe)) as web:
            body = {"model": "tiny", "prompt": "hello world", "max_tokens": 12, "temperature": 0.0,
                    "offramp": {"exit": "off"}}
            r = httpx.post(web.url + "/v1/completions", json=body, headers=dict(meta("http")), timeout=30)
            assert r.status_code == 200, r.text
        stub = pb_grpc.OfframpStub(channel)
        unary = stub.Generate(greedy(), metadata=meta("unary"), timeout=30)
        streamed = [t for m in stub.GenerateStream(greedy(), metadata=meta("stream"), timeout=30) for t in m.token_ids]
        assert r.json()["choices"][0]["offramp"]["token_ids"] == list(unary.token_ids) == streamed
        assert tracing.force_flush()
        otlp_receiver.wait_for(lambda s: all(otlp_receiver.trace(t) for t in traces.values()))
        spans = {how: [s for s in otlp_receiver.trace(t) if s.name.startswith("text_completion")]
                 for how, t in traces.items()}
        assert all(len(v) == 1 for v in spans.values()), spans
        attrs = {how: v[0].attributes for how, v in spans.items()}
        assert all(v[0].parent_span_id == "00f067aa0ba902b7" for v in spans.values())
        request_keys = {k for k in attrs["http"] if k.startswith(("gen_ai.request.", "offramp.")) and
                        k not in ("offramp.stages_skipped",)}
        assert {"gen_ai.request.max_tokens", "gen_ai.request.temperature", "offramp.exit_mode"} <= request_keys
        for how in ("unary", "stream"):
            assert attrs[how].pop("offramp.rpc") == "grpc"
            assert {k: attrs[how].get(k) for k in request_keys} == {k: attrs["http"][k] for k in request_keys}
        for how, a in attrs.items():  # each span ended with its response
            assert a["gen_ai.usage.output_tokens"] == len(unary.token_ids), how
            assert a["gen_ai.response.finish_reasons"] == [unary.finish_reason], how
            assert a["offramp.stages_skipped"] == 0, how
    finally:
        channel.close()
        srv.close()
        tracing.shutdown_tracing()
