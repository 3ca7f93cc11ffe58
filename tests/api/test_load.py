"""A bounded load test against a real API server process (uvicorn, the shipped admission control, a small
pool): 200 concurrent pollers for a few seconds. Every request is answered (no connection error, no client
timeout); what is not served is shed at once with 429/503 and Retry-After, never another 5xx; a single poll
succeeds the moment the load stops. Figures at scale: experiments/service/load.py (docs/operations.md)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from tests.service_conftest import ROOT, free_port, new_tenant, ready_inputs, wait_for_server

pytestmark = [pytest.mark.services, pytest.mark.slow]

CLIENTS, SECONDS, CLIENT_TIMEOUT = 200, 8.0, 10.0


@pytest.fixture
def server(service_env, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        **service_env,
        "PYTHONPATH": str(ROOT),
        "DISP_RUN_MIGRATIONS": "false",
        "DISP_MAX_CONCURRENT_REQUESTS": "4",
        "DISP_DB_POOL_SIZE": "8",
        "DISP_RATE_LIMIT_PER_S": "100",
        "DISP_RATE_LIMIT_BURST": "100",
    }
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "api.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    wait_for_server(proc, f"{base}/healthz", tmp_path / "api.log", 60, "api server")
    yield base
    proc.terminate()
    proc.wait(30)
    log.close()
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def seed_jobs(base: str, pg_url: str, tenants: int = 4) -> list[tuple[str, dict, dict]]:
    jobs = []
    for _ in range(tenants):
        auth = new_tenant(pg_url)
        body = ready_inputs(pg_url, auth)
        created = httpx.post(f"{base}/v1/jobs", headers=auth, json=body)
        assert created.status_code == 201, created.text
        jobs.append((created.json()["id"], auth, body))
    return jobs


async def hammer(base: str, jobs: list) -> tuple[Counter, list[str], int, float]:
    codes: Counter = Counter()
    problems: list[str] = []
    served = 0
    deadline = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

    async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT, limits=limits) as client:

        async def one_client(i: int) -> None:
            nonlocal served
            job_id, auth, body = jobs[i % len(jobs)]
            n = 0
            while time.monotonic() < deadline:
                n += 1
                kind = n % 20
                try:
                    if kind == 0:  # 5% create, 15% list, 80% poll
                        r = await client.post("/v1/jobs", headers=auth, json=body)
                    elif kind < 4:
                        r = await client.get("/v1/jobs?limit=20", headers=auth)
                    else:
                        r = await client.get(f"/v1/jobs/{job_id}", headers=auth)
                except httpx.TransportError as exc:  # connection errors and client timeouts
                    problems.append(f"{type(exc).__name__}: {exc}")
                    continue
                codes[r.status_code] += 1
                if r.status_code in (429, 503):
                    if not r.headers.get("retry-after"):
                        problems.append(f"{r.status_code} without Retry-After")
                    await asyncio.sleep(0.05)  # a well-behaved client backs off a little
                elif r.status_code >= 500 or r.status_code not in (200, 201):
                    problems.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    served += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
        return codes, problems, served, time.monotonic() - started


def test_200_concurrent_clients_are_served_or_shed_at_once(server, pg_url):
    jobs = seed_jobs(server, pg_url)
    codes, problems, served, elapsed = asyncio.run(hammer(server, jobs))
    print(f"\n{CLIENTS} clients for {elapsed:.1f}s: {dict(codes)}; served {served / elapsed:.0f}/s")
    assert not problems, problems[:10]
    assert served > 0 and codes[503] > 0  # the limit of 4 concurrent requests was reached and shed
    assert set(codes) <= {200, 201, 429, 503}
    assert elapsed < SECONDS + CLIENT_TIMEOUT
    # recovery: the next single poll is answered at once
    job_id, auth, _ = jobs[0]
    started = time.monotonic()
    assert httpx.get(f"{server}/v1/jobs/{job_id}", headers=auth, timeout=5).status_code == 200
    assert time.monotonic() - started < 2
