"""Throughput of DiSP's stages: the published per-sample procedure against the product, in one process.

    python benchmarks/perf.py [--quick] [--json OUT] [--samples N] [--threads N] [--gpu-8b]

Both sides run on the same model object and the same data, one after the other: the reference
(`benchmarks/reference.py`: batch 1, sequential probes, float64 Fisher, unbatched generation, tower per
sample and per training step) and the product (`disp.pipeline.score_samples`, `purify_samples`,
`finetune_samples`, with one `VisionCache` shared by scoring and purification, as `defend` runs them).
For saliency, purification, fine-tuning and end to end (the sum of the three) it prints samples/s of each,
the ratio and the peak memory (CUDA: `max_memory_allocated`; CPU: the process's peak RSS, sampled every
5 ms), then checks, at temperature 0 and the same seeds, that

- every purified answer of the product equals the reference's,
- every sample's saliency agrees within `SALIENCY_RTOL` (relative L2 error; bf16: `SALIENCY_RTOL_BF16`),
- the fine-tuning epoch losses agree within `LOSS_RTOL` (when both sides trained on the same samples),

and exits 1 if any check fails. `--json OUT` writes the figures (fields in `docs/performance.md`).

Workloads. CPU (default): a random-weight checkpoint with the architecture of the `shapes-base` recipe
(LM 128 wide, 4 layers; SigLIP 96 wide; 48 px images, 36 visual tokens), SHAPES samples with 20% poisoned
by a corner trigger, the system prompt on, the paper's sampler (32 tokens, 32 steps, one block).
`--gpu-8b` (CUDA only) adds a model of LLaDA-V's shape (LM 4096 wide, 32 layers, 126,464-token
vocabulary; SigLIP so400m at 384 px, 729 visual tokens) with random bf16 weights built on the GPU, scored
and purified with batches of 8, and reports model-FLOPs utilisation against the GPU's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.measure import (  # noqa: F401  (some re-exported for the tests)
    FlopCounter,
    StagePeaks,
    _sync,
    device_description,
    gpu_peak_flops,
)
from benchmarks.reference import reference_finetune, reference_score_and_purify
from benchmarks.workloads import (  # noqa: F401  (some re-exported for the tests)
    LLADA_V_8B_LM,
    LLADA_V_VOCAB,
    SHAPES_BASE_LM,
    SHAPES_BASE_VISION,
    SIGLIP_SO400M,
    Workload,
    build_llada_v_8b_shape,
    cpu_workload,
    gpu_8b_workload,
    write_benchmark_checkpoint,
)
from disp.config import FinetuneConfig
from disp.data import parse_samples
from disp.models.base import MDLM
from disp.pipeline import VisionCache, finetune_samples, purify_samples, score_samples

STAGES = ("saliency", "purification", "finetune", "end_to_end")
SALIENCY_RTOL = 1e-3  # float32: batching changes only the rounding
SALIENCY_RTOL_BF16 = 5e-2  # bf16: batched and unbatched matmuls round differently at 8 bits of mantissa
LOSS_RTOL = 1e-3
LOSS_RTOL_BF16 = 2e-2

# -- the comparison -------------------------------------------------------------------------------------
def _snapshot_projector(model: MDLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.projector.state_dict().items()}


def _restore_projector(model: MDLM, state: dict[str, torch.Tensor]) -> None:
    model.projector.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def _warm_up(w: Workload, tmp: Path) -> None:
    """Untimed: one sample through the reference, one batch through the product, one training step."""
    model, n = w.model, min(w.saliency.batch_size, len(w.samples))
    sub = w.samples[:n]
    reference_score_and_purify(
        model, [sub[0].question], [lambda: w.source.open(sub[0].image)], w.saliency, w.purify
    )
    scores = score_samples(model, sub, w.source, w.saliency, w.purify.sampler)
    purify_samples(model, sub, w.source, w.purify, scores)
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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Reference then product on `w`; returns per-stage figures and the checks.

    `official_quirks`: the reference reproduces the official code's two numerical quirks (see
    `benchmarks/reference.py`); the checks then measure their effect and are not enforced."""
    model, dev = w.model, w.model.device
    samples, n_ref = w.samples, w.reference_samples
    ref_samples = samples[:n_ref]
    sampler = w.purify.sampler
    projector0 = _snapshot_projector(model)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    if warm_up:
        log("warm-up ...")
        _warm_up(w, tmp)
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
            scores = score_samples(model, samples, w.source, w.saliency, sampler, cache=cache)
            _sync(dev)
            t1 = time.perf_counter()
            flops["product"]["saliency"] = counter.take()
            log(f"product: purifying {len(samples)} samples, batch {w.purify.batch_size} ...")
            mem.switch("purification")
            records = purify_samples(model, samples, w.source, w.purify, scores, cache=cache)
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
        train = parse_samples(
            [{k: r[k] for k in ("id", "image", "conversations")} for r in records], "purified"
        )
        log(f"product: fine-tuning on {len(train)} samples, {w.finetune.epochs} epoch(s) ...")
        with StagePeaks(dev) as mem:
            mem.switch("finetune")
            _sync(dev)
            t0 = time.perf_counter()
            metrics = finetune_samples(
                model,
                train,
                w.source,
                w.finetune,
                tmp / f"ft-{uuid.uuid4().hex[:8]}",
                run_key=uuid.uuid4().hex,
            )
            _sync(dev)
            seconds["product"]["finetune"] = time.perf_counter() - t0
            flops["product"]["finetune"] = counter.take()
        peaks["product"].update(mem.peaks)
        _restore_projector(model, projector0)

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
        k = int(w.purify.mask_ratio * len(ref_scores))
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
    prompt_lens = [
        len(model.tokenizer.encode_prompt(s.question)) - 1 + model.num_image_tokens for s in samples
    ]
    result["workload"] = {
        "name": w.name,
        **w.description,
        "samples": n_prod,
        "reference_samples": n_ref,
        "num_visual_tokens": model.num_image_tokens,
        "prompt_tokens_min_max": [min(prompt_lens), max(prompt_lens)],
        "saliency": asdict(w.saliency),
        "purify": asdict(w.purify),
        "finetune": asdict(w.finetune),
    }
    return result


# -- report ----------------------------------------------------------------------------------------------
def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def format_table(result: dict[str, Any], title: str) -> str:
    w = result["workload"]
    lines = [
        title,
        f"  {w['samples']} samples (reference: {w['reference_samples']}), prompts of "
        f"{w['prompt_tokens_min_max'][0]}-{w['prompt_tokens_min_max'][1]} tokens ({w['num_visual_tokens']} visual), "
        f"sampler {w['purify']['sampler']['gen_length']}/{w['purify']['sampler']['steps']}, "
        f"M={w['saliency']['probes']} probes, top-{w['saliency']['topk']}, rho={w['purify']['mask_ratio']}, "
        f"batches {w['saliency']['batch_size']}/{w['purify']['batch_size']}/{w['finetune']['batch_size']}, "
        f"{w['finetune']['epochs']} fine-tuning epoch(s)",
    ]
    mfu = "product_mfu" in result["saliency"]
    head = f"  {'stage':<13}{'reference/s':>12}{'product/s':>11}{'speedup':>9}{'peak mem ref':>14}{'peak mem prod':>15}"
    lines.append(head + (f"{'MFU ref':>9}{'MFU prod':>10}" if mfu else ""))
    for stage in STAGES:
        e = result[stage]
        row = (
            f"  {stage:<13}{e['reference_sps']:>12.2f}{e['product_sps']:>11.2f}{e['speedup']:>8.2f}x"
            f"{_mib(e['reference_peak_mem_bytes']):>14}{_mib(e['peak_mem_bytes']):>15}"
        )
        if mfu:
            row += f"{100 * e['reference_mfu']:>8.1f}%{100 * e['product_mfu']:>9.1f}%"
        lines.append(row)
    c = result["checks"]
    loss = (
        "n/a"
        if c["finetune_loss_max_rel_diff"] is None
        else f"{c['finetune_loss_max_rel_diff']:.1e} (tolerance {c['finetune_loss_tolerance']:.0e})"
    )
    why = "official quirks" if c["official_quirks"] else "bf16"
    lines.append(
        f"  checks{'' if c['strict'] else f' ({why}: reported, not enforced)'}: purified answers identical "
        f"{c['answers_identical']}, masked sets identical {c['masked_sets_identical']}, saliency max rel. "
        f"error {c['saliency_max_rel_err']:.1e} (tolerance {c['saliency_tolerance']:.0e}), "
        f"fine-tuning loss rel. diff {loss}"
    )
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    """float32: every check must hold. bf16: the checks are reported, not enforced (see docs/performance.md):
    batched and unbatched bf16 matmuls round differently, and random-weight logits tie at bf16 resolution."""
    c = result["checks"]
    return not c["strict"] or bool(result["outputs_identical"] and c["saliency_ok"] and c["finetune_ok"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="16 samples, 1 fine-tuning epoch (about half a minute)"
    )
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--samples", type=int, help="samples of the CPU workload (default 48; --quick 16)")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default 4, the paper's; --quick 1)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the benchmark machine's cores are shared); 0 keeps torch's",
    )
    ap.add_argument("--device", default=None, help="device of the main workload (default: cpu)")
    ap.add_argument(
        "--gpu-8b", action="store_true", help="also run LLaDA-V's 8B shape with random bf16 weights (CUDA)"
    )
    ap.add_argument("--gpu-8b-samples", type=int, default=32, help="product samples of the 8B run")
    ap.add_argument("--gpu-8b-reference-samples", type=int, default=8, help="reference samples of the 8B run")
    ap.add_argument(
        "--gpu-8b-lm", type=json.loads, default=None, help=argparse.SUPPRESS
    )  # shape overrides (tests)
    ap.add_argument("--gpu-8b-vision", type=json.loads, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-8b-device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU, if not recognised")
    ap.add_argument(
        "--official-quirks",
        action="store_true",
        help="reference with the official code's undetached probes and float32 confidences "
        "(reports how much they change the outputs; checks not enforced)",
    )
    ap.add_argument("--no-warm-up", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=("shapes-base", "tiny"), default="shapes-base", help=argparse.SUPPRESS)
    ap.add_argument("--gen-length", type=int, default=32, help=argparse.SUPPRESS)  # = steps = block (tests)
    args = ap.parse_args(argv)
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if args.threads:
        torch.set_num_threads(args.threads)
    # float32 means float32 on a GPU too (no TF32), so the float32 comparison is exact up to batching
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _run(args, argv)
    finally:  # leave the process as it was (the tests call main)
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    n = args.samples or (16 if args.quick else 48)
    epochs = args.epochs or (1 if args.quick else 4)
    device = torch.device(args.device or "cpu")
    out: dict[str, Any] = {
        "device": device_description(device),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="disp-perf-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        w = cpu_workload(
            tmp / "cpu", n, epochs, device=str(device), size=args.model, gen_length=args.gen_length
        )
        res = run_workload(
            w,
            tmp,
            warm_up=not args.no_warm_up,
            peak_flops=gpu_peak_flops(device, args.peak_tflops),
            official_quirks=args.official_quirks,
        )
        print(format_table(res, f"DiSP stages, reference vs product: {w.name} on {out['device']}"))
        out.update(res)
        if not passed(res):
            failures.append("outputs differ or a tolerance was exceeded (see checks)")
        if args.gpu_8b:
            gdev = torch.device(args.gpu_8b_device)
            if gdev.type == "cuda" and not torch.cuda.is_available():
                out["gpu_8b"] = {"skipped": "no CUDA device"}
                failures.append("--gpu-8b needs a CUDA device; skipped")
            else:
                del w
                try:
                    gw = gpu_8b_workload(
                        tmp / "gpu",
                        args.gpu_8b_samples,
                        args.gpu_8b_reference_samples,
                        1,
                        device=str(gdev),
                        lm=args.gpu_8b_lm,
                        vision=args.gpu_8b_vision,
                    )
                    gres = run_workload(
                        gw,
                        tmp,
                        warm_up=not args.no_warm_up,
                        peak_flops=gpu_peak_flops(gdev, args.peak_tflops),
                        official_quirks=args.official_quirks,
                    )
                except torch.OutOfMemoryError as err:  # report it rather than lose the figures above
                    out["gpu_8b"] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
                    failures.append(f"--gpu-8b: {out['gpu_8b']['error']}")
                else:
                    gres["device"] = device_description(gdev)
                    print(
                        format_table(
                            gres, f"DiSP stages, reference vs product: {gw.name} on {gres['device']}"
                        )
                    )
                    out["gpu_8b"] = gres
                    if not passed(gres):
                        failures.append("8B shape: outputs differ or a tolerance was exceeded (see checks)")
        out["wall_s"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
