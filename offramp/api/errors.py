"""Every failure of the HTTP API as an OpenAI error object.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``

Status codes: validation, bad JSON and bad UTF-8 -> 400 (never 422: OpenAI and vLLM use
400, and clients branch on it); missing/wrong key -> 401; unknown model -> 404
``model_not_found``; unknown route -> 404; wrong method -> 405; body too large -> 400 ``request_too_large``;
Overloaded -> 429 and StageUnavailable -> 503, both with ``Retry-After``;
DeadlineExceeded -> 504; RowFailed (one request's own computation failed in a stage)
-> 500 ``row_failed`` with its message (it names no internals); anything else -> 500 with
a generic message (the traceback goes to the server log, never to the client).
"""
from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from offramp.errors import OfframpError

log = logging.getLogger("offramp.api")

INTERNAL_MESSAGE = "The server had an error while processing your request; it has been logged."


class ApiError(Exception):
    """An HTTP-level failure with its OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(name: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist; this server serves '{served}'",
                    param="model", code="model_not_found")


def from_offramp(e: OfframpError) -> ApiError:
    headers = {}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
    if e.http_status >= 500 and e.http_status not in (503, 504) and not getattr(e, "public", False):
        return internal(e)
    code = {429: "overloaded", 503: "stage_unavailable", 504: "deadline_exceeded",
            500: "row_failed"}.get(e.http_status)
    return ApiError(e.http_status, str(e) or type(e).__name__, type=e.error_type,
                    param=getattr(e, "param", None), code=code, headers=headers)


def internal(e: BaseException) -> ApiError:
    log.error("unhandled error in the HTTP API", exc_info=e)
    return ApiError(500, INTERNAL_MESSAGE, type="server_error", code="internal_error")


def from_validation(e: ValidationError | RequestValidationError) -> ApiError:
    """One 400 naming every bad field (inputs themselves are not echoed back)."""
    from offramp.api.schemas import BadRequestValue

    errors = e.errors(include_url=False, include_input=False) if isinstance(e, ValidationError) else e.errors()
    messages: list[str] = []
    param = None
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, BadRequestValue):
            return ApiError(400, str(cause), param=cause.param)
        path = ".".join(str(p) for p in err.get("loc", ()) if not _is_union_tag(p))
        param = param or path or None
        msg = f"{path}: {err.get('msg')}" if path else str(err.get("msg"))
        if msg not in messages:
            messages.append(msg)
    text = "; ".join(messages[:5]) + (f"; and {len(messages) - 5} more" if len(messages) > 5 else "")
    return ApiError(400, f"Invalid request: {text}", param=param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "body"})


def _is_union_tag(part: object) -> bool:
    """Union members show up in pydantic's loc as "str", "list[int]", "literal['off']", ..."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def install_handlers(app: FastAPI) -> None:
    """Map framework-level failures (404, 405, stray exceptions) to OpenAI error objects."""

    async def http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = ApiError(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
        elif exc.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        err.headers.update(exc.headers or {})
        return err.response()

    async def api_exc(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def offramp_exc(request: Request, exc: OfframpError) -> JSONResponse:
        return from_offramp(exc).response()

    async def validation_exc(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc).response()

    async def any_exc(request: Request, exc: Exception) -> JSONResponse:
        return internal(exc).response()

    app.add_exception_handler(StarletteHTTPException, http_exc)
    app.add_exception_handler(ApiError, api_exc)
    app.add_exception_handler(OfframpError, offramp_exc)
    app.add_exception_handler(RequestValidationError, validation_exc)
    app.add_exception_handler(Exception, any_exc)
