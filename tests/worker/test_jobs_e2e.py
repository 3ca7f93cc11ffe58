"""Whole jobs through the API and a real Celery worker on the tiny checkpoint: the happy path (weights
downloaded, loaded and defending; signed webhooks with a retry) and cancel. Workers killed mid-stage:
test_faults.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import httpx
import pytest

from tests.service_conftest import WebhookReceiver, dataset_archive, new_tenant, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]

SETTINGS = {
    "saliency": {"method": "fisher", "probes": 1, "batch_size": 4},
    "purify": {"batch_size": 4, "sampler": {"gen_length": 8, "block_length": 8, "steps": 8}},
    "finetune": {"epochs": 16, "batch_size": 2},
}
LIFECYCLE = ["validating", "queued", "scoring", "purifying", "finetuning", "evaluating", "succeeded"]


def submit(client, tenant, inputs, settings=SETTINGS, **extra):
    body = {
        "dataset_id": inputs[0],
        "checkpoint_id": inputs[1],
        "settings": settings,
        "shard_size": 4,
        **extra,
    }
    response = client.post("/v1/jobs", headers=tenant, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def poll(client, tenant, job_id, until, timeout=300, worker=None):
    def check():
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant).json()
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker died:\n{worker.tail()}")
        return job if until(job) else None

    try:
        return wait_for(check, timeout, message=f"job {job_id}")
    except AssertionError:
        if worker is not None:
            print(worker.tail(80))
        raise


def statuses(client, tenant, job_id) -> list[str]:
    events = client.get(f"/v1/jobs/{job_id}/events?limit=100", headers=tenant).json()["data"]
    return [e["data"]["status"] for e in events if e["type"] == "status"]


def download(client, tenant, artifact_id, via_url: bool) -> bytes:
    meta = client.get(f"/v1/artifacts/{artifact_id}", headers=tenant).json()
    if via_url:
        return httpx.get(meta["download_url"]).content
    response = client.get(f"/v1/artifacts/{artifact_id}/content", headers=tenant)
    assert response.headers["x-checksum-sha256"] == meta["sha256"]
    return response.content


@pytest.fixture(scope="module")
def reference(client, tenant, inputs, celery_worker):
    """One uninterrupted job, with a webhook receiver."""
    receiver = WebhookReceiver(fail_first=True)
    job_id = submit(client, tenant, inputs, webhook_url=receiver.url)
    job = poll(
        client,
        tenant,
        job_id,
        lambda j: j["status"] in ("succeeded", "failed", "cancelled", "failed_validation"),
        worker=celery_worker,
    )
    yield job, receiver
    receiver.server.shutdown()


def test_happy_path(client, tenant, reference, tiny_dir, tmp_path, pg_url):
    job, receiver = reference
    assert job["status"] == "succeeded", job
    assert statuses(client, tenant, job["id"]) == LIFECYCLE
    assert job["metrics"]["num_samples"] == 8 and job["metrics"]["finetune_steps"] > 0
    assert job["progress"] == {"stage": "evaluating", "done": 1, "total": 1} and job["finished_at"]
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenant).json()["data"]
    assert sorted(a["kind"] for a in artifacts) == ["projector", "purified_dataset", "report", "saliency"]
    assert sorted(job["artifact_ids"]) == sorted(a["id"] for a in artifacts)
    by_kind = {a["kind"]: a for a in artifacts}
    projector = download(client, tenant, by_kind["projector"]["id"], via_url=True)
    assert projector == download(client, tenant, by_kind["projector"]["id"], via_url=False)
    assert hashlib.sha256(projector).hexdigest() == by_kind["projector"]["sha256"]
    purified = json.loads(download(client, tenant, by_kind["purified_dataset"]["id"], via_url=True))
    assert len(purified) == 8 and all("disp" in r for r in purified)
    report = json.loads(download(client, tenant, by_kind["report"]["id"], via_url=False))
    other = new_tenant(pg_url)  # another tenant's artifact ids are unknown ids
    for path in (
        f"/v1/artifacts/{by_kind['projector']['id']}",
        f"/v1/artifacts/{by_kind['projector']['id']}/content",
    ):
        assert client.get(path, headers=other).status_code == 404
    assert report["summary"] == job["metrics"]

    # the downloaded projector loads over the base checkpoint, differs from it, and answers
    import torch

    from disp import models
    from disp.config import SamplerConfig
    from disp.data import load_samples, open_image_source
    from disp.evaluation import answer_all

    path = tmp_path / "projector.safetensors"
    path.write_bytes(projector)
    base, defended = models.load(tiny_dir), models.load(tiny_dir, projector=path)
    changed = [
        k
        for k, v in defended.projector_state_dict().items()
        if not torch.equal(v, base.projector_state_dict()[k])
    ]
    assert changed
    (tmp_path / "data.json").write_text(json.dumps(purified[:2]))
    archive = dataset_archive(tmp_path / "imgs.zip", n=2)
    answers = answer_all(
        defended,
        load_samples(tmp_path / "data.json"),
        open_image_source(archive),
        SamplerConfig(gen_length=8, block_length=8, steps=8),
    )
    assert len(answers) == 2

    # webhooks: signed over id.timestamp.body, one per transition after validating, retried once
    wait_for(lambda: "job.succeeded" in receiver.types(), 30, message="the succeeded webhook")
    secret = client.get("/v1/tenant", headers=tenant).json()["webhook_secret"]
    from api.webhooks import WebhookVerificationError, verify

    for headers, body in receiver.requests:
        verify(secret, body, headers)
        key = base64.b64decode(secret.removeprefix("whsec_"))
        mac = hmac.new(
            key, f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body, hashlib.sha256
        ).digest()
        assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
        with pytest.raises(WebhookVerificationError):
            verify(secret, body + b" ", headers)
        with pytest.raises(WebhookVerificationError):
            verify(secret, body, headers, now=int(headers["webhook-timestamp"]) + 301)
    assert sorted(receiver.types()) == sorted(["job.stage_changed"] * 5 + ["job.succeeded"])
    final = next(json.loads(b) for _, b in receiver.requests if json.loads(b)["type"] == "job.succeeded")
    assert final["data"]["artifact_ids"] == sorted(job["artifact_ids"])
    assert final["data"]["metrics"] == job["metrics"] and final["data"]["stage"] == "evaluating"
    from sqlalchemy import func, select

    from api.db.models import WebhookDelivery
    from api.db.session import session_scope

    with session_scope(pg_url) as session:
        attempts = session.scalar(
            select(func.max(WebhookDelivery.attempts)).where(WebhookDelivery.job_id == job["id"])
        )
    assert attempts == 2


def test_cancel_is_cooperative(client, tenant, inputs, celery_worker):
    slow = {**SETTINGS, "finetune": {"epochs": 400, "batch_size": 2}}
    job_id = submit(client, tenant, inputs, settings=slow)
    poll(
        client,
        tenant,
        job_id,
        lambda j: j["status"] == "finetuning" and j["progress"]["done"] > 0,
        worker=celery_worker,
    )
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant)
    assert response.status_code == 200 and response.json()["cancel_requested"]
    job = poll(client, tenant, job_id, lambda j: j["status"] == "cancelled", timeout=30, worker=celery_worker)
    assert job["progress"]["done"] < job["progress"]["total"] and job["artifact_ids"] == []
    assert statuses(client, tenant, job_id)[-1] == "cancelled"
