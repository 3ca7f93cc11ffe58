"""Schemathesis against the running API, as the outside check ran it (docs/security.md, "Fuzzing"): every
operation, the examples, coverage, fuzzing and stateful phases, a valid API key, and one real object of
each kind so that requests reach rows. Prints the requests the API served (from its own request counter),
how many were 5xx, and schemathesis's failures by check.

    python experiments/security/fuzz.py --seconds 600 --out experiments/security/fuzz-after.json
    python experiments/security/fuzz.py --src /tmp/main-tree --seconds 600     # main's code, the same run

tests/api/test_security_fuzz.py is the suite's bounded version of this run.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import METRICS_TOKEN, ROOT, Stack  # noqa: E402

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,unsupported_method,allow_header_conformance"
)
_SERVED = re.compile(
    r'^disp_http_requests_total\{method="(\w+)",route="([^"]*)",status="(\d+)"\} ([0-9.e+]+)$', re.M
)


def served(url: str) -> Counter:
    """Requests the API counted, by status code (its Prometheus counter)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    counts: Counter = Counter()
    for _, _, status, value in _SERVED.findall(text):
        counts[int(status)] += int(float(value))
    return counts


def tiny_inputs(folder: Path) -> tuple[bytes, bytes]:
    """A two-record dataset zip and a tiny checkpoint tar (written by `disp.models.tiny`)."""
    from PIL import Image

    from disp.models.tiny import write_tiny_checkpoint

    records = [
        {
            "id": f"r{i}",
            "image": f"images/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A box."},
            ],
        }
        for i in range(2)
    ]
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("data.json", json.dumps(records))
        for i in range(2):
            png = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(png, "PNG")
            zf.writestr(f"images/{i}.png", png.getvalue())
    ckpt = write_tiny_checkpoint(folder / "tiny", seed=0)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for f in sorted(ckpt.iterdir()):
            tf.add(f, arcname=f"ckpt/{f.name}")
    return data.getvalue(), tar.getvalue()


def objects(url: str, headers: dict, folder: Path) -> dict[str, str]:
    dataset, checkpoint = tiny_inputs(folder)
    ds = httpx.post(
        f"{url}/v1/datasets", headers=headers, files={"file": ("ds.zip", dataset)}, timeout=60
    ).json()["id"]
    ck = httpx.post(
        f"{url}/v1/checkpoints", headers=headers, files={"file": ("ck.tar", checkpoint)}, timeout=60
    ).json()["id"]
    job = httpx.post(f"{url}/v1/jobs", headers=headers, json={"dataset_id": ds, "checkpoint_id": ck}).json()[
        "id"
    ]
    upload = {"purpose": "dataset", "filename": "d.zip", "bytes": 10, "sha256": "a" * 64}
    up = httpx.post(f"{url}/v1/uploads", headers=headers, json=upload).json()["id"]
    return {"dataset_id": ds, "checkpoint_id": ck, "job_id": job, "upload_id": up}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", type=Path, default=ROOT, help="source tree the API runs from")
    parser.add_argument("--seconds", type=int, default=600, help="schemathesis --max-time")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="disp-fuzz-") as work:
        work = Path(work)
        stack = Stack(args.src.resolve(), work)
        try:
            stack.start(worker=False)
            url = f"http://127.0.0.1:{stack.port}"
            headers = {"Authorization": f"Bearer {stack.key}"}
            ids = objects(url, headers, work)
            config = work / "schemathesis.toml"
            config.write_text("[parameters]\n" + "".join(f'"path.{k}" = "{v}"\n' for k, v in ids.items()))
            before = served(url)
            cmd = [
                sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
                "-H", f"Authorization: Bearer {stack.key}", "--phases", "examples,coverage,fuzzing,stateful",
                "--checks", CHECKS, "--max-time", str(args.seconds), "-n", "60", "-w", "1", "--seed", str(args.seed),
                "--request-timeout", "30", "--continue-on-failure", "--suppress-health-check", "all",
                "--report", "json", "--report-json-path", str(work / "report.json"),
            ]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True)
            after = served(url)
            report = json.loads((work / "report.json").read_text())
        finally:
            stack.close()
    counts = after - before
    failures = Counter()
    for failure in report["failures"]:
        failures[failure.get("title") or failure.get("check") or str(failure)[:80]] += failure.get("count", 1)
    figures = {
        "src": str(args.src),
        "seconds": round(report["running_time"]),
        "requests": sum(counts.values()),
        "server_errors": sum(v for k, v in counts.items() if k >= 500),
        "by_status": dict(sorted(counts.items())),
        "test_cases": report["test_cases"],
        "operations": report["operations"]["tested"],
        "failures": dict(failures),
        "errors": report["errors"],
        "exit_code": run.returncode,
    }
    print(run.stdout[-5000:])
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
