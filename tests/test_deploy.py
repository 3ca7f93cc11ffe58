"""docker-compose.yml and docker/ against the code: every DISP_* variable they set is a real setting, the
broker is RabbitMQ with a consumer timeout above any stage, the API runs as `api.serve`, and the
documented `models register --dir /models/...` has a /models volume on the api container."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_disp_variable_is_a_setting():
    from api.config import ApiSettings
    from worker.config import WorkerSettings

    known = {f"DISP_{name.upper()}" for name in {*ApiSettings.model_fields, *WorkerSettings.model_fields}}
    text = (ROOT / "docker-compose.yml").read_text() + "".join(
        p.read_text() for p in (ROOT / "docker").glob("*Dockerfile")
    )
    not_settings = {"DISP_MODELS_DIR", "DISP_API_URL", "DISP_API_KEY"}  # a host path; the client's variables
    used = set(re.findall(r"\b(DISP_[A-Z0-9_]+)\b", text)) - not_settings
    assert used and used <= known, sorted(used - known)


def test_broker_workers_and_models_volume():
    services = compose()["services"]
    env = services["api"]["environment"]
    assert env["DISP_BROKER_URL"].startswith("amqp://") and "rabbitmq" in services
    conf = (ROOT / "docker" / "rabbitmq.conf").read_text()
    timeout_ms = int(re.search(r"^consumer_timeout = (\d+)", conf, re.M).group(1))
    from worker.config import WorkerSettings

    assert timeout_ms / 1000 > WorkerSettings.model_fields["task_time_limit_s"].default
    assert any(v.endswith(":/models:ro") for v in services["api"]["volumes"])
    assert "--dir /models/" in (ROOT / "docker" / "README.md").read_text()
    assert services["worker"]["environment"]["DISP_QUEUES"] == "gpu"
    assert services["cpu-worker"]["environment"]["DISP_QUEUES"] == "cpu"
    api_cmd = (ROOT / "docker" / "api.Dockerfile").read_text()
    assert '"-m", "api.serve"' in api_cmd and "COPY migrations" not in api_cmd
    assert "solo" not in (ROOT / "docker" / "worker.cuda.Dockerfile").read_text().split("CMD", 1)[1]
