"""Import boundaries, schema/dataclass agreement, and webhook signing (no services needed)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    return set(out.stdout.split())


def test_api_never_loads_torch_or_the_worker():
    mods = loaded_modules("import api.main, api.client, api.cli\napi.main.create_app")
    assert "torch" not in mods and "disp.models" not in mods and "disp.pipeline" not in mods
    assert not any(m == "worker" or m.startswith("worker.") for m in mods)


def _fields(obj) -> dict:
    return {
        f.name: _fields(getattr(obj, f.name))
        if dataclasses.is_dataclass(getattr(obj, f.name))
        else getattr(obj, f.name)
        for f in dataclasses.fields(obj)
    }


def test_job_settings_mirror_the_library_defaults():
    from api.schemas import DefenseSettings
    from disp.config import DEFENSES, REMASKING, DefenseConfig

    dumped = DefenseSettings().model_dump()
    assert DefenseConfig.from_dict(dumped) == DefenseConfig()
    # the settings the job stores leave the method-dependent cap, floor and anchor unset; the library resolves them
    unset = (("purify", "mask_ratio"), ("purify", "min_score"), ("finetune", "anchor_weight"))
    assert all(dumped[section][name] is None for section, name in unset)
    resolved = _fields(DefenseConfig())
    for section, name in unset:
        dumped[section][name] = resolved[section][name]
    assert dumped == resolved
    schema = DefenseSettings.model_json_schema()
    assert tuple(schema["properties"]["defense"]["enum"]) == DEFENSES
    assert tuple(schema["$defs"]["SamplerSettings"]["properties"]["remasking"]["enum"]) == REMASKING


def test_webhook_signatures():
    from api.security import new_webhook_secret
    from api.webhooks import WebhookVerificationError, headers, verify

    secret, body = new_webhook_secret(), b'{"type":"job.succeeded"}'
    signed = headers(secret, "msg_1", body)
    verify(secret, body, signed)
    rotated = {**signed, "webhook-signature": "v1,bm9wZQ== " + signed["webhook-signature"]}
    verify(secret, body, rotated)  # any listed signature may match (secret rotation)
    for bad in (
        {**signed, "webhook-id": "msg_2"},
        {k: v for k, v in signed.items() if k != "webhook-signature"},
    ):
        with pytest.raises(WebhookVerificationError):
            verify(secret, body, bad)
    with pytest.raises(WebhookVerificationError):
        verify(new_webhook_secret(), body, signed)
    old = headers(secret, "msg_1", body, timestamp=int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, body, old)
    verify(secret, body, old, tolerance_s=900)
