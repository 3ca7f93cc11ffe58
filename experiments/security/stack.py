"""The service stack the security experiments run against: an own PostgreSQL database, a free Redis DB,
moto's S3 server, `uvicorn api.main:app` and optionally one Celery worker, from any source tree (`src`), so
that the same measurement runs on main's code and on a branch. Traffic only on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("DISP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("DISP_TEST_REDIS", "redis://127.0.0.1:6379")
METRICS_TOKEN = "experiments-metrics"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, src: Path, work: Path) -> None:
        from sqlalchemy import create_engine, text

        self.src, self.work = src, work
        run = uuid.uuid4().hex[:8]
        self.db = f"disp_bombs_{run}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        import redis

        for db in range(15, 0, -1):
            self.redis = redis.Redis.from_url(f"{REDIS}/{db}")
            if self.redis.dbsize() == 0 and self.redis.set("disp-bombs-lock", run, nx=True, ex=7200):
                break
        else:
            raise SystemExit("no free Redis database")
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        s3_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
        self.moto.start()
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "DISP_ENVIRONMENT": "test",
            "DISP_SECRET_KEY": "bombs-secret",
            "DISP_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + f"/{self.db}",
            "DISP_BROKER_URL": f"{REDIS}/{db}",
            "DISP_RESULT_BACKEND": f"{REDIS}/{db}",
            "DISP_QUEUE_PREFIX": f"bombs{run}-",
            "DISP_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "DISP_S3_BUCKET": f"bombs-{run}",
            "DISP_S3_ACCESS_KEY_ID": "testing",
            "DISP_S3_SECRET_ACCESS_KEY": "testing",
            "DISP_WORK_DIR": str(work / "worker"),
            "DISP_DEVICE": "cpu",
            "DISP_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            "DISP_METRICS_TOKEN": METRICS_TOKEN,
        }
        self.procs: list[subprocess.Popen] = []
        self.key = ""

    def start(self, *, worker: bool = True) -> dict[str, int]:
        """Start the API (and a worker); returns their pids once /healthz answers and a tenant key exists."""
        log = open(self.work / "stack.log", "ab")  # noqa: SIM115 (closed with the processes)
        uvicorn = ["-m", "uvicorn", "api.main:app", "--port", str(self.port), "--log-level", "warning"]
        api = subprocess.Popen([sys.executable, *uvicorn], cwd=self.src, env=self.env, stdout=log, stderr=log)
        self.procs = [api]
        if worker:
            queues = ",".join(self.env["DISP_QUEUE_PREFIX"] + q for q in ("cpu", "gpu"))
            celery = "-m celery -A worker.celery_app worker -P solo -c 1 --loglevel WARNING".split()
            celery += ["-Q", queues, "--without-gossip", "--without-mingle", "--without-heartbeat"]
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, *celery], cwd=self.src, env=self.env, stdout=log, stderr=log
                )
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        if not self.key:
            code = (
                "from api.db.session import session_scope; from api.services.tenants import *;"
                "import os\nwith session_scope(os.environ['DISP_DATABASE_URL']) as s:\n"
                " t = get_or_create_tenant(session=s, name='bombs'); print(create_api_key(session=s, tenant_id=t.id)[1])"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                cwd=self.src,
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            )
            self.key = out.stdout.strip().splitlines()[-1]
        if worker:
            time.sleep(8)  # the worker imports torch and connects
        return dict(zip(("api", "worker"), (p.pid for p in self.procs), strict=False))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def close(self) -> None:
        from sqlalchemy import text

        self.stop()
        self.moto.stop()
        self.redis.flushdb()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))
