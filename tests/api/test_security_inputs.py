"""Bad input gets a 4xx that names the problem, never a 500 (the causes schemathesis found: NUL bytes,
integers beyond bigint, unbounded strings, deep JSON, lax types), 405 carries `Allow`, and the OpenAPI
document lists every status, the security scheme and the `Idempotency-Key` header."""

from __future__ import annotations

import pytest

from tests.service_conftest import dataset_archive

pytestmark = pytest.mark.services

SHA = "a" * 64


def assert_4xx(response, status=422, param=None):
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/%00",
        "/v1/jobs?after=%00",
        "/v1/datasets/ds_%00x",
        "/v1/checkpoints?after=ckpt%00",
        "/v1/uploads/%00",
        "/v1/artifacts/%00/content",
        "/v1/models/%00",
    ],
)
def test_nul_bytes_and_huge_integers_in_the_url_are_422(client, auth, path):
    assert_4xx(client.get(path, headers=auth))


def test_nul_bytes_and_unbounded_strings_in_json_are_422(client, auth, inputs):
    ds, ck = inputs
    cases = [
        ({"dataset_id": "ds_\x00", "checkpoint_id": ck}, "dataset_id"),
        ({"dataset_id": ds, "checkpoint_id": ck, "webhook_url": "http://x/" + "a" * 2000}, "webhook_url"),
        ({"dataset_id": ds, "checkpoint_id": ck, "metadata": {"k\x00": "v"}}, "metadata.k\x00.[key]"),
        ({"dataset_id": ds, "checkpoint_id": ck, "metadata": {"k": "\x00"}}, "metadata.k"),
        ({"dataset_id": ds, "checkpoint_id": ck, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"dataset_id": ds, "checkpoint_id": ck, "shard_size": 2**63}, "shard_size"),
    ]
    for body, param in cases:
        error = assert_4xx(client.post("/v1/jobs", headers=auth, json=body))
        assert error["param"] == param or param.startswith("metadata"), (param, error)
    upload = {"purpose": "dataset", "filename": "d.zip", "bytes": 10, "sha256": SHA}
    for extra, param in [
        ({"part_size": 2**64}, "part_size"),
        ({"part_size": False}, "part_size"),
        ({"bytes": 54.0}, "bytes"),
        ({"bytes": "54"}, "bytes"),
        ({"name": "n" * 301}, "name"),
        ({"filename": "a\x00.zip"}, "filename"),
        ({"base_model": "m\x00"}, "base_model"),
    ]:
        assert_4xx(client.post("/v1/uploads", headers=auth, json={**upload, **extra}), param=param)
    upload_id = client.post("/v1/uploads", headers=auth, json=upload).json()["id"]
    parts = {"parts": [{"part_number": 1, "etag": "e\x00"}]}
    assert_4xx(
        client.post(f"/v1/uploads/{upload_id}/complete", headers=auth, json=parts), param="parts.0.etag"
    )
    assert_4xx(client.post(f"/v1/uploads/{upload_id}/parts", headers=auth, json={"part_numbers": [0]}))
    job_id = client.post("/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck}).json()["id"]
    assert_4xx(client.get(f"/v1/jobs/{job_id}/events?after={2**70}", headers=auth), param="after")


def test_nul_bytes_in_form_fields_and_file_names(client, auth, tmp_path):
    archive = dataset_archive(tmp_path / "ds.zip", n=1).read_bytes()
    response = client.post(
        "/v1/datasets", headers=auth, data={"name": "a\x00b"}, files={"file": ("d.zip", archive)}
    )
    assert_4xx(response, param="name")
    response = client.post(
        "/v1/datasets", headers=auth, data={"name": "n" * 301}, files={"file": ("d.zip", archive)}
    )
    assert_4xx(response, param="name")
    boundary = "b0undary"  # written by hand: clients percent-encode such names, an attacker need not
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="../evil\x00\x01.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + archive
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {**auth, "content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/v1/datasets", headers=headers, content=body)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "evil__.zip"  # the last path component, control characters replaced
    response = client.post(
        "/v1/checkpoints",
        headers=auth,
        data={"kind": "adapter", "base_model": "x\x00"},
        files={"file": ("p", b"x")},
    )
    assert_4xx(response, param="base_model")


def test_deeply_nested_json_body_is_a_4xx(client, auth):
    body = b'{"dataset_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post("/v1/jobs", headers={**auth, "content-type": "application/json"}, content=body)
    assert 400 <= response.status_code < 500, response.text


def test_json_bodies_are_capped_below_uploads(client, auth, api_settings):
    body = b'{"x": "' + b"a" * api_settings.max_json_body_bytes + b'"}'
    response = client.post("/v1/jobs", headers={**auth, "content-type": "application/json"}, content=body)
    error = assert_4xx(response, status=413)
    assert str(api_settings.max_json_body_bytes) in error["message"]


def test_405_lists_the_allowed_methods(client, auth):
    response = client.put("/v1/jobs", headers=auth)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_bad_idempotency_keys_are_400(client, auth, inputs):
    body = {"dataset_id": inputs[0], "checkpoint_id": inputs[1]}
    for key in (b"k" * 256, b"with space", "caf\u00e9".encode()):
        headers = {**auth, "Idempotency-Key": key}
        error = assert_4xx(client.post("/v1/jobs", headers=headers, json=body), status=400)
        assert error["code"] == "invalid_idempotency_key"


def test_openapi_documents_statuses_security_and_idempotency_key(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    error_ref = "#/components/schemas/ErrorResponse"
    for path, item in spec["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            if path.startswith("/v1/"):
                assert op.get("security") == [{"HTTPBearer": []}], (method, path)
                assert "401" in codes, (method, path)
            if "{" in path:
                assert {"404", "422"} <= codes, (method, path)
            for code in codes - {"200", "201", "204", "206", "304"}:  # 206: a byte range; 304: no body
                if path.startswith("/v1/"):
                    schema = op["responses"][code]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, code)
            if method == "post":
                headers = {p["name"] for p in op.get("parameters", []) if p["in"] == "header"}
                assert "Idempotency-Key" in headers, path
                assert {"400", "409", "413"} <= codes, path
            if method == "delete":
                assert {"204", "409"} <= codes, path
