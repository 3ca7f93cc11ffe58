"""GPU-only checks: the same results on CUDA as on the CPU (run with `make test-gpu` on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from disp import models
from disp.config import FinetuneConfig, SaliencyConfig, SamplerConfig
from disp.finetune import finetune_projector, vision_features
from disp.saliency import exact_saliency
from disp.sampling import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_saliency_and_generation_match_the_cpu(tiny_dir, solid_images):
    cpu, gpu = models.load(tiny_dir), models.load(tiny_dir, device="cuda")
    sampler = SamplerConfig(16, 16, 16)
    questions = ["What is it?"] * len(solid_images)
    s_cpu = exact_saliency(cpu, cpu.prompt_batch(questions, solid_images), SaliencyConfig(), sampler)
    s_gpu = exact_saliency(gpu, gpu.prompt_batch(questions, solid_images), SaliencyConfig(), sampler)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-2, atol=1e-9)
    a = generate(cpu, cpu.prompt_batch(questions, solid_images), sampler).answers()
    b = generate(gpu, gpu.prompt_batch(questions, solid_images), sampler).answers()
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= len(a) - 1  # float ties may flip one token


def test_bf16_finetune_changes_only_the_projector(tiny_dir, solid_images):
    model = models.load(tiny_dir, device="cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats = vision_features(model, solid_images)
    finetune_projector(model, ["What?"] * 4, ["A ball."] * 4, feats, FinetuneConfig(epochs=2, lr=1e-2, batch_size=2))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("model.mm_projector.")}
