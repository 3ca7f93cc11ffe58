"""A tenant can delete its datasets, checkpoints and jobs, stored objects included, but not while a job
uses them; webhook targets must be globally routable when the job is created and again at delivery."""

from __future__ import annotations

import pytest

from tests.service_conftest import WebhookReceiver, new_tenant

pytestmark = pytest.mark.services


def storage_key(pg_url, model, object_id):
    from api.db.session import session_scope

    with session_scope(pg_url) as session:
        return session.get(model, object_id).storage_key


def test_delete_refused_while_a_job_uses_the_inputs(client, auth, inputs, storage, pg_url):
    from api.db.models import Checkpoint, Dataset

    ds, ck = inputs
    keys = {ds: storage_key(pg_url, Dataset, ds), ck: storage_key(pg_url, Checkpoint, ck)}
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck}).json()
    for kind, object_id in (("datasets", ds), ("checkpoints", ck)):
        response = client.delete(f"/v1/{kind}/{object_id}", headers=auth)
        assert response.status_code == 409, response.text
        assert job["id"] in response.json()["error"]["message"]
        assert storage.exists(keys[object_id])  # nothing lost
    response = client.delete(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_not_finished"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelled"
    # the job's stored outputs go with it
    tenant_id = client.get("/v1/tenant", headers=auth).json()["id"]
    prefix = f"tenants/{tenant_id}/jobs/{job['id']}"
    storage.put_bytes(f"{prefix}/saliency.json", b"{}")
    storage.put_bytes(f"{prefix}/saliency/shard-00000.json", b"{}")
    assert client.delete(f"/v1/jobs/{job['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 404
    assert not storage.exists(f"{prefix}/saliency.json") and not storage.exists(
        f"{prefix}/saliency/shard-00000.json"
    )
    for kind, object_id in (("datasets", ds), ("checkpoints", ck)):
        other = new_tenant(pg_url)
        assert client.delete(f"/v1/{kind}/{object_id}", headers=other).status_code == 404  # not theirs
        assert client.delete(f"/v1/{kind}/{object_id}", headers=auth).status_code == 204
        assert not storage.exists(keys[object_id])
        assert client.get(f"/v1/{kind}/{object_id}", headers=auth).status_code == 404
        assert client.get(f"/v1/{kind}", headers=auth).json()["data"] == []
        assert client.delete(f"/v1/{kind}/{object_id}", headers=auth).status_code == 404
    again = client.post("/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck})
    assert again.status_code == 404 and again.json()["error"]["param"] == "dataset_id"


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/hook",  # CGNAT, shared address space
        "http://10.1.2.3/hook",
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
        "http://0.0.0.0/hook",
        "http://localhost/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_webhook_urls_must_be_public(api_settings, auth, inputs, url):
    from fastapi.testclient import TestClient

    from api.main import create_app

    strict = api_settings.model_copy(update={"webhook_allow_private": False, "run_migrations": False})
    with TestClient(create_app(strict), raise_server_exceptions=False) as tc:
        body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1], "webhook_url": url}
        response = tc.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_webhook_url"


def test_public_address_table():
    from api.webhooks import public_address

    assert public_address("8.8.8.8") and public_address("2606:4700:4700::1111")
    for addr in (
        "100.64.0.1",
        "100.127.255.254",
        "192.168.1.1",
        "172.16.0.1",
        "::1",
        "fe80::1",
        "224.0.0.1",
        "2002:7f00:1::",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
        "198.18.0.1",
        "fd00::1",
    ):
        assert not public_address(addr), addr


def test_webhook_target_is_checked_again_at_delivery(client, auth, inputs, pg_url, service_env):
    """A URL accepted when the job was created (here: private networks allowed then) is refused at delivery
    when its address is not public: the receiver never sees the request."""
    from api.db.models import WebhookDelivery
    from api.db.session import session_scope
    from worker.config import WorkerSettings
    from worker.webhooks import DeliveryFailed, deliver

    receiver = WebhookReceiver()
    job = client.post(
        "/v1/jobs",
        headers=auth,
        json={"dataset_id": inputs[0], "checkpoint_id": inputs[1], "webhook_url": receiver.url},
    ).json()
    with session_scope(pg_url) as session:
        row = WebhookDelivery(job_id=job["id"], event_type="job.test", url=receiver.url, payload="{}")
        session.add(row)
        session.flush()
        delivery_id = row.id
    env = {k[len("DISP_") :].lower(): v for k, v in service_env.items()}
    fields = set(WorkerSettings.model_fields) - {"broker_transport_options"}
    settings = WorkerSettings(**{k: v for k, v in env.items() if k in fields})
    with pytest.raises(DeliveryFailed, match="non-public address"):
        deliver(settings.model_copy(update={"webhook_allow_private": False}), delivery_id)
    assert receiver.calls == 0
    assert deliver(settings, delivery_id) == "delivered" and receiver.calls == 1
    receiver.server.shutdown()
