"""Service fixtures plus a real Celery worker subprocess for the worker tests."""

from __future__ import annotations

import pytest

from tests.service_conftest import *  # noqa: F403
from tests.service_conftest import RUN, WorkerProcess, _once, checkpoint_archive, dataset_archive, new_tenant


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    return f"t{RUN}-w-"


@pytest.fixture(scope="session")
def celery_worker(service_env, tmp_path_factory, request) -> WorkerProcess:
    def make():
        proc = WorkerProcess(service_env, tmp_path_factory.mktemp("logs") / "worker.log").start()
        return proc, proc.stop

    return _once("worker", request, make)


@pytest.fixture(scope="module")
def tenant(pg_url):
    """A tenant per test module."""
    return new_tenant(pg_url)


@pytest.fixture(scope="module")
def inputs(client, tenant, tmp_path_factory, tiny_dir):
    """The tiny job's dataset (8 records, 2 poisoned) and the tiny checkpoint, uploaded."""
    tmp = tmp_path_factory.mktemp("e2e")
    archive = dataset_archive(tmp / "ds.zip", n=8, poisoned=2)
    dataset = client.post(
        "/v1/datasets", headers=tenant, files={"file": ("ds.zip", archive.read_bytes())}
    ).json()
    ck = checkpoint_archive(tiny_dir, tmp / "ck.tar")
    checkpoint = client.post(
        "/v1/checkpoints", headers=tenant, files={"file": ("ck.tar", ck.read_bytes())}
    ).json()
    return dataset["id"], checkpoint["id"]
