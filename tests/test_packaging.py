"""What a user installs: the wheel holds the product (disp, api, worker) and the one base checkpoint the demo
needs; the lab (experiments/) and its checkpoints stay in the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_product_and_one_checkpoint(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("disp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"disp", "api", "worker"}
    checkpoints = {n.rsplit("/", 1)[0] for n in names if n.endswith("model.safetensors")}
    assert checkpoints == {"disp/assets/shapes-base"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[disp.commands]" in text and "api.cli:add_commands" in text


@pytest.mark.slow
@pytest.mark.services
def test_installed_wheel_migrates_and_serves_outside_the_source_tree(tmp_path):
    """The wheel in a fresh venv (dependencies from this venv's site-packages through a .pth, nothing
    downloaded), run from a directory with no source tree: migrations apply to PostgreSQL and SQLite, and
    `disp serve` answers its readiness check."""
    import site
    import socket
    import time
    import uuid

    import httpx
    from sqlalchemy import create_engine, inspect, text

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("disp-*.whl")
    assert "api/migrations/env.py" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # a plain path, not a site dir: this venv's editable-install hook (.pth) is not run, so the wheel is used
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}

    where = subprocess.run([python, "-c", "import api, disp; print(api.__file__, disp.__file__)"], cwd=outside,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert str(ROOT) not in where and purelib in where

    db = f"disp_wheel_{uuid.uuid4().hex[:8]}"
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    try:
        subprocess.run([python, "-c", f"from api.migrate import upgrade; upgrade({url!r})"], cwd=outside, env=env,
                       check=True, capture_output=True)
        engine = create_engine(url)
        assert {"jobs", "alembic_version"} <= set(inspect(engine).get_table_names())
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([venv / "bin" / "disp", "serve", "--data-dir", str(outside / "data"), "--port",
                             str(port), "--no-worker"], cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
