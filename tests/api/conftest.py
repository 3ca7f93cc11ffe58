"""Service fixtures (real Postgres, Redis, moto S3) for the API tests; no worker consumes their queues."""

import pytest

from tests.service_conftest import *  # noqa: F403
from tests.service_conftest import RUN


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    return f"t{RUN}-api-"
