"""Where each saliency method ranks the trigger's own visual tokens (docs/reproduction.md, "Why the Fisher
score misses the trigger").

    python -m experiments.diagnostics.trigger_rank CELL [--n 40] [--json OUT]

CELL is a reproduction cell (`<work>/<target>-<trigger>-p<ratio>/`, as `python -m experiments.reproduce` leaves it, with
`poisoned/` and `backdoored/`). For the first n poisoned training samples, under the backdoored projector,
every visual token is scored by

- the paper's Fisher form: Hutchinson with M = 6 (the product's default) and M = 64, and exactly (JVPs);
- the Fisher form of the tempered distributions softmax(z/T), T = 3 and 10 (a diagnostic only);
- the exact KL of occluding one token (`SaliencyConfig(method="occlusion")`, disp's variant);
- the KL of showing one token alone against showing none (`SaliencyConfig(method="isolation")`, disp's
  second variant),

and the report gives, per method, how often a trigger token ranks first, how often all of the trigger's
main tokens (at least half covered by the patch, or the most covered one when none is) are inside the top floor(ρ·N_v) for ρ = 0.1 and 0.3, and
the median rank of the best trigger token. It also reports the model's first-step probability of its
top token at answer position 0: near 1 for a well-implanted backdoor, where the Fisher p(1 − p) vanishes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disp.attacks import TriggerConfig, apply_trigger
from disp.cell import CellConfig
from disp.config import SaliencyConfig
from disp.models import load
from disp.models.base import MDLM
from disp.models.llada_v import vision_config_from
from disp.pipeline import load_dataset
from disp.saliency import first_step_inputs, hutchinson_saliency, visual_saliency

SAMPLER = CellConfig().sampler  # as the reproduction runs
METHODS = {
    "fisher (M=6)": dict(config=SaliencyConfig(method="fisher")),
    "fisher (M=64)": dict(config=SaliencyConfig(method="fisher", probes=64)),
    "fisher (exact)": dict(config=SaliencyConfig(method="fisher", exact=True)),
    "fisher, T=3": dict(config=SaliencyConfig(method="fisher"), temperature=3.0),
    "fisher, T=10": dict(config=SaliencyConfig(method="fisher"), temperature=10.0),
    "occlusion": dict(config=SaliencyConfig(method="occlusion")),
    "isolation": dict(config=SaliencyConfig(method="isolation")),
}


def trigger_coverage(trigger: TriggerConfig, image_size: int, patch: int) -> np.ndarray:
    """Fraction of each visual token's pixels that the trigger overwrites: [N_v] (row-major token grid)."""
    changed = np.zeros((image_size, image_size), dtype=bool)
    for fill in ((255, 255, 255), (128, 128, 128), (0, 0, 0)):  # a pixel the trigger sets differs from one fill
        img = Image.new("RGB", (image_size, image_size), fill)
        changed |= (np.asarray(apply_trigger(img, trigger)) != np.asarray(img)).any(-1)
    n = image_size // patch
    return changed[: n * patch, : n * patch].reshape(n, patch, n, patch).mean((1, 3)).reshape(-1)


def score(model: MDLM, prompt, method: dict) -> torch.Tensor:
    if "temperature" in method:
        return hutchinson_saliency(model, prompt, method["config"], SAMPLER, temperature=method["temperature"])
    return visual_saliency(model, prompt, method["config"], SAMPLER)


def position0_confidence(model: MDLM, prompt) -> list[float]:
    """First-step probability of the top token at answer position 0, per row."""
    with torch.no_grad():
        embeds, mask = first_step_inputs(model, prompt, SAMPLER.gen_length)
        logits = model.forward_embeds(embeds, mask, logits_from=prompt.embeds.shape[1])[:, 0]
    return torch.softmax(logits.double(), -1).max(-1).values.tolist()


def trigger_ranks(cell: Path, base: Path, n: int = 40, batch: int = 8) -> dict:
    """Per method: first-rank share, all-main-tokens-in-top-ρ shares, median best rank (see the module doc)."""
    manifest = json.loads((cell / "poisoned" / "manifest.json").read_text())
    model = load(base, projector=cell / "backdoored" / "projector.safetensors")
    vcfg = vision_config_from(model.config)
    coverage = trigger_coverage(TriggerConfig(**manifest["trigger"]), vcfg["image_size"], vcfg["patch_size"])
    touched = np.flatnonzero(coverage > 0)
    main = np.flatnonzero(coverage >= min(0.5, coverage.max()))  # a patch smaller than half a token: its best
    samples, source = load_dataset(cell / "poisoned" / "data.json", cell / "poisoned")
    poisoned = set(manifest["poisoned_ids"])
    chosen = [s for s in samples if s.id in poisoned][:n]
    ranks: dict[str, list[np.ndarray]] = {name: [] for name in METHODS}
    conf: list[float] = []
    for lo in range(0, len(chosen), batch):
        part = chosen[lo : lo + batch]
        prompt = model.prompt_batch([s.question for s in part], [source.open(s.image) for s in part])
        conf += position0_confidence(model, prompt)
        for name, method in METHODS.items():
            order = score(model, prompt, method).argsort(dim=1, descending=True).numpy()
            ranks[name] += [np.argsort(row) for row in order]  # rank of each token
    n_v = len(coverage)
    out = {"cell": str(cell), "samples": len(chosen), "trigger": manifest["trigger"],
           "trigger_tokens": touched.tolist(), "main_trigger_tokens": main.tolist(),
           "position0_top_prob_median": statistics.median(conf),
           "position0_top_prob_min": min(conf), "methods": {}}
    for name, rs in ranks.items():
        best = np.array([r[touched].min() for r in rs])
        worst_main = np.array([r[main].max() for r in rs])
        out["methods"][name] = {
            "trigger_first": float(np.mean(best == 0)),
            **{f"main_in_top_rho{rho:g}": float(np.mean(worst_main < int(rho * n_v))) for rho in (0.1, 0.3)},
            "median_best_rank": float(np.median(best)),
        }
    return out


def cell_arguments(prog: str, doc: str, cell_help: str, argv: list[str] | None,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace | None:
    """The command line of a diagnostic that reads one reproduction cell: CELL, --base, --threads, --json (and
    `extra`'s). Sets the threads and the default base; None, with the error printed, if the cell has no
    backdoored projector."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("cell", type=Path, help=cell_help)
    ap.add_argument("--base", type=Path, help="base checkpoint of the run (default: the committed SHAPES base)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the report here")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if not (args.cell / "backdoored" / "projector.safetensors").is_file():
        print(f"error: {args.cell} holds no backdoored/projector.safetensors (run python -m experiments.reproduce first)",
              file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    from disp.cell import BASE_CHECKPOINT

    args.base = args.base or BASE_CHECKPOINT
    return args


def main(argv: list[str] | None = None) -> int:
    args = cell_arguments("python -m experiments.diagnostics.trigger_rank", __doc__, "reproduction cell directory (holds poisoned/ "
                          "and backdoored/)", argv, lambda ap: ap.add_argument(
                              "--n", type=int, default=40, help="poisoned training samples to score"))
    if args is None:
        return 2
    res = trigger_ranks(args.cell, args.base, args.n)
    print(f"{res['samples']} poisoned samples; trigger tokens {res['trigger_tokens']} (main {res['main_trigger_tokens']});"
          f" first-step top probability at answer position 0: median {res['position0_top_prob_median']:.6f}")
    print(f"{'method':<16}{'first':>8}{'all in top 10%':>16}{'all in top 30%':>16}{'median rank':>13}")
    for name, m in res["methods"].items():
        print(f"{name:<16}{m['trigger_first']:>8.2f}{m['main_in_top_rho0.1']:>16.2f}{m['main_in_top_rho0.3']:>16.2f}"
              f"{m['median_best_rank']:>13.1f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
