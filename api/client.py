"""Python client of the disp service (httpx). Retries connection errors, 429 and 5xx with backoff,
reusing one `Idempotency-Key` per POST across its retries; large files go through presigned multipart."""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from api.statuses import FINAL
from disp.progress import remaining, stage_bars

TERMINAL = frozenset(FINAL)
SIMPLE_UPLOAD_LIMIT = 64 * 1024**2


class DispError(Exception):
    """An error answer from the service, with its envelope fields."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param {param})" if param else ""))
        self.status, self.code, self.message, self.param, self.request_id = (
            status,
            code,
            message,
            param,
            request_id,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class DispClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
    ) -> None:
        self.base_url = (base_url or os.environ.get("DISP_API_URL", "http://127.0.0.1:8000")).rstrip("/")
        key = api_key or os.environ.get("DISP_API_KEY")
        if not key:
            raise ValueError("an API key is needed: --api-key (api_key in Python) or DISP_API_KEY")
        self.max_retries = max_retries
        self.http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "disp-client/0.1"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DispClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}) or {})
        if method == "POST":
            headers.setdefault("Idempotency-Key", uuid.uuid4().hex)
        for attempt in range(self.max_retries + 1):
            for value in kwargs.get("files", {}).values():  # rewind file objects for a retry
                if hasattr(value[1], "seek"):
                    value[1].seek(0)
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
            except httpx.UnsupportedProtocol:  # a wrong base URL: no retry will fix it
                raise
            except httpx.TransportError:
                if attempt == self.max_retries:
                    raise
                time.sleep(min(30.0, 0.5 * 2**attempt))
                continue
            if response.status_code in (429, 502, 503, 504) or response.status_code >= 500:
                if attempt < self.max_retries:
                    retry_after = response.headers.get("retry-after")
                    time.sleep(
                        float(retry_after) if retry_after and retry_after.isdigit() else 0.5 * 2**attempt
                    )
                    continue
            if response.status_code >= 400:
                try:
                    err = response.json()["error"]
                except (ValueError, KeyError, TypeError):
                    err = {"code": "http_error", "message": response.text[:500]}
                raise DispError(
                    response.status_code,
                    err.get("code", "error"),
                    err.get("message", ""),
                    err.get("param"),
                    err.get("request_id") or response.headers.get("x-request-id"),
                )
            return (
                response.json()
                if response.headers.get("content-type", "").startswith("application/json")
                else response
            )
        raise AssertionError("unreachable")

    # -- uploads -------------------------------------------------------------------------------------
    def _upload(self, purpose: str, path: Path, fields: dict[str, Any]) -> dict:
        size = path.stat().st_size
        if size <= SIMPLE_UPLOAD_LIMIT:
            with open(path, "rb") as fh:
                form = {k: v for k, v in fields.items() if v is not None}
                return self.request("POST", f"/v1/{purpose}s", files={"file": (path.name, fh)}, data=form)
        body = {
            "purpose": purpose,
            "filename": path.name,
            "bytes": size,
            "sha256": _sha256(path),
            **{k: v for k, v in fields.items() if v is not None},
        }
        upload = self.request("POST", "/v1/uploads", json=body)
        try:
            urls = self.request("POST", f"/v1/uploads/{upload['id']}/parts")["parts"]
            parts = []
            with open(path, "rb") as fh:
                for part in urls:
                    fh.seek((part["part_number"] - 1) * upload["part_size"])
                    chunk = fh.read(upload["part_size"])
                    etag = self._put_part(part["url"], chunk)
                    parts.append({"part_number": part["part_number"], "etag": etag})
            done = self.request("POST", f"/v1/uploads/{upload['id']}/complete", json={"parts": parts})
        except BaseException:
            try:
                self.request("POST", f"/v1/uploads/{upload['id']}/abort")
            finally:
                raise
        return self.request("GET", f"/v1/{purpose}s/{done['object_id']}")

    def _put_part(self, url: str, chunk: bytes) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                response = httpx.put(url, content=chunk, timeout=self.http.timeout)
                if response.status_code < 500:
                    response.raise_for_status()
                    return response.headers["etag"]
            except httpx.TransportError:
                if attempt == self.max_retries:
                    raise
            time.sleep(0.5 * 2**attempt)
        raise DispError(503, "part_upload_failed", f"could not upload a part to {url.split('?')[0]}")

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> dict:
        """A .zip or .tar(.gz) holding a data file (docs/data.md) and its images."""
        return self._upload("dataset", Path(path), {"name": name})

    def check_dataset(self, path: str | Path) -> dict:
        """Dry run of an upload: the service's report on a dataset archive (records, turns, images, format,
        problems), nothing stored. The same report as `disp data check` (use that for large archives)."""
        path = Path(path)
        with open(path, "rb") as fh:
            return self.request("POST", "/v1/datasets/check", files={"file": (path.name, fh)})

    def upload_checkpoint(
        self, path: str | Path, *, kind: str = "full", base_model: str | None = None, name: str | None = None
    ) -> dict:
        """A checkpoint directory (tarred here), an archive of one, or a projector .safetensors (kind="projector")."""
        path = Path(path)
        if path.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                archive = Path(tmp) / f"{path.name}.tar"
                with tarfile.open(archive, "w") as tf:
                    for f in sorted(path.rglob("*")):
                        if f.is_file():
                            tf.add(f, arcname=str(f.relative_to(path)))
                return self._upload(
                    "checkpoint", archive, {"kind": kind, "base_model": base_model, "name": name or path.name}
                )
        return self._upload("checkpoint", path, {"kind": kind, "base_model": base_model, "name": name})

    def wait_ready(self, kind: str, object_id: str, *, timeout: float = 3600, interval: float = 1.0) -> dict:
        """Poll a dataset or checkpoint until validated; DispError if it is invalid."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.request("GET", f"/v1/{kind}s/{object_id}")
            if obj["status"] == "ready":
                return obj
            if obj["status"] == "invalid":
                err = obj.get("error") or {}
                raise DispError(422, err.get("code", "invalid"), err.get("message", ""), kind)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{object_id} still {obj['status']}")
            time.sleep(interval)

    # -- jobs ----------------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        dataset_id: str,
        checkpoint_id: str,
        settings: dict | None = None,
        webhook_url: str | None = None,
        shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        body = {
            "dataset_id": dataset_id,
            "checkpoint_id": checkpoint_id,
            "settings": settings or {},
            "webhook_url": webhook_url,
            "shard_size": shard_size,
            "metadata": metadata or {},
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[dict]:
        after = None
        while True:
            params = {
                "limit": page_size,
                **({"after": after} if after else {}),
                **({"status": status} if status else {}),
            }
            page = self.request("GET", "/v1/jobs", params=params)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["next_cursor"]

    def cancel_job(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> dict:
        params = {"limit": limit, **({"after": after} if after is not None else {})}
        return self.request("GET", f"/v1/jobs/{job_id}/events", params=params)

    def artifacts(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models")["data"]

    def watch(
        self,
        job_id: str,
        *,
        on_update: Callable[[dict], None] | None = None,
        interval: float = 1.0,
        timeout: float | None = None,
    ) -> dict:
        """Poll until the job is terminal, calling `on_update(job)` after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']}")
            time.sleep(interval)

    def download_artifact(self, artifact_id: str, dest: str | Path) -> Path:
        """Stream an artifact to `dest` and check its SHA-256."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        meta = self.request("GET", f"/v1/artifacts/{artifact_id}")
        digest = hashlib.sha256()
        tmp = dest.with_name(f".{dest.name}.part")
        with (
            self.http.stream("GET", f"/v1/artifacts/{artifact_id}/content") as response,
            open(tmp, "wb") as out,
        ):
            if response.status_code != 200:
                response.read()
                raise DispError(response.status_code, "download_failed", response.text[:300])
            for chunk in response.iter_bytes(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != meta["sha256"]:
            tmp.unlink()
            raise DispError(502, "checksum_mismatch", f"{artifact_id}: downloaded bytes do not match")
        tmp.replace(dest)
        return dest

    def download_job(self, job_id: str, out_dir: str | Path) -> dict[str, Path]:
        """Every artifact of a job into `out_dir`, by kind."""
        return {
            a["kind"]: self.download_artifact(a["id"], Path(out_dir) / a["filename"])
            for a in self.artifacts(job_id)
        }


def seconds_left(job: dict, now: datetime | None = None) -> float | None:
    """Seconds until the service's estimate of the job's end (its `eta`), None when it has none."""
    if not job.get("eta"):
        return None
    eta = datetime.fromisoformat(job["eta"].replace("Z", "+00:00"))
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return max(0.0, (eta - (now or datetime.now(UTC))).total_seconds())


def progress_line(job: dict) -> str:
    """`scoring 12/40 (30%), 1m20s left`: the job's stage, its progress and the time the service expects
    it still needs (not a clock time)."""
    p = job.get("progress") or {}
    done, total = p.get("done") or 0, p.get("total") or 0
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    left = seconds_left(job)
    return f"{job['status']} {done}/{total}{pct}" + ("" if left is None else f", {remaining(left)} left")


def show_progress(file: TextIO | None = None) -> Callable[[dict], None]:
    """An `on_update(job)` for `DispClient.watch`: a line per status change, and while a stage runs a bar
    (a tqdm bar on a terminal, plain periodic lines otherwise; `disp.progress`)."""
    file = file or sys.stderr
    bars = stage_bars(file=file)
    last: list[str | None] = [None]

    def show(job: dict) -> None:
        p = job.get("progress") or {}
        running = job.get("stage") is not None and job["status"] == job.get("stage") and p.get("total")
        if running:
            bars(job["stage"], p.get("done") or 0, p["total"])
        elif job["status"] != last[0]:
            print(f"{job['id']}: {job['status']}", file=file, flush=True)
        last[0] = job["status"]

    return show
