"""The fast product beside the exact one: purification with the approximate sampler settings, then recovery.

Scoring does not depend on the sampler's approximations (`SamplerConfig.confidence_threshold`,
`prompt_cache_refresh`), so the fast product reuses the exact product's saliency scores and reports the exact
product's saliency figures; purification (with the fast sampler) and fine-tuning (on the fast rewrite) are run
and timed. Parity is answer agreement with the exact product's rewrite: the fraction of samples whose purified
answer is identical. Whether a setting keeps the defense (CP and ASR after recovery) is measured on trained
cells by `experiments/fast_parity.py`; a random-weight workload has no backdoor to measure.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from disp.data import parse_samples
from disp.pipeline import VisionCache, finetune_samples, purify_samples
from experiments.benchmarks.measure import FlopCounter, StagePeaks, _sync
from experiments.benchmarks.workloads import Workload

# Defaults of `perf.py --fast`: the setting that kept CP and ASR w/t of exact in experiments/results/fast.
FAST_SAMPLER = {"prompt_cache_refresh": 8}
AGREEMENT_TOLERANCE = 0.9  # parity: at least this fraction of purified answers identical to exact decoding


def run_fast(
    w: Workload,
    tmp: Path,
    *,
    sampler: dict[str, Any],
    scores: dict[str, list[float]],
    cache: VisionCache,
    exact_records: list[dict],
    counter: FlopCounter,
    workers: int | None,
    restore,
) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, Any]]:
    """Fast purification and fine-tuning on `w`; returns (seconds, flops, peak memory) per stage and parity.

    `restore()` puts the projector back where the exact product started from, before and after fine-tuning."""
    model, dev = w.model, w.model.device
    pcfg = replace(w.purify, sampler=replace(w.purify.sampler, **sampler))
    seconds: dict[str, float] = {}
    flops: dict[str, float] = {}
    with StagePeaks(dev) as mem:
        counter.backwards_per_grad_forward = 0
        counter.take()
        mem.switch("purification")
        _sync(dev)
        t0 = time.perf_counter()
        records = purify_samples(model, w.samples, w.source, pcfg, scores, cache=cache, workers=workers)
        _sync(dev)
        seconds["purification"] = time.perf_counter() - t0
        flops["purification"] = counter.take()
        counter.backwards_per_grad_forward = 1
        restore()
        train = parse_samples(
            [{k: r[k] for k in ("id", "image", "conversations")} for r in records], "purified"
        )
        mem.switch("finetune")
        _sync(dev)
        t0 = time.perf_counter()
        finetune_samples(
            model,
            train,
            w.source,
            w.finetune,
            tmp / f"ft-fast-{uuid.uuid4().hex[:8]}",
            run_key=uuid.uuid4().hex,
            cache=cache,
        )
        _sync(dev)
        seconds["finetune"] = time.perf_counter() - t0
        flops["finetune"] = counter.take()
    restore()
    same = [
        a["disp"]["purified_answer"] == b["disp"]["purified_answer"]
        for a, b in zip(records, exact_records, strict=True)
    ]
    agreement = sum(same) / len(same)
    parity = {
        "passed": agreement >= AGREEMENT_TOLERANCE,
        "agreement": agreement,
        "tolerance": AGREEMENT_TOLERANCE,
        "measure": "fraction of purified answers identical to exact decoding",
    }
    return seconds, flops, dict(mem.peaks), {"sampler": dict(sampler), "parity": parity}


def fast_entries(
    result: dict[str, Any],
    seconds: dict[str, float],
    flops: dict[str, float],
    peaks: dict[str, int],
    info: dict[str, Any],
    peak_flops: float | None,
) -> dict[str, Any]:
    """The `fast` object of perf.py's JSON: per stage the exact product's fields for the fast product
    (`speedup` against the reference, `speedup_vs_exact` against the exact product); saliency is shared."""
    out: dict[str, Any] = dict(info)
    stages = ("saliency", "purification", "finetune")
    s = {st: seconds.get(st, result[st]["product_s"]) for st in stages}
    f = {st: flops.get(st, result[st]["product_model_flops"]) for st in stages}
    m = {st: peaks.get(st, result[st]["peak_mem_bytes"]) for st in stages}
    s["end_to_end"], f["end_to_end"], m["end_to_end"] = sum(s.values()), sum(f.values()), max(m.values())
    for st in (*stages, "end_to_end"):
        exact = result[st]
        n = exact["product_samples"]
        e = {
            "product_s": s[st],
            "product_sps": n / s[st],
            "product_samples": n,
            "peak_mem_bytes": m[st],
            "product_model_flops": f[st],
            "product_achieved_flops_per_s": f[st] / s[st],
            "shared_with_exact": st == "saliency",
        }
        e["speedup"] = e["product_sps"] / exact["reference_sps"]
        e["speedup_vs_exact"] = exact["product_s"] / s[st]
        e["flops_saved_vs_exact"] = (
            1 - f[st] / exact["product_model_flops"] if exact["product_model_flops"] else 0.0
        )
        if peak_flops:
            e["product_mfu"] = e["product_achieved_flops_per_s"] / peak_flops
        out[st] = e
    return out


def best_fast(runs: list[dict[str, Any]], result: dict[str, Any], peak_flops: float | None) -> dict[str, Any]:
    """`fast` of repeated runs (`compare.best_of`): each fast stage's fastest time, against the combined result."""
    first = runs[0]["fast"]
    stages = ("purification", "finetune")
    seconds = {st: min(r["fast"][st]["product_s"] for r in runs) for st in stages}
    flops = {st: first[st]["product_model_flops"] for st in stages}
    peaks = {st: max(r["fast"][st]["peak_mem_bytes"] for r in runs) for st in stages}
    parity = {**first["parity"], "passed": all(r["fast"]["parity"]["passed"] for r in runs)}
    return fast_entries(
        result, seconds, flops, peaks, {"sampler": first["sampler"], "parity": parity}, peak_flops
    )
