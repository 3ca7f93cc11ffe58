"""Uploads validated by a real worker before any GPU time: records, images present and decodable,
checksums, pickles refused unopened (in the worker too)."""

from __future__ import annotations

import os
import pickle

import pytest

from tests.service_conftest import (
    checkpoint_archive,
    dataset_archive,
    llava_records,
    presigned,
    settled,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.usefixtures("celery_worker")]


def upload_dataset(client, auth, path):
    response = client.post("/v1/datasets", headers=auth, files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_dataset_validation_outcomes(client, auth, tmp_path):
    good = upload_dataset(client, auth, dataset_archive(tmp_path / "good.tar", n=3))
    records = llava_records(3)
    missing = upload_dataset(client, auth, dataset_archive(tmp_path / "missing.zip", n=2, records=records))
    broken = upload_dataset(
        client,
        auth,
        dataset_archive(tmp_path / "broken.zip", n=3, extra={"images/img1.png": b"not an image"}),
    )
    bad_record = [dict(records[0], conversations=[{"from": "human", "value": "hi"}])]
    malformed = upload_dataset(client, auth, dataset_archive(tmp_path / "rec.zip", n=1, records=bad_record))
    body = settled(client, auth, "datasets", good)
    assert (body["status"], body["num_records"], body["num_images"]) == ("ready", 3, 3), body
    body = settled(client, auth, "datasets", missing)
    assert body["status"] == "invalid" and body["error"]["code"] == "invalid_image", body
    assert "img2.png" in body["error"]["message"]
    body = settled(client, auth, "datasets", broken)
    assert body["status"] == "invalid" and body["error"]["code"] == "invalid_image", body
    body = settled(client, auth, "datasets", malformed)
    assert body["status"] == "invalid" and body["error"]["code"] == "invalid_record", body


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.usefixtures("base_model")
def test_checkpoints_validated_and_pickles_never_opened(client, auth, tmp_path, tiny_dir):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Exploit(marker))
    full = presigned(
        client,
        auth,
        checkpoint_archive(tiny_dir, tmp_path / "ck.tar").read_bytes(),
        purpose="checkpoint",
        filename="ck.tar",
    )
    disguised = presigned(
        client,
        auth,
        payload,
        purpose="checkpoint",
        filename="projector.safetensors",
        kind="adapter",  # the kind's former name, still accepted
        base_model="tiny",
    )
    wrong_sum = client.post(
        "/v1/uploads",
        headers=auth,
        json={"purpose": "dataset", "filename": "d.zip", "bytes": 10, "sha256": "1" * 64},
    )
    assert wrong_sum.status_code == 201
    assert settled(client, auth, "checkpoints", full)["status"] == "ready"
    body = settled(client, auth, "checkpoints", disguised)
    assert body["status"] == "invalid" and body["error"]["code"] == "pickle_refused", body
    assert body["kind"] == "projector"
    assert not marker.exists()


def test_checksum_mismatch_is_invalid(client, auth, tmp_path):
    data = dataset_archive(tmp_path / "d.zip", n=1).read_bytes()
    dataset_id = presigned(client, auth, data, purpose="dataset", filename="d.zip", sha256="1" * 64)
    body = settled(client, auth, "datasets", dataset_id)
    assert body["status"] == "invalid" and body["error"]["code"] == "checksum_mismatch"


def test_job_on_invalid_dataset_fails_validation(client, auth, tmp_path, tiny_dir):
    records = llava_records(2)
    dataset = upload_dataset(client, auth, dataset_archive(tmp_path / "m.zip", n=1, records=records))
    ck = checkpoint_archive(tiny_dir, tmp_path / "ck.tar")
    checkpoint = client.post(
        "/v1/checkpoints", headers=auth, files={"file": ("ck.tar", ck.read_bytes())}
    ).json()
    job = client.post(
        "/v1/jobs", headers=auth, json={"dataset_id": dataset, "checkpoint_id": checkpoint["id"]}
    )
    if job.status_code == 422:  # validation already finished: refused at once
        assert job.json()["error"]["code"] == "invalid_input"
        return
    job_id = job.json()["id"]
    body = wait_for(
        lambda: (b := client.get(f"/v1/jobs/{job_id}", headers=auth).json())["status"] != "validating" and b,
        60,
        message="job validation",
    )
    assert body["status"] == "failed_validation" and body["error"]["code"] == "invalid_image", body


def test_every_format_validates_and_problems_name_their_records(client, auth, tmp_path):
    import json

    from tests.service_conftest import png_bytes, write_archive

    records = [
        {"id": "multi", "image": "img0.png", "conversations": [  # the archive holds images/img0.png
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Brown."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/img1.png"}},
                                                   {"type": "text", "text": "Q"}]},
                      {"role": "assistant", "content": "A"}]},
    ]
    body = "\n".join(json.dumps(r) for r in records).encode()
    good = upload_dataset(client, auth, write_archive(
        tmp_path / "good.zip", {"data.jsonl": body, "images/img0.png": png_bytes(0), "images/img1.png": png_bytes(1)}))
    cut = png_bytes(1)[:60]
    bad = upload_dataset(client, auth, write_archive(
        tmp_path / "bad.zip", {"data.jsonl": body, "images/img0.png": b"junk", "images/img1.png": cut}))
    ready = settled(client, auth, "datasets", good)
    assert (ready["status"], ready["num_records"], ready["num_images"]) == ("ready", 3, 2), ready
    invalid = settled(client, auth, "datasets", bad)
    assert invalid["status"] == "invalid" and invalid["error"]["code"] == "invalid_image", invalid
    message = invalid["error"]["message"]
    assert message.startswith("2 problems:\ndata.jsonl: record 0 (id 'multi'): field 'image'")
    assert "record 2 (id 2): field 'image'" not in message and "record 2 (id '2'): field 'image'" in message
    assert "BytesIO" not in message and " at 0x" not in message and "/tmp" not in message
