"""A job's statuses, in order: validating, queued, the stages of `disp.stages` (its defense's plan), then the
final ones. Plain strings, so the client and the CLI read them without the database layer."""

from __future__ import annotations

from disp.stages import STAGES

FINAL = ("succeeded", "failed_validation", "failed", "cancelled")
JOB_STATUSES = ("validating", "queued", *STAGES, *FINAL)
