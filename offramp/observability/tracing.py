"""OpenTelemetry tracing for Offramp: one trace per request, one child span per stage visit.

Configured only by the standard environment variables, read once per process on first use
(or by an explicit :func:`setup_tracing`):

* ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``: where spans go.
  Neither set = tracing off (the default).
* ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` or
  ``http/protobuf`` (the OpenTelemetry default, as here).
* ``OTEL_SERVICE_NAME`` (default ``offramp``), ``OTEL_RESOURCE_ATTRIBUTES``.
* ``OTEL_TRACES_SAMPLER`` (``parentbased_traceidratio`` recommended) and
  ``OTEL_TRACES_SAMPLER_ARG`` (the ratio); default ``parentbased_always_on``.
* ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turn tracing off.
* Exporter details (headers, certificates, timeouts, ``OTEL_BSP_*`` batching) are read by
  the OpenTelemetry SDK itself.

Offramp keeps its own ``TracerProvider`` instead of the global one, so it neither fights
with Ray Serve's native tracing nor with an application that configured OpenTelemetry.

Propagation is W3C ``traceparent``/``tracestate`` in a plain ``dict`` carrier: the front
end opens :func:`request_span` and passes ``inject(span)`` down as
``GenerationRequest.trace_context``; each stage, in whatever process or node, opens
:func:`stage_span` from that carrier, so its span is a child of the request span.

When tracing is off every helper returns a shared no-op object after one flag check.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("offramp.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_SPAN = trace.INVALID_SPAN
_NOOP_CM = contextlib.nullcontext(_NOOP_SPAN)  # reusable: nullcontext keeps no state

_lock = threading.Lock()
_configured = False
_provider: Any = None  # opentelemetry.sdk.trace.TracerProvider when on
_tracer: trace.Tracer | None = None

# Event and attribute names (GenAI semantic conventions, Offramp's own under ``offramp.``).
EXIT_EVENT = "offramp.exit"


# --------------------------------------------------------------------------- setup


def _sampler_from_env(env: Mapping[str, str]):
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if "traceidratio" in name:
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; sampling every trace", arg)
        if not 0.0 <= ratio <= 1.0:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%s is outside [0, 1]; clamped", ratio)
            ratio = min(1.0, max(0.0, ratio))
    samplers = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported (use one of %s); using parentbased_always_on",
                    name, ", ".join(samplers))
        name = "parentbased_always_on"
    return samplers[name]


def _exporter_from_env(env: Mapping[str, str]):
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    # The exporters read endpoint, headers, TLS and timeout from the same OTEL_* variables.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use 'grpc' or 'http/protobuf'")
    return OTLPSpanExporter()


def setup_tracing(force: bool = False) -> bool:
    """Configure tracing from ``os.environ`` once per process; return whether it is on.

    Idempotent: later calls return the first result. ``force`` shuts the current provider
    down (flushing it) and reads the environment again (tests, or after a fork).
    """
    global _configured, _provider, _tracer
    with _lock:
        if _configured and not force:
            return _tracer is not None
        if _provider is not None:
            _provider.shutdown()
        _configured, _provider, _tracer = True, None, None
        env = os.environ
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if (not endpoint or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
                or env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none"):
            return False
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            attrs = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "offramp"}
            provider = TracerProvider(resource=Resource.create(attrs), sampler=_sampler_from_env(env))
            provider.add_span_processor(BatchSpanProcessor(_exporter_from_env(env)))
        except Exception as e:  # noqa: BLE001 - a tracing mistake must never stop serving
            log.error("tracing disabled: %s", e)
            return False
        _provider, _tracer = provider, provider.get_tracer("offramp")
        log.info("tracing on: OTLP to %s", endpoint)
        return True


def enabled() -> bool:
    """Whether spans are exported (configures on first call)."""
    if not _configured:
        setup_tracing()
    return _tracer is not None


def force_flush(timeout_s: float = 5.0) -> bool:
    """Export every finished span now (tests, before a process exits)."""
    provider = _provider
    return True if provider is None else bool(provider.force_flush(int(timeout_s * 1000)))


def shutdown_tracing() -> None:
    """Flush and stop exporting; a later use configures again from the environment."""
    global _configured, _provider, _tracer
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _configured, _provider, _tracer = False, None, None


atexit.register(shutdown_tracing)


# --------------------------------------------------------------------------- propagation


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The remote parent in a W3C carrier (``traceparent``, ``tracestate``); empty if none."""
    return _PROPAGATOR.extract(carrier) if carrier else Context()


def inject(context: Context | Span | None = None, carrier: Mapping[str, str] | None = None) -> dict[str, str]:
    """A W3C carrier for ``context`` (a Context or a Span): ``{"traceparent": ...}``.

    An invalid span (tracing off) gives ``carrier`` back unchanged, so an incoming
    traceparent still travels on when this process does not trace.
    """
    out = dict(carrier or {})
    if isinstance(context, Span):
        if not context.get_span_context().is_valid:
            return out
        context = trace.set_span_in_context(context)
    _PROPAGATOR.inject(out, context=context)
    return out


# --------------------------------------------------------------------------- spans


@contextlib.contextmanager
def request_span(name: str, carrier: Mapping[str, str] | None = None,
                 attrs: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """The span of one API request, child of the caller's ``traceparent`` if any.

    ``name`` is the GenAI operation (``text_completion``, ``chat``); the span is named
    ``"{name} {gen_ai.request.model}"`` as the GenAI conventions say. ``attrs`` are GenAI
    (``gen_ai.request.model``, ``gen_ai.request.max_tokens``, ...) or ``offramp.*``
    attributes; set the response ones on the yielded span with :func:`set_response`.
    An exception marks the span as an error (``error.type``) and propagates.
    """
    if _tracer is None and (_configured or not setup_tracing()):
        yield _NOOP_SPAN
        return
    attributes = {"gen_ai.operation.name": name, "gen_ai.provider.name": "offramp"}
    attributes.update({k: v for k, v in (attrs or {}).items() if v is not None})
    model = attributes.get("gen_ai.request.model")
    span = _tracer.start_span(f"{name} {model}" if model else name, context=extract(carrier),
                              kind=SpanKind.SERVER, attributes=attributes)
    with _ended(span):
        yield span


def set_response(span: Span, *, response_id: str | None = None, input_tokens: int | None = None,
                 output_tokens: int | None = None, finish_reasons: Sequence[str] | None = None,
                 **offramp: Any) -> None:
    """GenAI response attributes on a request span (no-op when it does not record).
    Extra keyword arguments become ``offramp.<name>`` attributes."""
    if not span.is_recording():
        return
    values = {"gen_ai.response.id": response_id, "gen_ai.usage.input_tokens": input_tokens,
              "gen_ai.usage.output_tokens": output_tokens,
              "gen_ai.response.finish_reasons": list(finish_reasons) if finish_reasons else None}
    values.update({f"offramp.{k}": v for k, v in offramp.items()})
    span.set_attributes({k: v for k, v in values.items() if v is not None})


def _record_error(span: Span, e: BaseException) -> None:
    if not span.is_recording():
        return
    if isinstance(e, (GeneratorExit, KeyboardInterrupt)) or type(e).__name__ == "CancelledError":
        span.set_attribute("error.type", "cancelled")
        return
    span.set_attribute("error.type", getattr(e, "grpc_code", None) or type(e).__name__)
    span.record_exception(e)
    span.set_status(Status(StatusCode.ERROR, str(e)[:200]))


def _stage_attributes(stage: int, layers: Sequence[int] | None, pool: str | None, replica: str | None,
                      batch_size: int | None, tokens: int | None, precision: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"offramp.stage.index": stage}
    if layers is not None:
        attrs["offramp.stage.layers"] = [int(x) for x in layers]
    for key, value in (("offramp.stage.pool", pool), ("offramp.stage.replica", replica),
                       ("offramp.batch_size", batch_size), ("offramp.tokens", tokens),
                       ("offramp.stage.precision", precision)):
        if value is not None:
            attrs[key] = value
    return attrs


def stage_span(carrier: Mapping[str, str] | None, stage: int, layers: Sequence[int] | None = None,
               pool: str | None = None, replica: str | None = None, batch_size: int | None = None,
               tokens: int | None = None, precision: str | None = None):
    """Context manager: the span of one stage visit of one request (``offramp.stage N``).

    Its parent is the request span named by ``carrier`` (the request's
    ``trace_context``), so it nests correctly in any process. No carrier, or tracing
    off: a shared no-op. ``layers`` is the stage's ``[start, end)`` layer range,
    ``tokens`` the positions this visit computes (prefill chunk or 1 when decoding).
    """
    if not carrier or (_tracer is None and (_configured or not setup_tracing())):
        return _NOOP_CM
    return _stage_cm(carrier, stage, layers, pool, replica, batch_size, tokens, precision)


@contextlib.contextmanager
def _ended(span: Span) -> Iterator[Span]:
    """Ends ``span`` on leaving; an exception marks it as an error (``error.type``) and
    propagates."""
    try:
        yield span
    except BaseException as e:
        _record_error(span, e)
        raise
    finally:
        span.end()


@contextlib.contextmanager
def _stage_cm(carrier, stage, layers, pool, replica, batch_size, tokens, precision) -> Iterator[Span]:
    span = _tracer.start_span(f"offramp.stage {stage}", context=extract(carrier), kind=SpanKind.INTERNAL,
                              attributes=_stage_attributes(stage, layers, pool, replica, batch_size, tokens,
                                                           precision))
    with _ended(span):
        yield span


@contextlib.contextmanager
def stage_spans(carriers: Sequence[Mapping[str, str] | None], stage: int, layers: Sequence[int] | None = None,
                pool: str | None = None, replica: str | None = None, precision: str | None = None,
                tokens: Sequence[int] | None = None) -> Iterator[list[Span]]:
    """One :func:`stage_span` per row of a batched step, all timing the same step.

    Yields one span per carrier (the no-op span for rows without one), in row order, so
    ``exit_event(spans[i], ...)`` marks row ``i``. ``tokens[i]`` is row i's positions.
    """
    n = len(carriers)
    if _tracer is None and (_configured or not setup_tracing()):
        yield [_NOOP_SPAN] * n
        return
    with contextlib.ExitStack() as stack:
        spans = [stack.enter_context(stage_span(c, stage, layers, pool, replica, n,
                                                None if tokens is None else tokens[i], precision))
                 for i, c in enumerate(carriers)]
        yield spans


def exit_event(span: Span, gate: int, confidence: float, threshold: float | None = None,
               task: str | None = None, token_id: int | None = None) -> None:
    """Mark on a stage span that a token left the pipeline at ``gate`` (an event
    ``offramp.exit``), with the gate's confidence and the threshold it beat."""
    if not span.is_recording():
        return
    attrs: dict[str, Any] = {"offramp.exit.gate": gate, "offramp.exit.confidence": float(confidence)}
    if threshold is not None:
        attrs["offramp.exit.threshold"] = float(threshold)
    if task:
        attrs["offramp.task"] = task
    if token_id is not None:
        attrs["offramp.exit.token_id"] = token_id
    span.add_event(EXIT_EVENT, attrs)


def verify_event(span: Span, drafted: int, accepted: int) -> None:
    """Mark on the last stage's span one speculative verify round (an event
    ``offramp.verify``): how many drafted tokens it checked and how many it kept."""
    if not span.is_recording():
        return
    span.add_event("offramp.verify", {"offramp.verify.drafted": drafted, "offramp.verify.accepted": accepted})
