"""Webhooks: signing and verification (HMAC-SHA256 over `id.timestamp.body`, the Standard Webhooks
scheme), and the SSRF guard on their targets: only globally routable addresses, checked when the job is
created and again, on the address actually connected to, at every delivery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

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


# Not private by the stdlib's tables, yet no place for a webhook (Python 3.11 counts some as global).
_BLOCKED = [
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "64:ff9b:1::/48")
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookTargetError(ValueError):
    """A webhook URL is not an http(s) URL of a publicly routable host."""


def public_address(text: str) -> bool:
    """Whether an IP address is globally routable: not private, loopback, link-local, CGNAT
    (100.64.0.0/10), multicast, reserved, nor an IPv6 form wrapping such an IPv4 address."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if addr.version == 6:
        inner = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if inner is None and addr in _NAT64:
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is not None:
            return public_address(str(inner))
    return addr.is_global and not addr.is_multicast and not any(addr in net for net in _BLOCKED)


def resolve_public(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to; WebhookTargetError if it does not resolve or any is not public
    (one private answer is enough to refuse: a resolver may hand out either)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookTargetError(f"webhook host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    private = [a for a in addresses if not public_address(a)]
    if private:
        raise WebhookTargetError(f"webhook host {host!r} resolves to a non-public address ({private[0]})")
    return addresses


def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse a webhook URL that is not http(s) or (unless `allow_private`) not publicly routable."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookTargetError("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetError("webhook_url must be an http(s) URL")
    if parts.username or parts.password:
        raise WebhookTargetError("webhook_url must not carry credentials")
    if not allow_private:
        resolve_public(parts.hostname, port)
