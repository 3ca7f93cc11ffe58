"""Adapts disp's `on_progress(done, total)` and `should_stop()` callbacks to the jobs tables."""

from __future__ import annotations

import time

from api import jobstate
from api.db.models import TERMINAL, Job
from api.db.session import session_scope


class StageReporter:
    """Progress rows for one shard of one stage, written at most every `interval` seconds, and a
    cancel check that reads the job row at most every `poll` seconds."""

    def __init__(
        self,
        database_url: str,
        job_id: str,
        stage: str,
        shard: int = 0,
        *,
        interval: float = 1.0,
        poll: float = 1.0,
    ) -> None:
        self.url, self.job_id, self.stage, self.shard = database_url, job_id, stage, shard
        self.interval, self.poll = interval, poll
        self._last_write = 0.0
        self._last_poll = 0.0
        self._stop = False
        self.lease = None  # a `worker.lease.StageLease`: a lost lease stops the stage too

    def on_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_write < self.interval:
            return
        self._last_write = now
        with session_scope(self.url) as session:
            jobstate.set_progress(session, self.job_id, self.stage, self.shard, done, total)

    def should_stop(self) -> bool:
        if self.lease is not None and self.lease.lost:
            return True
        now = time.monotonic()
        if not self._stop and now - self._last_poll >= self.poll:
            self._last_poll = now
            with session_scope(self.url) as session:
                job = session.get(Job, self.job_id)
                self._stop = job is None or job.cancel_requested or job.status in TERMINAL
        return self._stop
