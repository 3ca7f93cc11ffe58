"""Resumable artifact downloads (`Range`, against the moto S3 server) and metadata filters on the job list."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from api.db.models import Artifact, Job
from api.db.session import session_scope
from api.deps import bearer_key, tenant_for_key
from tests.service_conftest import ready_inputs

pytestmark = pytest.mark.services


@pytest.fixture
def artifact(auth, pg_url, storage) -> tuple[str, bytes]:
    """A succeeded job's 300 kB artifact, stored in S3: (artifact id, its bytes). Tests ask for `client` first
    (its start applies the migrations)."""
    data = os.urandom(300_000)
    ids = ready_inputs(pg_url, auth)
    with session_scope(pg_url) as session:
        tenant = tenant_for_key(session, bearer_key(auth["Authorization"]))
        job = Job(tenant_id=tenant.id, settings={"defense": "disp"}, status="succeeded", **ids)
        session.add(job)
        session.flush()
        key = f"tests/{job.id}/report.json"
        storage.put_bytes(key, data)
        row = Artifact(
            tenant_id=tenant.id,
            job_id=job.id,
            kind="report",
            filename="report.json",
            storage_key=key,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        session.add(row)
        session.flush()
        return row.id, data


def test_ranges_give_206_and_resume_to_the_same_bytes(client, auth, artifact):
    art_id, data = artifact
    url = f"/v1/artifacts/{art_id}/content"
    whole = client.get(url, headers=auth)
    assert whole.status_code == 200 and whole.content == data
    assert (
        whole.headers["accept-ranges"] == "bytes"
        and whole.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    )
    part = client.get(url, headers=auth | {"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert (
        part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        and part.headers["content-length"] == "1000"
    )
    # a download cut off after 123 456 bytes resumes from there to the same file
    rest = client.get(url, headers=auth | {"Range": "bytes=123456-", "If-Range": whole.headers["etag"]})
    assert rest.status_code == 206 and data[:123456] + rest.content == data
    tail = client.get(url, headers=auth | {"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    clipped = client.get(url, headers=auth | {"Range": f"bytes={len(data) - 5}-{len(data) + 100}"})
    assert clipped.status_code == 206 and clipped.content == data[-5:]
    past = client.get(url, headers=auth | {"Range": f"bytes={len(data)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    assert past.json()["error"]["code"] == "range_not_satisfiable"
    # a changed file (another ETag) or a multi-range request gets the whole artifact
    stale = client.get(url, headers=auth | {"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == data
    multi = client.get(url, headers=auth | {"Range": "bytes=0-1,5-6"})
    assert multi.status_code == 200 and multi.content == data


def test_the_download_url_honours_range_too(client, auth, artifact):
    art_id, data = artifact
    url = client.get(f"/v1/artifacts/{art_id}", headers=auth).json()["download_url"]
    assert url.startswith("http") and "/v1/artifacts/" not in url  # presigned S3
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]


def test_jobs_filter_by_metadata(client, auth, pg_url):
    ids = ready_inputs(pg_url, auth)

    def create(metadata):
        response = client.post("/v1/jobs", headers=auth, json={**ids, "metadata": metadata})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    a = create({"team": "vision", "run": "1"})
    b = create({"team": "vision", "run": "2"})
    c = create({"team": "audio", "run": "1"})

    def listed(query):
        response = client.get(f"/v1/jobs?{query}", headers=auth)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["data"]]

    assert listed("metadata.team=vision") == [b, a]
    assert listed("metadata[team]=vision&metadata.run=1") == [a]
    assert listed("metadata.run=1") == [c, a]
    assert listed("metadata.team=nobody") == [] and listed("metadata.missing=x") == []
    assert listed("metadata.team=vision&limit=1") == [b]
    assert set(listed("")) == {a, b, c}
    bad = client.get("/v1/jobs?metadata." + "k" * 65 + "=v", headers=auth)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "metadata." + "k" * 65


def test_local_storage_reads_only_the_range(tmp_path):
    from api.storage import CHUNK, LocalStorage

    store = LocalStorage(tmp_path)
    data = os.urandom(2 * CHUNK + 17)
    store.put_bytes("a/b", data)
    for start, end in [
        (0, None),
        (5, 9),
        (CHUNK - 1, CHUNK + 1),
        (CHUNK + 3, None),
        (len(data) - 1, len(data) - 1),
    ]:
        got = b"".join(store.iter_chunks("a/b", start, end))
        assert got == data[start : None if end is None else end + 1], (start, end)
