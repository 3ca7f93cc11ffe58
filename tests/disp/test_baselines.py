"""Baselines do what they say: random drop, oracle filtering, magnitude pruning."""

from __future__ import annotations

import json

import pytest
import torch

from disp import models
from disp.baselines import magnitude_prune, oracle_filter, random_drop, read_manifest
from disp.data import Sample


def _samples(n):
    return [Sample(index=i, id=f"s{i}", image=f"{i}.png", question="<image>\nQ", answer="A") for i in range(n)]


def test_random_drop_removes_the_ratio_deterministically():
    kept = random_drop(_samples(50), 0.2, seed=3)
    assert len(kept) == 40
    assert [s.id for s in kept] == [s.id for s in random_drop(_samples(50), 0.2, seed=3)]
    assert [s.id for s in kept] != [s.id for s in random_drop(_samples(50), 0.2, seed=4)]


def test_oracle_filter_drops_exactly_the_poisoned(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"poisoned_ids": ["s1", "s3"]}))
    kept = oracle_filter(_samples(5), read_manifest(path)["poisoned_ids"])
    assert [s.id for s in kept] == ["s0", "s2", "s4"]
    with pytest.raises(ValueError, match="not in the dataset"):
        oracle_filter(_samples(2), ["zzz"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="poisoned_ids"):
        read_manifest(tmp_path / "bad.json")


def test_magnitude_prune_zeroes_the_smallest_weights(tiny_dir):
    model = models.load(tiny_dir)
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    sparsity = magnitude_prune(model, 0.3)
    after = model.projector.state_dict()
    for name, w in after.items():
        if w.dim() < 2:
            assert torch.equal(w, before[name])  # biases untouched
            continue
        assert sparsity[name] >= int(0.3 * w.numel()) / w.numel()
        zeroed = w == 0
        # every zeroed weight was no larger than every kept one
        assert before[name][zeroed].abs().max() <= before[name][~zeroed].abs().min()
        assert torch.equal(w[~zeroed], before[name][~zeroed])
    lm_before = models.load(tiny_dir).state_dict()
    assert all(torch.equal(v, lm_before[k]) for k, v in model.state_dict().items() if "mm_projector" not in k)
