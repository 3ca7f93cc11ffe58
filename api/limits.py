"""Load shedding and per-tenant limits. Whatever cannot be served in time is answered at once:
- `Admission` (ASGI): at most `max_concurrent_requests` requests of this process run at once; one that
  cannot start within `admission_wait_s` gets 503 `overloaded` with `Retry-After`, instead of queueing
  until the client times out. Large bodies (uploads) and event streams have their own, smaller lanes.
- `RateLimiter`: a token bucket per tenant in Redis (one atomic script, so every API process and replica
  shares it); an empty bucket is 429 `rate_limited` with `Retry-After`.
A database pool that stays exhausted past `db_pool_timeout_s` is 503 `database_busy` (see `api.errors`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.config import ApiSettings
from api.errors import ApiError, error_body

log = logging.getLogger(__name__)

UNLIMITED = ("/healthz", "/readyz", "/metrics")  # probes must answer under any load
LARGE_BODY = 1024**2  # requests declaring more than this use the upload lane


def is_stream(scope: Scope) -> bool:
    return scope["path"].endswith("/stream")


class Admission:
    """Bounded concurrency with a short wait, per process, in three lanes: requests, uploads, streams."""

    def __init__(self, app: ASGIApp, *, settings: ApiSettings) -> None:
        self.app, self.settings = app, settings
        self.lanes: dict[str, asyncio.Semaphore] = {}
        self.sizes = {
            "requests": settings.max_concurrent_requests,
            "uploads": settings.max_concurrent_uploads,
            "streams": settings.max_streams,
        }

    def lane(self, scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED:
            return None
        if is_stream(scope):
            return "streams"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if scope["method"] in ("POST", "PUT") and (not declared.isdigit() or int(declared) > LARGE_BODY):
            return "uploads"
        return "requests"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane(scope)
        if lane is None or self.sizes[lane] <= 0:
            await self.app(scope, receive, send)
            return
        if lane not in self.lanes:  # created inside the running loop
            self.lanes[lane] = asyncio.Semaphore(self.sizes[lane])
        gate = self.lanes[lane]
        wait = 0 if lane == "streams" else self.settings.admission_wait_s
        try:
            if wait > 0:
                await asyncio.wait_for(gate.acquire(), timeout=wait)
            else:
                await _take(gate)
        except (TimeoutError, _Full):
            retry = self.settings.retry_after_s
            what = {"requests": "requests", "uploads": "uploads", "streams": "event streams"}[lane]
            message = f"The server is at its limit of concurrent {what}; retry in {retry} s"
            body = error_body(Request(scope), "overloaded", message, None)
            await JSONResponse(body, status_code=503, headers={"Retry-After": str(retry)})(
                scope, receive, send
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.release()


class _Full(Exception):
    pass


async def _take(gate: asyncio.Semaphore) -> None:
    if gate.locked():
        raise _Full
    await gate.acquire()


# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, cost. Server time, so API hosts need no clock sync.
_BUCKET = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RateLimiter:
    """Token buckets in Redis. If Redis cannot be reached the request is let through (logged): the limits
    protect fairness, and the admission control above still protects the process."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = self.client.register_script(_BUCKET)
        self._warned = 0.0
        self._down_until = 0.0  # after a failure, skip Redis for a few seconds instead of waiting on it

    def take(self, bucket: str, *, rate: float, burst: int, cost: int = 1) -> float:
        """Seconds to wait before the request would be allowed; 0 when it is allowed (and counted)."""
        import redis

        if time.monotonic() < self._down_until:
            return 0.0
        try:
            return float(self.script(keys=[f"disp:rate:{bucket}"], args=[rate, burst, cost]))
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + 5
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("rate limiter unavailable, requests are not limited: %s", exc)
            return 0.0


_limiters: dict[str, RateLimiter] = {}


def rate_limiter(settings: ApiSettings) -> RateLimiter | None:
    if not settings.rate_limit_redis_url:
        return None
    if settings.rate_limit_redis_url not in _limiters:
        _limiters[settings.rate_limit_redis_url] = RateLimiter(settings.rate_limit_redis_url)
    return _limiters[settings.rate_limit_redis_url]


def check_rate(settings: ApiSettings, tenant_id: str, *, kind: str = "requests") -> None:
    """429 when the tenant's bucket of `kind` ('requests': every authenticated call; 'jobs': job
    creation) is empty."""
    limiter = rate_limiter(settings)
    rate, burst = {
        "requests": (settings.rate_limit_per_s, settings.rate_limit_burst),
        "jobs": (settings.job_create_per_min / 60, settings.job_create_burst),
    }[kind]
    if limiter is None or rate <= 0:
        return
    wait = limiter.take(f"{kind}:{tenant_id}", rate=rate, burst=burst)
    if wait > 0:
        what = "requests" if kind == "requests" else "job creations"
        raise RateLimited(
            f"Rate limit of {what} exceeded for this tenant; retry in {math.ceil(wait)} s", wait
        )


class RateLimited(ApiError):
    def __init__(self, message: str, wait: float, code: str = "rate_limited") -> None:
        super().__init__(429, code, message)
        self.retry_after = max(1, math.ceil(wait))


def check_active_jobs(settings: ApiSettings, active: int) -> None:
    """The quota of unfinished jobs per tenant."""
    if 0 < settings.max_active_jobs <= active:
        raise RateLimited(
            f"This tenant has {active} unfinished jobs, its quota is {settings.max_active_jobs}; "
            "wait for one to finish or cancel one",
            30,
            "quota_exceeded",
        )
