"""How `disp jobs watch` shows a job: a line per status, the stage's progress with the time left (not a clock
time), and no carriage returns when the output is not a terminal."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from api.client import progress_line, seconds_left, show_progress


def job(status: str, done: int = 0, total: int = 0, eta: datetime | None = None) -> dict:
    stage = status if status in ("scoring", "purifying") else None
    return {
        "id": "job_1",
        "status": status,
        "stage": stage,
        "progress": {"stage": stage, "done": done, "total": total},
        "eta": eta.isoformat() if eta else None,
    }


def test_progress_line_gives_the_time_left():
    now = datetime.now(UTC)
    assert progress_line(job("scoring", 12, 40, now + timedelta(seconds=80, milliseconds=400))) in (
        "scoring 12/40 (30%), 1m20s left",
        "scoring 12/40 (30%), 1m19s left",
    )
    assert progress_line(job("queued")) == "queued 0/0"
    assert seconds_left(job("scoring", eta=now - timedelta(seconds=5))) == 0.0
    naive = {"eta": (now + timedelta(hours=2)).replace(tzinfo=None).isoformat()}  # a UTC time without zone
    assert 7190 < seconds_left(naive) <= 7200


def test_watch_output_off_a_terminal_is_plain_lines():
    out = io.StringIO()
    show = show_progress(out)
    for update in [
        job("validating"),
        job("queued"),
        job("queued"),
        job("scoring", 0, 4),
        job("scoring", 4, 4),
        job("purifying", 0, 4),
        job("purifying", 4, 4),
        job("succeeded"),
    ]:
        show(update)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "job_1: validating",
        "job_1: queued",
        "scoring 0/4 (0%)",
        "scoring 4/4 (100%)",
        "purifying 0/4 (0%)",
        "purifying 4/4 (100%)",
        "job_1: succeeded",
    ]
