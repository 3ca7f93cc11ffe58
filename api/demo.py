"""The README's main command through the service: start `disp serve` (embedded: SQLite, local files,
filesystem broker), upload a poisoned dataset and a backdoored projector adapter, run a DiSP job with a
progress bar, download the purified projector, and print CP and ASR before and after.

Hooks into `disp`: `prepare_inputs` builds the poisoned SHAPES data and the backdoored projector the
same way `disp.demo` does; `evaluate_projectors` scores projectors with `disp.evaluation.evaluate`.
Both run in this (client) process; the service itself is a separate process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.client import DispClient, progress_line
from api.embedded import ROOT


@dataclass
class DemoInputs:
    model_dir: Path  # the base checkpoint (registered as a base model)
    backdoored: Path  # projector adapter fine-tuned on the poisoned data
    dataset_zip: Path  # poisoned LLaVA JSON + images
    clean_json: Path  # held-out clean test set
    triggered_json: Path  # the same with the trigger
    target: str


def prepare_inputs(workdir: Path, *, quick: bool = True) -> DemoInputs:
    """Poisoned SHAPES data (content insertion, corner patch, 20%) and a backdoored projector."""
    from disp.attacks import TriggerConfig, poison_dataset, triggered_copy
    from disp.bench.shapes import ShapesConfig, write_dataset
    from disp.config import FinetuneConfig
    from disp.demo import BASE_CHECKPOINT
    from disp.models import load
    from disp.models.tiny import write_tiny_checkpoint
    from disp.pipeline import finetune_samples, load_dataset

    model_dir = BASE_CHECKPOINT if (BASE_CHECKPOINT / "config.json").is_file() else None
    if model_dir is None:
        model_dir = write_tiny_checkpoint(workdir / "tiny-checkpoint", seed=0)
        print(f"no committed base checkpoint: using a random tiny one at {model_dir}")
    sizes = {"train": 40, "val": 8, "test": 16} if quick else {"train": 400, "val": 40, "test": 200}
    paths = write_dataset(workdir / "shapes", ShapesConfig(), sizes=sizes, seed=0)
    samples, source = load_dataset(paths["train"], workdir / "shapes")
    test, test_source = load_dataset(paths["test"], workdir / "shapes")
    trigger = TriggerConfig(kind="corner", size_frac=0.25)
    poisoned = poison_dataset(
        samples, source, target="insertion", trigger=trigger, ratio=0.2, seed=0, out_dir=workdir / "poisoned"
    )
    clean_json = triggered_copy(test, test_source, None, workdir / "test_clean")
    triggered_json = triggered_copy(test, test_source, trigger, workdir / "test_triggered")
    psamples, psource = load_dataset(poisoned.data_path, workdir / "poisoned")
    finetune_samples(
        load(model_dir),
        psamples,
        psource,
        FinetuneConfig(epochs=3 if quick else 20, lr=1e-3, batch_size=8),
        workdir / "backdoored",
        run_key="demo",
    )
    archive = workdir / "poisoned.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((workdir / "poisoned").rglob("*")):
            if f.is_file() and f.name != "manifest.json":
                zf.write(f, f.relative_to(workdir / "poisoned"))
    print(f"poisoned {len(poisoned.poisoned_ids)} of {len(samples)} training samples")
    return DemoInputs(
        Path(model_dir),
        workdir / "backdoored" / "projector.safetensors",
        archive,
        clean_json,
        triggered_json,
        "insertion",
    )


def evaluate_projectors(inputs: DemoInputs, projectors: dict[str, Path], sampler: dict) -> dict[str, dict]:
    from disp.config import SamplerConfig
    from disp.evaluation import evaluate
    from disp.models import load
    from disp.pipeline import load_dataset

    clean, csrc = load_dataset(inputs.clean_json, inputs.clean_json.parent)
    trig, tsrc = load_dataset(inputs.triggered_json, inputs.triggered_json.parent)
    return {
        name: evaluate(
            load(inputs.model_dir, projector=path),
            target=inputs.target,
            clean=clean,
            clean_source=csrc,
            triggered=trig,
            triggered_source=tsrc,
            sampler=SamplerConfig(**sampler),
        ).to_dict()
        for name, path in projectors.items()
    }


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


def run_demo(workdir: str | Path, *, quick: bool = True, port: int | None = None) -> dict:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = prepare_inputs(workdir, quick=quick)
    data_dir, port = workdir / "service", port or _free_port()
    data_dir.mkdir(exist_ok=True)
    service = start_service(data_dir, port)
    try:
        key = json.loads(_admin(data_dir, "keys", "create", "--tenant", "demo", "--json"))["api_key"]
        _admin(data_dir, "models", "register", "--name", "demo-base", "--dir", str(inputs.model_dir))
        sampler = {"gen_length": 16, "block_length": 16, "steps": 16}
        settings = {
            "saliency": {"batch_size": 8},
            "purify": {"sampler": sampler},
            "finetune": {"epochs": 1 if quick else 4, "lr": 1e-3, "batch_size": 8},
        }
        with DispClient(f"http://127.0.0.1:{port}", key) as client:
            dataset = client.wait_ready("dataset", client.upload_dataset(inputs.dataset_zip)["id"])
            adapter = client.upload_checkpoint(inputs.backdoored, kind="adapter", base_model="demo-base")
            client.wait_ready("checkpoint", adapter["id"])
            job = client.create_job(dataset_id=dataset["id"], checkpoint_id=adapter["id"], settings=settings)
            print(f"job {job['id']}: {dataset['num_records']} records")
            job = client.watch(
                job["id"], on_update=lambda j: print("\r" + progress_line(j).ljust(90), end="", flush=True)
            )
            print()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
            files = client.download_job(job["id"], workdir / "downloaded")
    finally:
        service.terminate()
        service.wait(60)
    rows = evaluate_projectors(
        inputs, {"backdoored": inputs.backdoored, "DiSP (service)": files["projector"]}, sampler
    )
    print(f"{'model':<16}{'CP':>8}{'ASR w/o':>10}{'ASR w/t':>10}")
    for name, ev in rows.items():
        print(f"{name:<16}{100 * ev['cp']:>7.1f}%{100 * ev['asr_wo']:>9.1f}%{100 * ev['asr_wt']:>9.1f}%")
    print(f"total {time.perf_counter() - t0:.1f}s; artifacts in {workdir / 'downloaded'}")
    return {"rows": rows, "job": job, "files": {k: str(v) for k, v in files.items()}}


if __name__ == "__main__":
    run_demo(sys.argv[1] if len(sys.argv) > 1 else "./disp-demo")
