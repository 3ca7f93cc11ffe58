"""Crafted checkpoints are refused at upload, before anything is stored: an index naming shards outside the
checkpoint (another tenant's, by `..` or an absolute path), missing tokenizer or shards, an index that puts
tensors in a shard that does not hold them. Errors never show a server path."""

from __future__ import annotations

import pytest

from tests.service_conftest import crafted_checkpoint

pytestmark = pytest.mark.services

OTHER = "ckpt_01a245628d0ea612bdb86bf6"


def post(client, auth, archive):
    return client.post("/v1/checkpoints", headers=auth, files={"file": (archive.name, archive.read_bytes())})


@pytest.mark.parametrize(
    "shard_name",
    [
        lambda s: f"../../../{OTHER}/dir/ckpt/{s}",
        lambda s: f"/srv/disp/work/cache/checkpoints/{OTHER}/dir/ckpt/{s}",
        lambda s: f"sub/{s}",
        lambda s: "..",
    ],
    ids=["dotdot", "absolute", "subfolder", "parent"],
)
def test_index_naming_files_outside_the_checkpoint_is_refused(client, auth, tmp_path, tiny_dir, shard_name):
    archive = crafted_checkpoint(tiny_dir, tmp_path / "evil.tar", shard_name=shard_name)
    response = post(client, auth, archive)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsafe_checkpoint_index", error
    assert "/srv/" not in error["message"] and "/tmp" not in error["message"]
    assert client.get("/v1/checkpoints", headers=auth).json()["data"] == []  # nothing stored


@pytest.mark.parametrize(
    ("drop", "extra", "code", "words"),
    [
        (("tokenizer.json",), None, "invalid_checkpoint", "no tokenizer.json"),
        (("model-00002-of-00004.safetensors",), None, "invalid_checkpoint", "missing: model-00002-of-00004"),
        (("config.json",), None, "invalid_checkpoint", "no config.json"),
        ((), {"config.json": b"[1, 2"}, "invalid_checkpoint", "config.json is not valid JSON"),
    ],
)
def test_incomplete_checkpoints_are_refused_at_upload(
    client, auth, tmp_path, tiny_dir, drop, extra, code, words
):
    archive = crafted_checkpoint(tiny_dir, tmp_path / "partial.tar", drop=drop, extra=extra)
    response = post(client, auth, archive)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert words in response.json()["error"]["message"]


def test_index_putting_tensors_in_the_wrong_shard_is_refused(client, auth, tmp_path, tiny_dir):
    first = "model-00001-of-00004.safetensors"
    archive = crafted_checkpoint(tiny_dir, tmp_path / "moved.tar", shard_name=lambda s: first)
    response = post(client, auth, archive)
    assert response.status_code == 422
    assert "puts" in response.json()["error"]["message"] and first in response.json()["error"]["message"]


def test_a_complete_checkpoint_is_accepted(client, auth, tmp_path, tiny_dir):
    archive = crafted_checkpoint(tiny_dir, tmp_path / "good.tar")
    response = post(client, auth, archive)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "validating"
