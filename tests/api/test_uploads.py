"""Datasets and checkpoints by multipart POST and by presigned multipart upload to (moto's) S3; bad inputs."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import pytest

from tests.service_conftest import checkpoint_archive, dataset_archive, png_bytes, write_archive

pytestmark = pytest.mark.services


def post_dataset(client, auth, path, **extra):
    with open(path, "rb") as fh:
        return client.post("/v1/datasets", headers={**auth, **extra}, files={"file": (path.name, fh)})


def test_dataset_upload_creates_validating_dataset(client, auth, tmp_path):
    archive = dataset_archive(tmp_path / "ds.zip", n=4)
    response = post_dataset(client, auth, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating" and body["num_records"] == 4 and body["archive_format"] == "zip"
    assert body["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert client.get(f"/v1/datasets/{body['id']}", headers=auth).json()["id"] == body["id"]
    listed = client.get("/v1/datasets", headers=auth).json()
    assert [d["id"] for d in listed["data"]] == [body["id"]]


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ({"data.json": b"[{not json"}, "malformed_json"),
        ({"data.json": b'{"a": 1}'}, "malformed_json"),
        ({"data.json": b"[]"}, "empty_dataset"),
        ({"images/a.png": b"x"}, "missing_dataset_json"),
        ({"data.json": b"[{}]", "../escape.png": b"x"}, "unsafe_archive_entry"),
        ({"data.json": b"[{}]", "/abs/evil.png": b"x"}, "unsafe_archive_entry"),
        ({"data.json": b"[{}]", "images/../../evil.png": b"x"}, "unsafe_archive_entry"),
    ],
)
@pytest.mark.parametrize("suffix", [".zip", ".tar"])
def test_bad_dataset_archives_are_refused(client, auth, tmp_path, files, code, suffix):
    archive = write_archive(tmp_path / f"bad{suffix}", files)
    response = post_dataset(client, auth, archive)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code


def test_tar_symlink_entry_is_refused(client, auth, tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tf:
        data = b"[{}]"
        info = tarfile.TarInfo("data.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("images/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    response = post_dataset(client, auth, path)
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsafe_archive_entry"


def test_not_an_archive(client, auth, tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(png_bytes(0))
    response = post_dataset(client, auth, path)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_archive"


def test_oversize_upload_is_413(client, auth, api_settings):
    blob = os.urandom(api_settings.max_upload_bytes + 1024)
    response = client.post("/v1/datasets", headers=auth, files={"file": ("big.zip", blob)})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


class Exploit:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    return pickle.dumps(Exploit(marker)), marker


@pytest.mark.usefixtures("base_model")
def test_pickle_checkpoints_are_refused_unopened(client, auth, tmp_path, evil, tiny_dir):
    payload, marker = evil
    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        response = client.post("/v1/checkpoints", headers=auth, files={"file": (name, payload)})
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "pickle_refused"
    # a full checkpoint archive with a pickle inside
    src = tmp_path / "ck"
    src.mkdir()
    for f in tiny_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "pytorch_model.bin").write_bytes(payload)
    archive = checkpoint_archive(src, tmp_path / "ck.tar")
    response = client.post("/v1/checkpoints", headers=auth, files={"file": ("ck.tar", archive.read_bytes())})
    assert response.status_code == 415 and response.json()["error"]["code"] == "pickle_refused"
    # a pickle wearing a .safetensors name, as a full checkpoint and as a projector
    response = client.post("/v1/checkpoints", headers=auth, files={"file": ("model.safetensors", payload)})
    assert response.status_code == 415 and response.json()["error"]["code"] == "pickle_refused"
    response = client.post(
        "/v1/checkpoints",
        headers=auth,
        data={"kind": "projector", "base_model": "tiny"},
        files={"file": ("projector.safetensors", payload)},
    )
    assert response.status_code == 415 and response.json()["error"]["code"] == "pickle_refused"
    assert not marker.exists()


@pytest.mark.parametrize("idempotency_key", [None, "chunked-big"])
def test_oversize_chunked_upload_is_413(client, auth, api_settings, idempotency_key):
    def body():
        chunk = b"--x\r\n" + b"0" * (1024 * 1024)
        for _ in range(api_settings.max_upload_bytes // len(chunk) + 2):
            yield chunk

    headers = {**auth, "content-type": "multipart/form-data; boundary=x"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    response = client.post("/v1/datasets", headers=headers, content=body())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"


MIXED = [
    {"id": "multi", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Brown."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"id": "broken", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "images/img1.png"}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"}]},
]


def test_dry_run_reports_and_stores_nothing(client, auth, tmp_path):
    import json

    files = {"data.jsonl": "\n".join(json.dumps(r) for r in MIXED).encode(), "images/img0.png": png_bytes(0),
             "images/img1.png": b"not an image"}
    archive = write_archive(tmp_path / "mixed.zip", files)
    before = client.get("/v1/datasets", headers=auth).json()["data"]
    response = client.post("/v1/datasets/check", headers=auth,
                           files={"file": ("my data.zip", archive.read_bytes())})
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["path"], report["format"], report["data_file"]) == ("my data.zip", "jsonl", "data.jsonl")
    assert (report["records"], report["samples"], report["text_only"], report["turns"]) == (3, 2, 1, 8)
    assert report["record_formats"] == {"llava": 1, "openai-messages": 2} and not report["ok"]
    (problem,) = report["problems"]
    assert (problem["index"], problem["id"], problem["field"], problem["code"]) == (2, "broken", "image", "invalid_image")
    assert "not a PNG/JPEG/WEBP/GIF/BMP/TIFF image" in problem["message"]
    assert "BytesIO" not in problem["message"] and " at 0x" not in problem["message"]
    assert "/tmp" not in response.text and "disp-upload" not in response.text  # no server paths
    assert client.get("/v1/datasets", headers=auth).json()["data"] == before  # nothing stored
    refused = client.post("/v1/datasets/check", headers=auth,
                          files={"file": ("x.zip", write_archive(tmp_path / "x.zip", {"a.png": b"x"}).read_bytes())})
    assert refused.status_code == 200 and refused.json()["problems"][0]["code"] == "missing_dataset_json"
    assert client.post("/v1/datasets/check", files={"file": ("x.zip", b"x")}).status_code == 401


def test_every_format_is_accepted_at_upload(client, auth, tmp_path):
    import json

    caps = {"annotations": [{"image_id": i, "caption": f"Caption {i}."} for i in range(3)]}
    cc = write_archive(tmp_path / "cc.tar", {"cc_sbu_align/filter_cap.json": json.dumps(caps).encode(),
                                             **{f"cc_sbu_align/image/{i}.jpg": png_bytes(i) for i in range(3)}})
    jsonl = write_archive(tmp_path / "l.zip", {"train.jsonl": "\n".join(json.dumps(r) for r in MIXED).encode()})
    for archive, count in ((cc, 3), (jsonl, 3)):
        response = post_dataset(client, auth, archive)
        assert response.status_code == 201, response.text
        assert response.json()["num_records"] == count
