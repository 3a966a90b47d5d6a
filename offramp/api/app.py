"""The OpenAI-compatible HTTP API as a FastAPI app, independent of Ray.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE streaming
ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{model}``, and the
open health routes ``GET /healthz`` and ``GET /-/healthz``.

Serve ingress (Ray Serve 2.60). ``serve.ingress`` accepts an app, a zero-argument builder
function, or nothing: with nothing, the class must define ``__serve_build_asgi_app__``,
which Serve calls on the replica *after* ``__init__`` — the pattern that lets the app
close over what the constructor built (stage handles, tokenizer)::

    from ray import serve
    from offramp.api.app import create_app
    from offramp.api.frontend import Frontend
    from offramp.api.text import load_tokenizer

    @serve.deployment(name="OfframpIngress")
    @serve.ingress()                     # no app: built per replica, below
    class OfframpIngress:                # must not define __call__
        def __init__(self, args: AppArgs, *stage_handles):
            backend = PipelineBackend(...)       # offramp.deployments.pipeline; an offramp.protocol.Backend
            self.frontend = Frontend.from_app_args(args, backend, load_tokenizer(model_dir),
                                                   model_context=...)

        def __serve_build_asgi_app__(self):
            return create_app(self.frontend)

A builder *function* passed as ``serve.ingress(build)`` is called with no arguments, so it
cannot see the constructor's objects; a prebuilt app passed as ``serve.ingress(app)`` is
cloudpickled at decoration time. Neither suits an app that holds handles and a tokenizer.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import sys
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from offramp.api import errors as api_errors
from offramp.api.auth import ApiKeyMiddleware
from offramp.api.errors import ApiError
from offramp.api.frontend import Frontend
from offramp.api.generation import ChoiceDelta, Generation
from offramp.api.logprobs import LogprobFormatter
from offramp.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from offramp.api.text import encode_chat, encode_prompt
from offramp.errors import OfframpError

log = logging.getLogger("offramp.api")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


# --------------------------------------------------------------------------- body


MAX_JSON_DEPTH = 32  # a request body is at most ~6 levels deep; more is an attack or a bug

# A JSON escape that decodes to a UTF-16 surrogate (U+D800..U+DFFF). Paired escapes
# ("\ud83d\ude00") are joined by json.loads into one code point, so a surrogate left in a
# decoded string is always an unpaired one. This regex is only a cheap pre-filter.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_body(message: str, code: str | None, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, or an :class:`ApiError` 400 saying what is wrong with it.

    Too large (declared Content-Length or bytes actually read) -> ``request_too_large``;
    not UTF-8, a byte order mark, unpaired surrogate escapes -> ``invalid_encoding``;
    not JSON, NaN/Infinity, not an object -> ``invalid_json``; nested deeper than
    :data:`MAX_JSON_DEPTH` -> ``nesting_too_deep``; an integer literal too long for Python
    -> ``number_out_of_range``. Never a 500 (see :func:`decode_json_body`).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise _bad_body("Content-Length header is not a number", None)
        if len(declared) > 18 or int(declared) > limit:
            raise _too_large(f"request body is {declared if len(declared) <= 18 else 'over 10^18'} bytes; "
                             f"the limit is {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return decode_json_body(b"".join(chunks))


def _too_large(message: str) -> ApiError:
    # 400, not 413: every malformed body is a 400 (OpenAI clients branch on it); the code says why.
    return _bad_body(message, "request_too_large")


def decode_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object whose every string is valid Unicode and whose nesting is at
    most :data:`MAX_JSON_DEPTH`; anything else is an :class:`ApiError` 400."""
    if raw.startswith(codecs.BOM_UTF8):
        raise _bad_body("request body starts with a UTF-8 byte order mark; send plain UTF-8 JSON without a BOM",
                        "invalid_encoding")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_body(f"request body is not valid UTF-8 (byte {e.start})", "invalid_encoding") from None
    if not text.strip():
        raise _bad_body("request body is empty; send a JSON object", "invalid_json")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except _NotJsonNumber as e:
        raise _bad_body(f"request body is not valid JSON: {e}", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise _bad_body(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                        "invalid_json") from None
    except RecursionError:
        raise _bad_body(f"request body is nested too deeply; at most {MAX_JSON_DEPTH} levels of arrays and "
                        "objects are allowed", "nesting_too_deep") from None
    except ValueError:  # an integer literal beyond Python's int_max_str_digits
        raise _huge_integer(text) from None
    if not isinstance(data, dict):
        raise _bad_body(f"request body must be a JSON object, got a JSON {_json_kind(data)}", "invalid_json")
    _check_tree(data, strings=_SURROGATE_ESCAPE.search(text) is not None,
                depth=text.count("{") + text.count("[") > MAX_JSON_DEPTH)
    return data


class _NotJsonNumber(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NotJsonNumber(f"{name} is not a JSON number")


class _HugeInt:
    def __init__(self, digits: int):
        self.digits = digits


def _max_int_digits() -> int:
    """Longest decimal integer Python converts (sys.int_max_str_digits, 4300 by default;
    longer ones raise ValueError inside json.loads)."""
    return getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300


def _lenient_int(s: str) -> Any:
    digits = len(s) - s.startswith("-")
    return _HugeInt(digits) if digits > _max_int_digits() else int(s)


def _huge_integer(text: str) -> ApiError:
    """The 400 for an integer literal too long to convert, naming where it is (re-parsed
    with a hook that marks such literals instead of converting them; the rare path)."""
    param = None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_int=_lenient_int)
        found = _find(data, lambda v: isinstance(v, _HugeInt))
        if found is not None:
            param = _dotted(found)
    except (ValueError, RecursionError):
        pass
    where = f" in {param}" if param else ""
    return _bad_body(f"request body has an integer{where} longer than {_max_int_digits()} digits; it is out of range",
                     "number_out_of_range", param)


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", str: "string", list: "array", int: "number", float: "number"}.get(type(v), "value")


def _check_tree(data: dict[str, Any], *, strings: bool, depth: bool) -> None:
    """Walk the decoded body iteratively (never recursively): reject nesting deeper than
    :data:`MAX_JSON_DEPTH` and, when ``strings``, any key or string holding a lone surrogate.

    The callers' pre-filters skip the walk when neither can happen (at most MAX_JSON_DEPTH
    brackets in the text; no ``\\uD8xx``-``\\uDFxx`` escape in it), so a large flat prompt
    costs nothing here.
    """
    if not (strings or depth):
        return
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        obj, level, path = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise _bad_body(f"request body is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects "
                            f"(under {_dotted(path[:3])}...)", "nesting_too_deep", _dotted(path[:1]) or None)
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if strings and isinstance(key, str) and _SURROGATE.search(key):
                raise _unpaired(path + (key,), "a key")
            if isinstance(value, (dict, list)):
                stack.append((value, level + 1, path + (key,)))
            elif strings and isinstance(value, str) and _SURROGATE.search(value):
                raise _unpaired(path + (key,), "a string")


def _unpaired(path: tuple, what: str) -> ApiError:
    param = _dotted(path)
    return _bad_body(f"{what} in the request body ({param}) holds an unpaired UTF-16 surrogate escape "
                     "(\\ud800-\\udfff without its pair); strings must be valid Unicode", "invalid_encoding", param)


def _find(data: Any, bad: Callable[[Any], bool]) -> tuple | None:
    """Path of the first leaf for which ``bad`` is true (iterative)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, (dict, list)):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            stack.extend((v, path + (k,)) for k, v in items)
        elif bad(obj):
            return path
    return None


def _dotted(path: tuple) -> str:
    """``("messages", 0, "content")`` -> ``"messages.0.content"``, safe to put in a response
    (lone surrogates and control characters escaped, long keys cut)."""
    parts = []
    for p in path:
        s = str(p)
        if len(s) > 64:
            s = s[:64] + "..."
        parts.append(s if s.isprintable() else s.encode("ascii", "backslashreplace").decode("ascii"))
    return ".".join(parts)


def parse(model: type[BaseModel], data: dict[str, Any], served: str) -> Any:
    name = data.get("model")
    if isinstance(name, str) and name != served:
        raise api_errors.model_not_found(name, served)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise api_errors.from_validation(e) from None


# --------------------------------------------------------------------------- helpers


async def run_unless_disconnected(request: Request, coro: Any) -> Any:
    """Await ``coro``; if the client disconnects first, cancel it and raise ClientGone."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)
    if work.cancelled():
        raise ClientGone()
    return work.result()


class SSEResponse(StreamingResponse):
    """Streams server-sent events; stops and closes the body iterator (which cancels the
    backend requests) as soon as the client disconnects, whatever the ASGI spec version."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:
                pass  # client gone while sending

        async def watch() -> None:
            await self.listen_for_disconnect(receive)

        streamer, watcher = asyncio.ensure_future(stream()), asyncio.ensure_future(watch())
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            streamer.cancel()
            watcher.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def trace_context(request: Request) -> dict[str, str] | None:
    carrier = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
    return carrier or None


def offramp_block(gen: Generation, exit_stages: list[int], choices: list) -> dict[str, Any]:
    """The response's ``offramp`` block over ``choices`` (whose tokens are ``exit_stages``);
    ``speculative`` (drafted, accepted, verify rounds) only when the request ran speculative."""
    block: dict[str, Any] = {"exit_stages": exit_stages, "stages_skipped": gen.stages_skipped(exit_stages)}
    if gen.logprobs:  # each token's logprobs come from the head that chose it
        block["logprob_stages"] = exit_stages
    spec = gen.speculative(choices)
    if spec is not None:
        block["speculative"] = spec
    return block


def chunk_offramp(gen: Generation, d: ChoiceDelta) -> dict[str, Any]:
    """A streamed chunk's per-choice ``offramp``: its tokens' exit stages, and on the
    choice's last chunk its ``speculative`` totals."""
    block: dict[str, Any] = {"exit_stages": d.exit_stages}
    if gen.logprobs:
        block["logprob_stages"] = d.exit_stages
    spec = gen.speculative([gen.choices[d.index]]) if d.finish_reason else None
    if spec is not None:
        block["speculative"] = spec
    return block


# --------------------------------------------------------------------------- app


class OpenAIRoutes:
    """The HTTP handlers over one :class:`Frontend`, each a method: a handler can be called
    on its own with a Starlette ``Request`` (tests do), and :func:`create_app` only mounts
    them. Nothing is read from the environment here (see :meth:`Frontend.from_app_args`)."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend
        self.settings = frontend.settings
        self.tokenizer = frontend.tokenizer
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        s = self.settings
        return {"id": s.model_name, "object": "model", "created": self.created, "owned_by": "offramp",
                "max_model_len": s.max_context,
                "offramp": {"num_stages": int(getattr(self.frontend.backend, "num_stages", 1))}}

    # -- open routes -----------------------------------------------------------------
    async def healthz(self) -> dict[str, str]:
        """Liveness of this ingress replica (Serve's and HAProxy's checks)."""
        return {"status": "ok"}

    async def health(self):
        """Readiness: 200 once every stage has a live replica, else 503 with what is missing
        (e.g. while the stages compile on a first start)."""
        problem = await self.frontend.backend.readiness()
        if problem is not None:
            return JSONResponse({"status": "starting", "detail": problem}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok"}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model: str) -> dict[str, Any]:
        if model != self.settings.model_name:
            raise api_errors.model_not_found(model, self.settings.model_name)
        return self.model_card()

    # -- the generation endpoints ------------------------------------------------------
    async def completions_route(self, request: Request):
        return await self.guarded(self.completions, request)

    async def chat_completions_route(self, request: Request):
        return await self.guarded(self.chat_completions, request)

    async def guarded(self, handler: Callable, request: Request):
        """``handler(request)`` with every error as its OpenAI error response."""
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except OfframpError as e:
            return api_errors.from_offramp(e).response()
        except ClientGone:
            log.info("client disconnected; request cancelled")
            return JSONResponse({"error": None}, status_code=499)
        except Exception as e:
            return api_errors.internal(e).response()

    def start_generation(self, req: SamplingFields, prompt_ids: list[int], extra_stops: list[str], request_id: str,
                         request: Request) -> Generation:
        return self.frontend.generation(
            req, prompt_ids, request_id=request_id, carrier=trace_context(request), max_n=self.settings.max_n,
            operation="text_completion" if isinstance(req, CompletionRequest) else "chat", extra_stops=extra_stops)

    @staticmethod
    def chunk_usage(gen: Generation, req: SamplingFields) -> dict[str, Any]:
        """A chunk's ``usage``: so far (``continuous_usage_stats``), null (``include_usage``:
        the totals come in the last chunk) or absent."""
        if req.continuous_usage:
            return {"usage": gen.usage()}
        return {"usage": None} if req.include_usage else {}

    async def respond(self, request: Request, gen: Generation, req: SamplingFields,
                      chunk: Callable[[ChoiceDelta], dict[str, Any]], first_chunks: list[dict[str, Any]],
                      final: Callable[[list], dict[str, Any]], envelope: Callable[[], dict[str, Any]]):
        """Shared tail of both endpoints: JSON body or SSE stream."""
        if not req.stream:
            try:
                async def work() -> list:
                    await gen.start()
                    return await gen.collect()
                results = await run_unless_disconnected(request, work())
            except BaseException as e:
                gen.end_span(e)
                raise
            finally:
                await gen.aclose()
            gen.end_span()
            return JSONResponse(final(results))
        try:
            await run_unless_disconnected(request, gen.start())  # admission errors -> HTTP status
        except BaseException as e:
            await gen.aclose()
            gen.end_span(e)
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                for c in first_chunks:
                    yield sse(c)
                async for d in gen.deltas():
                    yield sse(chunk(d))
                if req.include_usage:
                    all_stages = [s for c in gen.choices for s in c.exit_stages]
                    block: dict[str, Any] = {"stages_skipped": gen.stages_skipped(all_stages)}
                    spec = gen.speculative(gen.choices)
                    if spec is not None:
                        block["speculative"] = spec
                    yield sse({**envelope(), "choices": [], "usage": gen.usage(), "offramp": block})
            except Exception as e:  # mid-stream: one error event, then [DONE]
                err = api_errors.from_offramp(e) if isinstance(e, OfframpError) else api_errors.internal(e)
                log.warning("request %s failed mid-stream: %s", gen.request_id, err.message)
                gen.end_span(e)
                yield sse(err.body())
            finally:
                await gen.aclose()
                gen.end_span()
            yield DONE

        return SSEResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(self, request: Request):
        settings, tokenizer = self.settings, self.tokenizer
        req: CompletionRequest = parse(CompletionRequest, await read_json_body(request, settings.max_body_bytes),
                                       settings.model_name)
        prompt_ids = encode_prompt(tokenizer, req.prompt_input())
        rid = f"cmpl-{uuid.uuid4().hex}"
        gen = self.start_generation(req, prompt_ids, [], rid, request)
        now = int(time.time())
        fmt = LogprobFormatter(tokenizer) if req.logprobs is not None else None
        prompt = req.prompt_input()
        echo_text = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)) if req.echo else ""
        offsets = [0] * req.n  # streamed text_offset, per choice
        echoed: set[int] = set()

        def prompt_items(prompt_logprobs) -> list:
            lps = list(prompt_logprobs or ())
            return list(zip(prompt_ids, lps + [None] * (len(prompt_ids) - len(lps))))

        def envelope() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": now, "model": settings.model_name}

        def chunk(d: ChoiceDelta) -> dict[str, Any]:
            text, items = d.text, list(d.logprobs)
            if req.echo and d.index not in echoed:  # the prompt leads the choice's first chunk
                echoed.add(d.index)
                text = echo_text + text
                items = prompt_items(gen.choices[d.index].prompt_logprobs) + items
            lp = None
            if fmt is not None:
                lp, offsets[d.index] = fmt.completion(items, offsets[d.index])
            choice = {"index": d.index, "text": text, "logprobs": lp, "finish_reason": d.finish_reason,
                      "offramp": chunk_offramp(gen, d)}
            return {**envelope(), "choices": [choice], **self.chunk_usage(gen, req)}

        def mean_logprob(r) -> float:
            lps = [lp.logprob for lp in r.logprobs if lp is not None]
            return sum(lps) / len(lps) if lps else float("-inf")

        def final_logprobs(r) -> dict[str, Any] | None:
            if fmt is None:
                return None
            items = (prompt_items(r.prompt_logprobs) if req.echo else []) + list(zip(r.token_ids, r.logprobs))
            return fmt.completion(items)[0]

        def final(results: list) -> dict[str, Any]:
            if len(results) > req.n:  # best_of: the n with the highest mean logprob per token, in that order
                results = sorted(results, key=mean_logprob, reverse=True)[: req.n]
                for i, r in enumerate(results):
                    r.index = i
            choices = [{"index": r.index, "text": echo_text + r.text, "logprobs": final_logprobs(r),
                        "finish_reason": r.finish_reason,
                        "offramp": {**offramp_block(gen, r.exit_stages, [r]), "token_ids": r.token_ids}}
                       for r in results]
            all_stages = [s for r in results for s in r.exit_stages]
            return {**envelope(), "choices": choices, "usage": gen.usage(),
                    "offramp": {"num_stages": gen.num_stages, **offramp_block(gen, all_stages, results)}}

        return await self.respond(request, gen, req, chunk, [], final, envelope)

    async def chat_completions(self, request: Request):
        settings, tokenizer = self.settings, self.tokenizer
        req: ChatCompletionRequest = parse(
            ChatCompletionRequest, await read_json_body(request, settings.max_body_bytes), settings.model_name)
        prompt_ids, implicit_stops = encode_chat(
            tokenizer, [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = self.start_generation(req, prompt_ids, implicit_stops, rid, request)
        now = int(time.time())
        fmt = LogprobFormatter(tokenizer) if req.logprobs else None

        def envelope() -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name,
                    "system_fingerprint": None}

        first_chunks = [{**envelope(), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(req.n)], **self.chunk_usage(gen, req)}]

        def chunk(d: ChoiceDelta) -> dict[str, Any]:
            delta = {"content": d.text} if d.text else {}
            choice = {"index": d.index, "delta": delta, "logprobs": fmt.chat(d.logprobs) if fmt else None,
                      "finish_reason": d.finish_reason, "offramp": chunk_offramp(gen, d)}
            return {**envelope(), "choices": [choice], **self.chunk_usage(gen, req)}

        def final(results: list) -> dict[str, Any]:
            choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                        "logprobs": fmt.chat(zip(r.token_ids, r.logprobs)) if fmt else None,
                        "finish_reason": r.finish_reason,
                        "offramp": {**offramp_block(gen, r.exit_stages, [r]), "token_ids": r.token_ids}}
                       for r in results]
            all_stages = [s for r in results for s in r.exit_stages]
            return {**envelope(), "object": "chat.completion", "choices": choices, "usage": gen.usage(),
                    "offramp": {"num_stages": gen.num_stages, **offramp_block(gen, all_stages, results)}}

        return await self.respond(request, gen, req, chunk, first_chunks, final, envelope)


def create_app(frontend: Frontend) -> FastAPI:
    """The HTTP app for one served model: :class:`OpenAIRoutes` mounted, the API key
    checked (:class:`ApiKeyMiddleware`), errors as OpenAI error objects."""
    routes = OpenAIRoutes(frontend)
    app = FastAPI(title="Offramp", docs_url=None, redoc_url=None, openapi_url=None)
    api_errors.install_handlers(app)
    key = frontend.settings.api_key.get_secret_value() if frontend.settings.api_key else None
    app.add_middleware(ApiKeyMiddleware, api_key=key)
    app.get("/healthz")(routes.healthz)
    app.get("/-/healthz")(routes.healthz)
    app.get("/health")(routes.health)  # vLLM's route; load generators (guidellm) wait on it
    app.get("/v1/models")(routes.list_models)
    app.get("/v1/models/{model:path}")(routes.get_model)
    app.post("/v1/completions")(routes.completions_route)
    app.post("/v1/chat/completions")(routes.chat_completions_route)
    return app
