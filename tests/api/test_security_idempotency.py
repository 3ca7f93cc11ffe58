"""An immediate replay under the same `Idempotency-Key` returns the stored response every time, over a
real HTTP server (the in-process test client waits for the whole app and would hide the race), and a JSON
body re-serialised with the same content is the same request."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.service_conftest import dataset_archive

pytestmark = [pytest.mark.services, pytest.mark.slow]
TRIALS = 50


@pytest.fixture(scope="module")
def live(live_api):
    with httpx.Client(base_url=live_api, timeout=30) as http:
        yield http


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
