"""The scoring FLOP model (experiments.benchmarks.saliency_cost) against FlopCounter's count of the real calls."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from disp.config import SaliencyConfig, SamplerConfig
from disp.saliency import visual_saliency
from experiments.benchmarks.measure import FlopCounter
from experiments.benchmarks.saliency_cost import LMShape, main, passes, scoring_flops, split_forwards

SAMPLER = SamplerConfig(16, 16, 16)


@pytest.mark.parametrize("method", ["fisher", "isolation", "split_isolation"])
def test_model_matches_the_counted_flops_of_a_scoring_pass(tiny_model, method):
    cfg = SaliencyConfig(method=method, probes=3, split_groups=2, split_beam=1, split_budget=6)
    prompt = tiny_model.prompt_batch(["What is it?"], [Image.new("RGB", (56, 56), (200, 30, 30))])
    n_visual = prompt.visual_counts()[0]
    text = prompt.embeds.shape[1] - n_visual
    counter = FlopCounter(tiny_model)
    counter.backwards_per_grad_forward = cfg.probes
    with counter.counting():
        visual_saliency(tiny_model, prompt, cfg, SAMPLER)
    counted = counter.take()
    modelled = scoring_flops(
        LMShape.of(tiny_model.lm_config), method, n_visual, text, SAMPLER.gen_length, cfg
    )
    assert counted > 0
    assert modelled == pytest.approx(counted, rel=1e-9)


def test_split_isolation_forwards_follow_its_plan_and_budget():
    cfg = SaliencyConfig(split_groups=4, split_beam=2, split_budget=20)
    assert split_forwards(36, cfg) == 20  # 4 ranges of 9, then 8 halvings: the budget
    assert split_forwards(729, cfg) == split_forwards(3699, cfg) == 20  # the budget, whatever N_v
    assert split_forwards(5, cfg) == 6  # 4 ranges (1, 1, 2, 1): one halving is all there is
    assert split_forwards(36, SaliencyConfig(split_groups=8, split_beam=2, split_budget=21)) == 20  # pairs only
    assert passes("fisher", 729, cfg) == (1, 6) and passes("isolation", 729, cfg) == (730, 0)
    with pytest.raises(ValueError, match="method must be one of .*got 'kl'"):
        passes("kl", 36, cfg)


def test_table_puts_split_isolation_within_three_times_the_paper_at_llada_v_sizes(capsys, tmp_path):
    assert main(["--visual", "729", "3699", "--json", str(tmp_path / "cost.json")]) == 0
    rows = {(r["n_visual"], r["method"]): r for r in json.loads((tmp_path / "cost.json").read_text())["rows"]}
    for n in (729, 3699):
        assert rows[n, "fisher"]["vs_paper"] == 1.0
        assert rows[n, "split_isolation"]["vs_paper"] <= 3.0
        assert rows[n, "isolation"]["vs_paper"] > 100
    assert "split_isolation" in capsys.readouterr().out
