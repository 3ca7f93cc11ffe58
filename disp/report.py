"""The defense's report (report.json): per sample what the defense saw and did, the samples it suspects, and the
checks that need no ground truth. Pure functions over the stages' outputs; `disp.defend` gathers the inputs.

    samples       per image sample: saliency summary (max, mean, top tokens), the visual tokens held, the original
                  and purified first answer, whether any answer changed, the first step's top-1 probability,
                  and for a changed sample the purified model's unmasked answer
    suspected     the changed samples (the rewrite's own verdict), ranked by saliency evidence: the highest
                  token score first, a sample without scores after every scored one
    residual      of the samples whose first answer changed, the share whose unmasked answer from the purified
                  model (the fine-tuned projector, no token held) is still the original, suspected answer: the
                  backdoor the defense left behind, measured without ground truth
    saturation    the share of samples whose first denoising step is saturated (top-1 p >= `SATURATED_P` at the
                  first answer position), where the Fisher form is blind (docs/findings.md, finding 1)
    ground_truth  with the attack's manifest: precision and recall of `suspected` against the poisoned ids

A dataset larger than `SAMPLE_ROWS` samples keeps that many rows in `samples` (the suspected ones first, then
by position) and says so in `samples_truncated`; every sample's full record stays in purified.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from disp.data import Sample, answers_kept
from disp.metrics import normalise_answer

SATURATED_P = 0.999  # first-step top-1 probability from which a sample counts as saturated
SATURATION_WARN_SHARE = 0.05  # warn above this share of saturated samples
SAMPLE_ROWS = 2000  # per-sample rows kept in report.json
TOP_TOKENS = 5  # highest-scoring visual tokens listed per sample


def saliency_summary(scores: Sequence[float], top: int = TOP_TOKENS) -> dict[str, Any]:
    """One sample's saliency [N_b] → {"max", "mean", "top": the `top` highest-scoring token indices, best first}."""
    if not scores:
        return {"max": None, "mean": None, "top": []}
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return {"max": max(scores), "mean": sum(scores) / len(scores), "top": order[:top]}


def same_answer(a: str, b: str) -> bool:
    """Whether two answers say the same words (`disp.metrics.normalise_answer`: case, punctuation, articles)."""
    return normalise_answer(a) == normalise_answer(b)


def sample_rows(
    samples: Sequence[Sample],
    purified: Mapping[str, Mapping[str, Any]] | None,
    saliency: Mapping[str, Sequence[float]] | None,
    top1: Mapping[str, float] | None,
    unmasked: Mapping[str, str] | None,
) -> list[dict[str, Any]]:
    """One row per image sample, in dataset order. `purified`: the purified records by id (None: the defense
    purifies nothing); `saliency`: scores by id; `top1`: first-step top-1 probability by id; `unmasked`: the
    purified model's unmasked first answer by id (the samples whose first answer changed)."""
    rows = []
    for s in samples:
        rec = (purified or {}).get(s.id)
        info = (rec or {}).get("disp") or {}
        row: dict[str, Any] = {
            "index": s.index,
            "id": s.id,
            "image": s.image,
            "saliency": saliency_summary(saliency[s.id]) if saliency and s.id in saliency else None,
            "first_step_top1": (top1 or {}).get(s.id),
            "held_tokens": info.get("masked_visual_tokens", []),
            "original_answer": s.answer,
            "purified_answer": info.get("purified_answer", s.answer),
            "changed": rec is not None and not answers_kept(rec),
        }
        if rec is None and purified is not None:
            row["dropped"] = True  # a filtering defense left it out of training
        if unmasked and s.id in unmasked:
            row["unmasked_answer"] = unmasked[s.id]
            row["residual"] = same_answer(unmasked[s.id], s.answer)
        rows.append(row)
    return rows


def first_answer_changed(
    samples: Sequence[Sample], purified: Mapping[str, Mapping[str, Any]]
) -> list[Sample]:
    """The samples whose first answer the purification rewrote (those the residual check regenerates)."""
    out = []
    for s in samples:
        info = (purified.get(s.id) or {}).get("disp") or {}
        if "purified_answer" in info and not same_answer(info["purified_answer"], s.answer):
            out.append(s)
    return out


def rank_suspected(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The changed samples, most suspicious first: by their highest token score (unscored last), then position.
    Each entry: rank, id, index and the evidence (saliency max, max/mean, held tokens, residual)."""
    changed = [r for r in rows if r["changed"]]

    def key(r):
        top = (r["saliency"] or {}).get("max")
        return (top is None, -(top or 0.0), r["index"])

    out = []
    for rank, r in enumerate(sorted(changed, key=key), 1):
        sal = r["saliency"] or {}
        peak = sal["max"] / sal["mean"] if sal.get("mean") else None
        out.append(
            {
                "rank": rank,
                "id": r["id"],
                "index": r["index"],
                "saliency_max": sal.get("max"),
                "saliency_peak_ratio": peak,
                "top_tokens": sal.get("top", []),
                "held_tokens": r["held_tokens"],
                "residual": r.get("residual"),
            }
        )
    return out


def residual_backdoor(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Of the samples regenerated unmasked with the purified model, how many still give the original answer."""
    done = [r for r in rows if "unmasked_answer" in r]
    still = sum(bool(r["residual"]) for r in done)
    return {"regenerated": len(done), "still_original": still, "rate": still / len(done) if done else None}


def saturation(top1: Mapping[str, float] | None, method: str | None) -> tuple[dict[str, Any], list[str]]:
    """The saturated share of the scored samples and, above `SATURATION_WARN_SHARE` with the Fisher form, a
    warning naming the saliency method that does not depend on the first step's Fisher matrix."""
    if not top1:
        return {"measured": 0, "saturated": 0, "share": None, "threshold": SATURATED_P}, []
    k = sum(p >= SATURATED_P for p in top1.values())
    share = k / len(top1)
    stats = {"measured": len(top1), "saturated": k, "share": share, "threshold": SATURATED_P}
    if share <= SATURATION_WARN_SHARE or method != "fisher":
        return stats, []
    return stats, [
        f"{k} of {len(top1)} samples ({share:.0%}) have a saturated first denoising step (top-1 "
        f"probability >= {SATURATED_P}): there F = diag(p) - pp^T is near 0 and the paper's Fisher form "
        "is known to miss the trigger (docs/findings.md). Saliency method 'split_isolation' (`--method "
        "split_isolation`, API settings.saliency.method; about 3x the Fisher form's cost) or 'isolation' (one "
        "forward per visual token) is more reliable on such a model (docs/saliency.md)."
    ]


def ground_truth(
    suspected_ids: Sequence[str], sample_ids: Sequence[str], poisoned_ids: Sequence[str]
) -> dict:
    """Precision and recall of the suspected samples against the attack's poisoned ids (`disp poison`'s manifest);
    ValueError naming ids that are not samples of the dataset."""
    poisoned = {str(i) for i in poisoned_ids}
    unknown = poisoned - set(sample_ids)
    if unknown:
        raise ValueError(f"manifest names ids that are not samples of the dataset: {sorted(unknown)[:5]}")
    hit = len(poisoned & set(suspected_ids))
    return {
        "poisoned": len(poisoned),
        "suspected": len(suspected_ids),
        "true_positives": hit,
        "precision": hit / len(suspected_ids) if suspected_ids else None,
        "recall": hit / len(poisoned) if poisoned else None,
    }


def cap_rows(rows: list[dict], suspected: Sequence[Mapping[str, Any]], cap: int = SAMPLE_ROWS) -> list[dict]:
    """At most `cap` rows: the suspected samples in rank order first, then the others by position."""
    if len(rows) <= cap:
        return rows
    by_id = {r["id"]: r for r in rows}
    first = [by_id[s["id"]] for s in suspected[:cap]]
    seen = {r["id"] for r in first}
    return first + [r for r in rows if r["id"] not in seen][: cap - len(first)]


def build_report(
    samples: Sequence[Sample],
    *,
    purified: Mapping[str, Mapping[str, Any]] | None = None,
    saliency: Mapping[str, Sequence[float]] | None = None,
    top1: Mapping[str, float] | None = None,
    unmasked: Mapping[str, str] | None = None,
    method: str | None = None,
    poisoned_ids: Sequence[str] | None = None,
    cap: int = SAMPLE_ROWS,
) -> dict[str, Any]:
    """The report's per-sample part: {"summary": flat figures, "samples", "samples_total", "samples_truncated",
    "suspected", "residual_backdoor", "saturation", "ground_truth" (None without a manifest), "warnings"}.
    `method`: the saliency method that scored the samples (the saturation warning concerns "fisher")."""
    rows = sample_rows(samples, purified, saliency, top1, unmasked)
    suspected = rank_suspected(rows)
    residual = residual_backdoor(rows)
    sat, warnings = saturation(top1, method)
    truth = None
    if poisoned_ids is not None:
        truth = ground_truth([s["id"] for s in suspected], [s.id for s in samples], poisoned_ids)
    summary = {
        "suspected": len(suspected),
        "residual_regenerated": residual["regenerated"],
        "residual_still_original": residual["still_original"],
        "residual_backdoor_rate": residual["rate"],
        "saturated_fraction": sat["share"],
    }
    if truth is not None:
        summary |= {"precision": truth["precision"], "recall": truth["recall"]}
    kept = cap_rows(rows, suspected, cap)
    return {
        "summary": summary,
        "samples": kept,
        "samples_total": len(rows),
        "samples_truncated": len(kept) < len(rows),
        "suspected": suspected[:cap],
        "residual_backdoor": residual,
        "saturation": sat,
        "ground_truth": truth,
        "warnings": warnings,
    }


__all__ = [
    "SATURATED_P",
    "SATURATION_WARN_SHARE",
    "SAMPLE_ROWS",
    "build_report",
    "first_answer_changed",
    "ground_truth",
    "rank_suspected",
    "residual_backdoor",
    "same_answer",
    "sample_rows",
    "saliency_summary",
    "saturation",
]
