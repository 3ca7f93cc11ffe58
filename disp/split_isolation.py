"""Coarse-to-fine isolation: the isolation score (`disp.saliency.isolation_saliency`) found by splitting groups.

Isolation shows each visual token alone and measures the first step's top-k KL against showing none: robust on
a saturated model, but N_v + 1 forwards per sample (729 to 3,699 at LLaDA-V's sizes). Here a *group* of visual
tokens is shown alone (every other one held as the mask embedding) and scored by the same divergence,

    s(S) = KL(p_S ‖ p_∅)  over p_S's top-k entries of the first block,

and only the groups that say most are split further, as in adaptive group testing:

1. the sample's N_b visual tokens, in raster order, are cut into `split_groups` contiguous ranges, each scored;
2. each round halves, of all the ranges scored so far and not halved yet, the `split_beam` whose tokens are
   credited most, s(S) / |S| (best-first), and scores both halves;
3. rounds stop when no scored range is left to halve or the next would pass `split_budget` forwards.

Best-first on the per-token credit, not a beam over the last round's ranges: a trigger drawn on several
separate tokens (four patches, a blended pattern) puts several ranges at the trigger's divergence, and a
per-round beam followed two of them down and left the rest as whole ranges, while best-first halves whichever
range's tokens stand highest wherever it is. And the credit doubles at each halving that keeps the trigger, so
the descent goes deep on one trigger before it goes wide: at 729 tokens (ranges of 91) 20 forwards take one
range down to a single token, where a beam of 2 per round stopped at ranges of 11, whose share of a trigger's
divergence falls under the floor.

A token's score is its share of the divergence of the smallest range scored that holds it, s(S) / |S|: the
full divergence when the descent reached it alone, a per-token share when it stayed in a range. A trigger that
sets the backdoor off alone moves the first step about as much in any range that holds it (107-146 nats on the
SHAPES quick cells, a clean token alone up to about 10), so the descent follows it in O(beam · log N_v)
forwards and it keeps its full divergence. The divergence of clean content grows with the range, though: with
ranges of 9 clean tokens it sometimes beat the trigger's range in the first round (docs/saliency.md), so the
first ranges should be small enough that the trigger outweighs their content.

Cost per sample: 1 + at most `split_budget` forwards of the full sequence, whatever N_v (the copies of all the
batch's samples run `occlusion_rows` at a time). Not the paper's method: disp's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disp.config import SaliencyConfig, SamplerConfig
from disp.models.base import MDLM, PromptBatch
from disp.saliency import isolation_reference, padded_scores


def initial_ranges(n: int, groups: int) -> list[tuple[int, int]]:
    """[0, n) cut into min(groups, n) contiguous ranges whose sizes differ by at most one."""
    g = min(groups, n)
    edges = [round(j * n / g) for j in range(g + 1)]
    return [(edges[j], edges[j + 1]) for j in range(g)]


def halves(lo: int, hi: int) -> list[tuple[int, int]]:
    mid = (lo + hi + 1) // 2
    return [(lo, mid), (mid, hi)]


def plan_round(open_: dict[tuple[int, int], float], beam: int, left: int) -> list[tuple[int, int]]:
    """The ranges to halve next: of `open_` (range → score, the ranges scored and not halved yet), the `beam`
    splittable ones whose tokens are credited most (score / size), fewer when `left` forwards do not pay for two
    halves each; ties go to the earlier range."""
    splittable = sorted((r for r in open_ if r[1] - r[0] > 1), key=lambda r: (-open_[r] / (r[1] - r[0]), r[0]))
    return splittable[: min(beam, left // 2)]


def _score_ranges(
    model: MDLM,
    prompt: PromptBatch,
    ref,
    jobs: list[tuple[int, int, int]],
    rows_per_pass: int,
    calls: list[int],
) -> list[float]:
    """s(S) for each job (sample b, lo, hi): the copy of sample b with visual tokens lo..hi-1 alone shown."""
    blank, mask, shown, kl, P, G = ref
    pos, valid = prompt.image_positions, prompt.visual_mask()
    N = pos.shape[1]
    out: list[float] = []
    for start in range(0, len(jobs), rows_per_pass):
        chunk = torch.tensor(jobs[start : start + rows_per_pass], device=blank.device)  # (n, 3)
        b, lo, hi = chunk.unbind(1)
        idx = torch.arange(N, device=blank.device)
        show = (idx >= lo[:, None]) & (idx < hi[:, None]) & valid[b]  # (n, N)
        r, i = show.nonzero().unbind(1)
        x = blank[b].clone()
        x[r, pos[b[r], i]] = shown[b[r], i]
        logits = model.forward_embeds(x, mask[b], logits_from=P)[:, :G]
        calls[0] += len(b)
        out += kl(b, logits).tolist()
    return out


def descend(
    counts: list[int], config: SaliencyConfig, score: Callable[[list[tuple[int, int, int]]], list[float]]
) -> list[dict[tuple[int, int], float]]:
    """The rounds of the descent for samples of `counts` visual tokens: `score` gets each round's jobs
    (sample b, lo, hi) at once and returns s(S) per job; returns every range scored, per sample (range → s)."""
    scored: list[dict[tuple[int, int], float]] = [{} for _ in counts]
    halved: list[set[tuple[int, int]]] = [set() for _ in counts]
    todo = [(b, lo, hi) for b, n in enumerate(counts) for lo, hi in initial_ranges(n, config.split_groups)]
    while todo:
        for (b, lo, hi), s in zip(todo, score(todo), strict=True):
            scored[b][(lo, hi)] = s
        plans = [
            plan_round({r: s for r, s in scored[b].items() if r not in halved[b]}, config.split_beam,
                       config.split_budget - len(scored[b]))
            for b in range(len(counts))
        ]
        for b, plan in enumerate(plans):
            halved[b].update(plan)
        todo = [(b, *h) for b, plan in enumerate(plans) for r in plan for h in halves(*r)]
    return scored


@torch.no_grad()
def split_isolation_saliency(
    model: MDLM,
    prompt: PromptBatch,
    config: SaliencyConfig,
    sampler: SamplerConfig,
    *,
    forwards: list[int] | None = None,
) -> torch.Tensor:
    """Coarse-to-fine isolation scores: prompt of B samples → scores [B, N] (float32), −inf past a sample's own
    visual tokens. `forwards`, when given, gets the sequence copies run (the reference included) appended."""
    ref = isolation_reference(model, prompt, config, sampler)
    calls = [prompt.embeds.shape[0]]  # the all-masked reference: one copy per sample
    counts = prompt.visual_counts()
    scored = descend(counts, config,
                     lambda jobs: _score_ranges(model, prompt, ref, jobs, config.occlusion_rows, calls))
    if forwards is not None:
        forwards.append(calls[0])
    scores = torch.zeros(prompt.image_positions.shape, dtype=torch.float64)
    for b in range(len(counts)):
        for (lo, hi), s in sorted(
            scored[b].items(), key=lambda kv: kv[0][0] - kv[0][1]
        ):  # largest ranges first
            scores[b, lo:hi] = s / (hi - lo)  # smaller ranges overwrite the larger ones that hold them
    return padded_scores(scores.to(prompt.embeds.device), prompt)
