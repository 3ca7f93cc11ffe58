"""`disp serve` (SQLite, local files, filesystem broker, one worker) driven by the Python client: admin
commands, a base model and a projector laid over it, signed local part URLs, a sharded job, downloads."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.service_conftest import ROOT, dataset_archive, free_port, wait_for_server

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def served(tmp_path):
    data_dir, port = tmp_path / "svc", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "wb"),
    )  # noqa: SIM115

    wait_for_server(proc, f"http://127.0.0.1:{port}/readyz", tmp_path / "serve.log", 60, "disp serve")
    yield data_dir, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def test_embedded_service_runs_a_projector_job(served, tmp_path, tiny_dir, monkeypatch):
    from safetensors.torch import save_file

    import api.client
    from api.client import DispClient
    from disp import models

    data_dir, url = served
    key = json.loads(cli("keys", "create", "--data-dir", str(data_dir), "--tenant", "t1", "--json"))[
        "api_key"
    ]
    assert "registered tiny" in cli(
        "models", "register", "--data-dir", str(data_dir), "--name", "tiny", "--dir", str(tiny_dir)
    )
    projector = tmp_path / "projector.safetensors"
    save_file({k: v.contiguous() for k, v in models.load(tiny_dir).projector_state_dict().items()}, projector)
    monkeypatch.setattr(api.client, "SIMPLE_UPLOAD_LIMIT", 0)  # force presigned multipart (API-signed URLs)
    with DispClient(url, key) as client:
        assert [m["name"] for m in client.models()] == ["tiny"]
        dataset = client.upload_dataset(dataset_archive(tmp_path / "ds.tar", n=6, poisoned=2))
        checkpoint = client.upload_checkpoint(projector, kind="projector", base_model="tiny")
        assert client.wait_ready("dataset", dataset["id"])["num_images"] == 6
        client.wait_ready("checkpoint", checkpoint["id"])
        settings = {
            "saliency": {"method": "fisher", "probes": 1},
            "finetune": {"epochs": 1},
            "purify": {"sampler": {"gen_length": 8, "block_length": 8, "steps": 8}},
        }
        job = client.create_job(
            dataset_id=dataset["id"], checkpoint_id=checkpoint["id"], settings=settings, shard_size=3
        )
        seen = []
        job = client.watch(job["id"], on_update=lambda j: seen.append(j["status"]), interval=0.3, timeout=240)
        assert job["status"] == "succeeded", job
        assert seen[-1] == "succeeded"
        files = client.download_job(job["id"], tmp_path / "out")
    defended = models.load(tiny_dir, projector=files["projector"])
    assert defended.projector_state_dict().keys() == models.load(tiny_dir).projector_state_dict().keys()
    assert len(json.loads(files["purified_dataset"].read_text())) == 6
    assert json.loads(files["report"].read_text())["inputs"]["checkpoint"]["kind"] == "projector"
    env = {"DISP_API_URL": url, "DISP_API_KEY": key}
    watched = cli("jobs", "watch", job["id"], "--out", str(tmp_path / "cli-out"), env=env)
    assert '"answers_changed"' in watched and "projector: " in watched
    cli("jobs", "download", job["id"], "--out", str(tmp_path / "cli-dl"), env=env)
    assert (tmp_path / "cli-dl" / "projector.safetensors").read_bytes() == files["projector"].read_bytes()
    assert job["id"] in cli("jobs", "list", env=env)
    revoked = cli("keys", "list", "--data-dir", str(data_dir)).split()[0]
    cli("keys", "revoke", "--data-dir", str(data_dir), revoked)
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
