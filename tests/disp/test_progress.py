"""disp.progress: plain periodic lines with the remaining time where output is not a terminal, a tqdm bar
with the remaining time on a terminal."""

from __future__ import annotations

import io

from disp import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_remaining_reads_as_a_duration():
    assert [progress.remaining(s) for s in (0, 45.4, 185, 7620, None, -1)] == [
        "0s",
        "45s",
        "3m05s",
        "2h07m",
        "?",
        "?",
    ]


def test_plain_lines_off_a_terminal(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    update = progress.stage_bars(file=out, interval=10)
    for done in range(0, 41):  # one item a second
        update("scoring", done, 40)
        clock[0] += 1
    update("purifying", 0, 4)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "scoring 0/40 (0%)"  # no rate yet: no estimate
    assert lines[1] == "scoring 10/40 (25%), 30s left"  # 10 s later: every 10 s, the remaining time
    assert lines[-2] == "scoring 40/40 (100%)" and lines[-1] == "purifying 0/4 (0%)"
    assert len(lines) == 6  # scoring at 0, 10, 20, 30 s and at its end (one every 10 s at most), purifying


def test_a_terminal_gets_a_tqdm_bar_with_the_remaining_time():
    import time

    out = Terminal()
    update = progress.bar("scoring", file=out)
    for done in range(0, 5):
        update(done, 4)
        time.sleep(0.12)  # tqdm redraws at most every 0.1 s
    text = out.getvalue()
    assert "\r" in text and "scoring" in text and "4/4" in text
    assert "2/4 [00:00<00:00" in text  # tqdm's [elapsed<remaining] once it has a rate
