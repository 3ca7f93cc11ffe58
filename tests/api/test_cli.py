"""`disp jobs` against a running `disp serve` (embedded: SQLite, local files; no servers needed): the
service's errors and an unreachable service end in one line, not a traceback; and the client installs and
works without torch (`pip install 'disp[client]'` in a fresh venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.service_conftest import free_port, wait_for_server

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("DISP_API_KEY", None)
ENV.pop("DISP_API_URL", None)

pytestmark = pytest.mark.slow  # starts the service (a few seconds)


def disp(
    *args: str, python: str | Path = sys.executable, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "disp.cli", *args], capture_output=True, text=True, timeout=120, env=env or ENV
    )


def one_line_error(out: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == rc and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("disp jobs: error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, out.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, api key) of `disp serve --no-worker` on a fresh data dir."""
    tmp = tmp_path_factory.mktemp("serve")
    data_dir, port = tmp / "data", free_port()
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "disp.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--no-worker",
        ],
        cwd=tmp,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    try:
        wait_for_server(proc, f"{url}/readyz", tmp / "serve.log", 90, "disp serve")
        made = disp("keys", "create", "--data-dir", str(data_dir), "--tenant", "cli", "--json")
        assert made.returncode == 0, made.stderr
        yield url, json.loads(made.stdout)["api_key"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_service_errors_are_one_line(served, tmp_path):
    url, key = served
    assert disp("jobs", "list", "--api-url", url, "--api-key", key).returncode == 0

    line = one_line_error(disp("jobs", "list", "--api-url", url, "--api-key", "disp_not-a-key"), 1, "401")
    assert "--api-key" in line and "(request req_" in line

    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("data.json", "[]")
    auth = ["--api-url", url, "--api-key", key]
    out = disp("jobs", "submit", "--dataset", str(tmp_path / "empty.zip"), "--checkpoint", "ckpt_x", *auth)
    one_line_error(out, 1, "422", "empty_dataset", "no records")

    one_line_error(disp("jobs", "watch", "job_nope", *auth), 1, "404", "job_nope")

    one_line_error(disp("jobs", "list", "--api-url", url), 2, "API key", "DISP_API_KEY")

    one_line_error(disp("jobs", "list", "--api-url", "127.0.0.1:1", "--api-key", key), 1, "http://")

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there; the client retries, then gives up
    one_line_error(
        disp("jobs", "list", "--api-url", closed, "--api-key", key), 1, f"cannot reach {closed}", "refused"
    )


def test_the_client_installs_and_runs_without_torch(served, tmp_path):
    """The wheel with only the client extra in a fresh venv (no system site-packages; dependencies from the
    configured index): `disp --help`, `disp jobs list` and `api.client` work, torch is absent, and a model
    command names the extra it needs."""
    url, key = served
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("disp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"{wheel}[client]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    outside = tmp_path / "elsewhere"  # no source tree on the path: the installed package runs
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=outside, env=env, capture_output=True, text=True, timeout=120)

    assert run(str(python), "-c", "import torch").returncode != 0  # torch is not installed
    helped = run(str(venv / "bin" / "disp"), "--help")
    assert helped.returncode == 0 and "jobs" in helped.stdout, helped.stderr
    listed = run(str(venv / "bin" / "disp"), "jobs", "list", "--api-url", url, "--api-key", key)
    assert listed.returncode == 0, listed.stderr
    code = (
        "import sys, api.client\n"
        f"c = api.client.DispClient({url!r}, {key!r})\n"
        "print(len(list(c.list_jobs())), c.models(), api.client.__file__, 'torch' in sys.modules)"
    )
    called = run(str(python), "-c", code)
    assert called.returncode == 0, called.stderr
    assert called.stdout.split()[:2] == ["0", "[]"] and str(venv) in called.stdout
    assert called.stdout.split()[-1] == "False"
    refused = run(str(venv / "bin" / "disp"), "defend", "--checkpoint", "m", "--data", "d.json", "--out", "o")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "disp defend: error: this command needs torch, which is not installed: pip install 'disp[torch]'"
    )
