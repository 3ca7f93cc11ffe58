"""Peak resident memory of `disp.models.load` against the checkpoint's size on disk.

    python -m experiments.benchmarks.load_memory [--layers N] [--out DIR] [--keep] [--json OUT]
    python -m experiments.benchmarks.load_memory --checkpoint DIR      # measure an existing checkpoint

Writes a random bf16 checkpoint in LLaDA-V's published layout (`disp.models.tiny.write_random_checkpoint`:
sharded safetensors with an index; LM 4096 wide, 12288 MLP, 32 heads, 126,464-token vocabulary; SigLIP
so400m at 384 px; anyres_max_4 with image_newline) with `--layers` of the 32 language-model layers (default
4: 4.6 GB), then loads it in a fresh Python process and prints the peak RSS the load added (the kernel's
high-water mark, reset just before `load` through /proc/self/clear_refs) and its ratio to the checkpoint's
bytes on disk. The loader builds on the meta device and reads each tensor into its parameter, so the
target is a ratio of at most 1.2 (issue 26); the earlier loader built the model in float32 first and then
read the whole state dict (to measure it: export that commit's `disp` with `git archive <commit> disp | tar -x -C
OLD` and run `--checkpoint DIR` with `PYTHONPATH=OLD`; this script imports nothing of `disp` at module level).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 1.2

_CHILD = r"""
import json, re, sys
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
from disp import models
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status("VmRSS")
model = models.load(sys.argv[1])
peak = status("VmHWM")
params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
print(json.dumps({"rss_before": before, "peak_rss": peak, "rss_after": status("VmRSS"), "param_bytes": params,
                  "dtypes": dtypes}))
"""


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def measure_load(path: Path) -> dict:
    """Load `path` in a fresh process: RSS before, peak and after (bytes), the checkpoint's size, the ratio."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["checkpoint_bytes"] = checkpoint_bytes(path)
    res["added_peak"] = res["peak_rss"] - res["rss_before"]
    res["ratio"] = res["added_peak"] / res["checkpoint_bytes"]
    return res


def write_llada_v_shape(out: Path, layers: int, max_shard_bytes: int = 1 << 30) -> Path:
    import torch

    from disp.models.tiny import LLADA_V_ANYRES, write_random_checkpoint
    from experiments.benchmarks.workloads import LLADA_V_8B_LM, LLADA_V_VOCAB, SIGLIP_SO400M

    return write_random_checkpoint(out, vocab_size=LLADA_V_VOCAB, lm={**LLADA_V_8B_LM, "num_hidden_layers": layers},
                                   vision=SIGLIP_SO400M, image=LLADA_V_ANYRES, dtype=torch.bfloat16,
                                   max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="language-model layers of the 32 (default 4: 4.6 GB)")
    p.add_argument("--out", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--checkpoint", type=Path, help="measure this checkpoint directory instead of writing one")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    tmp = None if args.out or args.checkpoint else tempfile.TemporaryDirectory(prefix="disp-load-")
    path = args.checkpoint or write_llada_v_shape(args.out or Path(tmp.name) / "ckpt", args.layers)
    shards = len(list(path.glob("*.safetensors")))
    try:
        res = {"checkpoint": str(path), **measure_load(path)}
    finally:
        if tmp is not None and not args.keep:
            tmp.cleanup()
    gib = 1 << 30
    print(f"{path}: {res['checkpoint_bytes'] / gib:.2f} GiB on disk in {shards} shard(s)")
    print(f"  loaded parameters {res['param_bytes'] / gib:.2f} GiB ({', '.join(res['dtypes'])}); RSS before load "
          f"{res['rss_before'] / gib:.2f} GiB, peak {res['peak_rss'] / gib:.2f} GiB, after {res['rss_after'] / gib:.2f} GiB")
    print(f"  peak RSS added by the load: {res['added_peak'] / gib:.2f} GiB = {res['ratio']:.3f}x the checkpoint "
          f"(target <= {TARGET})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["ratio"] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
