"""The lab: studies of the method that are not part of the installed product (reproduction, SHAPES
pretraining, diagnostics, benchmarks, results). Run from the repository root, e.g.
`python -m experiments.reproduce --quick`."""

from pathlib import Path

BASE_V3_CHECKPOINT = Path(__file__).parent / "assets" / "shapes-base-v3"  # the saturated base (docs/findings.md)
