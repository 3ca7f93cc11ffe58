"""Presigned multipart uploads: straight to (moto's) S3, and through the API's own signed URLs with the
local-files backend."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from tests.service_conftest import dataset_archive

pytestmark = pytest.mark.services
PART = 5 * 1024**2


def big_archive(tmp_path):
    """~11 MB: three parts of 5 MB (S3's minimum for all but the last)."""
    return dataset_archive(tmp_path / "big.zip", n=3, extra={"padding.bin": os.urandom(11 * 1024**2)})


def test_multipart_upload_to_s3(client, auth, tmp_path, storage):
    data = big_archive(tmp_path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    up = client.post(
        "/v1/uploads",
        headers=auth,
        json={
            "purpose": "dataset",
            "filename": "big.zip",
            "bytes": len(data),
            "sha256": sha,
            "part_size": PART,
        },
    )
    assert up.status_code == 201, up.text
    upload = up.json()
    assert upload["num_parts"] == 3 and upload["status"] == "pending"
    urls = client.post(f"/v1/uploads/{upload['id']}/parts", headers=auth).json()["parts"]
    assert all(u["url"].startswith(storage.client.meta.endpoint_url) for u in urls)
    parts = []
    for u in urls:
        chunk = data[(u["part_number"] - 1) * PART : u["part_number"] * PART]
        put = httpx.put(u["url"], content=chunk)
        assert put.status_code == 200, put.text
        parts.append({"part_number": u["part_number"], "etag": put.headers["etag"]})
    wrong = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth, json={"parts": parts[:2]})
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "invalid_parts"
    done = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth, json={"parts": parts})
    assert done.status_code == 200, done.text
    dataset_id = done.json()["object_id"]
    dataset = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()
    assert dataset["status"] == "validating" and dataset["bytes"] == len(data) and dataset["sha256"] == sha
    tenant_id = client.get("/v1/tenant", headers=auth).json()["id"]
    assert storage.read_bytes(f"tenants/{tenant_id}/datasets/{upload['id']}/big.zip") == data
    again = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth, json={"parts": parts})
    assert again.json()["object_id"] == dataset_id


def test_abort_and_pickle_names(client, auth):
    body = {"purpose": "checkpoint", "filename": "model.safetensors", "bytes": 10, "sha256": "0" * 64}
    up = client.post("/v1/uploads", headers=auth, json=body).json()
    aborted = client.post(f"/v1/uploads/{up['id']}/abort", headers=auth).json()
    assert aborted["status"] == "aborted"
    assert client.post(f"/v1/uploads/{up['id']}/parts", headers=auth).status_code == 409
    refused = client.post("/v1/uploads", headers=auth, json={**body, "filename": "pytorch_model.bin"})
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "pickle_refused"
    too_big = client.post("/v1/uploads", headers=auth, json={**body, "bytes": 10**15})
    assert too_big.status_code == 413


@pytest.fixture
def local_client(api_settings, tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = api_settings.model_copy(
        update={"storage_backend": "local", "storage_root": tmp_path / "store"}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as tc:
        yield tc


def test_local_backend_signed_part_urls_and_downloads(local_client, auth, tmp_path):
    data = dataset_archive(tmp_path / "small.zip", n=2).read_bytes()
    body = {
        "purpose": "dataset",
        "filename": "small.zip",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    upload = local_client.post("/v1/uploads", headers=auth, json=body).json()
    (url,) = local_client.post(f"/v1/uploads/{upload['id']}/parts", headers=auth).json()["parts"]
    assert url["url"].startswith("http://testserver/v1/uploads/")
    forged = local_client.put(url["url"].replace("token=", "token=1"), content=data)
    assert forged.status_code == 403
    put = local_client.put(url["url"], content=data)
    assert put.status_code == 200
    bad = local_client.post(
        f"/v1/uploads/{upload['id']}/complete",
        headers=auth,
        json={"parts": [{"part_number": 1, "etag": '"deadbeef"'}]},
    )
    assert bad.status_code == 422
    done = local_client.post(
        f"/v1/uploads/{upload['id']}/complete",
        headers=auth,
        json={"parts": [{"part_number": 1, "etag": put.headers["etag"]}]},
    )
    assert done.status_code == 200 and done.json()["object_id"].startswith("ds_")
