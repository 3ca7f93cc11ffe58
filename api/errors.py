"""Error envelope `{"error": {"code", "message", "param", "request_id"}}` and its exception handlers."""

from __future__ import annotations

import logging
import os
import re
import tempfile

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports to the caller."""

    retry_after: int | None = None  # seconds, sent as Retry-After (429, 503)
    headers: dict[str, str] | None = None  # sent with the error (Content-Range of a 416)

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


_SYSTEM_DIRS = (
    "tmp",
    "var",
    "home",
    "root",
    "usr",
    "opt",
    "srv",
    "work",
    "app",
    "data",
    "mnt",
    "etc",
    "run",
    "proc",
    "dev",
    "private",
    "Users",
    "workspace",
)
_PATH_TAIL = r"(?:/[^\s'\":,;()\[\]<>]*)*"


def public_message(text: str, roots: tuple[str | os.PathLike[str], ...] = ()) -> str:
    """`text` as a tenant may see it: every server path (under `roots`, the temp dir or a system folder)
    is cut to its last component, so `/srv/work/cache/ckpt_1/dir/tokenizer.json` reads `tokenizer.json`."""
    prefixes = {os.path.abspath(r) for r in roots} | {str(r).rstrip("/") for r in roots if str(r)}
    prefixes |= {tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}
    alternatives = [re.escape(p) for p in sorted(prefixes, key=len, reverse=True) if p and p != "/"]
    alternatives.append("/(?:" + "|".join(_SYSTEM_DIRS) + ")(?=/)")
    pattern = re.compile(r"(?<![\w.-])(?:" + "|".join(alternatives) + ")" + _PATH_TAIL)
    return pattern.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"No {kind} with id {object_id!r}", param)


ERROR_DESCRIPTIONS = {
    400: "Malformed JSON or multipart body, or an invalid `Idempotency-Key`.",
    401: "Missing, invalid or revoked API key.",
    403: "The signed URL is invalid or expired.",
    404: "No such object for this tenant (another tenant's ids read the same).",
    409: "Conflict with the object's state (named in the message), or a request with the same "
    "`Idempotency-Key` still in progress.",
    413: "The body, or what an uploaded archive expands to, is over a limit; the message names the limit "
    "and its setting.",
    415: "A pickle weight file: refused unopened (safetensors only).",
    416: "The `Range` asks for bytes past the end; `Content-Range: bytes */SIZE` gives the size.",
    422: "Invalid request; `param` names the field.",
    429: "A rate limit or quota of the tenant is reached (`rate_limited`, `quota_exceeded`); `Retry-After` "
    "says when to retry.",
    503: "Overloaded (`overloaded`, `database_busy`), or the database, broker or storage is unavailable; "
    "`Retry-After` says when to retry.",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` of a route's error statuses, each with the error envelope's schema."""
    from api.schemas import ErrorResponse

    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def error_body(request: Request, code: str, message: str, param: str | None) -> dict:
    request_id = getattr(request.state, "request_id", None)
    return {"error": {"code": code, "message": message, "param": param, "request_id": request_id}}


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after else {})}
    return JSONResponse(
        error_body(request, code, message, param), status_code=status, headers=headers or None
    )


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _respond(request, exc.status, exc.code, exc.message, exc.param, exc.retry_after, exc.headers)


async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    """No database connection free within the pool timeout: shed, do not queue."""
    log.debug("database pool exhausted: %s", exc)
    retry = request.app.state.settings.retry_after_s
    return _respond(
        request, 503, "database_busy", "All database connections are busy; retry shortly", None, retry
    )


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    """The database refused or dropped the connection (restart, failover)."""
    log.warning("database unavailable: %s", exc)
    retry = request.app.state.settings.retry_after_s
    return _respond(
        request, 503, "database_unavailable", "The database is unavailable; retry shortly", None, retry
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    message = first.get("msg", "Invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return _respond(request, 400, "malformed_json", f"Request body is not valid JSON: {message}")
    code = (
        "invalid_settings" if loc[:1] == ["settings"] else "invalid_request"
    )  # job settings: disp.config's checks
    return _respond(request, 422, code, message, ".".join(loc) or None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, ApiError):  # e.g. the body limit tripped while FastAPI parsed a form
        return await _api_error(request, exc.__cause__)
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    response = _respond(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:  # Starlette names one route's methods; list every route on this path
        response.headers["Allow"] = ", ".join(_allowed_methods(request))
    return response


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for the most specific path template matching this path
    (`/v1/datasets/check` before `/v1/datasets/{dataset_id}`); for undocumented paths, every method some
    route answers."""
    parts = request.url.path.split("/")
    best, best_literals = None, -1
    for template, operations in request.app.openapi()["paths"].items():
        pattern = template.split("/")
        if len(pattern) == len(parts) and all(
            p == q or (p.startswith("{") and q) for p, q in zip(pattern, parts, strict=True)
        ):
            literals = sum(not p.startswith("{") for p in pattern)
            if literals > best_literals:
                best, best_literals = operations, literals
    if best is not None:
        return sorted(method.upper() for method in best)
    from starlette.routing import Match

    allowed = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.add(method)
    return sorted(allowed)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _respond(request, 500, "internal_error", "Internal server error")


def install(app: FastAPI) -> None:
    from sqlalchemy.exc import DisconnectionError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(PoolTimeout, _pool_timeout)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(DisconnectionError, _database_down)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
