"""Webhook signing and verification: HMAC-SHA256 over `id.timestamp.body` (Standard Webhooks scheme)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from api.security import WEBHOOK_SECRET_PREFIX

DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The signature, the timestamp or the headers of a webhook are not valid."""


def _key(secret: str) -> bytes:
    if secret.startswith(WEBHOOK_SECRET_PREFIX):
        return base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :])
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 hmac>`."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def verify(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless `body` was signed with `secret` within the tolerance."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts_text, signatures = (
            lower["webhook-id"],
            lower["webhook-timestamp"],
            lower["webhook-signature"],
        )
        ts = int(ts_text)
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError("missing or malformed webhook headers") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError(f"timestamp {ts} outside the {tolerance_s}s tolerance")
    want = sign(secret, msg_id, ts, body)
    if not any(hmac.compare_digest(want, s) for s in signatures.split()):
        raise WebhookVerificationError("no matching signature")
