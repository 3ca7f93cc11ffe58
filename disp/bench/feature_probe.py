"""How much of a visual token's place in the image its features hold: linear probes on a SHAPES base
(docs/reproduction.md, "Position in the visual features").

    python -m disp.bench.feature_probe BASE [--n-train 1500] [--n-test 400] [--threads N] [--json OUT]

A pretrained SigLIP's features say where each patch is; a tower trained from scratch on position-free
labels may wash that out, and then the language model has no way to answer "where is the dog?" except
through its own rotary positions. For the tower's output and for the projector's output (what the LM
reads), a softmax-regression probe, fit on the visual tokens of `n_train` random scenes, predicts for
each visual token of `n_test` other scenes (a) its grid cell ("top left", ...) and (b) its index among the
visual tokens. The report gives each probe's held-out accuracy and its chance level.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from disp.bench import scenes, shapes
from disp.bench.asr_by_position import token_cells


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 classes: int, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """Held-out accuracy of softmax regression: features [N, C] → labels [N] in 0..classes-1.

    Features are standardised with the training set's mean and std; full-batch Adam for `steps`.
    """
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError(f"features and labels differ in length: {x_train.shape[0]} vs {y_train.shape[0]}, "
                         f"{x_test.shape[0]} vs {y_test.shape[0]}")
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(x_train.shape[1], classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(x_train @ w + b, y_train).backward()
        opt.step()
    with torch.no_grad():
        return ((x_test @ w + b).argmax(-1) == y_test).float().mean().item()


@torch.no_grad()
def visual_features(model, config: shapes.ShapesConfig, n: int, rng: random.Random,
                    batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower output [n, N_v, C_v] and projector output [n, N_v, D] of `n` random scenes (float32, CPU)."""
    tower, projected = [], []
    for start in range(0, n, batch):
        images = [scenes.render_scene(shapes.sample_scene(config, rng), config.image_size)
                  for _ in range(min(batch, n - start))]
        f = model.vision_features(model.preprocess(images).to(model.device, model.dtype))
        tower.append(f.float().cpu())
        projected.append(model.project(f).float().cpu())
    return torch.cat(tower), torch.cat(projected)


def position_report(model, config: shapes.ShapesConfig, *, n_train: int = 1500, n_test: int = 400,
                    seed: int = 0) -> dict:
    """Held-out accuracy of the cell and token-index probes on the tower's and the projector's output, on
    scenes drawn with `config` (the checkpoint's own scene settings)."""
    rng = random.Random(f"feature_probe/{seed}")
    train, test = visual_features(model, config, n_train, rng), visual_features(model, config, n_test, rng)
    n_v = train[0].shape[1]
    side = int(round(n_v ** 0.5))
    labels = {"cell": (torch.tensor(token_cells(side, config.grid)), config.grid ** 2),
              "token_index": (torch.arange(n_v), n_v)}
    report: dict = {"visual_tokens": n_v, "grid": config.grid, "n_train": n_train, "n_test": n_test, "probes": {}}
    for where, (tr, te) in zip(("tower", "projector"), zip(train, test, strict=True), strict=True):
        for label, (y, k) in labels.items():
            acc = linear_probe(tr.flatten(0, 1), y.repeat(n_train), te.flatten(0, 1), y.repeat(n_test),
                               classes=k, seed=seed)
            report["probes"][f"{where}/{label}"] = {"accuracy": acc, "chance": 1 / k}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m disp.bench.feature_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="SHAPES checkpoint folder")
    p.add_argument("--n-train", type=int, default=1500, help="scenes whose visual tokens fit the probes")
    p.add_argument("--n-test", type=int, default=400, help="held-out scenes the probes are scored on")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the probes' init")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 leaves torch's default")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        p.error(f"--n-train and --n-test must be >= 1, got {args.n_train} and {args.n_test}")
    if not (args.base / "config.json").is_file():
        p.error(f"{args.base} is not a checkpoint folder (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from disp.models import load

    torch.manual_seed(args.seed)
    model = load(args.base, device="cpu").eval()
    config = shapes.config_of_checkpoint(args.base)
    report = {"base": str(args.base), **position_report(model, config, n_train=args.n_train, n_test=args.n_test,
                                                        seed=args.seed)}
    print(f"{report['visual_tokens']} visual tokens, {report['grid']}x{report['grid']} grid; "
          f"probes fit on {args.n_train} scenes, scored on {args.n_test}")
    for name, r in report["probes"].items():
        print(f"{name:<24} {100 * r['accuracy']:6.1f} %   (chance {100 * r['chance']:.1f} %)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
