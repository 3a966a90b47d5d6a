"""Tracing and metrics building blocks: OTLP export to a real in-process OTLP/gRPC receiver,
W3C propagation through the carrier, GenAI attributes, exit events; metric definitions."""
from __future__ import annotations

import threading

import pytest
from opentelemetry import trace

from offramp.observability import metrics, tracing
from otlp_receiver import otlp_receiver  # noqa: F401  (fixture)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
             "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    tracing.shutdown_tracing()
    yield
    tracing.shutdown_tracing()


def traced_request(carrier_in: dict[str, str]) -> str:
    """What the front end and the stages will do: request span, carrier, stage spans in
    another thread (standing in for another process: only the carrier crosses), exit event."""
    with tracing.request_span("text_completion", carrier_in, {
            "gen_ai.request.model": "tiny", "gen_ai.request.max_tokens": 2,
            "gen_ai.request.temperature": 0.0}) as span:
        carrier = tracing.inject(span)
        if carrier_in:
            assert carrier["traceparent"].split("-")[1] == TRACE_ID
        else:  # an unsampled root still propagates, not sampled, so the stages do not sample either
            assert not span.is_recording() and int(carrier["traceparent"][-2:], 16) & 1 == 0

        def stages() -> None:
            for token in range(2):
                for stage in (0, 1):
                    if token == 1 and stage == 1:
                        break  # token 1 exits after stage 0
                    with tracing.stage_span(carrier, stage, layers=(2 * stage, 2 * stage + 2), pool="cpu",
                                            replica=f"r{stage}", batch_size=1, tokens=3 if token == 0 else 1,
                                            precision="fp32") as s:
                        if token == 1:
                            tracing.exit_event(s, gate=0, confidence=0.93, threshold=0.9, task="qa")

        t = threading.Thread(target=stages)
        t.start()
        t.join()
        tracing.set_response(span, response_id="cmpl-1", input_tokens=3, output_tokens=2,
                             finish_reasons=["length"], stages_skipped=1)
    return span.get_span_context().span_id.to_bytes(8, "big").hex()


def test_request_and_stage_spans_reach_the_collector(otlp_receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "offramp-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.0")  # new roots dropped, sampled parents kept
    assert tracing.setup_tracing(force=True)

    request_id = traced_request({"traceparent": TRACEPARENT})
    assert tracing.force_flush()
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 4)
    mine = otlp_receiver.trace(TRACE_ID)
    assert len(mine) == 4 and len(spans) == 4

    (req,) = [s for s in mine if s.span_id == request_id]
    assert req.name == "text_completion tiny" and req.parent_span_id == PARENT_ID
    assert req.kind == 2  # SERVER
    assert req.resource["service.name"] == "offramp-test"
    a = req.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.request.max_tokens"] == 2 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 2
    assert a["gen_ai.response.finish_reasons"] == ["length"] and a["gen_ai.response.id"] == "cmpl-1"
    assert a["offramp.stages_skipped"] == 1

    stage_spans = [s for s in mine if s is not req]
    assert [s.name for s in stage_spans] == ["offramp.stage 0", "offramp.stage 1", "offramp.stage 0"]
    assert all(s.parent_span_id == request_id for s in stage_spans)
    assert all(req.start_ns <= s.start_ns and s.end_ns <= req.end_ns for s in stage_spans)
    first = stage_spans[0].attributes
    assert first["offramp.stage.index"] == 0 and first["offramp.stage.layers"] == [0, 2]
    assert first["offramp.stage.pool"] == "cpu" and first["offramp.stage.replica"] == "r0"
    assert first["offramp.batch_size"] == 1 and first["offramp.tokens"] == 3
    assert first["offramp.stage.precision"] == "fp32"
    assert stage_spans[0].events == [] and stage_spans[1].events == []
    ((name, ev),) = stage_spans[2].events
    assert name == "offramp.exit"
    assert ev == {"offramp.exit.gate": 0, "offramp.exit.confidence": pytest.approx(0.93),
                  "offramp.exit.threshold": pytest.approx(0.9), "offramp.task": "qa"}

    # Ratio 0 and no parent: a new root is not sampled, nothing more is exported.
    otlp_receiver.clear()
    traced_request({})
    tracing.force_flush()
    assert otlp_receiver.trace(TRACE_ID) == [] and otlp_receiver.spans == []


def test_batched_stage_spans_and_errors(otlp_receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    assert tracing.setup_tracing(force=True)
    other = "0af7651916cd43dd8448eb211c80319c"
    carriers = [{"traceparent": TRACEPARENT}, None, {"traceparent": f"00-{other}-b7ad6b7169203331-01"}]
    with tracing.stage_spans(carriers, stage=1, layers=(2, 4), pool="gpu", tokens=[1, 1, 5]) as spans:
        assert len(spans) == 3 and not spans[1].is_recording()
        tracing.exit_event(spans[2], gate=1, confidence=0.5)
    with pytest.raises(ValueError):
        with tracing.request_span("chat", {"traceparent": TRACEPARENT}, {"gen_ai.request.model": "m"}):
            raise ValueError("boom")
    tracing.force_flush()
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 3)
    by_trace = {s.trace_id: s for s in spans if s.name.startswith("offramp.stage")}
    assert set(by_trace) == {TRACE_ID, other}
    assert by_trace[other].attributes["offramp.batch_size"] == 3 and by_trace[other].attributes["offramp.tokens"] == 5
    assert by_trace[other].events[0][0] == "offramp.exit"
    (err,) = [s for s in spans if s.name == "chat m"]
    assert err.status_code == 2 and err.attributes["error.type"] == "ValueError"  # STATUS_CODE_ERROR


def test_off_without_endpoint_is_noop():
    assert not tracing.enabled()
    with tracing.request_span("text_completion", {"traceparent": TRACEPARENT}) as span:
        assert span is trace.INVALID_SPAN
        # The incoming carrier still travels on to the stages when this process does not trace.
        assert tracing.inject(span, {"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}
    cm = tracing.stage_span({"traceparent": TRACEPARENT}, 0)
    assert cm is tracing.stage_span(None, 1)  # one shared no-op object
    with cm as s:
        tracing.exit_event(s, 0, 0.9)
        tracing.set_response(s, response_id="x")


@pytest.mark.parametrize("var, value", [("OTEL_TRACES_EXPORTER", "none"), ("OTEL_SDK_DISABLED", "true")])
def test_explicitly_disabled(monkeypatch, var, value):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv(var, value)
    assert not tracing.setup_tracing(force=True)


def test_setup_is_idempotent_and_http_protocol(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")  # http/protobuf by default
    assert tracing.setup_tracing(force=True)
    provider = tracing._provider
    assert tracing.setup_tracing() and tracing._provider is provider
    exporter = provider._active_span_processor._span_processors[0]._batch_processor._exporter
    assert type(exporter).__module__.endswith("http.trace_exporter")
    assert exporter._endpoint == "http://127.0.0.1:1/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    assert not tracing.setup_tracing(force=True)  # logged, never raised


def test_extract_inject_roundtrip():
    ctx = tracing.extract({"traceparent": TRACEPARENT, "tracestate": "k=v"})
    sc = trace.get_current_span(ctx).get_span_context()
    assert format(sc.trace_id, "032x") == TRACE_ID and sc.is_remote
    assert tracing.inject(ctx) == {"traceparent": TRACEPARENT, "tracestate": "k=v"}
    assert tracing.extract(None) is not None and tracing.inject(None) == {}


# --------------------------------------------------------------------------- metrics


def test_metric_definitions_follow_ray_rules():
    for name, spec in metrics.SPECS.items():
        assert "." not in name and name.startswith("offramp_") and name == spec.name
        assert not set(spec.tags) & metrics.RESERVED_TAGS, name
        assert (spec.kind == "histogram") == bool(spec.buckets)
        if spec.kind == "counter":
            assert name.endswith("_total")
    for wanted in ("offramp_early_exit_total", "offramp_gate_activation_ratio", "offramp_exit_agreement_ratio",
                   "offramp_stage_step_seconds", "offramp_stage_queue_depth", "offramp_stage_batch_size",
                   "offramp_tokens_total", "offramp_ttft_seconds", "offramp_tpot_seconds",
                   "offramp_hops_saved_total", "offramp_draft_tokens_total", "offramp_accepted_draft_tokens_total",
                   "offramp_verify_rounds_total", "offramp_requests_waiting_for_kv", "offramp_kv_waits_total"):
        assert wanted in metrics.SPECS


def test_metrics_are_noop_without_ray(monkeypatch):
    # In a full run a session-scoped Ray cluster may be up: pretend it is not.
    monkeypatch.setattr(metrics, "_ray_ready", lambda: False)
    monkeypatch.setattr(metrics, "_objects", {})
    metrics.record_gate(0, evaluated=4, exited=1, task="qa")
    metrics.record_agreement(0, True)
    metrics.record_step(1, "gpu", 0.003, 8, queue_depth=2)
    metrics.set_queue_depth(1, "gpu", 0)
    metrics.record_tokens("tiny", [0, 3, 3, 1], num_stages=4)
    metrics.record_ttft("tiny", 0.1)
    metrics.record_tpot("tiny", 0.01)
    metrics.record_verify("tiny", "qa", drafted=4, accepted=2)
    metrics.record_kv_wait("tiny", 3, queued=True)
    assert metrics.get("offramp_tokens_total") is metrics.NOOP and not metrics._objects


def test_record_verify_counts_drafts_accepts_and_rounds(monkeypatch):
    class Counter:
        def __init__(self):
            self.calls = []

        def inc(self, value=1.0, tags=None):
            assert value > 0  # Ray counters refuse 0
            self.calls.append((value, tags))

    names = ("offramp_draft_tokens_total", "offramp_accepted_draft_tokens_total", "offramp_verify_rounds_total")
    counters = {n: Counter() for n in names}
    monkeypatch.setattr(metrics, "_objects", dict(counters))
    metrics.record_verify("tiny", "math", drafted=5, accepted=3)
    metrics.record_verify("tiny", None, drafted=0, accepted=0)  # a round with nothing drafted (the first token)
    drafted, accepted, rounds = (counters[n].calls for n in names)
    assert drafted == [(5, {"task": "math", "model": "tiny"})]
    assert accepted == [(3, {"task": "math", "model": "tiny"})]
    assert rounds == [(1, {"task": "math", "model": "tiny"}), (1, {"task": "none", "model": "tiny"})]


def test_ewma_ratio():
    e = metrics._Ewma(alpha=0.5)
    assert e.update(("k",), 1.0) == 1.0
    assert e.update(("k",), 0.0) == 0.5
    assert e.update(("k",), 0.0, weight=2) == pytest.approx(0.125)
