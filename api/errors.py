"""Error envelope `{"error": {"code", "message", "param", "request_id"}}` and its exception handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports to the caller."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"No {kind} with id {object_id!r}", param)


def error_body(request: Request, code: str, message: str, param: str | None) -> dict:
    request_id = getattr(request.state, "request_id", None)
    return {"error": {"code": code, "message": message, "param": param, "request_id": request_id}}


def _respond(
    request: Request, status: int, code: str, message: str, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(request, code, message, param), status_code=status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _respond(request, exc.status, exc.code, exc.message, exc.param)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    message = first.get("msg", "Invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return _respond(request, 400, "malformed_json", f"Request body is not valid JSON: {message}")
    code = "invalid_settings" if loc[:1] == ["settings"] else "invalid_request"  # job settings: disp.config's checks
    return _respond(request, 422, code, message, ".".join(loc) or None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, ApiError):  # e.g. the body limit tripped while FastAPI parsed a form
        return await _api_error(request, exc.__cause__)
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return _respond(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _respond(request, 500, "internal_error", "Internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
