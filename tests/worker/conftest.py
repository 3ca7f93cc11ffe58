"""Service fixtures plus a real Celery worker subprocess for the worker tests."""

from __future__ import annotations

import pytest

from tests.service_conftest import *  # noqa: F403
from tests.service_conftest import RUN, WorkerProcess, _once


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    return f"t{RUN}-w-"


@pytest.fixture(scope="session")
def celery_worker(service_env, tmp_path_factory, request) -> WorkerProcess:
    def make():
        proc = WorkerProcess(service_env, tmp_path_factory.mktemp("logs") / "worker.log").start()
        return proc, proc.stop

    return _once("worker", request, make)
