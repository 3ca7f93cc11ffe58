"""`advance_job` called directly (no broker, no GPU): SQLite, local storage, dispatch recorded. Resumes at
the first stage whose output is missing; duplicate calls never redo work or repeat a transition."""

from __future__ import annotations

import json

import pytest

from api.db.models import Checkpoint, Dataset, Job, JobStatus, StageProgress, Tenant
from api.db.session import session_scope
from api.storage import LocalStorage
from worker import keys, orchestrate


@pytest.fixture
def env(tmp_path, monkeypatch):
    from api.migrate import upgrade
    from worker.config import WorkerSettings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = WorkerSettings(
        _env_file=None,
        environment="test",
        database_url=url,
        broker_url="memory://",
        work_dir=tmp_path / "work",
        visibility_timeout_s=60,
        task_time_limit_s=30,
    )
    calls: list[tuple] = []
    monkeypatch.setattr(
        orchestrate,
        "_dispatch",
        lambda app, s, job, stage, shards=None: calls.append(("dispatch", stage, shards)),
    )

    class Sig:
        def __init__(self, task, kwargs):
            self.task, self.kwargs = task, kwargs

        def apply_async(self, **options):
            calls.append(("send", self.task, options.get("countdown")))

    monkeypatch.setattr(orchestrate, "_sig", lambda app, s, task, **kw: Sig(task, kw))
    with session_scope(url) as session:
        tenant = Tenant(name="t", webhook_secret="whsec_x")
        session.add(tenant)
        session.flush()
        ds = Dataset(
            tenant_id=tenant.id,
            name="d",
            archive_format="zip",
            storage_key="k",
            bytes=1,
            sha256="0",
            num_records=8,
            status="ready",
        )
        ck = Checkpoint(
            tenant_id=tenant.id,
            name="c",
            kind="full",
            archive_format="tar",
            storage_key="k",
            bytes=1,
            sha256="0",
            status="ready",
        )
        session.add_all([ds, ck])
        session.flush()
        job = Job(
            tenant_id=tenant.id,
            dataset_id=ds.id,
            checkpoint_id=ck.id,
            settings={"defense": "disp"},
            status=JobStatus.queued,
            num_shards=2,
        )
        session.add(job)
    return settings, LocalStorage(tmp_path / "store"), job.id, calls


def status(settings, job_id):
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def test_advance_walks_the_stages_and_tolerates_duplicates(env):
    settings, storage, job_id, calls = env
    orchestrate.advance(None, settings, storage, job_id)
    orchestrate.advance(None, settings, storage, job_id)  # duplicate: already scoring, nothing redone
    assert status(settings, job_id).status == "scoring"
    assert calls == [("dispatch", "scoring", None)]
    job = status(settings, job_id)
    storage.put_bytes(
        keys.shard(job, "scoring", 0), json.dumps({"config": {}, "saliency": {"s0": [1.0]}}).encode()
    )
    calls.clear()
    orchestrate.advance(None, settings, storage, job_id)  # shard 0 done, shard 1 still running: wait for it
    assert calls == [] and status(settings, job_id).status == "scoring"
    storage.put_bytes(
        keys.shard(job, "scoring", 1), json.dumps({"config": {}, "saliency": {"s1": [2.0]}}).encode()
    )
    calls.clear()
    orchestrate.advance(None, settings, storage, job_id)
    assert status(settings, job_id).status == "purifying" and calls == [("dispatch", "purifying", None)]
    merged = json.loads(storage.read_bytes(keys.output(job, "saliency.json")))
    assert merged["saliency"] == {"s0": [1.0], "s1": [2.0]}


def test_finishing_registers_artifacts_once(env):
    settings, storage, job_id, calls = env
    with session_scope(settings.database_url) as session:
        session.get(Job, job_id).status = JobStatus.evaluating
        session.add(StageProgress(job_id=job_id, stage="evaluating", shard=0, done=1, total=1))
    job = status(settings, job_id)
    storage.put_bytes(keys.output(job, "projector.safetensors"), b"weights")
    storage.put_bytes(keys.output(job, "purified.json"), b"[]")
    storage.put_bytes(
        keys.output(job, "report.json"), json.dumps({"summary": {"answers_changed": 3}}).encode()
    )
    orchestrate.advance(None, settings, storage, job_id)
    orchestrate.advance(None, settings, storage, job_id)
    job = status(settings, job_id)
    assert job.status == "succeeded" and job.metrics == {"answers_changed": 3}
    with session_scope(settings.database_url) as session:
        from api.db.models import Artifact, JobEvent

        kinds = sorted(a.kind for a in session.query(Artifact).filter_by(job_id=job_id))
        events = [e.data["status"] for e in session.query(JobEvent).filter_by(job_id=job_id, type="status")]
    assert kinds == ["projector", "purified_dataset", "report"] and events == ["succeeded"]


def test_cancel_requested_and_terminal_jobs(env):
    settings, storage, job_id, calls = env
    with session_scope(settings.database_url) as session:
        session.get(Job, job_id).cancel_requested = True
    orchestrate.advance(None, settings, storage, job_id)
    assert status(settings, job_id).status == "cancelled" and calls == []
    orchestrate.advance(None, settings, storage, job_id)
    assert calls == []


def test_resume_after_restart_redispatches_missing_work_at_once(env):
    settings, storage, job_id, calls = env
    orchestrate.advance(None, settings, storage, job_id)
    job = status(settings, job_id)
    storage.put_bytes(
        keys.shard(job, "scoring", 1), json.dumps({"config": {}, "saliency": {"s1": [1.0]}}).encode()
    )
    calls.clear()
    orchestrate.advance(None, settings, storage, job_id, resume=True)
    assert calls == [("dispatch", "scoring", [0])]


def test_stage_lease_admits_one_holder_until_it_stops_renewing(env):
    """A second worker cannot take a live lease; it can once the holder stops renewing for `ttl`; the old
    holder then finds its lease lost (and would stop at its next batch)."""
    import time

    from api.db.models import JobEvent
    from api.db.models import StageLease as LeaseRow
    from worker.lease import LeaseHeld, StageLease

    settings, _, job_id, _ = env
    first = StageLease(settings.database_url, job_id, "scoring", 0, ttl=0.6)
    assert first.acquire() == 1
    second = StageLease(settings.database_url, job_id, "scoring", 0, ttl=0.6)
    with pytest.raises(LeaseHeld) as held:
        second.acquire()
    assert held.value.holder == first.holder and 0 < held.value.wait <= 0.6
    time.sleep(0.9)  # first renews every ttl/3: still held
    with pytest.raises(LeaseHeld):
        second.acquire()
    other_shard = StageLease(settings.database_url, job_id, "scoring", 1, ttl=0.6)
    assert other_shard.acquire() == 1  # shards are independent
    other_shard.release()
    first._stop.set()  # the holder dies: no more renewals
    first._thread.join()
    time.sleep(0.7)
    assert second.acquire() == 2
    assert not first.renew() and first.lost
    first.release()  # a lost lease is not released over the new holder
    with session_scope(settings.database_url) as session:
        row = session.get(LeaseRow, (job_id, "scoring", 0))
        assert row.holder == second.holder and row.runs == 2
        resumed = [e for e in session.query(JobEvent).filter_by(job_id=job_id) if e.type == "message"]
    assert [e.data["start"] for e in resumed] == [2]
    second.release()
    third = StageLease(settings.database_url, job_id, "scoring", 0, ttl=0.6)
    assert third.acquire() == 3  # a released lease is free at once
    third.release()


def test_finished_stages_leave_their_metrics_epoch_losses_and_report_warnings_as_events(env):
    from api.db.models import JobEvent

    settings, storage, job_id, calls = env
    with session_scope(settings.database_url) as session:
        session.get(Job, job_id).status = JobStatus.finetuning
    job = status(settings, job_id)
    storage.put_bytes(keys.output(job, "projector.safetensors"), b"weights")
    stored = {"num_train": 8, "steps": 4, "epoch_losses": [0.9, 0.5, 0.25]}
    storage.put_bytes(keys.metrics(job, "finetuning", 0), json.dumps(stored).encode())
    orchestrate.advance(None, settings, storage, job_id)
    orchestrate.advance(None, settings, storage, job_id)  # duplicate: no second set of events
    assert status(settings, job_id).status == "evaluating"
    warning = "11 of 12 samples (92%) have a saturated first denoising step ..."
    report = {"summary": {"suspected": 3, "residual_backdoor_rate": 0.5}, "warnings": [warning]}
    storage.put_bytes(keys.output(job, "report.json"), json.dumps(report).encode())
    orchestrate.advance(None, settings, storage, job_id)
    with session_scope(settings.database_url) as session:
        events = [
            (e.type, e.level, e.data)
            for e in session.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)
        ]
    epochs = [d for t, _, d in events if t == "metrics" and "epoch" in d]
    assert [(d["epoch"], d["epochs"], d["loss"]) for d in epochs] == [(1, 3, 0.9), (2, 3, 0.5), (3, 3, 0.25)]
    stage_metrics = {d["stage"]: d["metrics"] for t, _, d in events if t == "metrics" and "metrics" in d}
    assert stage_metrics == {"finetuning": stored, "evaluating": report["summary"]}
    assert [(lvl, d["stage"]) for t, lvl, d in events if t == "message"] == [("warn", "evaluating")]
    statuses = [d["status"] for t, _, d in events if t == "status"]
    assert statuses == ["evaluating", "succeeded"]
    # the epochs come before the status event of the transition they belong to
    order = [t if t == "status" else "epoch" if "epoch" in d else t for t, _, d in events]
    assert order[:5] == ["epoch", "epoch", "epoch", "metrics", "status"]
