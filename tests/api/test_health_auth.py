"""Health, readiness, metrics, auth and the error envelope."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.services


def test_healthz_readyz_metrics(client, auth):
    from tests.service_conftest import METRICS_TOKEN

    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert client.get("/v1/jobs", headers=auth).status_code == 200
    # /metrics is the operator's: neither anonymous nor a tenant's API key may read it
    for headers in ({}, auth, {"Authorization": "Bearer wrong"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status_code == 200
    assert "disp_http_requests_total" in metrics.text and 'disp_jobs{status="queued"}' in metrics.text
    assert "ten_" not in metrics.text and "job_0" not in metrics.text  # no tenant or job ids in labels


def test_metrics_are_off_without_a_token(api_settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    off = api_settings.model_copy(update={"metrics_token": None, "run_migrations": False})
    with TestClient(create_app(off), raise_server_exceptions=False) as tc:
        response = tc.get("/metrics")
    assert response.status_code == 404 and "DISP_METRICS_TOKEN" in response.json()["error"]["message"]


def test_openapi_docs_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/jobs" in paths and "/v1/uploads/{upload_id}/complete" in paths


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer dsk_nope"}, {"Authorization": "Basic x"}])
def test_unauthenticated_requests_get_401_envelope(client, headers):
    response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["request_id"] == response.headers["x-request-id"]


def test_revoked_key_is_refused(client, pg_url):
    from api.db.session import session_scope
    from api.services.tenants import create_api_key, get_or_create_tenant, revoke_api_key

    with session_scope(pg_url) as session:
        tenant = get_or_create_tenant(session=session, name="revoker")
        key, plaintext = create_api_key(session=session, tenant_id=tenant.id)
    headers = {"Authorization": f"Bearer {plaintext}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with session_scope(pg_url) as session:
        revoke_api_key(session=session, key_id=key.id)
        assert plaintext not in {
            k.key_hash for k in [session.get(type(key), key.id)]
        }  # only the hash is stored
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_malformed_json_and_validation_errors(client, auth):
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={**auth, "content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    response = client.post("/v1/jobs", json={"dataset_id": "ds_x"}, headers=auth)
    assert response.status_code == 422
    assert response.json()["error"] == {
        "code": "invalid_request",
        "message": "Field required",
        "param": "checkpoint_id",
        "request_id": response.headers["x-request-id"],
    }


def test_request_id_is_echoed(client):
    response = client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_broker_outage_is_503_and_leaves_nothing_pending(api_settings, auth, tmp_path, pg_url):
    from fastapi.testclient import TestClient

    from api.db.models import Dataset
    from api.db.session import session_scope
    from api.main import create_app
    from tests.service_conftest import dataset_archive

    down = api_settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"})
    with TestClient(create_app(down), raise_server_exceptions=False) as tc:
        assert tc.get("/readyz").json()["checks"]["broker"].startswith("error")
        archive = dataset_archive(tmp_path / "d.zip", n=1).read_bytes()
        response = tc.post("/v1/datasets", headers=auth, files={"file": ("d.zip", archive)})
    assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
    with session_scope(pg_url) as session:
        rows = session.query(Dataset).filter(Dataset.error.is_not(None)).all()
        assert any(r.status == "invalid" and r.error["code"] == "broker_unavailable" for r in rows)
