"""Load on the API from outside, as docs/operations.md reports it: `hey` for DURATION seconds per
concurrency level, mixed 80% `GET /v1/jobs/{id}` polls over 50 existing jobs, 15% `GET /v1/jobs?limit=20`,
5% `POST /v1/jobs`, `-t 20` per request; then the recovery time (until one poll answers again).

The stack is its own: a fresh PostgreSQL database, a RabbitMQ vhost (the broker; nothing consumes the
`validate_job` messages the POSTs send), local storage, and `uvicorn api.main:app` run from SRC (so the
same script measures an older checkout: `git archive main | tar -x -C /tmp/disp-main`).

    flock /work/locks/heavy.lock .venv/bin/python -m experiments.service.load --workers 2

The mix runs as parallel `hey` processes (hey takes one URL): one per polled job (up to 50, the polls'
concurrency split over them), one listing, one posting. hey reports percentiles per process: p50 and p99
below are request-weighted means of the processes' own percentiles, `p99 max` the worst process.
Needs: hey (`apt-get install hey`), PostgreSQL on 127.0.0.1:5432, RabbitMQ on 127.0.0.1:5672.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"

SEED = r"""
import json, sys
from api.db.models import Checkpoint, Dataset
from api.db.session import session_scope
from api.migrate import upgrade
from api.services.tenants import create_api_key, get_or_create_tenant
url, n, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
upgrade(url)
out = []
with session_scope(url) as s:
    for i in range(n):
        t = get_or_create_tenant(session=s, name=f"load-{run}-{i}")
        _, key = create_api_key(session=s, tenant_id=t.id)
        common = dict(tenant_id=t.id, status="ready", storage_key="x", bytes=1, sha256="0" * 64)
        ds = Dataset(name="d", archive_format="zip", num_records=8, **common)
        ck = Checkpoint(name="c", kind="full", archive_format="tar", **common)
        s.add_all([ds, ck])
        s.flush()
        out.append({"key": key, "dataset_id": ds.id, "checkpoint_id": ck.id})
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    method: str, url: str, key: str, body: dict | None = None, timeout: float = 20
) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


class Stack:
    """Database, vhost and API server of one measurement."""

    def __init__(self, src: Path, workers: int, tenants: int, env: dict[str, str]) -> None:
        self.src, self.workers, self.tenants, self.extra_env = src, workers, tenants, env
        self.run = uuid.uuid4().hex[:8]
        self.db = f"disp_load_{self.run}"
        self.vhost = f"disp-load-{self.run}"
        self.tmp = Path(tempfile.mkdtemp(prefix="disp-load-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(self.src),
            "DISP_ENVIRONMENT": "development",
            "DISP_SECRET_KEY": "load-test-secret",
            "DISP_DATABASE_URL": f"{PG}/{self.db}",
            "DISP_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            "DISP_RESULT_BACKEND": "redis://127.0.0.1:6379/0",
            "DISP_QUEUE_PREFIX": f"load-{self.run}-",
            "DISP_STORAGE_BACKEND": "local",
            "DISP_STORAGE_ROOT": str(self.tmp / "storage"),
            "DISP_WEBHOOK_ALLOW_PRIVATE": "true",
            **self.extra_env,
        }

    def __enter__(self) -> Stack:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f'CREATE DATABASE "{self.db}"'], check=True
        )
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", self.vhost], check=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"], check=True
        )
        seeded = subprocess.run(
            [sys.executable, "-c", SEED, f"{PG}/{self.db}", str(self.tenants), self.run],
            env=self.env(),
            cwd=self.tmp,
            check=True,
            capture_output=True,
            text=True,
        )
        self.tenant_rows = json.loads(seeded.stdout.strip().splitlines()[-1])
        self.log = open(self.tmp / "api.log", "wb")
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.tmp,
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.base}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"API did not start:\n{(self.tmp / 'api.log').read_text()[-3000:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-qc",
                f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)',
            ],
            check=False,
        )
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def api_log(self) -> str:
        return (self.tmp / "api.log").read_text(errors="replace")


def make_jobs(stack: Stack, n: int) -> list[tuple[str, dict]]:
    """n jobs spread over the tenants: (job id, tenant row)."""
    jobs = []
    for i in range(n):
        t = stack.tenant_rows[i % len(stack.tenant_rows)]
        body = {"dataset_id": t["dataset_id"], "checkpoint_id": t["checkpoint_id"]}
        for _ in range(50):
            status, out = request("POST", f"{stack.base}/v1/jobs", t["key"], body)
            if status == 201:
                break
            time.sleep(0.5)  # a rate limit or quota of the server under test
        else:
            raise RuntimeError(f"could not create job {i}: HTTP {status}")
        jobs.append((out["id"], t))
    return jobs


def split(c: int) -> tuple[int, int, int]:
    """Concurrency of polls, listing, posting (80/15/5, at least one each)."""
    post = max(1, round(c * 0.05))
    lst = max(1, round(c * 0.15))
    return c - post - lst, lst, post


def hey(duration: int, timeout: int, conc: int, key: str, url: str, *extra: str) -> list[str]:
    return ["hey", "-z", f"{duration}s", "-t", str(timeout), "-c", str(conc), *extra,
            "-H", f"Authorization: Bearer {key}", url]  # fmt: skip


def hey_cmds(stack: Stack, jobs: list, c: int, duration: int, timeout: int) -> list[tuple[str, list[str]]]:
    polls, lst, post = split(c)
    n = min(polls, len(jobs))
    cmds = []
    for i in range(n):
        job_id, t = jobs[i]
        conc = polls // n + (1 if i < polls % n else 0)
        cmds.append(("poll", hey(duration, timeout, conc, t["key"], f"{stack.base}/v1/jobs/{job_id}")))
    t = stack.tenant_rows[0]
    cmds.append(("list", hey(duration, timeout, lst, t["key"], f"{stack.base}/v1/jobs?limit=20")))
    body = json.dumps({"dataset_id": t["dataset_id"], "checkpoint_id": t["checkpoint_id"]})
    post_args = ("-m", "POST", "-T", "application/json", "-d", body)
    cmds.append(("post", hey(duration, timeout, post, t["key"], f"{stack.base}/v1/jobs", *post_args)))
    return cmds


def parse_hey(text: str) -> dict:
    """Counts and percentiles from hey's summary."""
    out = {"codes": {}, "errors": 0, "timeouts": 0, "conn_errors": 0, "p50": None, "p99": None}
    for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text):
        out["codes"][int(code)] = out["codes"].get(int(code), 0) + int(n)
    in_errors = False
    for line in text.splitlines():
        if line.startswith("Error distribution"):
            in_errors = True
            continue
        m = re.match(r"\s+\[(\d+)\]\s+(.*)", line)
        if in_errors and m:
            n, what = int(m.group(1)), m.group(2)
            out["errors"] += n
            if "Timeout" in what or "deadline exceeded" in what:
                out["timeouts"] += n
            else:
                out["conn_errors"] += n
    for pct, secs in re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), text):
        if pct in ("50", "99"):
            out[f"p{pct}"] = float(secs)
    slowest = re.search(r"Slowest:\s+([\d.]+) secs", text)
    if out["codes"] and out["p99"] is None and slowest:  # too few responses for hey's percentiles
        out["p99"] = float(slowest.group(1))
        out["p50"] = out["p50"] if out["p50"] is not None else out["p99"]
    return out


def recovery(stack: Stack, jobs: list, limit: float = 300) -> float:
    """Seconds until one poll answers 200 again."""
    job_id, t = jobs[0]
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            status, _ = request("GET", f"{stack.base}/v1/jobs/{job_id}", t["key"], timeout=2)
            if status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    return float("inf")


def level(stack: Stack, jobs: list, c: int, duration: int, timeout: int) -> dict:
    cmds = hey_cmds(stack, jobs, c, duration, timeout)
    with ThreadPoolExecutor(len(cmds)) as pool:
        texts = list(
            pool.map(lambda kc: (kc[0], subprocess.run(kc[1], capture_output=True, text=True).stdout), cmds)
        )
    rec = recovery(stack, jobs)
    parts = [(kind, parse_hey(text)) for kind, text in texts]
    row = {"c": c, "duration": duration, "recovery_s": round(rec, 2), "codes": {}}
    for key in ("errors", "timeouts", "conn_errors"):
        row[key] = sum(p[key] for _, p in parts)
    for _, p in parts:
        for code, n in p["codes"].items():
            row["codes"][code] = row["codes"].get(code, 0) + n
    responses = sum(row["codes"].values())
    ok = sum(n for code, n in row["codes"].items() if code < 400)
    row["req_s"] = round(responses / duration, 1)
    row["ok_s"] = round(ok / duration, 1)
    weighted = [
        (sum(p["codes"].values()), p) for _, p in parts if p["p50"] is not None and p["p99"] is not None
    ]
    total = sum(w for w, _ in weighted) or 1
    row["p50_ms"] = round(1000 * sum(w * p["p50"] for w, p in weighted) / total, 1) if weighted else None
    row["p99_ms"] = round(1000 * sum(w * p["p99"] for w, p in weighted) / total, 1) if weighted else None
    row["p99_max_ms"] = round(1000 * max(p["p99"] for _, p in weighted), 1) if weighted else None
    row["n429"] = row["codes"].get(429, 0)
    row["n503"] = row["codes"].get(503, 0)
    row["n5xx_other"] = sum(n for code, n in row["codes"].items() if code >= 500 and code != 503)
    row["pool_errors_logged"] = stack.api_log().count("QueuePool limit")
    return row


HEADER = (
    "c",
    "req/s",
    "ok/s",
    "p50 ms",
    "p99 ms",
    "p99 max",
    "timeouts",
    "conn err",
    "429",
    "503",
    "5xx other",
    "recovery s",
)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = (
            r["c"],
            r["req_s"],
            r["ok_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["p99_max_ms"],
            r["timeouts"],
            r["conn_errors"],
            r["n429"],
            r["n503"],
            r["n5xx_other"],
            r["recovery_s"],
        )
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--src", type=Path, default=ROOT, help="source tree whose api/ is served (default: this one)"
    )
    p.add_argument("--levels", default="10,50,200,500", help="comma-separated client concurrencies")
    p.add_argument("--duration", type=int, default=40, help="seconds per level")
    p.add_argument("--timeout", type=int, default=20, help="hey's per-request timeout, seconds")
    p.add_argument("--jobs", type=int, default=50, help="existing jobs the polls spread over")
    p.add_argument("--tenants", type=int, default=10, help="tenants owning the jobs (one API key each)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--env", action="append", default=[], metavar="DISP_X=V", help="extra server setting")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if not shutil.which("hey"):
        p.error("hey is not installed (apt-get install -y hey)")
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = []
    with Stack(args.src.resolve(), args.workers, args.tenants, env) as stack:
        jobs = make_jobs(stack, args.jobs)
        for c in (int(x) for x in args.levels.split(",")):
            row = level(stack, jobs, c, args.duration, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\nsrc={args.src} workers={args.workers} tenants={args.tenants} cores={os.cpu_count()} "
        f"load average={os.getloadavg()[0]:.1f} (machine shared with other engineers' work)"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
