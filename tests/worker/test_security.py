"""Attacks that only a worker can show: another tenant's weights read through a crafted shard index
(refused at upload, at validation and at load), incomplete or mis-shaped checkpoints refused before any
GPU stage, image and records-file bombs refused by validation; no error a tenant sees holds a server path."""

from __future__ import annotations

import json

import pytest

from tests.service_conftest import (
    checkpoint_archive,
    crafted_checkpoint,
    dataset_archive,
    new_tenant,
    presigned,
    settled,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.usefixtures("celery_worker")]

NONE = {"defense": "none"}
FINAL = ("succeeded", "failed", "cancelled", "failed_validation")


def finished(client, auth, job_id, timeout=180):
    def done():
        body = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        return body if body["status"] in FINAL else None

    return wait_for(done, timeout, message=f"job {job_id}")


def no_server_path(text: str, service_env) -> None:
    for fragment in (service_env["DISP_WORK_DIR"], "/tmp/", "disp-validate-", "/cache/checkpoints/"):
        assert fragment not in text, text


@pytest.fixture(scope="module")
def victim(client, pg_url, tmp_path_factory, tiny_dir):
    """Tenant A: a checkpoint, and a defense=none job on it (its shards now sit in the worker's cache)."""
    auth = new_tenant(pg_url)
    tmp = tmp_path_factory.mktemp("victim")
    ds = client.post(
        "/v1/datasets",
        headers=auth,
        files={"file": ("ds.zip", dataset_archive(tmp / "ds.zip", n=4).read_bytes())},
    ).json()["id"]
    ck = client.post(
        "/v1/checkpoints",
        headers=auth,
        files={"file": ("ck.tar", checkpoint_archive(tiny_dir, tmp / "ck.tar").read_bytes())},
    ).json()["id"]
    job = client.post(
        "/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck, "settings": NONE}
    ).json()
    job = finished(client, auth, job["id"])
    assert job["status"] == "succeeded", job
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]
    projector = next(a for a in artifacts if a["kind"] == "projector")
    return {"checkpoint_id": ck, "projector_sha256": projector["sha256"]}


@pytest.fixture(scope="module")
def attacker_files(tmp_path_factory):
    """Tenant B's own checkpoint (other weights than A's), as the attack ships it beside the crafted index."""
    from disp.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("attacker") / "b", seed=1)


def test_crafted_index_cannot_read_another_tenants_weights(
    client, pg_url, tmp_path, victim, attacker_files, service_env
):
    from api.db.models import Checkpoint, UploadStatus
    from api.db.session import session_scope

    auth = new_tenant(pg_url)
    escape = f"../../../{victim['checkpoint_id']}/dir/ckpt/"
    archive = crafted_checkpoint(attacker_files, tmp_path / "evil.tar", shard_name=lambda s: escape + s)
    # 1. the API refuses it at upload
    response = client.post(
        "/v1/checkpoints", headers=auth, files={"file": ("evil.tar", archive.read_bytes())}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsafe_checkpoint_index"
    # 2. uploaded around the API's pre-check, validation refuses it
    ck = presigned(client, auth, archive.read_bytes(), purpose="checkpoint", filename="evil.tar")
    body = settled(client, auth, "checkpoints", ck)
    assert body["status"] == "invalid" and body["error"]["code"] == "unsafe_checkpoint_index", body
    no_server_path(body["error"]["message"], service_env)
    # 3. even marked ready (as one stored before the checks existed), loading it refuses the foreign shards
    with session_scope(pg_url) as session:
        row = session.get(Checkpoint, ck)
        row.status, row.error, row.archive_format = UploadStatus.ready, None, "tar"
    ds = client.post(
        "/v1/datasets",
        headers=auth,
        files={"file": ("d.zip", dataset_archive(tmp_path / "d.zip", n=4).read_bytes())},
    ).json()["id"]
    job = client.post(
        "/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck, "settings": NONE}
    )
    job = finished(client, auth, job.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input", job
    assert "plain file name" in job["error"]["message"]
    no_server_path(json.dumps(job["error"]), service_env)
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]
    assert victim["projector_sha256"] not in {a["sha256"] for a in artifacts}
    assert not [a for a in artifacts if a["kind"] == "projector"]


@pytest.mark.parametrize(
    ("drop", "extra", "code", "words"),
    [
        (("tokenizer.json",), None, "invalid_checkpoint", "no tokenizer.json"),
        (("model-00003-of-00004.safetensors",), None, "invalid_checkpoint", "are missing"),
        ((), {"config.json": None}, "invalid_checkpoint", "shape mismatches"),
    ],
    ids=["no-tokenizer", "missing-shard", "shapes-disagree-with-config"],
)
def test_incomplete_checkpoints_are_invalid_before_any_stage(
    client, auth, tmp_path, tiny_dir, service_env, drop, extra, code, words
):
    if extra is not None:  # a config whose projector is wider than the weights
        config = json.loads((tiny_dir / "config.json").read_text())
        config["hidden_size"] = config["hidden_size"] * 2
        extra = {"config.json": json.dumps(config).encode()}
    archive = crafted_checkpoint(tiny_dir, tmp_path / "partial.tar", drop=drop, extra=extra)
    ck = presigned(client, auth, archive.read_bytes(), purpose="checkpoint", filename="partial.tar")
    body = settled(client, auth, "checkpoints", ck)
    assert body["status"] == "invalid" and body["error"]["code"] == code, body
    assert words in body["error"]["message"], body["error"]["message"]
    no_server_path(body["error"]["message"], service_env)


def png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_bomb_is_invalid_naming_the_pixel_limit(client, auth, tmp_path, api_settings):
    archive = dataset_archive(
        tmp_path / "img.zip", n=2, extra={"images/img1.png": png_declaring(60_000, 60_000)}
    )
    ds = client.post("/v1/datasets", headers=auth, files={"file": ("img.zip", archive.read_bytes())}).json()[
        "id"
    ]
    body = settled(client, auth, "datasets", ds)
    assert body["status"] == "invalid" and body["error"]["code"] == "invalid_image", body
    assert (
        "img1.png" in body["error"]["message"]
        and str(api_settings.max_image_pixels) in body["error"]["message"]
    )


def test_records_bomb_uploaded_around_the_api_is_invalid(client, auth, tmp_path, service_env):
    """The worker applies the same limits to a presigned upload: a 1 GiB-of-whitespace records file in a
    small zip is refused by its compression ratio before anything is inflated."""
    import zipfile

    path = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("data.json", "w", force_zip64=True) as out,
    ):
        for _ in range(256):
            out.write(b" " * 4 * 1024 * 1024)
        out.write(b"[]")
    assert path.stat().st_size < 4 * 1024 * 1024
    ds = presigned(client, auth, path.read_bytes(), purpose="dataset", filename="bomb.zip")
    body = settled(client, auth, "datasets", ds)
    assert body["status"] == "invalid" and body["error"]["code"] == "compression_ratio_too_high", body
    assert "max_compression_ratio" in body["error"]["message"]
    no_server_path(body["error"]["message"], service_env)


def test_targz_dataset_validates_and_is_read_by_offset(client, auth, tmp_path):
    archive = dataset_archive(tmp_path / "ds.tar.gz", n=5)
    ds = client.post(
        "/v1/datasets", headers=auth, files={"file": ("ds.tar.gz", archive.read_bytes())}
    ).json()["id"]
    body = settled(client, auth, "datasets", ds)
    assert (body["status"], body["num_records"], body["num_images"]) == ("ready", 5, 5), body
