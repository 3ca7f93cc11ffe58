"""The comparison itself: the reference then the product on one workload, stage by stage, with the checks.

`run_workload` times each stage of both sides on the same model and data and checks that they compute the
same thing; `best_of` combines repeated runs (the fastest time of each stage, per side).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from disp.batching import visual_counts
from disp.config import FinetuneConfig
from disp.models.base import MDLM
from disp.pipeline import VisionCache, finetune_samples, purify_samples, score_samples
from experiments.benchmarks.fast import best_fast, fast_entries, run_fast
from experiments.benchmarks.measure import FlopCounter, StagePeaks, _sync
from experiments.benchmarks.reference import reference_finetune, reference_score_and_purify
from experiments.benchmarks.workloads import Workload, finetune_purified, purified_samples

STAGES = ("saliency", "purification", "finetune", "end_to_end")
SALIENCY_RTOL = 1e-3  # float32: batching changes only the rounding
SALIENCY_RTOL_BF16 = 5e-2  # bf16: batched and unbatched matmuls round differently at 8 bits of mantissa
LOSS_RTOL = 1e-3
LOSS_RTOL_BF16 = 2e-2

def _snapshot_projector(model: MDLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.projector.state_dict().items()}


def _restore_projector(model: MDLM, state: dict[str, torch.Tensor]) -> None:
    model.projector.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def _warm_up(w: Workload, tmp: Path, workers: int | None) -> None:
    """Untimed: one sample through the reference, one batch through the product, one training step."""
    model, n = w.model, min(w.saliency.batch_size, len(w.samples))
    sub = w.samples[:n]
    reference_score_and_purify(
        model, [sub[0].question], [lambda: w.source.open(sub[0].image)], w.saliency, w.purify
    )
    scores = score_samples(model, sub, w.source, w.saliency, w.purify.sampler, workers=workers)
    purify_samples(model, sub, w.source, w.purify, scores, workers=workers)
    state = _snapshot_projector(model)
    finetune_samples(
        model,
        sub,
        w.source,
        FinetuneConfig(**{**asdict(w.finetune), "epochs": 1}),
        tmp / "warmup",
        run_key=uuid.uuid4().hex,
    )
    _restore_projector(model, state)
    _sync(model.device)


def run_workload(
    w: Workload,
    tmp: Path,
    *,
    warm_up: bool = True,
    peak_flops: float | None = None,
    official_quirks: bool = False,
    workers: int | None = 1,
    fast: dict[str, Any] | None = None,
    fast_recovery: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Reference then product on `w`; returns per-stage figures and the checks. `fast`: SamplerConfig
    overrides of a third side, the fast product (`experiments/benchmarks/fast.py`), reported under "fast";
    `fast_recovery`: FinetuneConfig overrides of that side's recovery.

    `official_quirks`: the reference reproduces the official code's two numerical quirks (see
    `experiments/benchmarks/reference.py`); the checks then measure their effect and are not enforced."""
    model, dev = w.model, w.model.device
    samples, n_ref = w.samples, w.reference_samples
    ref_samples = samples[:n_ref]
    sampler = w.purify.sampler
    projector0 = _snapshot_projector(model)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    if warm_up:
        log("warm-up ...")
        _warm_up(w, tmp, workers)
    counter = FlopCounter(model)
    seconds: dict[str, dict[str, float]] = {"reference": {}, "product": {}}
    flops: dict[str, dict[str, float]] = {"reference": {}, "product": {}}
    peaks: dict[str, dict[str, int]] = {}

    with counter.counting():
        # reference: score and purify each sample in turn (tower once per sample, as the official code)
        log(f"reference: scoring + purification of {n_ref} samples, one at a time ...")
        counter.backwards_per_grad_forward = w.saliency.probes
        with StagePeaks(dev) as mem:
            stage_flops = {"saliency": 0.0, "purification": 0.0}

            def on_stage(stage: str | None) -> None:
                spent = counter.take()
                if mem.current is not None:
                    stage_flops[mem.current] += spent
                mem.switch(stage)

            ref = reference_score_and_purify(
                model,
                [s.question for s in ref_samples],
                [lambda s=s: w.source.open(s.image) for s in ref_samples],
                w.saliency,
                w.purify,
                on_stage=on_stage,
                official_quirks=official_quirks,
            )
        peaks["reference"] = dict(mem.peaks)
        seconds["reference"].update(saliency=ref.saliency_s, purification=ref.purification_s)
        flops["reference"].update(stage_flops)

        # product: score, then purify with the scores, sharing the vision features
        cache = VisionCache()
        log(f"product: scoring {len(samples)} samples, batch {w.saliency.batch_size} ...")
        with StagePeaks(dev) as mem:
            counter.take()
            mem.switch("saliency")
            _sync(dev)
            t0 = time.perf_counter()
            scores = score_samples(model, samples, w.source, w.saliency, sampler, cache=cache, workers=workers)
            _sync(dev)
            t1 = time.perf_counter()
            flops["product"]["saliency"] = counter.take()
            log(f"product: purifying {len(samples)} samples, batch {w.purify.batch_size} ...")
            mem.switch("purification")
            records = purify_samples(model, samples, w.source, w.purify, scores, cache=cache, workers=workers)
            _sync(dev)
            t2 = time.perf_counter()
            flops["product"]["purification"] = counter.take()
        peaks["product"] = dict(mem.peaks)
        seconds["product"].update(saliency=t1 - t0, purification=t2 - t1)

        # fine-tuning from the same projector, each side on its own purified answers
        counter.backwards_per_grad_forward = 1
        log(f"reference: fine-tuning on {n_ref} samples, {w.finetune.epochs} epoch(s), tower every step ...")
        images = [w.source.open(s.image) for s in ref_samples]
        _restore_projector(model, projector0)
        with StagePeaks(dev) as mem:
            mem.switch("finetune")
            counter.take()
            _sync(dev)
            t0 = time.perf_counter()
            ref_losses = reference_finetune(
                model, [s.question for s in ref_samples], ref.answers, images, w.finetune
            )
            _sync(dev)
            seconds["reference"]["finetune"] = time.perf_counter() - t0
            flops["reference"]["finetune"] = counter.take()
        peaks["reference"].update(mem.peaks)
        _restore_projector(model, projector0)
        train = purified_samples(records)
        log(f"product: fine-tuning on {len(train)} samples, {w.finetune.epochs} epoch(s) ...")
        with StagePeaks(dev) as mem:
            mem.switch("finetune")
            _sync(dev)
            t0 = time.perf_counter()
            metrics = finetune_purified(w, train, tmp, cache)
            _sync(dev)
            seconds["product"]["finetune"] = time.perf_counter() - t0
            flops["product"]["finetune"] = counter.take()
        peaks["product"].update(mem.peaks)
        _restore_projector(model, projector0)
        if fast is not None:
            log(f"fast product: purifying with {fast}, then fine-tuning with {fast_recovery or {}} ...")
            fast_run = run_fast(w, tmp, sampler=fast, finetune=fast_recovery, scores=scores, cache=cache,
                                exact_records=records, counter=counter, workers=workers,
                                restore=lambda: _restore_projector(model, projector0))

    # checks
    prod_answers = [r["conversations"][1]["value"] for r in records[:n_ref]]
    same_answers = [a == b for a, b in zip(ref.answers, prod_answers, strict=True)]
    same_masked = [
        sorted(r["disp"]["masked_visual_tokens"]) == sorted(m)
        for r, m in zip(records[:n_ref], ref.masked, strict=True)
    ]
    rel_errs = []
    for s, ref_scores in zip(ref_samples, ref.scores, strict=True):
        prod = torch.tensor(scores[s.id], dtype=torch.float64)
        rel_errs.append(float((prod - ref_scores).norm() / ref_scores.norm().clamp_min(1e-300)))
    overlaps = []
    for s, ref_scores in zip(ref_samples, ref.scores, strict=True):
        k = int(w.purify.rho * len(ref_scores))
        prod = torch.tensor(scores[s.id], dtype=torch.float64)
        if k:
            overlaps.append(
                len(set(ref_scores.topk(k).indices.tolist()) & set(prod.topk(k).indices.tolist())) / k
            )
    sal_tol = SALIENCY_RTOL_BF16 if bf16 else SALIENCY_RTOL
    loss_rel = None
    if n_ref == len(samples):
        loss_rel = max(
            abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref_losses, metrics["epoch_losses"], strict=True)
        )
    loss_tol = LOSS_RTOL_BF16 if bf16 else LOSS_RTOL
    checks = {
        "strict": not (bf16 or official_quirks),
        "official_quirks": official_quirks,
        "answers_identical": f"{sum(same_answers)}/{n_ref}",
        "masked_sets_identical": f"{sum(same_masked)}/{n_ref}",
        "saliency_max_rel_err": max(rel_errs),
        "saliency_tolerance": sal_tol,
        "saliency_ok": max(rel_errs) <= sal_tol,
        "saliency_median_rel_err": sorted(rel_errs)[len(rel_errs) // 2],
        "salient_set_overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
        "salient_set_overlap_min": min(overlaps) if overlaps else None,
        "finetune_loss_max_rel_diff": loss_rel,
        "finetune_loss_tolerance": loss_tol,
        "finetune_ok": loss_rel is None or loss_rel <= loss_tol,
        "reference_epoch_losses": ref_losses,
        "product_epoch_losses": metrics["epoch_losses"],
        "answers_changed_by_purification": sum(
            r["disp"]["original_answer"] != r["disp"]["purified_answer"] for r in records
        ),
        "differing_ids": [s.id for s, ok in zip(ref_samples, same_answers, strict=True) if not ok][:10],
    }
    n_prod = len(samples)
    result: dict[str, Any] = {"outputs_identical": all(same_answers), "checks": checks}
    for side in ("reference", "product"):
        seconds[side]["end_to_end"] = sum(seconds[side][s] for s in STAGES[:3])
        flops[side]["end_to_end"] = sum(flops[side][s] for s in STAGES[:3])
        peaks[side]["end_to_end"] = max(peaks[side].get(s, 0) for s in STAGES[:3])
    for stage in STAGES:
        ref_sps = n_ref / seconds["reference"][stage]
        prod_sps = n_prod / seconds["product"][stage]
        entry = {
            "reference_sps": ref_sps,
            "product_sps": prod_sps,
            "speedup": prod_sps / ref_sps,
            "peak_mem_bytes": peaks["product"].get(stage, 0),
            "reference_peak_mem_bytes": peaks["reference"].get(stage, 0),
            "reference_s": seconds["reference"][stage],
            "product_s": seconds["product"][stage],
            "reference_samples": n_ref,
            "product_samples": n_prod,
            "reference_model_flops": flops["reference"][stage],
            "product_model_flops": flops["product"][stage],
        }
        entry["product_achieved_flops_per_s"] = entry["product_model_flops"] / seconds["product"][stage]
        entry["reference_achieved_flops_per_s"] = entry["reference_model_flops"] / seconds["reference"][stage]
        if peak_flops:
            entry["product_mfu"] = entry["product_achieved_flops_per_s"] / peak_flops
            entry["reference_mfu"] = entry["reference_achieved_flops_per_s"] / peak_flops
        result[stage] = entry
    if fast is not None:
        result["fast"] = fast_entries(result, *fast_run, peak_flops)
    visual = visual_counts(model, samples, w.source)
    prompt_lens = [
        len(model.tokenizer.encode_prompt(s.question)) - 1 + n for s, n in zip(samples, visual, strict=True)
    ]
    result["workload"] = {
        "name": w.name,
        **w.description,
        "samples": n_prod,
        "reference_samples": n_ref,
        "num_visual_tokens": model.num_image_tokens or f"{min(visual)}-{max(visual)}",
        "prompt_tokens_min_max": [min(prompt_lens), max(prompt_lens)],
        "saliency": asdict(w.saliency),
        "purify": asdict(w.purify),
        "finetune": asdict(w.finetune),
    }
    return result




def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one workload → the first run's result with each side's fastest time per stage.

    The shared machine's speed drifts between runs; a stage's fastest time is its least disturbed one.
    End to end becomes the sum of the fastest stages; peaks are the highest seen. Every run's samples/s
    stay under `runs`, and the checks must hold in every run (`outputs_identical` is their conjunction).
    """
    result = {**runs[0], "runs": [{s: {k: r[s][k] for k in ("reference_sps", "product_sps", "speedup")}
                                   for s in STAGES} for r in runs]}
    if len(runs) == 1:
        return result
    result["outputs_identical"] = all(r["outputs_identical"] for r in runs)
    result["checks"] = {**runs[0]["checks"], "runs_passed": [passed(r) for r in runs]}
    for stage in STAGES[:3]:
        e = dict(runs[0][stage])
        for side, n in (("reference", e["reference_samples"]), ("product", e["product_samples"])):
            fastest = min(runs, key=lambda r: r[stage][f"{side}_s"])[stage]
            for key in (f"{side}_s", f"{side}_achieved_flops_per_s", f"{side}_mfu"):
                if key in fastest:
                    e[key] = fastest[key]
            e[f"{side}_sps"] = n / e[f"{side}_s"]
        e["peak_mem_bytes"] = max(r[stage]["peak_mem_bytes"] for r in runs)
        e["reference_peak_mem_bytes"] = max(r[stage]["reference_peak_mem_bytes"] for r in runs)
        e["speedup"] = e["product_sps"] / e["reference_sps"]
        result[stage] = e
    e2e = dict(runs[0]["end_to_end"])
    for side in ("reference", "product"):
        e2e[f"{side}_s"] = sum(result[s][f"{side}_s"] for s in STAGES[:3])
        e2e[f"{side}_sps"] = e2e[f"{side}_samples"] / e2e[f"{side}_s"]
        flops = e2e[f"{side}_model_flops"] / e2e[f"{side}_s"]
        if f"{side}_mfu" in e2e:
            e2e[f"{side}_mfu"] *= flops / e2e[f"{side}_achieved_flops_per_s"]
        e2e[f"{side}_achieved_flops_per_s"] = flops
    e2e["peak_mem_bytes"] = max(result[s]["peak_mem_bytes"] for s in STAGES[:3])
    e2e["reference_peak_mem_bytes"] = max(result[s]["reference_peak_mem_bytes"] for s in STAGES[:3])
    e2e["speedup"] = e2e["product_sps"] / e2e["reference_sps"]
    result["end_to_end"] = e2e
    if "fast" in runs[0]:
        mfu = runs[0]["saliency"].get("product_mfu")
        peak = runs[0]["saliency"]["product_achieved_flops_per_s"] / mfu if mfu else None
        result["fast"] = best_fast(runs, result, peak)
    return result


def passed(result: dict[str, Any]) -> bool:
    """float32: every check must hold (in every run). bf16: the checks are reported, not enforced (see
    docs/performance.md): batched and unbatched bf16 matmuls round differently, and random-weight logits
    tie at bf16 resolution."""
    c = result["checks"]
    if "runs_passed" in c:
        return all(c["runs_passed"])
    return not c["strict"] or bool(result["outputs_identical"] and c["saliency_ok"] and c["finetune_ok"])
