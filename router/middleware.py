"""The ASGI gate every HTTP request passes: request id (the client's `x-request-id` or a new one, echoed on
every response, errors included), API-key check on /v1/*, the body-size limit (413), a catch-all that turns
an unexpected exception into the OpenAI error shape, and per request one structured access-log line and
the request counter. It never logs prompt text or keys.

Handlers leave token counts in `scope["state"]` (Starlette's `request.state`) for the log line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from router.auth import ApiKeys
from router.errors import APIError, error_response, internal_error
from router.metrics import RouterMetrics

log = logging.getLogger("llm_cluster.router")
access_log = logging.getLogger("llm_cluster.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLIENT_CLOSED = 499  # nginx's code for "client went away before the response"


def request_id_from(header: bytes | None) -> str:
    """The client's id when it is a sane token (it is echoed in a header and used as the engine id)."""
    if header:
        value = header.decode("latin-1")
        if _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class Gatekeeper:
    def __init__(self, app, *, keys: ApiKeys, max_body_bytes: int, metrics: RouterMetrics):
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or ())
        rid = request_id_from(headers.get(b"x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t0"] = t0
        rid_header = (b"x-request-id", rid.encode())
        status = [CLIENT_CLOSED]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        started = lambda: status[0] != CLIENT_CLOSED  # noqa: E731
        try:
            err = None
            if scope["path"].startswith("/v1/"):
                try:
                    self.keys.check(headers.get(b"authorization", b"").decode("latin-1"))
                except APIError as e:
                    err = e
            if err is None and scope["method"] in _BODY_METHODS:
                receive, err = await self._read_body(headers, receive)
            if err is not None:
                await error_response(err)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s failed", rid)
            if started():
                raise  # mid-response: nothing clean left to send
            await error_response(internal_error())(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status[0], t0)

    async def _read_body(self, headers: dict, receive):
        """Buffer the body up to the limit and hand the app a receive that replays it."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return receive, _too_large(limit)
            except ValueError:
                return receive, APIError(400, "invalid Content-Length header", code="invalid_request")
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay(message, receive), None  # disconnect before the body: let the app see it
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return receive, _too_large(limit)
            parts.append(body)
            if not message.get("more_body", False):
                break
        return _replay({"type": "http.request", "body": b"".join(parts), "more_body": False}, receive), None

    def _record(self, scope, state: dict, status: int, t0: float) -> None:
        path = scope["path"]
        if not path.startswith("/v1/"):
            return  # probes, scrapes and docs: neither API requests nor worth a log line each
        if not state.get("observed"):  # generation requests count themselves (final status, tokens)
            self.metrics.request_done(status, cancelled=status == CLIENT_CLOSED)
        access_log.info(json.dumps({
            "request_id": state.get("request_id"), "method": scope["method"], "path": path, "status": status,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
            "prompt_tokens": state.get("prompt_tokens"), "completion_tokens": state.get("completion_tokens"),
            "cached_tokens": state.get("cached_tokens"), "attempts": state.get("attempts"),
            **({"user": state["user"]} if state.get("user") else {}),  # the request's OpenAI `user`
        }))


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def _replay(first: dict, receive):
    pending = [first]

    async def replay():
        if pending:
            return pending.pop()
        return await receive()
    return replay
