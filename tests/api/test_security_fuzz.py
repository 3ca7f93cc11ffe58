"""A bounded schemathesis run over every operation of the OpenAPI document (examples, coverage, fuzzing and
stateful phases, a valid API key) against the API served by uvicorn: no server error and no response that
breaks the document (status, content type, headers, schema). `DISP_FUZZ_SECONDS` sets its time budget (the
suite's default keeps it near a minute; docs/security.md gives a 600 s run's figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.service_conftest import new_tenant

pytestmark = [pytest.mark.services, pytest.mark.slow]

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,unsupported_method,allow_header_conformance"
)


@pytest.fixture(scope="module")
def objects(client, pg_url, tmp_path_factory, tiny_dir) -> tuple[dict, dict]:
    """A tenant's key and one object of each kind, so that generated requests reach real rows."""
    from tests.service_conftest import checkpoint_archive, dataset_archive

    auth = new_tenant(pg_url)
    tmp = tmp_path_factory.mktemp("fuzz")
    archive = dataset_archive(tmp / "ds.zip", n=2).read_bytes()
    ds = client.post("/v1/datasets", headers=auth, files={"file": ("ds.zip", archive)}).json()["id"]
    ck_bytes = checkpoint_archive(tiny_dir, tmp / "ck.tar").read_bytes()
    ck = client.post("/v1/checkpoints", headers=auth, files={"file": ("ck.tar", ck_bytes)}).json()["id"]
    job = client.post("/v1/jobs", headers=auth, json={"dataset_id": ds, "checkpoint_id": ck}).json()["id"]
    upload = {"purpose": "dataset", "filename": "d.zip", "bytes": 10, "sha256": "a" * 64}
    up = client.post("/v1/uploads", headers=auth, json=upload).json()["id"]
    ids = {"dataset_id": ds, "checkpoint_id": ck, "job_id": job, "upload_id": up}
    return auth, ids


def test_fuzzing_finds_no_server_error_and_no_schema_violation(live_api, objects, tmp_path):
    seconds = int(os.environ.get("DISP_FUZZ_SECONDS", "60"))
    auth, ids = objects
    config = tmp_path / "schemathesis.toml"
    config.write_text("[parameters]\n" + "".join(f'"path.{k}" = "{v}"\n' for k, v in ids.items()))
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{live_api}/openapi.json",
        "-H", f"Authorization: {auth['Authorization']}",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--checks", CHECKS,
        "--max-time", str(seconds), "-n", "30", "-w", "1", "--seed", "42",
        "--request-timeout", "30", "--continue-on-failure", "--suppress-health-check", "all",
        "--report", "json", "--report-json-path", str(tmp_path / "report.json"),
    ]  # fmt: skip
    # one worker: CPython 3.11's ast.parse is not thread-safe, and hypothesis calls it for filtered strategies
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    report = json.loads((tmp_path / "report.json").read_text())
    summary = {k: report.get(k) for k in ("running_time", "stop_reason", "operations", "failures", "errors")}
    print(json.dumps(summary, indent=1))
    print(run.stdout[-3000:])
    assert report["operations"]["tested"] == report["operations"]["total"] > 20
    assert report["failures"] == [] and report["errors"] == [], run.stdout[-6000:]
    assert run.returncode == 0, run.stdout[-6000:]
