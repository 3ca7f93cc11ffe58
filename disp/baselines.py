"""The paper's baselines (§4.2): random drop, magnitude pruning, oracle data filtering.

Random drop and oracle filtering choose which training samples the shared projector fine-tuning sees
(with their original answers); pruning edits the projector directly and trains nothing. The oracle
reads the attack's ground-truth manifest, which no real defense has: it is an upper bound.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from disp.data import Sample
from disp.models.base import MDLM


def random_drop(samples: Sequence[Sample], ratio: float, seed: int) -> list[Sample]:
    """Keep all but round(ratio·N) samples chosen at random (paper: 20%)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"drop ratio must be in [0, 1), got {ratio}")
    n_drop = round(ratio * len(samples))
    dropped = set(random.Random(seed).sample(range(len(samples)), n_drop))
    return [s for i, s in enumerate(samples) if i not in dropped]


def read_manifest(path: str | Path) -> dict:
    """The attack's ground truth (written by `disp poison`); only oracle filtering and reports read it."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the poison manifest: {exc}") from exc
    if not isinstance(manifest.get("poisoned_ids"), list):
        raise ValueError(f"{path}: manifest has no 'poisoned_ids' list")
    return manifest


def oracle_filter(samples: Sequence[Sample], poisoned_ids: Sequence[str]) -> list[Sample]:
    """Drop exactly the poisoned samples (an upper bound on any filtering defense)."""
    bad = {str(i) for i in poisoned_ids}
    unknown = bad - {s.id for s in samples}
    if unknown:
        raise ValueError(f"manifest names ids that are not in the dataset: {sorted(unknown)[:5]}")
    return [s for s in samples if s.id not in bad]


@torch.no_grad()
def magnitude_prune(model: MDLM, ratio: float) -> dict[str, float]:
    """Zero the `ratio` smallest-magnitude weights of each projector weight matrix (biases kept).

    Returns the achieved sparsity per weight name.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    sparsity = {}
    for name, p in model.projector.named_parameters():
        if p.dim() < 2:
            continue
        k = int(ratio * p.numel())
        if k:
            threshold = p.abs().flatten().kthvalue(k).values
            p.masked_fill_(p.abs() <= threshold, 0.0)
        sparsity[name] = float((p == 0).float().mean())
    return sparsity
