"""The README's main command, `disp demo`, through the embedded service, and `disp demo --local` beside it:
both must show the backdoor implanted and removed on the committed base (smaller held-out sets than the
demo's default, the same poisoned captions, implant and DiSP settings)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SIZES = {"n_asr": 20, "n_cp": 20}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")  # shared: the second demo reuses the first one's implant


def check_removed(rows: dict, defended: str) -> None:
    before, after = rows["backdoored"], rows[defended]
    assert before["asr_wt"] >= 0.8, before  # the backdoor took
    assert before["asr_wo"] == 0.0 and after["asr_wo"] == 0.0
    assert after["asr_wt"] <= 0.1, after  # and DiSP removed it
    assert after["cp"] >= before["cp"] - 0.1, (before["cp"], after["cp"])


def test_local_demo_removes_the_backdoor(workdir):
    from disp.demo import run_demo

    out = run_demo(workdir, **SIZES)
    check_removed(out["rows"], "DiSP")
    assert set(out["report"]["seconds"]) == {"scoring", "purifying", "finetuning", "evaluating"}


def test_service_demo_removes_the_backdoor_as_the_library_does(workdir):
    from api.demo import run_demo

    out = run_demo(workdir, **SIZES)
    assert out["job"]["status"] == "succeeded"
    check_removed(out["rows"], "DiSP (service)")
    service = load_file(out["files"]["projector"])
    local = load_file(workdir / "defended" / "projector.safetensors")
    assert service.keys() == local.keys()
    for name in local:  # the job ran the same defense on the same inputs as the in-process run
        assert (service[name] - local[name]).abs().max() <= 1e-4 * local[name].abs().max(), name
