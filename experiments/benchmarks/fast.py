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
from dataclasses import replace
from pathlib import Path
from typing import Any

from disp.pipeline import VisionCache, purify_samples
from experiments.benchmarks.measure import FlopCounter, StagePeaks, _sync
from experiments.benchmarks.workloads import Workload, finetune_purified, purified_samples

# Defaults of `perf.py --fast`: the settings that kept CP and ASR w/t within a point of exact on every cell of
# experiments/results/fast (the prompt cache refreshed every 8 steps, the recovery in bf16 on a CPU).
FAST_SAMPLER = {"prompt_cache_refresh": 8}
FAST_FINETUNE: dict[str, Any] = {"bf16_cpu": True}  # FinetuneConfig overrides of the fast product's recovery
AGREEMENT_TOLERANCE = 0.9  # parity: at least this fraction of purified answers identical to exact decoding


def run_fast(
    w: Workload,
    tmp: Path,
    *,
    sampler: dict[str, Any],
    finetune: dict[str, Any] | None = None,
    scores: dict[str, list[float]],
    cache: VisionCache,
    exact_records: list[dict],
    counter: FlopCounter,
    workers: int | None,
    restore,
) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, Any]]:
    """Fast purification (SamplerConfig overrides `sampler`) and fine-tuning (FinetuneConfig overrides `finetune`)
    on `w`; returns (seconds, flops, peak memory) per stage and parity.

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
        train = purified_samples(records)
        mem.switch("finetune")
        _sync(dev)
        t0 = time.perf_counter()
        finetune_purified(replace(w, finetune=replace(w.finetune, **(finetune or {}))), train, tmp, cache)
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
    return seconds, flops, dict(mem.peaks), {"sampler": dict(sampler), "recovery": dict(finetune or {}),
                                             "parity": parity}


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
    info = {"sampler": first["sampler"], "recovery": first.get("recovery", {}), "parity": parity}
    return fast_entries(result, seconds, flops, peaks, info, peak_flops)


# -- predicted figures at LLaDA-V's 8B shape, from the FLOP model and the H100 run of the exact product ------------
H100_RUN = Path(__file__).resolve().parents[1] / "results" / "perf-h100.json"


def lm_flops(lm: dict[str, int], vocab: int) -> tuple[float, float]:
    """`FlopCounter`'s LM constants: (matmul parameters incl. the lm head, attention FLOPs per query-key pair)."""
    D, inter, layers = lm["hidden_size"], lm["intermediate_size"], lm["num_hidden_layers"]
    kv = lm["num_key_value_heads"] * D // lm["num_attention_heads"]
    return layers * (2 * D * D + 2 * D * kv + 3 * D * inter) + D * vocab, 4 * D * layers


def purification_flops(
    lm: dict[str, int], vocab: int, prompt: int, gen: int = 32, steps: int = 32, refresh: int = 0
) -> tuple[float, float]:
    """Model FLOPs of purifying one sample (one block): (full forwards, answer-only cached forwards)."""
    mm, attn = lm_flops(lm, vocab)
    L = prompt + gen
    n_full = -(-steps // refresh) if refresh else steps
    full = n_full * (2 * L * mm + attn * L * L)
    cached = (steps - n_full) * (2 * gen * mm + attn * gen * L)
    return full, cached


def predict_8b(run: dict[str, Any], refresh: int, cached_mfu: float, prompt: int, steps: int = 32
               ) -> dict[str, float]:
    """Seconds per sample of each stage of the fast product at the 8B shape: saliency and fine-tuning as the exact
    product measured them; purification's full forwards at the measured purification MFU, its cached forwards at
    `cached_mfu` (an assumption: answer-only forwards are 256 tokens a batch, below the tensor cores' appetite).
    `steps`: forwards per answer (32 exact; fewer under a confidence threshold, which commits several tokens a
    step)."""
    from experiments.benchmarks.workloads import LLADA_V_8B_LM, LLADA_V_VOCAB

    g = run["gpu_8b"]
    per = {s: g[s]["product_s"] / g[s]["product_samples"] for s in ("saliency", "purification", "finetune")}
    ref = g["end_to_end"]["reference_s"] / g["end_to_end"]["reference_samples"]
    peak = g["purification"]["product_achieved_flops_per_s"] / g["purification"]["product_mfu"]
    full, cached = purification_flops(LLADA_V_8B_LM, LLADA_V_VOCAB, prompt, steps=steps, refresh=refresh)
    exact_full, _ = purification_flops(LLADA_V_8B_LM, LLADA_V_VOCAB, prompt)
    fast_pur = full / (g["purification"]["product_mfu"] * peak) + cached / (cached_mfu * peak)
    exact_pur = exact_full / (g["purification"]["product_mfu"] * peak)
    e2e = per["saliency"] + fast_pur + per["finetune"]
    return {
        "bound_free_purification": ref / (per["saliency"] + per["finetune"]),
        "prompt_tokens": prompt,
        "refresh": refresh,
        "steps": steps,
        "cached_mfu": cached_mfu,
        "purification_flops_exact": exact_full,
        "purification_flops_fast": full + cached,
        "flops_ratio": exact_full / (full + cached),
        "purification_s_exact_model": exact_pur,
        "purification_s_fast": fast_pur,
        "purification_speedup": exact_pur / fast_pur,
        "end_to_end_s_fast": e2e,
        "end_to_end_s_reference": ref,
        "end_to_end_speedup": ref / e2e,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from experiments.benchmarks.workloads import LLADA_V_8B_LM, LLADA_V_VOCAB

    p = argparse.ArgumentParser(
        description="Predicted fast-product figures at LLaDA-V's 8B shape (FLOP model + the "
        "H100 run of the exact product, experiments/results/perf-h100.json)."
    )
    p.add_argument("--run", type=Path, default=H100_RUN)
    args = p.parse_args(argv)
    run = json.loads(args.run.read_text())
    print("purification FLOPs per sample, 32 steps over 32 answer tokens (FlopCounter's model):")
    print(f"{'prompt':>8}{'exact':>12}" + "".join(f"{f'refresh {r}':>20}" for r in (4, 8, 16, 32)))
    for prompt in (800, 3770):
        exact = sum(purification_flops(LLADA_V_8B_LM, LLADA_V_VOCAB, prompt))
        row = "".join(
            f"{f:>12.3e} ({exact / f:4.1f}x)"
            for f in (
                sum(purification_flops(LLADA_V_8B_LM, LLADA_V_VOCAB, prompt, refresh=r))
                for r in (4, 8, 16, 32)
            )
        )
        print(f"{prompt:>8}{exact:>12.3e}{row}")
    print(
        "\nper sample at the measured 8B shape (800-token prompts), saliency and fine-tuning as measured on the H100:"
    )
    print(
        f"{'refresh':>8}{'cached MFU':>11}{'purify exact s':>15}{'purify fast s':>14}{'x':>6}{'e2e fast s':>11}"
        f"{'e2e ref s':>10}{'e2e x':>7}"
    )
    for refresh in (8, 32):
        for mfu in (0.456, 0.15):
            r = predict_8b(run, refresh, mfu, 800)
            print(
                f"{refresh:>8}{100 * mfu:>10.1f}%{r['purification_s_exact_model']:>15.3f}{r['purification_s_fast']:>14.3f}"
                f"{r['purification_speedup']:>5.1f}x{r['end_to_end_s_fast']:>11.3f}{r['end_to_end_s_reference']:>10.3f}"
                f"{r['end_to_end_speedup']:>6.2f}x"
            )
    print("\nwith a confidence threshold: forwards per answer (steps) as the threshold leaves them, refresh 0 and 8, "
          "cached MFU 15%")
    print(f"{'steps':>8}{'refresh':>8}{'purify x':>9}{'e2e fast s':>11}{'e2e x':>7}")
    for steps in (32, 16, 8, 4, 2):
        for refresh in (0, 8):
            r = predict_8b(run, refresh, 0.15, 800, steps=steps)
            print(f"{steps:>8}{refresh:>8}{r['purification_speedup']:>8.1f}x{r['end_to_end_s_fast']:>11.3f}"
                  f"{r['end_to_end_speedup']:>6.2f}x")
    r = predict_8b(run, 0, 0.15, 800)
    print(f"bound: purification free, saliency and fine-tuning as measured: end to end "
          f"{r['bound_free_purification']:.2f}x the reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
