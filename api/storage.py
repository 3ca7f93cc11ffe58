"""Object storage: S3-compatible (boto3, any endpoint) or a local directory, behind one interface."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from api.config import CommonSettings

CHUNK = 1024 * 1024


class StorageError(Exception):
    """A storage operation failed (missing object, bad part list, unreachable endpoint)."""


def _etag(value: str) -> str:
    return value.strip().strip('"')


class Storage:
    """Keys are `/`-separated paths; presign_* return None when the backend cannot presign."""

    def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def download(self, key: str, dest: Path) -> Path:
        raise NotImplementedError

    def iter_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The object's bytes `start`..`end` (inclusive; None: to the end), in chunks."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix/`; returns how many."""
        raise NotImplementedError

    def presign_get(self, key: str, *, filename: str, expires_in: int) -> str | None:
        return None

    def create_multipart(self, key: str) -> str:
        raise NotImplementedError

    def presign_part(self, key: str, upload_id: str, part_number: int, *, expires_in: int) -> str | None:
        return None

    def put_part(self, key: str, upload_id: str, part_number: int, stream: BinaryIO) -> str:
        raise StorageError("this backend takes parts through presigned URLs")

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        raise NotImplementedError

    def abort_multipart(self, key: str, upload_id: str) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the backend is unreachable."""
        raise NotImplementedError


class LocalStorage(Storage):
    """A directory on the local filesystem; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"key {key!r} escapes the storage root")
        return path

    def _atomic_write(self, key: str, writer) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                writer(fh)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        def write(fh):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, CHUNK)

        self._atomic_write(key, write)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda fh: fh.write(data))

    def download(self, key: str, dest: Path) -> Path:
        src = self.path(key)
        if not src.is_file():
            raise StorageError(f"no object {key!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return dest

    def iter_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        src = self.path(key)
        if not src.is_file():
            raise StorageError(f"no object {key!r}")
        with open(src, "rb") as fh:
            fh.seek(start)
            left = None if end is None else end - start + 1
            while (left is None or left > 0) and (
                chunk := fh.read(CHUNK if left is None else min(CHUNK, left))
            ):
                left = None if left is None else left - len(chunk)
                yield chunk

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        folder = self.path(prefix.rstrip("/"))
        count = sum(1 for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def _parts_dir(self, upload_id: str) -> Path:
        if not upload_id.isalnum():
            raise StorageError("bad upload id")
        return self.root / ".multipart" / upload_id

    def create_multipart(self, key: str) -> str:
        upload_id = uuid.uuid4().hex
        self._parts_dir(upload_id).mkdir(parents=True)
        return upload_id

    def put_part(self, key: str, upload_id: str, part_number: int, stream: BinaryIO) -> str:
        folder = self._parts_dir(upload_id)
        if not folder.is_dir():
            raise StorageError("no such multipart upload")
        md5 = hashlib.md5(usedforsecurity=False)
        tmp = folder / f".{part_number}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            while chunk := stream.read(CHUNK):
                md5.update(chunk)
                fh.write(chunk)
        os.replace(tmp, folder / f"{part_number:05d}")
        return md5.hexdigest()

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        folder = self._parts_dir(upload_id)
        for number, etag in parts:
            part = folder / f"{number:05d}"
            if not part.is_file():
                raise StorageError(f"part {number} was not uploaded")
            md5 = hashlib.md5(part.read_bytes(), usedforsecurity=False).hexdigest()
            if md5 != _etag(etag):
                raise StorageError(f"part {number}: etag {etag!r} does not match the uploaded bytes")

        def write(fh):
            for number, _ in parts:
                with open(folder / f"{number:05d}", "rb") as src:
                    shutil.copyfileobj(src, fh, CHUNK)

        self._atomic_write(key, write)
        shutil.rmtree(folder, ignore_errors=True)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self._parts_dir(upload_id), ignore_errors=True)

    def check(self) -> None:
        probe = self.root / ".readyz"
        probe.write_bytes(b"ok")
        probe.unlink()


class S3Storage(Storage):
    """Any S3-compatible endpoint (AWS, MinIO, moto) through boto3."""

    def __init__(self, settings: CommonSettings) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        common = {
            "region_name": settings.s3_region,
            "aws_access_key_id": settings.s3_access_key_id,
            "aws_secret_access_key": settings.s3_secret_access_key,
            "config": config,
        }
        self.bucket = settings.s3_bucket
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **common)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.presigner = boto3.client("s3", endpoint_url=public, **common)
        if settings.s3_create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:  # created concurrently
                if "BucketAlready" not in str(exc):
                    raise

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def download(self, key: str, dest: Path) -> Path:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.client.download_file(self.bucket, key, str(tmp))
            os.replace(tmp, dest)
        except ClientError as exc:
            raise StorageError(f"cannot download {key!r}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def iter_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        ranged = (
            {} if start == 0 and end is None else {"Range": f"bytes={start}-{'' if end is None else end}"}
        )
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key, **ranged)["Body"]
        except ClientError as exc:
            raise StorageError(f"no object {key!r}") from exc
        yield from body.iter_chunks(CHUNK)

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/"
        )
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:  # at most 1000 per page, the limit of one DeleteObjects call
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count

    def presign_get(self, key: str, *, filename: str, expires_in: int) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": key,
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        return self.presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    def create_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def presign_part(self, key: str, upload_id: str, part_number: int, *, expires_in: int) -> str | None:
        params = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part_number}
        return self.presigner.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires_in)

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        from botocore.exceptions import ClientError

        body = {"Parts": [{"PartNumber": n, "ETag": f'"{_etag(e)}"'} for n, e in parts]}
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=body
            )
        except ClientError as exc:
            raise StorageError(f"cannot complete the upload: {exc}") from exc

    def abort_multipart(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError:
            pass

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


_cache: dict[tuple, Storage] = {}


def get_storage(settings: CommonSettings) -> Storage:
    """The storage backend the settings name (cached per configuration)."""
    key = (settings.storage_backend, str(settings.storage_root), settings.s3_endpoint_url, settings.s3_bucket)
    if key not in _cache:
        if settings.storage_backend == "local":
            _cache[key] = LocalStorage(settings.storage_root)
        else:
            _cache[key] = S3Storage(settings)
    return _cache[key]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
