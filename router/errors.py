"""The one error format of the API: OpenAI's `{"error": {"message", "type", "param", "code"}}` with the
right HTTP status, for every error the router returns (ours, FastAPI's validation errors, Starlette's
404/405), and the error event that ends a broken stream.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# status -> OpenAI-style error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raise anywhere in request handling; becomes the OpenAI error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    return APIError(500, "internal server error", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse_error_event(err: APIError) -> str:
    """The event that ends a stream that can no longer go on; `data: [DONE]` follows it."""
    return f"data: {json.dumps(err.body())}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers bad parameters with 400, never 422; name the first offending field. A field outside the
    # schema, or one we do not implement, is named first, with OpenAI's wording and codes.
    errors = exc.errors()
    rank = {"unsupported_parameter": 0, "extra_forbidden": 1}
    first = min(errors, key=lambda e: rank.get(e.get("type"), 2)) if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type")
    if kind == "extra_forbidden":
        return error_response(bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                                          code="unknown_parameter"))
    if kind == "unsupported_parameter":
        ctx = first.get("ctx") or {}
        return error_response(bad_request(str(ctx.get("message") or first.get("msg")), param=ctx.get("param"),
                                          code="unsupported_parameter"))
    msg = first.get("msg", "invalid request")
    if param:
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more)"
    return error_response(bad_request(msg, param=param, code="invalid_value"))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code if exc.status_code != 422 else 400
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return error_response(APIError(status, str(exc.detail), code=code, headers=dict(exc.headers or {})))
