"""docs/webhooks.md: its verification function accepts a delivery the service's own code signs and sends,
refuses a changed body, another secret and an old timestamp, and its example request verifies."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def doc_verify():
    """The `verify_webhook` of the doc's Python block, run as a reader would copy it."""
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope["verify_webhook"]


@pytest.fixture
def receiver():
    """A local HTTP server that keeps each POST's headers and raw body."""
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()
    server.server_close()


def test_the_documented_function_verifies_a_real_delivery(receiver):
    from api import webhooks
    from api.security import new_webhook_secret
    from worker.webhooks import post

    url, got = receiver
    verify_webhook = doc_verify()
    secret, msg_id = new_webhook_secret(), "msg_0193a6f1c2e4a1b2c3d4e5f6"
    body = json.dumps(
        {
            "id": msg_id,
            "type": "job.succeeded",
            "created_at": int(time.time()),
            "data": {"job_id": "job_1", "status": "succeeded"},
        },
        separators=(",", ":"),
    ).encode()
    # what worker.webhooks.deliver does for one attempt: sign with api.webhooks, POST with worker.webhooks.post
    status = post(
        url,
        body,
        {**webhooks.headers(secret, msg_id, body), "user-agent": "disp-webhooks/1"},
        timeout=5,
        public_only=False,
    )
    assert status == 204
    ((headers, received),) = got
    assert received == body and headers["webhook-id"] == msg_id

    verify_webhook(secret, headers, received)  # raises if it does not verify
    webhooks.verify(secret, received, headers)  # the service's own check agrees

    with pytest.raises(ValueError, match="no webhook-signature matches"):
        verify_webhook(secret, headers, received.replace(b"succeeded", b"cancelled"))
    with pytest.raises(ValueError, match="no webhook-signature matches"):
        verify_webhook(new_webhook_secret(), headers, received)
    with pytest.raises(ValueError, match="no webhook-signature matches"):
        verify_webhook(secret, {**headers, "webhook-id": "msg_other"}, received)
    old = webhooks.headers(secret, msg_id, body, timestamp=int(time.time()) - 301)
    with pytest.raises(ValueError, match="from now"):
        verify_webhook(secret, old, body)
    webhooks.verify(secret, body, old, now=int(old["webhook-timestamp"]))  # signed right, only too old
    with pytest.raises(ValueError, match="missing or malformed"):
        verify_webhook(
            secret, {k: v for k, v in headers.items() if k.lower() != "webhook-signature"}, received
        )


def test_the_documented_example_request_verifies():
    from api.webhooks import verify

    text = DOC.read_text()
    block = re.search(r"```\nPOST <webhook_url>\n(.*?)```", text, re.S).group(1)
    head, body = block.split("\n\n", 1)
    headers = dict(line.split(": ", 1) for line in head.splitlines())
    body = body.rstrip("\n").encode()
    secret = re.search(r"example secret `(whsec_[^`]+)`", text).group(1)
    ts = int(headers["webhook-timestamp"])
    verify(secret, body, headers, now=ts)
    json.loads(body)  # the example body is the JSON the service sends
    verify_webhook = doc_verify()
    with pytest.raises(ValueError, match="from now"):  # 2024's example is long past the tolerance
        verify_webhook(secret, headers, body)
    verify_webhook(secret, headers, body, tolerance_s=10**10)
