"""The README's main command through the service: start `disp serve` (embedded: SQLite, local files,
filesystem broker), upload a poisoned dataset and a backdoored projector (over the registered base), run a DiSP job with a
progress bar, download the purified projector, and print CP and ASR before and after.

`disp.demo.prepare_inputs` builds the poisoned SHAPES data and the backdoored projector, and
`disp.demo.evaluate_projectors` scores projectors; both run in this (client) process, the service is a
separate one. The job's settings are `DemoInputs.defense` (the reproduction's), sent as the API's JSON.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

from api.client import DispClient, show_progress
from api.embedded import ROOT


def zip_dataset(poisoned_dir: Path, archive: Path) -> Path:
    """The poisoned LLaVA JSON and images as one zip (the manifest stays out: it is ground truth)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(poisoned_dir.rglob("*")):
            if f.is_file() and f.name != "manifest.json":
                zf.write(f, f.relative_to(poisoned_dir))
    return archive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(data_dir: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", *args, "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def start_service(data_dir: Path, port: int) -> subprocess.Popen:
    """`disp serve` as a child process; returns once /readyz answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / "serve.log", "ab"),
    )  # noqa: SIM115
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(
                f"disp serve exited with {proc.returncode}; see {data_dir.parent / 'serve.log'}"
            )
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError("disp serve did not become ready")


def run_demo(workdir: str | Path, *, quick: bool = True, n_asr: int | None = None, n_cp: int | None = None,
             port: int | None = None) -> dict:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from dataclasses import asdict

    from disp.demo import evaluate_projectors, prepare_inputs, print_table

    inputs = prepare_inputs(workdir, quick=quick, n_asr=n_asr, n_cp=n_cp)
    dataset_zip = zip_dataset(inputs.poisoned_dir, workdir / "poisoned.zip")
    data_dir, port = workdir / "service", port or _free_port()
    data_dir.mkdir(exist_ok=True)
    service = start_service(data_dir, port)
    try:
        key = json.loads(_admin(data_dir, "keys", "create", "--tenant", "demo", "--json"))["api_key"]
        _admin(data_dir, "models", "register", "--name", "demo-base", "--dir", str(inputs.model_dir))
        settings = asdict(inputs.defense)
        with DispClient(f"http://127.0.0.1:{port}", key) as client:
            dataset = client.wait_ready("dataset", client.upload_dataset(dataset_zip)["id"])
            projector = client.upload_checkpoint(inputs.cell.backdoored, kind="projector", base_model="demo-base")
            client.wait_ready("checkpoint", projector["id"])
            job = client.create_job(dataset_id=dataset["id"], checkpoint_id=projector["id"], settings=settings)
            print(f"job {job['id']}: {dataset['num_records']} records")
            job = client.watch(job["id"], on_update=show_progress())
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
            files = client.download_job(job["id"], workdir / "downloaded")
    finally:
        service.terminate()
        service.wait(60)
    rows = evaluate_projectors(inputs, {"backdoored": inputs.cell.backdoored, "DiSP (service)": files["projector"]})
    print_table(rows)
    print(f"total {time.perf_counter() - t0:.1f}s; artifacts in {workdir / 'downloaded'}")
    return {"rows": rows, "job": job, "files": {k: str(v) for k, v in files.items()}}


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "./disp-demo")
