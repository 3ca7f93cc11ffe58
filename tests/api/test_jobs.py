"""Jobs through the API alone (no worker): create, list with cursors, cancel before start, tenant
isolation, idempotent retries, settings validation."""

from __future__ import annotations

import pytest

from tests.service_conftest import dataset_archive, new_tenant

pytestmark = pytest.mark.services


def create(client, auth, inputs, **extra):
    body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1], **extra}
    return client.post("/v1/jobs", headers=auth, json=body)


def test_create_get_list_with_cursor(client, auth, inputs):
    ids = []
    for _ in range(3):
        response = create(client, auth, inputs)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    job = client.get(f"/v1/jobs/{ids[0]}", headers=auth).json()
    assert job["status"] == "validating" and job["progress"] == {"stage": None, "done": 0, "total": 0}
    # settings mirror the CLI defaults; the method-dependent ρ stays unset for the library to resolve
    assert job["settings"]["saliency"]["probes"] == 6 and job["settings"]["purify"]["mask_ratio"] is None
    first = client.get("/v1/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get(f"/v1/jobs?limit=2&after={first['next_cursor']}", headers=auth).json()
    assert [j["id"] for j in second["data"]] == [ids[0]] and not second["has_more"]


def test_invalid_settings_are_refused_with_param(client, auth, inputs):
    response = create(
        client, auth, inputs, settings={"purify": {"sampler": {"gen_length": 32, "block_length": 5}}}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_settings"
    response = create(client, auth, inputs, settings={"defense": "oracle_filter"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "settings.defense"
    response = create(client, auth, inputs, settings={"saliency": {"probez": 3}})
    assert response.status_code == 422 and response.json()["error"]["param"] == "settings.saliency.probez"


def test_cancel_before_start_and_events(client, auth, inputs):
    job = create(client, auth, inputs).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    events = client.get(f"/v1/jobs/{job['id']}/events?limit=2", headers=auth).json()
    assert [e["data"].get("status") for e in events["data"]] == ["validating", None] and events["has_more"]
    rest = client.get(f"/v1/jobs/{job['id']}/events?after={events['next_cursor']}", headers=auth).json()
    assert [e["data"].get("status") for e in rest["data"]] == ["cancelled"]


def test_tenant_isolation(client, auth, inputs, pg_url):
    job = create(client, auth, inputs).json()
    other = new_tenant(pg_url)
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/datasets/{inputs[0]}",
        f"/v1/checkpoints/{inputs[1]}",
    ):
        response = client.get(path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=other).status_code == 404
    assert client.get("/v1/jobs", headers=other).json()["data"] == []
    assert client.get("/v1/datasets", headers=other).json()["data"] == []
    stolen = client.post(
        "/v1/jobs", headers=other, json={"dataset_id": inputs[0], "checkpoint_id": inputs[1]}
    )
    assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "dataset_id"
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200


def test_idempotent_retries(client, auth, inputs, tmp_path):
    headers = {**auth, "Idempotency-Key": "retry-1"}
    body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1]}
    first = client.post("/v1/jobs", headers=headers, json=body)
    second = client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"] and second.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/jobs", headers=auth).json()["data"]) == 1
    changed = client.post("/v1/jobs", headers=headers, json={**body, "metadata": {"a": "b"}})
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"
    # multipart uploads: a retry with a fresh boundary is the same request
    archive = dataset_archive(tmp_path / "again.zip", n=2).read_bytes()
    up = [
        client.post(
            "/v1/datasets", headers={**auth, "Idempotency-Key": "ds-1"}, files={"file": ("a.zip", archive)}
        )
        for _ in range(2)
    ]
    assert up[0].json()["id"] == up[1].json()["id"]
    assert len(client.get("/v1/datasets", headers=auth).json()["data"]) == 2
    # keys are per tenant: another tenant's identical key is a different request
    other = new_tenant(client.app.state.settings.database_url)
    response = client.post(
        "/v1/datasets", headers={**other, "Idempotency-Key": "ds-1"}, files={"file": ("a.zip", archive)}
    )
    assert response.status_code == 201 and response.json()["id"] != up[0].json()["id"]
    # errors below 500 are replayed too
    bad = [
        client.post(
            "/v1/jobs",
            headers={**auth, "Idempotency-Key": "bad-1"},
            json={"dataset_id": "ds_nope", "checkpoint_id": inputs[1]},
        )
        for _ in range(2)
    ]
    assert bad[0].status_code == bad[1].status_code == 404 and bad[1].headers["idempotent-replayed"] == "true"
