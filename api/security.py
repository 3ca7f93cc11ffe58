"""API keys (only their SHA-256 is stored), webhook secrets, and signed URLs for the local backend."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

KEY_PREFIX = "dsk_"
WEBHOOK_SECRET_PREFIX = "whsec_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys carry 256 bits of entropy, so a plain SHA-256 is a safe lookup hash."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign_url_token(secret_key: str, subject: str, expires_in: int) -> str:
    """A token `expiry.signature` granting access to `subject` (a path) until expiry."""
    expiry = int(time.time()) + expires_in
    mac = hmac.new(secret_key.encode(), f"{subject}|{expiry}".encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.{mac}"


def check_url_token(secret_key: str, subject: str, token: str) -> bool:
    try:
        expiry_text, mac = token.split(".", 1)
        expiry = int(expiry_text)
    except ValueError:
        return False
    want = hmac.new(secret_key.encode(), f"{subject}|{expiry}".encode(), hashlib.sha256).hexdigest()
    return expiry >= time.time() and hmac.compare_digest(want, mac)
