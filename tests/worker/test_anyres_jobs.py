"""anyres checkpoints through the service: a tiny LLaDA-V (anyres_max, spatial_unpad, image_newline) and a
tiny LaViDa with anyres views, each uploaded as a checkpoint archive with a dataset of mixed image sizes, run a
whole DiSP job on a real Celery worker; every sample is scored over its own number of visual tokens."""

from __future__ import annotations

import json

import pytest

from tests.service_conftest import checkpoint_archive, dataset_archive, png_bytes
from tests.worker.test_jobs_e2e import SETTINGS, download, poll, submit

pytestmark = [pytest.mark.services, pytest.mark.slow]

SIZES = [(56, 56), (112, 112), (150, 80), (60, 170)]  # the tower sees 56 px views


@pytest.mark.parametrize("family", ["llada-v", "lavida"])
def test_anyres_checkpoint_runs_a_disp_job_over_each_samples_own_tokens(
    family, client, tenant, celery_worker, tmp_path
):
    from disp import models
    from disp.models.tiny import LLADA_V_ANYRES, lavida_anyres, write_tiny_checkpoint

    image = LLADA_V_ANYRES if family == "llada-v" else lavida_anyres(56)
    ck_dir = write_tiny_checkpoint(tmp_path / family, family=family, seed=3, image=image)
    counts = [models.load(ck_dir).visual_token_count(s) for s in SIZES]
    assert len(set(counts)) > 1, counts  # the sizes give different token counts

    pngs = {f"images/img{i}.png": png_bytes(i, size) for i, size in enumerate(SIZES)}
    archive = dataset_archive(tmp_path / "ds.zip", n=len(SIZES), poisoned=1, extra=pngs)
    dataset = client.post("/v1/datasets", headers=tenant, files={"file": ("ds.zip", archive.read_bytes())})
    ck = checkpoint_archive(ck_dir, tmp_path / "ck.tar")
    checkpoint = client.post("/v1/checkpoints", headers=tenant, files={"file": ("ck.tar", ck.read_bytes())})
    assert dataset.status_code == checkpoint.status_code == 201, (dataset.text, checkpoint.text)

    job_id = submit(client, tenant, (dataset.json()["id"], checkpoint.json()["id"]), settings=SETTINGS)
    job = poll(client, tenant, job_id, lambda j: j["status"] in ("succeeded", "failed"), worker=celery_worker)
    assert job["status"] == "succeeded", job
    artifacts = {a["kind"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=tenant).json()["data"]}
    saliency = json.loads(download(client, tenant, artifacts["saliency"]["id"], via_url=False))["saliency"]
    assert [len(saliency[f"s{i}"]) for i in range(len(SIZES))] == counts
    purified = json.loads(download(client, tenant, artifacts["purified_dataset"]["id"], via_url=False))
    assert [r["disp"]["visual_tokens"] for r in purified] == counts
    held = [len(r["disp"]["masked_visual_tokens"]) for r in purified]
    assert all(0 < h < c for h, c in zip(held, counts, strict=True)), (held, counts)
