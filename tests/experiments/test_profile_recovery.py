"""experiments/benchmarks/profile_recovery.py: the recovery's time by operator kind, and no weight gradients."""

from __future__ import annotations

import re

from experiments.benchmarks.profile_recovery import kind_of, main


def test_kinds_of_operators():
    assert kind_of("aten::mm") == kind_of("aten::addmm") == "matmul"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert kind_of("aten::mul") == "element-wise" and kind_of("aten::empty") == "other"


def test_profile_counts_no_weight_gradient_of_the_frozen_model(capsys):
    assert main(["--samples", "4", "--model", "trained"]) == 0
    out = capsys.readouterr().out
    shares = [float(m) for m in re.findall(r"\s([\d.]+) %", out)]
    assert abs(sum(shares) - 100) < 0.5 and "matmul" in out and "attention" in out
    mm, linears = map(float, re.search(r"([\d.]+) matrix multiplies for (\d+) frozen", out).groups())
    # forward: every frozen linear layer; backward: the input gradient of each, not their weight gradients
    assert linears < mm < 2 * linears + 6
