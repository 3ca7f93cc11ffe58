"""The trigger-rank diagnostic: which tokens a trigger covers, and a report per saliency method."""

from __future__ import annotations

import numpy as np
import pytest

from disp.attacks import TriggerConfig
from disp.config import FinetuneConfig, SamplerConfig
from experiments.diagnostics.trigger_rank import METHODS, main, trigger_coverage, trigger_ranks
from experiments.reproduce import ReproduceConfig, reproduce


def test_coverage_of_a_corner_patch_straddling_tokens():
    cov = trigger_coverage(TriggerConfig(kind="corner", size_px=10), 48, 8).reshape(6, 6)
    assert cov[0, 0] == 1.0 and cov[0, 1] == cov[1, 0] == pytest.approx(2 / 8) and cov[1, 1] == pytest.approx(4 / 64)
    assert cov.sum() == pytest.approx(100 / 64) and (cov[2:] == 0).all() and (cov[:, 2:] == 0).all()
    multi = trigger_coverage(TriggerConfig(kind="multi", size_px=8), 48, 8).reshape(6, 6)
    assert np.flatnonzero(multi.reshape(-1)).tolist() == [0, 5, 30, 35]


def test_report_on_a_reproduction_cell(tiny_dir, tmp_path, capsys):
    cfg = ReproduceConfig(base=str(tiny_dir), targets=("insertion",), triggers=("corner",), trigger_targets=(),
                          defenses=("none",), n_train=20, n_asr=2, n_cp=2, implant=FinetuneConfig(epochs=1, batch_size=8),
                          sampler=SamplerConfig(8, 8, 8), poison_sweep=(), mask_sweep=())
    reproduce(cfg, tmp_path, log=lambda _: None)
    cell = tmp_path / "insertion-corner-p0.2"
    res = trigger_ranks(cell, tiny_dir, n=3)
    assert res["samples"] == 3 and set(res["methods"]) == set(METHODS)
    assert res["main_trigger_tokens"] and set(res["main_trigger_tokens"]) <= set(res["trigger_tokens"])
    for m in res["methods"].values():
        assert 0.0 <= m["trigger_first"] <= 1.0 and m["main_in_top_rho0.1"] <= m["main_in_top_rho0.3"]
    # the tiny model's 14 px tokens: the default 9 px patch covers no token by half, so its most covered is main
    assert res["main_trigger_tokens"] == [0] and res["trigger_tokens"] == [0]
    assert main([str(tmp_path / "missing")]) == 2
    assert "no backdoored/projector.safetensors" in capsys.readouterr().err
