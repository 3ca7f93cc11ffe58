"""A worker SIGKILLed in each running stage (scoring, purifying, finetuning) of one job, with the shipped
recovery settings (RabbitMQ redelivery, lease TTL, heartbeats): the job resumes on a fresh worker within 2
minutes of each kill, ends with the projector of an undisturbed run byte for byte, and no stage shard ever
ran beside another copy of itself. Prints each stage's resumption time (docs/operations.md quotes them)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.service_conftest import wait_for
from tests.worker.test_jobs_e2e import LIFECYCLE, poll, statuses, submit

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The e2e test's tiny job, with enough work per stage to kill a worker in the middle of each.
SETTINGS = {
    "saliency": {"method": "fisher", "probes": 48, "batch_size": 1},
    "purify": {"batch_size": 1, "sampler": {"gen_length": 16, "block_length": 16, "steps": 16}},
    "finetune": {"epochs": 24, "batch_size": 2},
}
KILLED = ("scoring", "purifying", "finetuning")
WITHIN_S = 120


def leases(pg_url, job_id):
    from api.db.models import StageLease
    from api.db.session import session_scope

    with session_scope(pg_url) as session:
        return {(r.stage, r.shard): r for r in session.query(StageLease).filter_by(job_id=job_id)}


def running(pg_url, job_id, stage) -> str | None:
    """The holder of a leased (started, unfinished) shard of `stage`, on its first run. A lease is held
    from the shard's start to its end, so a kill now lands inside the stage however fast the machine is
    (progress rows are throttled to DISP_PROGRESS_INTERVAL_S and may not appear before a short shard ends)."""
    for (s, _shard), r in sorted(leases(pg_url, job_id).items()):
        if s == stage and r.holder and r.runs == 1:
            return r.holder
    return None


def resumed_events(pg_url, job_id):
    from api.db.models import JobEvent
    from api.db.session import session_scope

    with session_scope(pg_url) as session:
        rows = session.query(JobEvent).filter_by(job_id=job_id, type="message").order_by(JobEvent.id)
        return [(e.data, e.created_at.timestamp()) for e in rows if "start" in (e.data or {})]


def test_sigkill_in_each_stage_resumes_within_two_minutes_with_the_same_projector(
    client, tenant, inputs, celery_worker, pg_url, capsys
):
    def finish(job_id):
        done = ("succeeded", "failed")
        return poll(client, tenant, job_id, lambda j: j["status"] in done, timeout=300, worker=celery_worker)

    reference = submit(client, tenant, inputs, settings=SETTINGS)
    assert finish(reference)["status"] == "succeeded"

    job_id = submit(client, tenant, inputs, settings=SETTINGS)
    kills: dict[str, tuple[float, str]] = {}
    for stage in KILLED:
        # the first progress row of a running shard; its lease names the worker process to kill
        holder = wait_for(lambda s=stage: running(pg_url, job_id, s), 300, 0.05, f"{stage} under way")
        assert int(holder.split(":")[1]) == celery_worker.proc.pid
        celery_worker.proc.send_signal(signal.SIGKILL)
        celery_worker.proc.wait(10)
        kills[stage] = (time.time(), holder)
        celery_worker.start()  # a fresh worker; RabbitMQ has requeued the message already

        def resumed(stage=stage):
            return next((t for d, t in resumed_events(pg_url, job_id) if d["stage"] == stage), None)

        wait_for(resumed, WITHIN_S, message=f"{stage} resumed")

    job = finish(job_id)
    assert job["status"] == "succeeded", job
    assert statuses(client, tenant, job_id) == LIFECYCLE  # each stage entered once, none redone

    # resumed on another worker, after the killed one was gone, within two minutes
    times = {}
    for data, at in resumed_events(pg_url, job_id):
        killed_at, killed_holder = kills[data["stage"]]
        assert data["worker"] != killed_holder and at > killed_at
        times[data["stage"]] = at - killed_at
    assert sorted(times) == sorted(KILLED) and max(times.values()) < WITHIN_S
    # every shard started once, the killed one twice: never two copies at once
    rows = leases(pg_url, job_id)
    for (stage, shard), row in rows.items():
        assert row.runs <= 2 and row.holder is None, (stage, shard, row.runs)
    assert {s for (s, _), r in rows.items() if r.runs == 2} == set(KILLED)

    def projector(jid):
        arts = client.get(f"/v1/jobs/{jid}/artifacts", headers=tenant).json()["data"]
        art = next(a for a in arts if a["kind"] == "projector")
        return art["sha256"], client.get(f"/v1/artifacts/{art['id']}/content", headers=tenant).content

    (ref_sha, ref_bytes), (sha, data) = projector(reference), projector(job_id)
    assert sha == ref_sha and data == ref_bytes
    with capsys.disabled():
        print(
            "\nSIGKILL -> resumed on a fresh worker (s): " + ", ".join(f"{s} {times[s]:.1f}" for s in KILLED)
        )
