"""Load shedding and per-tenant limits: conditional GET (ETag/304), the job event stream, per-tenant rate
limits and the unfinished-jobs quota (429 + Retry-After), admission control and an exhausted database pool
(503 + Retry-After at once, never a hang)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.service_conftest import new_tenant, ready_inputs

pytestmark = pytest.mark.services


@pytest.fixture
def job(client, auth, pg_url):
    """A job of the caller's tenant on inputs marked ready."""
    inputs = ready_inputs(pg_url, auth)
    response = client.post("/v1/jobs", headers=auth, json=inputs)
    assert response.status_code == 201, response.text
    return response.json()["id"], inputs


def test_conditional_get_answers_304_until_the_job_changes(client, auth, job):
    job_id, _ = job
    first = client.get(f"/v1/jobs/{job_id}", headers=auth)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.json()["id"] == job_id and etag.startswith('"')
    again = client.get(f"/v1/jobs/{job_id}", headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    listed = client.get("/v1/jobs", headers=auth)
    assert (
        client.get("/v1/jobs", headers={**auth, "If-None-Match": listed.headers["etag"]}).status_code == 304
    )
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    changed = client.get(f"/v1/jobs/{job_id}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag
    # another tenant learns nothing from an ETag
    assert (
        client.get(
            f"/v1/jobs/{job_id}", headers={**new_tenant_auth(client), "If-None-Match": etag}
        ).status_code
        == 404
    )


def new_tenant_auth(client):
    return new_tenant(client.app.state.settings.database_url)


def test_event_stream_sends_events_then_ends_when_the_job_finishes(client, auth, job):
    job_id, _ = job
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    with client.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=auth) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    frames = [f for f in text.split("\n\n") if f.strip()]
    kinds = [line.split(": ", 1)[1] for f in frames for line in f.splitlines() if line.startswith("event: ")]
    assert kinds[-1] == "end" and "job" in kinds and kinds.count("status") == 2  # validating, cancelled
    ids = [int(line[4:]) for f in frames for line in f.splitlines() if line.startswith("id: ")]
    job_frame = next(f for f in frames if "event: job" in f)
    assert json.loads(job_frame.split("data: ", 1)[1])["status"] == "cancelled"
    # resuming after the last event id sends no event twice
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events/stream", headers={**auth, "Last-Event-ID": str(ids[-1])}
    ) as response:
        resumed = "".join(response.iter_text())
    assert "id: " not in resumed and "event: end" in resumed
    assert client.get(f"/v1/jobs/{job_id}/events/stream", headers=new_tenant_auth(client)).status_code == 404


def _app(api_settings, **overrides):
    from api.main import create_app

    return create_app(api_settings.model_copy(update={"run_migrations": False, **overrides}))


def test_tenant_rate_limit_is_429_with_retry_after_and_per_tenant(api_settings, pg_url):
    from fastapi.testclient import TestClient

    app = _app(api_settings, rate_limit_per_s=2.0, rate_limit_burst=5)
    noisy, quiet = new_tenant(pg_url), new_tenant(pg_url)
    with TestClient(app) as tc:
        codes = [tc.get("/v1/jobs", headers=noisy).status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}
        limited = tc.get("/v1/jobs", headers=noisy)
        assert limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
        assert tc.get("/v1/jobs", headers=quiet).status_code == 200  # another tenant is not affected
        assert tc.get("/healthz").status_code == 200
        time.sleep(1.1)  # the bucket refills at 2/s
        assert tc.get("/v1/jobs", headers=noisy).status_code == 200


def test_unfinished_jobs_quota_is_429(api_settings, auth, job):
    from fastapi.testclient import TestClient

    _, inputs = job
    with TestClient(_app(api_settings, max_active_jobs=2)) as tc:
        assert tc.post("/v1/jobs", headers=auth, json=inputs).status_code == 201
        refused = tc.post("/v1/jobs", headers=auth, json=inputs)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert "quota is 2" in refused.json()["error"]["message"] and refused.headers["retry-after"]


def test_admission_sheds_with_503_at_once_instead_of_queueing(api_settings):
    """Two requests may run, a third waits at most admission_wait_s and is then refused; probes pass."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from api.limits import Admission

    async def slow(_request):
        await asyncio.sleep(0.5)
        return PlainTextResponse("done")

    inner = Starlette(routes=[Route("/v1/slow", slow), Route("/healthz", slow)])
    settings = api_settings.model_copy(update={"max_concurrent_requests": 2, "admission_wait_s": 0.05})
    app = Admission(inner, settings=settings)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            started = time.monotonic()
            results = await asyncio.gather(*(c.get("/v1/slow") for _ in range(5)), c.get("/healthz"))
            return results, time.monotonic() - started

    results, elapsed = asyncio.run(run())
    codes = sorted(r.status_code for r in results[:5])
    assert codes == [200, 200, 503, 503, 503] and results[5].status_code == 200
    shed = next(r for r in results if r.status_code == 503)
    assert shed.headers["retry-after"] == "1" and shed.json()["error"]["code"] == "overloaded"
    assert elapsed < 1.5  # nothing waited for a slot beyond the admission wait


def test_exhausted_database_pool_is_503_not_a_hang(api_settings, pg_url, auth):
    """Every connection of a one-connection pool held: a request fails within the pool timeout, with
    Retry-After, and succeeds once the connection is back."""
    from fastapi.testclient import TestClient

    from api.db.session import get_engine

    url = pg_url + "?application_name=disp-pool-test"  # its own engine and pool
    app = _app(
        api_settings,
        database_url=url,
        db_pool_size=1,
        db_pool_overflow=0,
        db_pool_timeout_s=0.3,
        max_concurrent_requests=0,
    )
    with TestClient(app) as tc:
        held = get_engine(url).connect()
        try:
            started = time.monotonic()
            response = tc.get("/v1/jobs", headers=auth)
            assert time.monotonic() - started < 3
            assert response.status_code == 503 and response.json()["error"]["code"] == "database_busy"
            assert response.headers["retry-after"] == "1"
        finally:
            held.close()
        assert tc.get("/v1/jobs", headers=auth).status_code == 200


def test_rate_limits_fail_open_when_redis_is_down(api_settings, auth):
    """Redis only holds the rate-limit buckets: without it requests are served (not limited), not failed."""
    from fastapi.testclient import TestClient

    app = _app(api_settings, rate_limit_redis_url="redis://127.0.0.1:1/0", rate_limit_burst=1)
    with TestClient(app) as tc:
        started = time.monotonic()
        assert [tc.get("/v1/jobs", headers=auth).status_code for _ in range(3)] == [200, 200, 200]
        assert time.monotonic() - started < 5
