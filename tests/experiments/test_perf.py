"""experiments/benchmarks/perf.py on a tiny model: the JSON it writes, its checks, and the reference it measures against.

No timing is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import json

import pytest
import torch

from disp.config import SaliencyConfig, SamplerConfig
from disp.purify import held_positions
from disp.saliency import hutchinson_saliency
from experiments.benchmarks import perf
from experiments.benchmarks.reference import encode_one, reference_generate, reference_saliency

SAMPLER = SamplerConfig(8, 8, 8)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return perf.cpu_workload(tmp_path_factory.mktemp("perf"), 4, 1, size="tiny", gen_length=8)


def test_quick_run_writes_every_field_and_passes(tmp_path):
    out = tmp_path / "perf.json"
    rc = perf.main(
        [
            "--quick",
            "--samples",
            "4",
            "--model",
            "tiny",
            "--gen-length",
            "8",
            "--no-warm-up",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert rc == 0, data["checks"]
    assert data["device"].startswith("cpu")
    assert data["outputs_identical"] is True
    for stage in perf.STAGES:
        entry = data[stage]
        for key in ("reference_sps", "product_sps", "speedup", "peak_mem_bytes"):
            assert isinstance(entry[key], (int, float)) and entry[key] > 0, (stage, key, entry[key])
        assert entry["speedup"] == pytest.approx(entry["product_sps"] / entry["reference_sps"])
    assert data["checks"]["saliency_ok"] and data["checks"]["answers_identical"] == "4/4"
    assert data["workload"]["samples"] == 4
    assert len(data["runs"]) == 1


@pytest.mark.parametrize("refresh", [4, 1])
def test_fast_product_reports_per_stage_figures_and_parity(tmp_path, refresh):
    """--fast: a third side with the exact product's per-stage fields; refreshing the prompt cache every step is
    exact decoding, so its answers all agree and its purification costs the exact product's FLOPs."""
    out = tmp_path / "perf.json"
    rc = perf.main(["--quick", "--samples", "4", "--model", "tiny", "--gen-length", "8", "--no-warm-up", "--fast",
                    "--fast-cache-refresh", str(refresh), "--fast-threshold", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0
    fast = data["fast"]
    assert fast["sampler"] == {"prompt_cache_refresh": refresh, "confidence_threshold": 1.0}
    assert fast["recovery"] == {"bf16_cpu": True}  # the fast product's default recovery, beside its stage figures
    for stage in perf.STAGES:
        e = fast[stage]
        assert e["product_sps"] > 0 and e["peak_mem_bytes"] > 0 and e["product_model_flops"] > 0, stage
        assert e["speedup"] == pytest.approx(e["product_sps"] / data[stage]["reference_sps"])
        assert e["speedup_vs_exact"] == pytest.approx(data[stage]["product_s"] / e["product_s"])
    assert fast["saliency"]["shared_with_exact"] and fast["saliency"]["product_s"] == data["saliency"]["product_s"]
    parity = fast["parity"]
    assert parity["passed"] == (parity["agreement"] >= parity["tolerance"])
    exact_flops, fast_flops = data["purification"]["product_model_flops"], fast["purification"]["product_model_flops"]
    if refresh == 1:
        assert parity["agreement"] == 1.0 and fast_flops == exact_flops
    else:  # 8 steps: 2 full forwards and 6 over the 8 answer tokens alone
        assert fast_flops < 0.6 * exact_flops
        assert fast["purification"]["flops_saved_vs_exact"] == pytest.approx(1 - fast_flops / exact_flops)


def test_bad_fast_settings_are_named(capsys):
    with pytest.raises(SystemExit):
        perf.main(["--fast", "--fast-threshold", "0"])
    assert "confidence_threshold must be in (0, 1]" in capsys.readouterr().err


def _stage(ref_s: float, prod_s: float) -> dict:
    return {"reference_s": ref_s, "product_s": prod_s, "reference_samples": 4, "product_samples": 8,
            "reference_sps": 4 / ref_s, "product_sps": 8 / prod_s, "speedup": (8 / prod_s) / (4 / ref_s),
            "peak_mem_bytes": int(prod_s * 100), "reference_peak_mem_bytes": 5,
            "reference_model_flops": 40.0, "product_model_flops": 80.0,
            "reference_achieved_flops_per_s": 40 / ref_s, "product_achieved_flops_per_s": 80 / prod_s}


def test_best_of_keeps_each_sides_fastest_stage_and_sums_them():
    def run(times: dict[str, tuple[float, float]], ok: bool = True) -> dict:
        r = {s: _stage(*t) for s, t in times.items()}
        r["end_to_end"] = _stage(sum(t[0] for t in times.values()), sum(t[1] for t in times.values()))
        return {**r, "outputs_identical": ok, "checks": {"strict": True, "saliency_ok": True, "finetune_ok": True}}

    a = run({"saliency": (1.0, 0.5), "purification": (4.0, 1.0), "finetune": (2.0, 1.0)})
    b = run({"saliency": (2.0, 0.25), "purification": (3.0, 2.0), "finetune": (2.0, 0.5)})
    best = perf.best_of([a, b])
    assert best["saliency"]["reference_s"] == 1.0 and best["saliency"]["product_s"] == 0.25
    assert best["purification"]["reference_s"] == 3.0 and best["purification"]["product_s"] == 1.0
    e2e = best["end_to_end"]
    assert e2e["reference_s"] == 1.0 + 3.0 + 2.0 and e2e["product_s"] == 0.25 + 1.0 + 0.5
    assert e2e["speedup"] == pytest.approx((8 / 1.75) / (4 / 6.0))
    assert e2e["product_achieved_flops_per_s"] == pytest.approx(80 / 1.75)
    assert best["saliency"]["peak_mem_bytes"] == 50  # the higher of the two runs
    assert [r["saliency"]["speedup"] for r in best["runs"]] == [a["saliency"]["speedup"], b["saliency"]["speedup"]]
    assert perf.passed(best)
    assert not perf.passed(perf.best_of([a, run({"saliency": (1, 1), "purification": (1, 1), "finetune": (1, 1)},
                                                ok=False)]))


def test_bad_repeat_and_workers_are_named(capsys):
    with pytest.raises(SystemExit):
        perf.main(["--repeat", "0"])
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        perf.main(["--workers", "-1"])
    assert "--workers must be at least 0" in capsys.readouterr().err


def test_reference_saliency_is_the_products_estimator(workload):
    model, s = workload.model, workload.samples[0]
    prompt = encode_one(model, s.question, workload.source.open(s.image))
    ref = reference_saliency(model, prompt, SaliencyConfig(), SAMPLER)
    prod = hutchinson_saliency(model, prompt, SaliencyConfig(), SAMPLER)[0].double()
    torch.testing.assert_close(prod, ref, rtol=1e-4, atol=1e-12)
    # the official code differentiates the probes too: a different estimate at the same cost
    official = reference_saliency(model, prompt, SaliencyConfig(), SAMPLER, official_undetached_probes=True)
    assert not torch.allclose(official, ref, rtol=1e-3)


def test_reference_generation_is_the_products_sampler(workload):
    model = workload.model
    for s in workload.samples[:2]:
        prompt = encode_one(model, s.question, workload.source.open(s.image))
        idx = torch.tensor([[0, 3, 5]])
        held = held_positions(prompt, idx)
        ids = reference_generate(model, prompt.embeds, held[0], SAMPLER)
        gen = model.generate(prompt, SAMPLER, held=held)
        assert ids == gen.answers()[0]


def test_llada_v_8b_shape_builder(tmp_path):
    assert perf.LLADA_V_8B_LM["hidden_size"] == 4096 and perf.LLADA_V_8B_LM["num_hidden_layers"] == 32
    assert perf.SIGLIP_SO400M["image_size"] // perf.SIGLIP_SO400M["patch_size"] == 27  # 729 visual tokens
    tok = perf.write_benchmark_checkpoint(tmp_path / "tok", perf.SHAPES_BASE_LM, perf.SHAPES_BASE_VISION)
    small = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    model = perf.build_llada_v_8b_shape(
        tok,
        "cpu",
        torch.bfloat16,
        lm=small,
        vision={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
        },
    )
    assert torch.get_default_dtype() == torch.float32  # restored
    assert model.lm_config.vocab_size == perf.LLADA_V_VOCAB and model.lm_config.intermediate_size == 96
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    counter = perf.FlopCounter(model)
    with counter.counting():
        model.forward_embeds(torch.zeros(2, 5, 64, dtype=torch.bfloat16))
    assert counter.take() == pytest.approx(2 * 2 * 5 * counter.lm_matmul + 4 * 64 * 2 * 2 * 25)
    assert "forward_embeds" not in vars(model)  # the wrapper is gone


@pytest.mark.slow
def test_8b_path_runs_anyres(tmp_path):
    """--gpu-8b-anyres at a small shape on the CPU: LLaDA-V's anyres layout on images twice the tower's size
    (2x2 crops of 2x2 tokens: 4 + 4 * 5 = 24 visual tokens), both sides, every stage."""
    out = tmp_path / "perf.json"
    small_lm = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4}
    small_vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": 28}
    perf.main(["--quick", "--samples", "2", "--model", "tiny", "--gen-length", "8", "--no-warm-up",
               "--gpu-8b-anyres", "--gpu-8b-device", "cpu", "--gpu-8b-samples", "3", "--gpu-8b-reference-samples",
               "1", "--gpu-8b-lm", json.dumps(small_lm), "--gpu-8b-vision", json.dumps(small_vision),
               "--json", str(out)])
    res = json.loads(out.read_text())["gpu_8b_anyres"]
    assert res["workload"]["num_visual_tokens"] == "24-24"
    assert res["workload"]["image"]["image_aspect_ratio"] == "anyres_max_4"
    assert res["workload"]["saliency"]["batch_size"] == 3 and res["workload"]["finetune"]["batch_size"] == 3
    assert res["checks"]["answers_identical"] == "1/1"
    for stage in perf.STAGES:
        assert res[stage]["product_sps"] > 0 and res[stage]["reference_sps"] > 0


def test_trained_workload_is_the_shipped_base_on_its_own_scenes(tmp_path):
    """--model trained: the shipped SHAPES base, so a confidence threshold has confident steps to skip."""
    from disp.cell import BASE_CHECKPOINT
    from disp.shapes import config_of_checkpoint

    out = tmp_path / "perf.json"
    rc = perf.main(["--quick", "--samples", "4", "--model", "trained", "--gen-length", "8", "--no-warm-up", "--fast",
                    "--fast-cache-refresh", "0", "--fast-threshold", "0.9", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0, data["checks"]
    assert data["workload"]["checkpoint"] == "disp/assets/shapes-base"
    assert data["workload"]["lm"]["hidden_size"] == json.loads((BASE_CHECKPOINT / "config.json").read_text())["hidden_size"]
    image = config_of_checkpoint(BASE_CHECKPOINT).image_size
    assert data["workload"]["num_visual_tokens"] == (image // data["workload"]["vision"]["patch_size"]) ** 2
    # a trained model commits several tokens per step above the threshold: fewer forwards than exact decoding
    assert data["fast"]["purification"]["product_model_flops"] < data["purification"]["product_model_flops"]
