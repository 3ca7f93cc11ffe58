"""Webhook delivery: signed POST (`api.webhooks`), retried with exponential backoff by the task."""

from __future__ import annotations

import httpx

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
        response = httpx.post(
            url, content=body, headers=headers, timeout=settings.webhook_timeout_s, follow_redirects=False
        )
        if 200 <= response.status_code < 300:
            with session_scope(settings.database_url) as session:
                row = session.get(WebhookDelivery, delivery_id)
                row.status, row.delivered_at, row.last_error = "delivered", utcnow(), None
            return "delivered"
        error = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        row.last_error = error
        if row.attempts >= settings.webhook_max_attempts:
            row.status = "failed"
            return "failed"
    raise DeliveryFailed(error)
