"""Webhook delivery: signed POST (`api.webhooks`), retried with exponential backoff by the task.

The target's address is checked again at delivery (DNS may have changed since the job was created): the
host is resolved once, every address must be public, and the connection goes to that checked address, so a
rebinding resolver cannot swap in a private one between the check and the connect."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpcore

from api import webhooks
from api.db.models import Job, Tenant, WebhookDelivery, utcnow
from api.db.session import session_scope
from worker.config import WorkerSettings


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx; the task retries."""


def deliver(settings: WorkerSettings, delivery_id: str) -> str:
    """POST one delivery; 'delivered', 'gone' (nothing to do) or raise DeliveryFailed."""
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return "gone"
        job = session.get(Job, delivery.job_id)
        secret = session.get(Tenant, job.tenant_id).webhook_secret
        url, body = delivery.url, delivery.payload.encode()
        delivery.attempts += 1
    headers = webhooks.headers(secret, delivery_id, body)
    headers["user-agent"] = "disp-webhooks/1"
    error = None
    try:
        status = post(
            url,
            body,
            headers,
            timeout=settings.webhook_timeout_s,
            public_only=not settings.webhook_allow_private,
        )
        if 200 <= status < 300:
            with session_scope(settings.database_url) as session:
                row = session.get(WebhookDelivery, delivery_id)
                row.status, row.delivered_at, row.last_error = "delivered", utcnow(), None
            return "delivered"
        error = f"HTTP {status}"
    except (
        httpcore.NetworkError,
        httpcore.TimeoutException,
        httpcore.ProtocolError,
        httpcore.UnsupportedProtocol,
        webhooks.WebhookTargetError,
    ) as exc:
        error = f"{type(exc).__name__}: {exc}"
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        row.last_error = error
        if row.attempts >= settings.webhook_max_attempts:
            row.status = "failed"
            return "failed"
    raise DeliveryFailed(error)


class PublicOnly(httpcore.NetworkBackend):
    """Connects only to public addresses: resolves the host itself, refuses if any answer is not public
    (`api.webhooks.public_address`), and connects to the address it checked (TLS still verifies the name)."""

    def __init__(self) -> None:
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = webhooks.resolve_public(host, port)[0]
        return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("webhooks are delivered over TCP only")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float, public_only: bool) -> int:
    """POST `body` to `url` (no redirects, no proxy); the response status."""
    webhooks.check_target(url, allow_private=True)  # scheme and host; PublicOnly checks the addresses
    backend = PublicOnly() if public_only else None
    with httpcore.ConnectionPool(network_backend=backend, retries=0) as pool:
        response = pool.request(
            "POST",
            url,
            headers={**headers, "host": urlsplit(url).netloc},
            content=body,
            extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
        )
    return response.status
