"""Coarse-to-fine isolation: the isolation score (`disp.saliency.isolation_saliency`) found by splitting groups.

Isolation shows each visual token alone and measures the first step's top-k KL against showing none: robust on
a saturated model, but N_v + 1 forwards per sample (729 to 3,699 at LLaDA-V's sizes). Here a *group* of visual
tokens is shown alone (every other one held as the mask embedding) and scored by the same divergence,

    s(S) = KL(p_S ‖ p_∅)  over p_S's top-k entries of the first block,

and only the groups that say most are split further, as in adaptive group testing:

1. the sample's N_b visual tokens, in raster order, are cut into `split_groups` contiguous ranges, each scored;
2. each round halves the `split_beam` highest-scoring ranges of the round before (ranges of one round differ in
   size by at most one token, so their divergences compare like with like) and scores both halves;
3. rounds stop when no range of the last round can be split or the next would pass `split_budget` forwards.

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


def plan_round(last: dict[tuple[int, int], float], beam: int, left: int) -> list[tuple[int, int]]:
    """The ranges to halve next: the `beam` highest-scoring splittable ones of the last round's `last` (range →
    score), fewer when `left` forwards do not pay for two halves each; ties go to the earlier range."""
    splittable = sorted((r for r in last if r[1] - r[0] > 1), key=lambda r: (-last[r], r[0]))
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
    scored: list[dict[tuple[int, int], float]] = [{} for _ in counts]  # every range scored, per sample
    todo = [[(b, lo, hi) for lo, hi in initial_ranges(n, config.split_groups)] for b, n in enumerate(counts)]
    while any(todo):
        jobs = [j for per in todo for j in per]
        last: list[dict[tuple[int, int], float]] = [{} for _ in counts]
        for (b, lo, hi), s in zip(
            jobs, _score_ranges(model, prompt, ref, jobs, config.occlusion_rows, calls), strict=True
        ):
            scored[b][(lo, hi)] = last[b][(lo, hi)] = s
        todo = [
            [
                (b, *h)
                for r in plan_round(last[b], config.split_beam, config.split_budget - len(scored[b]))
                for h in halves(*r)
            ]
            for b in range(len(counts))
        ]
    if forwards is not None:
        forwards.append(calls[0])
    scores = torch.zeros(prompt.image_positions.shape, dtype=torch.float64)
    for b in range(len(counts)):
        for (lo, hi), s in sorted(
            scored[b].items(), key=lambda kv: kv[0][0] - kv[0][1]
        ):  # largest ranges first
            scores[b, lo:hi] = s / (hi - lo)  # smaller ranges overwrite the larger ones that hold them
    return padded_scores(scores.to(prompt.embeds.device), prompt)
