"""Throughput of DiSP's stages: the published per-sample procedure against the product, in one process.

    python -m experiments.benchmarks.perf [--quick] [--json OUT] [--samples N] [--threads N] [--workers N] [--repeat N] [--gpu-8b] [--gpu-8b-anyres] [--fast]

Both sides run on the same model object and the same data, one after the other: the reference
(`experiments/benchmarks/reference.py`: batch 1, sequential probes, float64 Fisher, unbatched generation, tower per
sample and per training step) and the product (`disp.pipeline.score_samples`, `purify_samples`,
`finetune_samples`, with one `VisionCache` shared by the three stages, as `defend` runs them; on a
CPU with one worker thread per core, `disp.parallel`). Both sides get the same torch threads (`--threads`).
`--repeat N` keeps each side's fastest time per stage over N runs (`experiments/benchmarks/compare.py`).
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
`--gpu-8b-anyres` runs that shape with LLaDA-V's published anyres_max_4 layout on 768 px images (3699 visual
tokens per sample), scored in batches of 3 and fine-tuned in micro-batches of 3 (what fits 80 GB,
`experiments.benchmarks.memory_8b`).

`--fast` adds a third side to every workload, the fast product: purification with the approximate sampler
(`--fast-cache-refresh`, `--fast-threshold`; `experiments/benchmarks/fast.py`) and fine-tuning on its rewrite,
scoring shared with the exact product. Its figures go under `fast` in the JSON, with `parity` (answer agreement
with exact decoding against `AGREEMENT_TOLERANCE`); a parity miss is reported, and fails the run only with
`--fast-strict`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmarks.compare import STAGES, best_of, passed, run_workload  # noqa: F401  (STAGES re-exported for the tests)
from experiments.benchmarks.fast import FAST_FINETUNE, FAST_SAMPLER
from experiments.benchmarks.measure import (  # noqa: F401  (some re-exported for the tests)
    FlopCounter,
    device_description,
    gpu_peak_flops,
)
from experiments.benchmarks.workloads import (  # noqa: F401  (some re-exported for the tests)
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
    if len(result.get("runs", ())) > 1:
        per_run = " ".join(f"{r['end_to_end']['speedup']:.2f}x" for r in result["runs"])
        lines.append(f"  {len(result['runs'])} runs, each side's fastest time per stage; end to end per run: {per_run}")
    c = result["checks"]
    loss = (
        "n/a"
        if c["finetune_loss_max_rel_diff"] is None
        else f"{c['finetune_loss_max_rel_diff']:.1e} (tolerance {c['finetune_loss_tolerance']:.0e})"
    )
    why = "official quirks" if c["official_quirks"] else "bf16"
    if "fast" in result:
        fast = result["fast"]
        lines.append(f"  fast product {fast['sampler']}{', recovery ' + str(fast['recovery']) if fast.get('recovery') else ''}"
                     " (saliency shared with the exact product):")
        lines.append(f"  {'stage':<13}{'fast/s':>12}{'vs ref':>9}{'vs exact':>10}{'FLOPs saved':>13}{'peak mem':>12}"
                     + (f"{'MFU':>8}" if mfu else ""))
        for stage in STAGES:
            e = fast[stage]
            row = (f"  {stage:<13}{e['product_sps']:>12.2f}{e['speedup']:>8.2f}x{e['speedup_vs_exact']:>9.2f}x"
                   f"{100 * e['flops_saved_vs_exact']:>12.1f}%{_mib(e['peak_mem_bytes']):>12}")
            if mfu:
                row += f"{100 * e['product_mfu']:>7.1f}%"
            lines.append(row)
        p = fast["parity"]
        lines.append(f"  fast parity: answer agreement with exact {100 * p['agreement']:.1f}% (tolerance "
                     f"{100 * p['tolerance']:.0f}%): {'passed' if p['passed'] else 'FAILED'}")
    lines.append(
        f"  checks{'' if c['strict'] else f' ({why}: reported, not enforced)'}: purified answers identical "
        f"{c['answers_identical']}, masked sets identical {c['masked_sets_identical']}, saliency max rel. "
        f"error {c['saliency_max_rel_err']:.1e} (tolerance {c['saliency_tolerance']:.0e}), "
        f"fine-tuning loss rel. diff {loss}"
    )
    return "\n".join(lines)


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
        default=0,
        help="torch CPU threads of both sides (default 0: torch's own, one per core)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each workload this many times and keep each side's fastest time per stage (default 1)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="product batches run at once (disp.parallel; default 0: one per torch thread on a CPU, 1 on a GPU)",
    )
    ap.add_argument("--device", default=None, help="device of the main workload (default: cpu)")
    ap.add_argument(
        "--gpu-8b", action="store_true", help="also run LLaDA-V's 8B shape with random bf16 weights (CUDA)"
    )
    ap.add_argument(
        "--gpu-8b-anyres", action="store_true", help="the 8B shape with LLaDA-V's anyres layout, 3699 visual tokens"
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
    ap.add_argument("--fast", action="store_true",
                    help="also run the fast product (approximate purification) and report its parity")
    ap.add_argument("--fast-cache-refresh", type=int, default=FAST_SAMPLER.get("prompt_cache_refresh", 0),
                    help="the fast product's SamplerConfig.prompt_cache_refresh (default %(default)s)")
    ap.add_argument("--fast-threshold", type=float, default=FAST_SAMPLER.get("confidence_threshold", 1.0),
                    help="the fast product's SamplerConfig.confidence_threshold (default %(default)s; 1 = off)")
    ap.add_argument("--fast-bf16-cpu", action=argparse.BooleanOptionalAction,
                    default=FAST_FINETUNE.get("bf16_cpu", False),
                    help="the fast product's FinetuneConfig.bf16_cpu (recovery in bf16 autocast on a CPU; "
                         "default %(default)s)")
    ap.add_argument("--fast-strict", action="store_true", help="exit 1 when the fast product misses parity")
    ap.add_argument("--no-warm-up", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=("shapes-base", "trained", "tiny"), default="shapes-base",
                    help="CPU workload: shapes-base (random weights, the figures' default), trained (the shipped "
                         "SHAPES base: a confident model, on which confidence-threshold decoding saves work)")
    ap.add_argument("--gen-length", type=int, default=32, help=argparse.SUPPRESS)  # = steps = block (tests)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.workers < 0:
        ap.error(f"--workers must be at least 0 (0: automatic), got {args.workers}")
    args.fast_sampler = None
    if args.fast:
        from disp.config import SamplerConfig

        args.fast_sampler = {"prompt_cache_refresh": args.fast_cache_refresh,
                             "confidence_threshold": args.fast_threshold}
        try:
            SamplerConfig(**args.fast_sampler)
        except ValueError as err:
            ap.error(f"--fast-cache-refresh / --fast-threshold: {err}")
    args.fast_recovery = {"bf16_cpu": True} if args.fast and args.fast_bf16_cpu else None
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


def _repeated(w: Workload, tmp: Path, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """`--repeat` runs of one workload (warmed up before the first), combined by `best_of`."""
    return best_of([
        run_workload(
            w,
            tmp,
            warm_up=not args.no_warm_up and r == 0,
            peak_flops=gpu_peak_flops(device, args.peak_tflops),
            official_quirks=args.official_quirks,
            workers=args.workers,
            fast=args.fast_sampler,
            fast_recovery=args.fast_recovery,
        )
        for r in range(args.repeat)
    ])


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
        res = _repeated(w, tmp, device, args)
        print(format_table(res, f"DiSP stages, reference vs product: {w.name} on {out['device']}"))
        out.update(res)
        if not passed(res):
            failures.append("outputs differ or a tolerance was exceeded (see checks)")
        if args.fast_strict and "fast" in res and not res["fast"]["parity"]["passed"]:
            failures.append("the fast product misses answer-agreement parity (see fast.parity)")
        del w
        for key, anyres in (("gpu_8b", False), ("gpu_8b_anyres", True)):
            if getattr(args, key):
                _gpu_8b(args, tmp, key, anyres, out, failures)
        out["wall_s"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _gpu_8b(args: argparse.Namespace, tmp: Path, key: str, anyres: bool, out: dict, failures: list[str]) -> None:
    """One 8B-shape workload on the GPU, its figures under `out[key]`."""
    flag = "--" + key.replace("_", "-")
    gdev = torch.device(args.gpu_8b_device)
    if gdev.type == "cuda" and not torch.cuda.is_available():
        out[key] = {"skipped": "no CUDA device"}
        failures.append(f"{flag} needs a CUDA device; skipped")
        return
    try:
        gw = gpu_8b_workload(tmp / key, args.gpu_8b_samples, args.gpu_8b_reference_samples, 1, device=str(gdev),
                             lm=args.gpu_8b_lm, vision=args.gpu_8b_vision, anyres=anyres)
        gres = _repeated(gw, tmp, gdev, args)
    except torch.OutOfMemoryError as err:  # report it rather than lose the figures above
        out[key] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        failures.append(f"{flag}: {out[key]['error']}")
        return
    finally:
        gw = None
        if gdev.type == "cuda":
            torch.cuda.empty_cache()
    gres["device"] = device_description(gdev)
    print(format_table(gres, f"DiSP stages, reference vs product: {gres.get('name', key)} on {gres['device']}"))
    out[key] = gres
    if not passed(gres):
        failures.append(f"{flag}: outputs differ or a tolerance was exceeded (see checks)")


if __name__ == "__main__":
    sys.exit(main())
