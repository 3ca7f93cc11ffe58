"""A lease per running stage shard, so no stage (shard) ever runs twice at once.

The broker redelivers a stage's message when the worker's connection drops (RabbitMQ: at once when the
process dies), and may deliver a duplicate while the first run is alive (a network blip). Only the holder of
the shard's lease runs it: the lease is a row (`stage_leases`) with a holder and an expiry, renewed by a
thread every `ttl / 3` while the stage runs. A killed worker stops renewing, so another worker takes the
lease at most `ttl` seconds later and resumes. A holder that finds its lease taken (it was frozen longer
than `ttl`) stops at its next batch without writing anything."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api import jobstate
from api.db.models import StageLease as LeaseRow
from api.db.models import as_utc, utcnow
from api.db.session import session_scope

log = logging.getLogger(__name__)


def holder_name() -> str:
    """Host, process and a random part: a restarted process (same pid in a container) is a new holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LeaseHeld(Exception):
    """Another live worker holds the lease; try again in `wait` seconds."""

    def __init__(self, holder: str, wait: float) -> None:
        super().__init__(f"held by {holder} for {wait:.1f} s more")
        self.holder, self.wait = holder, wait


class StageLease:
    def __init__(self, database_url: str, job_id: str, stage: str, shard: int, *, ttl: float) -> None:
        self.url, self.key, self.ttl = database_url, (job_id, stage, shard), ttl
        self.holder = holder_name()
        self.runs = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> int:
        """Take the lease (free, expired, or new) and return how many times the shard has been started;
        raise `LeaseHeld` while another holder's lease runs."""
        now = utcnow()
        until = now + timedelta(seconds=self.ttl)
        job_id, stage, shard = self.key
        with session_scope(self.url) as session:
            session.add(
                LeaseRow(
                    job_id=job_id,
                    stage=stage,
                    shard=shard,
                    holder=self.holder,
                    expires_at=until,
                    acquired_at=now,
                    runs=1,
                )
            )
            try:
                session.flush()
                self.runs = 1
                return self._started(session)
            except IntegrityError:
                session.rollback()
            taken = session.execute(
                update(LeaseRow)
                .where(*self._where(), LeaseRow.expires_at < now)
                .values(holder=self.holder, expires_at=until, acquired_at=now, runs=LeaseRow.runs + 1)
                .execution_options(synchronize_session=False)
            ).rowcount
            row = session.execute(select(LeaseRow).where(*self._where())).scalar_one()
            if taken != 1:
                raise LeaseHeld(row.holder or "?", max(0.0, (as_utc(row.expires_at) - now).total_seconds()))
            self.runs = row.runs
            return self._started(session)

    def _started(self, session) -> int:
        job_id, stage, shard = self.key
        if self.runs > 1:  # a resumption: tell the job's owner
            jobstate.add_event(
                session,
                job_id,
                type="message",
                level="warn",
                message=f"{stage} shard {shard} resumed on another worker (start {self.runs})",
                data={"stage": stage, "shard": shard, "start": self.runs, "worker": self.holder},
            )
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{stage}-{shard}", daemon=True)
        self._thread.start()
        return self.runs

    def _where(self):
        job_id, stage, shard = self.key
        return LeaseRow.job_id == job_id, LeaseRow.stage == stage, LeaseRow.shard == shard

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) when another holder has it now. Database errors are
        logged and tried again at the next renewal (nobody else can take it while the database is down)."""
        try:
            with session_scope(self.url) as session:
                renewed = session.execute(
                    update(LeaseRow)
                    .where(*self._where(), LeaseRow.holder == self.holder)
                    .values(expires_at=utcnow() + timedelta(seconds=self.ttl))
                    .execution_options(synchronize_session=False)
                ).rowcount
        except Exception as exc:
            log.warning("lease %s: renewal failed (%s); retrying", self.key, exc)
            return True
        if renewed != 1:
            log.error("lease %s lost to another worker; this run stops at its next batch", self.key)
            self.lost = True
        return not self.lost

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

    def release(self) -> None:
        """Stop renewing and free the lease (a finished shard is recognised by its stored output)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            with session_scope(self.url) as session:
                session.execute(
                    update(LeaseRow)
                    .where(*self._where(), LeaseRow.holder == self.holder)
                    .values(holder=None, expires_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
        except Exception as exc:  # it expires by itself
            log.warning("lease %s: release failed (%s)", self.key, exc)
