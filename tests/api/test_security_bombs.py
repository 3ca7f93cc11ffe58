"""Decompression bombs and oversized archives are refused at upload with 413/422 naming the limit, before
anything is stored; the records file is parsed as a stream in bounded memory. Limits are lowered here so
the bombs stay small (experiments/security/bombs.py measures RSS with the shipped limits)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile

import pytest

from tests.service_conftest import llava_records, png_bytes, write_archive

pytestmark = pytest.mark.services

MIB = 1024 * 1024
LIMITS = {
    "max_dataset_json_bytes": 4 * MIB,
    "max_member_bytes": 8 * MIB,
    "max_records": 50,
    "max_archive_entries": 40,
    "max_compression_ratio": 50,
    "run_migrations": False,
}


@pytest.fixture(scope="module")
def small(api_settings):
    """The API with small limits."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(api_settings.model_copy(update=LIMITS)), raise_server_exceptions=False) as tc:
        yield tc


def post(client, auth, path):
    return client.post("/v1/datasets", headers=auth, files={"file": (path.name, path.read_bytes())})


def whitespace_json(pad: int) -> bytes:
    return b" " * pad + json.dumps(llava_records(1)).encode()


def zip_of(path, files, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def refused(response, status, code, setting):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert setting in error["message"], error["message"]  # the message names the limit's setting


def test_zip_json_bomb_is_refused_by_its_compression_ratio(small, auth, tmp_path):
    archive = zip_of(
        tmp_path / "bomb.zip", {"data.json": whitespace_json(3 * MIB), "images/img0.png": png_bytes(0)}
    )
    assert archive.stat().st_size < 64 * 1024
    refused(post(small, auth, archive), 413, "compression_ratio_too_high", "max_compression_ratio")


def test_targz_json_bomb_is_refused_by_its_compression_ratio(small, auth, tmp_path):
    archive = write_archive(
        tmp_path / "bomb.tar.gz", {"data.json": whitespace_json(3 * MIB), "images/img0.png": png_bytes(0)}
    )
    refused(post(small, auth, archive), 413, "compression_ratio_too_high", "max_compression_ratio")


def test_records_file_over_its_cap_is_refused(small, auth, tmp_path):
    stored = zip_of(tmp_path / "big.zip", {"data.json": whitespace_json(5 * MIB)}, zipfile.ZIP_STORED)
    refused(post(small, auth, stored), 413, "dataset_json_too_large", "max_dataset_json_bytes")


def test_member_over_its_cap_is_refused(small, auth, tmp_path):
    big = tmp_path / "member.tar"
    with tarfile.open(big, "w") as tf:  # a header declaring 9 MiB: refused before any of it is read
        for name, data in {"data.json": json.dumps(llava_records(1)).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("images/huge.png")
        info.size = 9 * MIB
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    refused(post(small, auth, big), 413, "member_too_large", "max_member_bytes")


def test_too_many_entries_and_records(small, auth, tmp_path):
    files = {f"images/img{i}.png": b"x" for i in range(41)}
    files["data.json"] = b"[]"
    refused(
        post(small, auth, zip_of(tmp_path / "many.zip", files)),
        413,
        "too_many_entries",
        "max_archive_entries",
    )
    many = zip_of(tmp_path / "records.zip", {"data.json": json.dumps(llava_records(51)).encode()})
    refused(post(small, auth, many), 413, "too_many_records", "max_records")


def test_deeply_nested_json_is_422_not_500(client, auth, tmp_path):
    archive = zip_of(tmp_path / "deep.zip", {"data.json": b"[" * 100_000 + b"]" * 100_000})
    response = post(client, auth, archive)
    assert response.status_code == 422, response.text
    assert (
        response.json()["error"]["code"] == "malformed_json"
        and "nested" in response.json()["error"]["message"]
    )


def test_bad_crc_is_422_not_500(client, auth, tmp_path):
    path = zip_of(tmp_path / "crc.zip", {"data.json": json.dumps(llava_records(2)).encode()})
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data.json")
    wrong = struct.pack("<I", info.CRC ^ 0xFFFFFFFF)
    data[info.header_offset + 14 : info.header_offset + 18] = wrong
    central = data.rindex(b"PK\x01\x02")
    data[central + 16 : central + 20] = wrong
    path.write_bytes(bytes(data))
    response = post(client, auth, path)
    assert response.status_code == 422, response.text
    assert "CRC" in response.json()["error"]["message"], response.text
