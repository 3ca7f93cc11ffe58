"""Where the recovery stage's time goes: torch's profiler over projector-only fine-tuning, by kind of operator.

    python -m experiments.benchmarks.profile_recovery [--model trained|shapes-base] [--samples 48] [--epochs 1]
                                                    [--threads 1] [--bf16-cpu]

Fine-tunes the benchmark workload's projector (`experiments.benchmarks.workloads.cpu_workload`, tower outputs
cached as `disp.pipeline.finetune_samples` has them) once to warm up, then once under `torch.profiler`, and prints
the self CPU time per operator kind (matrix multiplies, attention, element-wise, optimiser, the rest), the
matrix multiplies per micro-batch (forward and backward: no weight gradient of the frozen model is computed, so
the backward runs one per frozen linear layer, not two) and the ten most expensive operators.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from disp.finetune import finetune_projector
from disp.pipeline import VisionCache
from experiments.benchmarks.workloads import cpu_workload

KINDS = {  # operator name fragment -> kind (first match wins)
    "scaled_dot_product": "attention",
    "flash_attention": "attention",
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::linear": "matmul",
    "Optimizer": "optimiser",
    "_foreach": "optimiser",
    "aten::mul": "element-wise",
    "aten::add": "element-wise",
    "aten::sub": "element-wise",
    "aten::div": "element-wise",
    "aten::pow": "element-wise",
    "aten::rsqrt": "element-wise",
    "aten::silu": "element-wise",
    "aten::neg": "element-wise",
    "aten::sin": "element-wise",
    "aten::cos": "element-wise",
    "aten::where": "element-wise",
    "aten::cat": "copies",
    "aten::copy_": "copies",
    "aten::to": "copies",
    "softmax": "loss",
    "nll_loss": "loss",
}


def kind_of(name: str) -> str:
    return next((k for frag, k in KINDS.items() if frag in name), "other")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("trained", "shapes-base"), default="trained",
                    help="the shipped SHAPES base (default) or the random-weight benchmark architecture")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a per-core profile)")
    ap.add_argument("--bf16-cpu", action="store_true", help="FinetuneConfig.bf16_cpu (bf16 autocast)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="disp-profile-") as tmp:
        w = cpu_workload(Path(tmp), args.samples, args.epochs, size=args.model)
        cache = VisionCache()
        cache.fill(w.model, [s.image for s in w.samples], w.source, samples=w.samples)
        feats = cache.lookup([s.image for s in w.samples])
        cfg = replace(w.finetune, epochs=args.epochs, bf16_cpu=args.bf16_cpu)
        start = {k: v.clone() for k, v in w.model.projector.state_dict().items()}
        train = ([s.questions for s in w.samples], [s.answers for s in w.samples], feats, cfg)
        finetune_projector(w.model, *train)  # warm-up
        w.model.projector.load_state_dict(start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = finetune_projector(w.model, *train)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    steps = result.steps * cfg.grad_accum
    mm_calls = sum(e.count for e in events if e.key == "aten::mm")
    linears = sum(isinstance(m, torch.nn.Linear) for m in (*w.model.model.layers.modules(), w.model.lm_head))
    print(f"recovery of {w.name}: {args.samples} samples, {args.epochs} epoch(s), {steps} micro-batches of "
          f"{cfg.batch_size}, {args.threads} thread(s), {'bf16 autocast' if args.bf16_cpu else 'float32'}; "
          f"{result.seconds:.2f} s ({total / 1e6:.2f} s of operator time)")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<14}{us / 1e6:>8.3f} s {100 * us / total:>6.1f} %")
    print(f"  per micro-batch: {mm_calls / steps:.1f} matrix multiplies for {linears} frozen linear layers and the "
          f"projector (forward and backward; weight gradients of the frozen layers would add {linears})")
    print("  most expensive operators (self CPU time):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"    {e.key[:60]:<60}{e.self_cpu_time_total / 1e6:>8.3f} s {e.count:>6} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
