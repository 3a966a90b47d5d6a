"""Observability and gRPC on the served pipeline (real local multi-node Ray cluster):

* traces exported over OTLP/gRPC from every replica to a real receiver started here: the
  caller's ``traceparent`` is continued, one stage span per stage visit as children of
  the request span, exit events on exited tokens, no stage spans past an exit;
* Offramp metrics scraped from Ray's real Prometheus endpoints after traffic;
* the gRPC API through Serve's gRPC proxy with the generated client.
"""
from __future__ import annotations

import re
import time
import urllib.request

import grpc
import httpx
import pytest

from otlp_receiver import otlp_receiver  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
KEY = "sk-observability-test"


@pytest.fixture
def traced_app(ray_cluster, tiny_model_dir, otlp_receiver):  # noqa: F811
    from serve_fixtures import APP, apply_config, free_port, fresh_serve, serve_config, stop_serve

    config = serve_config(tiny_model_dir, free_port())
    config["grpc_options"] = {"port": free_port(), "grpc_servicer_functions": [
        "offramp.api.proto.offramp_pb2_grpc.add_OfframpServicer_to_server"]}
    app = config["applications"][0]
    app["args"]["api_key_env"] = "OFFRAMP_TEST_KEY"  # Serve's gRPC proxy binds [::]: a key is required
    app["runtime_env"] = {"env_vars": {  # standard OTEL_* variables, read once per replica
        "OFFRAMP_TEST_KEY": KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "offramp-test", "OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_SCHEDULE_DELAY": "200"}}
    fresh_serve()  # its gRPC port: Serve keeps the options of whoever started it
    apply_config(config, wait_s=240)
    assert app["name"] == APP
    yield config
    stop_serve()


def _complete(config, body, traceparent=None):
    headers = {"authorization": f"Bearer {KEY}"}
    if traceparent:
        headers["traceparent"] = f"00-{traceparent}-00f067aa0ba902b7-01"
    r = httpx.post(f"http://127.0.0.1:{config['http_options']['port']}/v1/completions", timeout=120, headers=headers,
                   json={"model": "offramp-default", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["offramp"]


def test_trace_spans_stages_and_exits(traced_app, otlp_receiver):  # noqa: F811
    n_stages = 4
    off = _complete(traced_app, {"prompt": [5, 6, 7], "max_tokens": 3, "offramp": {"exit": "off"}}, TRACE_ID)
    spans = otlp_receiver.wait_for(
        lambda ss: sum(s.trace_id == TRACE_ID and s.name.startswith("offramp.stage") for s in ss) >= 3 * n_stages
        and any(s.trace_id == TRACE_ID and s.attributes.get("gen_ai.operation.name") for s in ss), timeout=60)
    trace = [s for s in spans if s.trace_id == TRACE_ID]
    (root,) = [s for s in trace if s.attributes.get("gen_ai.operation.name") == "text_completion"]
    assert root.parent_span_id == "00f067aa0ba902b7"  # continues the caller's traceparent
    assert root.attributes["gen_ai.request.model"] == "offramp-default"
    assert root.attributes["gen_ai.usage.input_tokens"] == 3
    assert root.attributes["gen_ai.usage.output_tokens"] == 3
    assert list(root.attributes["gen_ai.response.finish_reasons"]) == ["length"]
    stage_spans = sorted((s for s in trace if s.name.startswith("offramp.stage")), key=lambda s: s.start_ns)
    assert all(s.parent_span_id == root.span_id for s in stage_spans)
    order = [s.attributes["offramp.stage.index"] for s in stage_spans]
    assert order == list(range(n_stages)) * 3  # each token visits 0,1,2,3 in order
    assert off["exit_stages"] == [3, 3, 3]
    assert {s.resource.get("service.name") for s in stage_spans} == {"offramp-test"}

    # exits on with threshold 0: every token leaves at stage 0; later stages are never visited
    exit_trace = "11112222333344445555666677778888"
    on = _complete(traced_app, {"prompt": [5, 6, 7], "max_tokens": 3, "offramp": {"exit": 0.0}}, exit_trace)
    assert on["exit_stages"] == [0, 0, 0]
    spans = otlp_receiver.wait_for(
        lambda ss: sum(s.trace_id == exit_trace and s.name.startswith("offramp.stage") for s in ss) >= 3
        and any(s.trace_id == exit_trace and s.attributes.get("gen_ai.operation.name") for s in ss), timeout=60)
    time.sleep(1.0)  # anything late would show up now
    stages = [s for s in otlp_receiver.trace(exit_trace) if s.name.startswith("offramp.stage")]
    assert [s.attributes["offramp.stage.index"] for s in stages] == [0, 0, 0]
    exits = [attrs for s in stages for name, attrs in s.events if name == "offramp.exit"]
    assert len(exits) == 3 and all(e["offramp.exit.gate"] == 0 and e["offramp.exit.threshold"] == 0.0 for e in exits)


def test_metrics_scraped_from_prometheus_endpoint(traced_app):
    import ray

    _complete(traced_app, {"prompt": [5, 6, 7], "max_tokens": 4, "offramp": {"exit": 0.0}})
    _complete(traced_app, {"prompt": [8, 9], "max_tokens": 4, "offramp": {"exit": "off"}})
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    wanted = ["ray_offramp_early_exit_total", "ray_offramp_stage_step_seconds", "ray_offramp_ttft_seconds",
              "ray_offramp_tpot_seconds", "ray_offramp_tokens_total", "ray_offramp_hops_saved_total"]
    def stage0_exits(text):
        return sum(float(v) for v in re.findall(
            r'^ray_offramp_early_exit_total\{[^}]*stage="0"[^}]*\} ([0-9.e+]+)', text, re.M))

    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray exports on an interval: poll
        text = ""
        for port in ports:
            try:
                text += urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                pass
        if all(w in text for w in wanted) and stage0_exits(text) >= 4:
            break
        time.sleep(3)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"metrics not exported: {missing}"
    assert stage0_exits(text) >= 4  # the 4 tokens of the first request left at stage 0
    assert "." not in " ".join(re.findall(r"^(ray_offramp_[a-z_]+)", text, re.M))


def test_grpc_through_serve_proxy(traced_app):
    from offramp.api.proto import offramp_pb2 as pb
    from offramp.api.proto import offramp_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{traced_app['grpc_options']['port']}")
    stub = pb_grpc.OfframpStub(channel)
    meta = (("application", "offramp"), ("authorization", f"Bearer {KEY}"))
    r = stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0,
                                         exit_mode=pb.EXIT_MODE_OFF), metadata=meta, timeout=120)
    http = _complete(traced_app, {"prompt": [5, 6, 7], "max_tokens": 4, "offramp": {"exit": "off"}})
    assert list(r.token_ids) == http["token_ids"] and list(r.exit_stages) == [3, 3, 3, 3]
    chunks = list(stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0,
                                                         exit_mode=pb.EXIT_MODE_OFF), metadata=meta, timeout=120))
    assert [t for c in chunks for t in c.token_ids] == http["token_ids"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt_token_ids=[5], max_tokens=0), metadata=meta, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
