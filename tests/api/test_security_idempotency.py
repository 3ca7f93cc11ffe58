"""An immediate replay under the same `Idempotency-Key` returns the stored response every time, over a
real HTTP server (the in-process test client waits for the whole app and would hide the race), and a JSON
body re-serialised with the same content is the same request."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest

from tests.service_conftest import checkpoint_archive, dataset_archive, free_port

pytestmark = [pytest.mark.services, pytest.mark.slow]
TRIALS = 50


@pytest.fixture(scope="module")
def live(api_settings):
    """The API behind uvicorn on a free port, in a thread of this process."""
    import uvicorn

    from api.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(api_settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def inputs(client, auth, tmp_path, tiny_dir):
    archive = dataset_archive(tmp_path / "ds.zip", n=2)
    dataset = client.post(
        "/v1/datasets", headers=auth, files={"file": ("ds.zip", archive.read_bytes())}
    ).json()
    ck = checkpoint_archive(tiny_dir, tmp_path / "ck.tar")
    checkpoint = client.post(
        "/v1/checkpoints", headers=auth, files={"file": ("ck.tar", ck.read_bytes())}
    ).json()
    return dataset["id"], checkpoint["id"]


def replayed_pairs(send) -> list[tuple[httpx.Response, httpx.Response]]:
    pairs = []
    for _ in range(TRIALS):
        key = uuid.uuid4().hex
        first = send(key)
        pairs.append((first, send(key)))  # the moment the first response has arrived
    return pairs


def check(pairs) -> None:
    bad = [(a.status_code, b.status_code, b.text[:120]) for a, b in pairs if b.status_code != a.status_code]
    assert not bad, f"{len(bad)}/{len(pairs)} replays differ from the first response: {bad[:3]}"
    for first, again in pairs:
        assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]


def test_immediate_json_replays_return_the_stored_response(live, auth, inputs):
    body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1], "metadata": {"a": "1", "b": "2"}}
    check(
        replayed_pairs(lambda key: live.post("/v1/jobs", headers={**auth, "Idempotency-Key": key}, json=body))
    )


def test_immediate_multipart_replays_return_the_stored_response(live, auth, tmp_path):
    archive = dataset_archive(tmp_path / "d.zip", n=1).read_bytes()

    def send(key):
        return live.post(
            "/v1/datasets", headers={**auth, "Idempotency-Key": key}, files={"file": ("d.zip", archive)}
        )

    check(replayed_pairs(send))


def test_reserialised_json_is_the_same_request(client, auth, inputs):
    headers = {**auth, "Idempotency-Key": "same-content", "content-type": "application/json"}
    body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1], "metadata": {"a": "1", "b": "2"}}
    first = client.post("/v1/jobs", headers=headers, content=json.dumps(body))
    reordered = {"metadata": {"b": "2", "a": "1"}, "checkpoint_id": inputs[1], "dataset_id": inputs[0]}
    again = client.post("/v1/jobs", headers=headers, content=json.dumps(reordered, indent=4))
    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    changed = client.post("/v1/jobs", headers=headers, content=json.dumps({**body, "metadata": {"a": "2"}}))
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"
