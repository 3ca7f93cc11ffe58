"""`Idempotency-Key` on every POST: the first response (below 500) is stored per tenant and key and
replayed for retries with the same request; a different request under the same key is refused.

The response is held until its record is stored, so a retry sent the moment the first response arrives
always finds it. Requests are compared by method, path, query and body; a JSON body by its content (keys
in any order, any whitespace), a multipart body with its random boundary taken out."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.db.models import IdempotencyRecord, as_utc, utcnow
from api.db.session import get_sessionmaker
from api.deps import bearer_key, tenant_for_key
from api.errors import error_body

STALE_IN_FLIGHT = timedelta(minutes=10)
_KEEP_HEADERS = ("content-type", "location")
_BOUNDARY = re.compile(rb"boundary=\"?([^\";]+)\"?", re.I)
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as the OpenAPI document says
_JSON_TYPE = re.compile(rb"^application/([\w.+-]*\+)?json\b", re.I)
_MAX_CANONICAL = 1024**2  # JSON bodies up to this size are compared by content


class Idempotency:
    def __init__(self, app: ASGIApp, *, database_url: str, max_body: int) -> None:
        self.app, self.database_url, self.max_body = app, database_url, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        key = headers.get(b"idempotency-key", b"").decode("latin-1").strip()
        if scope["type"] != "http" or scope["method"] != "POST" or not key:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not _KEY.match(key):
            await self._error(
                scope,
                receive,
                send,
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
            )
            return
        api_key = bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
        tenant_id = await run_in_threadpool(self._tenant, api_key)
        if tenant_id is None:  # the route answers 401
            await self.app(scope, receive, send)
            return
        spool, fingerprint = await self._spool(scope, receive, headers)
        try:
            claim = await run_in_threadpool(self._claim, tenant_id, key, fingerprint)
            if isinstance(claim, Response):
                await claim(scope, receive, send)
                return
            await self._run(scope, send, spool, tenant_id, key)
        finally:
            spool.close()
        del request

    def _tenant(self, api_key: str | None) -> str | None:
        with get_sessionmaker(self.database_url)() as session:
            tenant = tenant_for_key(session, api_key)
            return tenant.id if tenant else None

    async def _spool(self, scope: Scope, receive: Receive, headers: dict) -> tuple:
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024**2)
        digest = hashlib.sha256(
            f"{scope['method']} {scope['path']}?{scope.get('query_string', b'').decode()}\n".encode()
        )
        content_type = headers.get(b"content-type", b"")
        match = _BOUNDARY.search(content_type)
        boundary = match.group(1) if match else b""
        as_json = bool(_JSON_TYPE.match(content_type.strip())) or not content_type
        size, more, rest = 0, True, b""
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > self.max_body:
                from api.middleware import BodyTooLarge

                raise BodyTooLarge(self.max_body)
            spool.write(chunk)
            if as_json:
                continue  # hashed below, by content
            if not boundary:
                digest.update(chunk)
                continue
            # Multipart boundaries are random per attempt: hash the body with each one replaced.
            *whole, last = (rest + chunk).split(boundary)
            for segment in whole:
                digest.update(segment + b"-")
            keep = len(boundary) - 1
            digest.update(last[: len(last) - keep] if len(last) > keep else b"")
            rest = last[len(last) - keep :] if len(last) > keep else last
        digest.update(rest)
        if as_json:
            spool.seek(0)
            digest.update(_canonical_json(spool.read(_MAX_CANONICAL + 1)) if size <= _MAX_CANONICAL else b"")
            if size > _MAX_CANONICAL:  # too large to parse here: compared byte for byte
                spool.seek(0)
                while chunk := spool.read(1024 * 1024):
                    digest.update(chunk)
        spool.seek(0)
        return spool, digest.hexdigest()

    def _claim(self, tenant_id: str, key: str, fingerprint: str) -> Response | None:
        with get_sessionmaker(self.database_url)() as session:
            record = session.get(IdempotencyRecord, (tenant_id, key))
            if (
                record is not None
                and record.status_code is None
                and as_utc(record.created_at) < utcnow() - STALE_IN_FLIGHT
            ):
                session.delete(record)
                session.commit()
                record = None
            if record is None:
                session.add(IdempotencyRecord(tenant_id=tenant_id, key=key, fingerprint=fingerprint))
                try:
                    session.commit()
                    return None
                except IntegrityError:
                    session.rollback()
                    record = session.get(IdempotencyRecord, (tenant_id, key))
            return self._replay(record, fingerprint)

    @staticmethod
    def _replay(record: IdempotencyRecord | None, fingerprint: str) -> Response:
        def err(status: int, code: str, message: str) -> Response:
            body = {
                "error": {"code": code, "message": message, "param": "Idempotency-Key", "request_id": None}
            }
            return JSONResponse(body, status_code=status)

        if record is None or record.status_code is None:
            return err(
                409, "idempotency_key_in_use", "a request with this Idempotency-Key is still in progress"
            )
        if record.fingerprint != fingerprint:
            return err(422, "idempotency_key_reused", "this Idempotency-Key was used for a different request")
        headers = {**record.response_headers, "idempotent-replayed": "true"}
        return Response(record.response_body or b"", status_code=record.status_code, headers=headers)

    async def _run(self, scope: Scope, send: Send, spool, tenant_id: str, key: str) -> None:
        async def replay_receive() -> Message:
            chunk = spool.read(1024 * 1024)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        messages: list[Message] = []
        captured = {"status": 500, "headers": {}, "body": bytearray()}

        async def hold(message: Message) -> None:  # sent only once the record is final
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                captured["body"].extend(message.get("body", b""))
            messages.append(message)

        try:
            await self.app(scope, replay_receive, hold)
        except BaseException:
            await run_in_threadpool(self._release, tenant_id, key)
            raise
        if captured["status"] >= 500:
            await run_in_threadpool(self._release, tenant_id, key)
        else:
            await run_in_threadpool(self._store, tenant_id, key, captured)
        for message in messages:
            await send(message)

    def _release(self, tenant_id: str, key: str) -> None:
        with get_sessionmaker(self.database_url)() as session:
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key
                )
            )
            session.commit()

    def _store(self, tenant_id: str, key: str, captured: dict) -> None:
        with get_sessionmaker(self.database_url)() as session:
            record = session.get(IdempotencyRecord, (tenant_id, key))
            if record is None:
                return
            record.status_code = captured["status"]
            record.response_body = bytes(captured["body"]).decode("utf-8", "replace")
            record.response_headers = {k: v for k, v in captured["headers"].items() if k in _KEEP_HEADERS}
            session.commit()

    async def _error(self, scope, receive, send, status: int, code: str, message: str) -> None:
        await JSONResponse(error_body(Request(scope), code, message, "Idempotency-Key"), status_code=status)(
            scope, receive, send
        )


def _canonical_json(body: bytes) -> bytes:
    """A JSON body re-serialised with sorted keys and no whitespace; the bytes themselves if not JSON."""
    try:
        value = json.loads(body)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        return body


def purge_expired(database_url: str, ttl_s: int) -> int:
    """Delete records older than the TTL (run from the API's start-up and periodically)."""
    with get_sessionmaker(database_url)() as session:
        cutoff = utcnow() - timedelta(seconds=ttl_s)
        ids = session.execute(
            select(IdempotencyRecord.tenant_id, IdempotencyRecord.key).where(
                IdempotencyRecord.created_at < cutoff
            )
        ).all()
        session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff))
        session.commit()
        return len(ids)
