"""Scoring FLOPs per sample of each saliency method, by the model `measure.FlopCounter` measures with.

    python -m experiments.benchmarks.saliency_cost [--text 100] [--gen 32] [--visual 36 729 3699] [--json OUT]

A first-step input is L = text + N_v + gen tokens. One forward costs 2·L·(matmul parameters, lm_head included)
+ 4·L²·D·layers (scores and values); a backward to the input embeddings (scoring differentiates with respect
to them, no weight gradients) the same matmul FLOPs and twice the attention FLOPs (`FlopCounter`). Per sample:

    fisher           1 forward + M backward passes (the paper's Hutchinson estimator, M = probes)
    occlusion        1 + N_v forwards (the reference, then each token masked)
    isolation        1 + N_v forwards (all masked, then each token shown alone)
    split_isolation  1 + the ranges its plan scores: at most split_budget, fewer when the halvings reach
                     single tokens first (counted by running the plan itself, `disp.split_isolation`)

The vision tower runs once per image for every method and is left out. The table is for LLaDA-V's 8B
language model (`disp.models.llada_lm.LLaDAConfig`'s defaults) unless --tiny, and gives each method's FLOPs and
their ratio to the paper's Fisher form at the same N_v.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from disp.config import SaliencyConfig
from disp.split_isolation import descend

METHODS = ("fisher", "occlusion", "isolation", "split_isolation")


@dataclass(frozen=True)
class LMShape:
    """What the FLOP model needs of a language model's config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, cfg) -> LMShape:
        return cls(
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
            cfg.vocab_size,
        )

    def matmul_params(self) -> int:
        hd = self.hidden // self.heads
        per_layer = (
            2 * self.hidden**2 + 2 * self.hidden * self.kv_heads * hd + 3 * self.hidden * self.intermediate
        )
        return self.layers * per_layer + self.hidden * self.vocab

    def forward(self, L: int) -> tuple[float, float]:
        """(matmul, attention) FLOPs of one forward over L tokens."""
        return 2.0 * L * self.matmul_params(), 4.0 * self.hidden * self.layers * L * L


def split_forwards(n_visual: int, config: SaliencyConfig) -> int:
    """Ranges split_isolation scores for a sample of n_visual tokens: its descent's count, which scores do not
    change (every round halves min(beam, forwards left / 2) of the splittable ranges not halved yet, and a range
    of two or more tokens is left until the budget or the tokens run out)."""
    return len(descend([n_visual], config, lambda jobs: [0.0] * len(jobs))[0])


def passes(method: str, n_visual: int, config: SaliencyConfig) -> tuple[int, int]:
    """(forwards, backwards) per sample."""
    if method == "fisher":
        return 1, config.probes
    if method in ("occlusion", "isolation"):
        return 1 + n_visual, 0
    if method == "split_isolation":
        return 1 + split_forwards(n_visual, config), 0
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def scoring_flops(
    shape: LMShape, method: str, n_visual: int, text: int, gen: int, config: SaliencyConfig | None = None
) -> float:
    """Language-model FLOPs of scoring one sample by `method`."""
    config = config or SaliencyConfig(method=method)
    fwd, bwd = passes(method, n_visual, config)
    mm, attn = shape.forward(text + n_visual + gen)
    return fwd * (mm + attn) + bwd * (mm + 2 * attn)


def table(shape: LMShape, visual: list[int], text: int, gen: int, config: SaliencyConfig) -> list[dict]:
    rows = []
    for n in visual:
        paper = scoring_flops(shape, "fisher", n, text, gen, config)
        for method in METHODS:
            f = scoring_flops(shape, method, n, text, gen, config)
            fwd, bwd = passes(method, n, config)
            rows.append(
                {
                    "n_visual": n,
                    "method": method,
                    "forwards": fwd,
                    "backwards": bwd,
                    "flops": f,
                    "vs_paper": f / paper,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.saliency_cost", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--text", type=int, default=100, help="prompt tokens besides the visual ones")
    ap.add_argument("--gen", type=int, default=32, help="answer length (gen_length)")
    ap.add_argument("--visual", type=int, nargs="+", default=[36, 729, 3699], help="visual tokens per sample")
    ap.add_argument(
        "--budget", type=int, default=SaliencyConfig.split_budget, help="split_isolation's split_budget"
    )
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    from disp.models.llada_lm import LLaDAConfig

    cfg = SaliencyConfig(split_budget=args.budget)
    shape = LMShape.of(LLaDAConfig())
    rows = table(shape, args.visual, args.text, args.gen, cfg)
    print(
        f"LLaDA-V 8B language model ({shape.matmul_params() / 1e9:.2f}B matmul parameters), text {args.text}, "
        f"answer {args.gen} tokens; split_isolation: groups {cfg.split_groups}, beam {cfg.split_beam}, "
        f"budget {cfg.split_budget}"
    )
    print(f"{'N_v':>6} {'method':<16}{'passes':>14}{'TFLOPs':>10}{'x paper':>9}")
    for r in rows:
        passes_ = f"{r['forwards']}F" + (f"+{r['backwards']}B" if r["backwards"] else "")
        print(
            f"{r['n_visual']:>6} {r['method']:<16}{passes_:>14}{r['flops'] / 1e12:>10.1f}{r['vs_paper']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text": args.text, "gen": args.gen, "config": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
