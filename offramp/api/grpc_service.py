"""The gRPC API (``offramp.v1.Offramp``) over the same :class:`~offramp.api.frontend.Frontend`
as the HTTP API: same validation, limits, detokenizer, stop strings and deadline.

Two ways to serve it:

* **Ray Serve.** Mix :class:`GrpcIngressMixin` into the ingress deployment (it has
  ``self.frontend``) and register the servicer in the Serve config::

      grpc_options:
        port: 9000
        grpc_servicer_functions:
          - offramp.api.proto.offramp_pb2_grpc.add_OfframpServicer_to_server

  Serve's gRPC proxy calls the deployment method named like the RPC with the request
  message and, because the methods declare it, ``grpc_context=`` (a
  ``ray.serve.grpc_util.RayServegRPCContext``). A status code is reported by setting it
  on that context and raising: Serve 2.60 wraps the exception in ``gRPCStatusError`` and
  the proxy answers with the code and details that were set.
* **Plain grpcio.** :func:`serve_standalone` runs the same methods on a ``grpc.aio``
  server (tests, a deployment without Ray).

Status codes: bad arguments -> INVALID_ARGUMENT; missing/wrong key -> UNAUTHENTICATED;
unknown model -> NOT_FOUND; Overloaded -> RESOURCE_EXHAUSTED; StageUnavailable ->
UNAVAILABLE; past the request timeout or the client's deadline -> DEADLINE_EXCEEDED;
anything else -> INTERNAL with a generic message (details in the server log).
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, AsyncIterator

import grpc

from offramp.api.auth import key_matches, presented_key
from offramp.api.errors import INTERNAL_MESSAGE
from offramp.api.frontend import Frontend
from offramp.api.generation import Generation
from offramp.api.proto import offramp_pb2 as pb
from offramp.api.proto import offramp_pb2_grpc as pb_grpc
from offramp.errors import OfframpError

log = logging.getLogger("offramp.api.grpc")


class GrpcError(Exception):
    """Ends an RPC with ``code`` and ``details`` (after setting them on the context)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses Ray process boundaries inside RayTaskError
        return (GrpcError, (self.code, self.details, self.retry_after_s))


def status_of(e: BaseException) -> GrpcError:
    """The gRPC status for an exception raised while serving a request."""
    from offramp.api.errors import ApiError

    if isinstance(e, GrpcError):
        return e
    if isinstance(e, ApiError):
        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT}.get(e.status)
        if code is not None:
            return GrpcError(code, e.message)
    if isinstance(e, OfframpError):
        code = getattr(grpc.StatusCode, e.grpc_code, grpc.StatusCode.INTERNAL)
        if code is not grpc.StatusCode.INTERNAL or getattr(e, "public", False):
            return GrpcError(code, str(e) or type(e).__name__, e.retry_after_s)
    if isinstance(e, TimeoutError):
        return GrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "request ran past its deadline")
    log.error("unhandled error in the gRPC API", exc_info=e)
    return GrpcError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _fail(grpc_context: Any, e: BaseException) -> GrpcError:
    """Set the status on the (Serve or standalone) context; return the exception to raise."""
    err = status_of(e)
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.details)
        if err.retry_after_s is not None:
            grpc_context.set_trailing_metadata([("retry-after-ms", str(int(err.retry_after_s * 1000)))])
    return err


def _metadata(grpc_context: Any) -> list[tuple[str, str]]:
    if grpc_context is None:
        return []
    return [(k.lower(), v if isinstance(v, str) else v.decode("latin-1"))
            for k, v in grpc_context.invocation_metadata()]


class GrpcIngressMixin:
    """The ``offramp.v1.Offramp`` RPCs as methods using ``self.frontend``.

    ``grpc_context`` is Serve's ``RayServegRPCContext`` or the standalone adapter's; both
    offer ``invocation_metadata``, ``set_code``, ``set_details``, ``set_trailing_metadata``;
    the standalone one also ``time_remaining`` (the client's deadline; Serve's proxy does
    not forward it, so there the request timeout and the proxy's cancellation apply).
    """

    frontend: Frontend

    # -- RPCs ----------------------------------------------------------------------------
    async def Health(self, request: pb.HealthRequest, grpc_context: Any = None) -> pb.HealthResponse:
        s = self.frontend.settings
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, model=s.model_name,
                                 num_stages=int(getattr(self.frontend.backend, "num_stages", 1)),
                                 max_context=s.max_context)

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        gen = self._begin(request, grpc_context)
        try:
            try:
                await gen.start()
                (result,) = await gen.collect()
            finally:
                await gen.aclose()
            usage = self._usage(gen, result)
        except BaseException as e:
            raise self._failed(gen, grpc_context, e) from None
        gen.end_span()
        return pb.GenerateResponse(id=gen.request_id, model=self.frontend.settings.model_name, text=result.text,
                                   token_ids=result.token_ids, exit_stages=result.exit_stages,
                                   finish_reason=result.finish_reason or "stop", usage=usage,
                                   num_stages=gen.num_stages,
                                   logprobs=_logprobs(zip(result.token_ids, result.logprobs)) if gen.logprobs else ())

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: Any = None) -> AsyncIterator[pb.GenerateStreamResponse]:
        gen = self._begin(request, grpc_context)
        try:
            await gen.start()
            choice = gen.choices[0]
            sent = 0
            async for d in gen.deltas():
                ids = choice.token_ids[sent:sent + len(d.exit_stages)]
                sent += len(ids)
                msg = pb.GenerateStreamResponse(id=gen.request_id, text=d.text, token_ids=ids,
                                                exit_stages=d.exit_stages, logprobs=_logprobs(d.logprobs))
                if d.finish_reason:
                    msg.finish_reason = d.finish_reason
                    msg.usage.CopyFrom(self._usage(gen, choice))
                yield msg
        except BaseException as e:  # a client's cancel too: the span records it
            raise self._failed(gen, grpc_context, e) from None
        finally:
            await gen.aclose()
            gen.end_span()  # no-op after an error

    # -- pieces ----------------------------------------------------------------------------
    def _begin(self, request: pb.GenerateRequest, grpc_context: Any) -> Generation:
        """The RPC's key checked and its request validated (errors as its status)."""
        try:
            self._authorize(grpc_context)
            return self._start(request, grpc_context)
        except Exception as e:
            raise _fail(grpc_context, e) from None

    @staticmethod
    def _failed(gen: Generation, grpc_context: Any, e: BaseException) -> BaseException:
        """``gen``'s span ended with ``e``; what to raise: an error as the RPC's status, a
        cancellation as itself."""
        gen.end_span(e)
        return _fail(grpc_context, e) if isinstance(e, Exception) else e

    def _authorize(self, grpc_context: Any) -> None:
        key = self.frontend.settings.api_key
        if key is None:
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in _metadata(grpc_context)]
        presented = presented_key(headers)
        if not key_matches(presented, key.get_secret_value().encode()):
            raise GrpcError(grpc.StatusCode.UNAUTHENTICATED,
                            "Missing API key: send metadata 'authorization: Bearer <key>'" if presented is None
                            else "Incorrect API key provided")

    def _start(self, request: pb.GenerateRequest, grpc_context: Any) -> Generation:
        """Validate exactly as POST /v1/completions does (the proto as its body, the same
        parser, the front ends' one :meth:`Frontend.generation`); an unstarted Generation
        whose deadline is also the client's."""
        from offramp.api.app import parse
        from offramp.api.schemas import CompletionRequest
        from offramp.api.text import encode_prompt

        fe = self.frontend
        req: CompletionRequest = parse(CompletionRequest, _completion_body(request, fe.settings.model_name),
                                       fe.settings.model_name)
        prompt_ids = encode_prompt(fe.tokenizer, req.prompt_input())
        remaining = getattr(grpc_context, "time_remaining", None)
        md = dict(_metadata(grpc_context))
        return fe.generation(req, prompt_ids, request_id=f"cmpl-{uuid.uuid4().hex}", operation="text_completion",
                             carrier={k: md[k] for k in ("traceparent", "tracestate") if k in md} or None,
                             max_n=1, timeout_s=remaining() if callable(remaining) else None,
                             attrs={"offramp.rpc": "grpc"})

    def _usage(self, gen: Any, choice: Any) -> pb.Usage:
        """Usage of the one choice (a ChoiceResult or the running choice)."""
        p, c = gen.prompt_tokens, len(choice.exit_stages)
        usage = pb.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                         stages_skipped=gen.stages_skipped(choice.exit_stages))
        spec = gen.speculative([choice])
        if spec is not None:
            usage.speculative.CopyFrom(pb.SpeculativeStats(drafted=spec["drafted"], accepted=spec["accepted"],
                                                           verify_rounds=spec["verify_rounds"]))
        return usage


_EXIT_MODES = {pb.EXIT_MODE_OFF: "off", pb.EXIT_MODE_CALIBRATED: "calibrated",
               pb.EXIT_MODE_SPECULATIVE: "speculative"}


def _logprobs(items) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=a, logprob=v) for a, v in lp.top])
            for t, lp in items if lp is not None]


def _completion_body(request: pb.GenerateRequest, served: str) -> dict[str, Any]:
    """The proto request as a /v1/completions body, so one validator serves both APIs."""
    from offramp.errors import BadRequest

    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        raise BadRequest("set exactly one of prompt (text) and prompt_token_ids", param="prompt")
    body: dict[str, Any] = {"model": request.model or served,
                            "prompt": request.prompt if has_text else list(request.prompt_token_ids)}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.ignore_eos:
        body["ignore_eos"] = True
    if request.include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    extras: dict[str, Any] = {}
    which = request.WhichOneof("exit")
    if which == "exit_threshold":
        extras["exit"] = float(request.exit_threshold)
    elif which == "exit_mode" and request.exit_mode != pb.EXIT_MODE_UNSPECIFIED:
        if request.exit_mode not in _EXIT_MODES:  # proto3 enums are open
            raise BadRequest(f"exit_mode {request.exit_mode} is not a known ExitMode", param="offramp.exit")
        extras["exit"] = _EXIT_MODES[request.exit_mode]
    if request.HasField("max_draft"):
        extras["max_draft"] = request.max_draft
    for name in ("logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in request.logit_bias.items()}
    if request.min_tokens:
        body["min_tokens"] = request.min_tokens
    if request.stop_token_ids:
        body["stop_token_ids"] = list(request.stop_token_ids)
    if request.task:
        extras["task"] = request.task
    if extras:
        body["offramp"] = extras
    return body


# --------------------------------------------------------------------------- standalone


class _ContextAdapter:
    """A grpc.aio ServicerContext seen through RayServegRPCContext's interface."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def invocation_metadata(self):
        return self._context.invocation_metadata() or ()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, md) -> None:
        self._context.set_trailing_metadata(tuple(md))

    async def abort(self, e: BaseException):
        err = e if isinstance(e, GrpcError) else status_of(e)
        await self._context.abort(self._code or err.code, self._details or err.details)


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (bad wire format, bad
    UTF-8 in a string field), so the RPC ends in INVALID_ARGUMENT instead of grpcio's UNKNOWN."""

    def __init__(self, reason: str):
        self.reason = reason

    def error(self) -> GrpcError:
        return GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {self.reason}")


def _lenient(message_type: Any):
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as e:
            return _Undecodable(str(e) or type(e).__name__)

    return parse


def _add_servicer(servicer: "StandaloneServicer", server: grpc.aio.Server) -> None:
    """``add_OfframpServicer_to_server`` with request deserializers that never raise."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateStreamResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=_lenient(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString),
    }
    service = pb.DESCRIPTOR.services_by_name["Offramp"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, handlers)


class StandaloneServicer(pb_grpc.OfframpServicer):
    """Runs a :class:`GrpcIngressMixin` on a plain ``grpc.aio`` server."""

    def __init__(self, ingress: GrpcIngressMixin):
        self.ingress = ingress

    async def Health(self, request, context):
        ctx = _ContextAdapter(context)
        if isinstance(request, _Undecodable):
            await ctx.abort(request.error())
        return await self.ingress.Health(request, grpc_context=ctx)

    async def Generate(self, request, context):
        ctx = _ContextAdapter(context)
        try:
            if isinstance(request, _Undecodable):
                raise request.error()
            return await self.ingress.Generate(request, grpc_context=ctx)
        except GrpcError as e:
            await ctx.abort(e)

    async def GenerateStream(self, request, context):
        ctx = _ContextAdapter(context)
        try:
            if isinstance(request, _Undecodable):
                raise request.error()
            async for msg in self.ingress.GenerateStream(request, grpc_context=ctx):
                yield msg
        except GrpcError as e:
            await ctx.abort(e)


class _FrontendIngress(GrpcIngressMixin):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend


async def serve_standalone(frontend: Frontend, port: int = 0, host: str = "127.0.0.1", *,
                           reflection: bool = True) -> tuple[grpc.aio.Server, int]:
    """Start a ``grpc.aio`` server for ``frontend`` on ``host:port`` (0 = any free port).

    Returns ``(server, bound_port)``; stop it with ``await server.stop(grace)``. Binding
    beyond loopback requires an API key, as for HTTP (:func:`offramp.api.auth.check_bind`).
    Server reflection is on by default so ``grpcurl`` works without the .proto.
    """
    from offramp.api.auth import check_bind

    key = frontend.settings.api_key
    check_bind(host, key.get_secret_value() if key else None)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", frontend.settings.max_body_bytes)])
    _add_servicer(StandaloneServicer(_FrontendIngress(frontend)), server)
    if reflection:
        try:
            from grpc_reflection.v1alpha import reflection as refl

            names = (pb.DESCRIPTOR.services_by_name["Offramp"].full_name, refl.SERVICE_NAME)
            refl.enable_server_reflection(names, server)
        except ImportError:
            log.info("grpcio-reflection not installed; serving without reflection")
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the gRPC server to {host}:{port}")
    await server.start()
    return server, bound
