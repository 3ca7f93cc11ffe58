"""ASGI middleware: request ids, request-body limits, and Prometheus request metrics."""

from __future__ import annotations

import re
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError

REQUESTS = Counter("disp_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("disp_http_request_seconds", "HTTP request latency", ["method", "route"])
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


class RequestContext:
    """Request id (from `X-Request-Id` or new) on `request.state` and the response; body size limits
    (`max_body` for uploads, `max_json_body` for everything else); request count and latency by route
    template."""

    def __init__(self, app: ASGIApp, *, max_body: int, max_json_body: int) -> None:
        self.app, self.max_body, self.max_json_body = app, max_body, max_json_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        declared = headers.get(b"content-length")
        # Only uploads may be large: multipart POSTs and the parts PUT to the API's own part URLs.
        upload = scope["method"] == "PUT" or headers.get(b"content-type", b"").lower().startswith(
            b"multipart/"
        )
        limit = self.max_body if upload else self.max_json_body
        if declared is not None and declared.isdigit() and int(declared) > limit:
            from starlette.requests import Request
            from starlette.responses import JSONResponse

            from api.errors import error_body

            body = error_body(
                Request(scope), "payload_too_large", f"request body exceeds {limit} bytes", None
            )
            await JSONResponse(body, status_code=413)(scope, receive, send_with_id)
            self._observe(scope, 413, 0.0)
            return
        seen = {"n": 0}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > limit:
                    raise BodyTooLarge(limit)
            return message

        started = {"response": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send_with_id(message)

        start = time.perf_counter()
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside the router (chunked bodies read by middleware)
            if started["response"]:
                raise
            from starlette.requests import Request
            from starlette.responses import JSONResponse

            from api.errors import error_body

            body = error_body(Request(scope), exc.code, exc.message, None)
            await JSONResponse(body, status_code=413)(scope, receive, tracking_send)
        finally:
            self._observe(scope, status["code"], time.perf_counter() - start)

    @staticmethod
    def _observe(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")
        REQUESTS.labels(scope["method"], template, str(status)).inc()
        LATENCY.labels(scope["method"], template).observe(seconds)
