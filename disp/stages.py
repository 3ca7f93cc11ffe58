"""The stages of a defense and the stages each defense runs: the one table that `disp.defend.defend` (all
stages in one process) and the service's worker (one job status per stage, sharded stages fanned out over
workers) both read. Pure data: the service imports it without torch.

    stage       reads                          writes                   sharded
    scoring     the dataset                    saliency.json            yes    saliency of every visual token (Eq. 3-8)
    purifying   the dataset (+ saliency.json)  purified.json            yes    answers re-generated with tokens held (Eq. 9-11)
    filtering   the dataset                    purified.json            no     a subset of the samples kept as they are
    finetuning  purified.json                  projector.safetensors    no     projector-only SFT on the purified set
    pruning     -                              projector.safetensors    no     smallest-magnitude projector weights zeroed
    exporting   -                              projector.safetensors    no     the checkpoint's projector as it is
    evaluating  every earlier output           report.json              no     the report (`disp.report`); changed
                                                                                samples re-answered unmasked

A new stage is an entry in STAGES plus its body in `disp.defend.STAGE_BODIES`; a new defense is an entry in
DEFENSES (its name is then valid in `DefenseConfig.defense`, the CLI and the API).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage: its name is also the job's status while it runs.

    Args:
        name: the stage's name ("scoring", ...).
        needs: files of earlier stages it reads when the defense's plan has them (the dataset and the checkpoint
            are always there).
        writes: the file it writes.
        sharded: whether it runs as independent shards over the samples, merged in sample order.
        settings: the `DefenseConfig` fields (dotted paths) its output depends on; with the files it reads,
            they make the fingerprint that lets a re-run skip the stage.
        summary: one line on what it does.
        ignores: fields inside `settings` (dotted paths) its output does not depend on, left out of the
            fingerprint.
    """

    name: str
    needs: tuple[str, ...]
    writes: str
    sharded: bool
    settings: tuple[str, ...]
    summary: str
    ignores: tuple[str, ...] = ()


SALIENCY_FILE, PURIFIED_FILE, PROJECTOR_FILE, REPORT_FILE = (
    "saliency.json", "purified.json", "projector.safetensors", "report.json")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("scoring", (), SALIENCY_FILE, True, ("saliency", "purify.sampler", "purify.question"),
          "saliency of every visual token of every sample (Eq. 3-8)",
          # the first denoising step is a full forward whatever the decoding after it does
          ignores=("purify.sampler.confidence_threshold", "purify.sampler.prompt_cache_refresh")),
    Stage("purifying", (SALIENCY_FILE,), PURIFIED_FILE, True, ("defense", "purify"),
          "every answer re-generated with the most salient visual tokens held masked (Eq. 9-11)"),
    Stage("filtering", (), PURIFIED_FILE, False, ("defense", "drop_ratio", "finetune.seed"),
          "a subset of the samples, kept as they are"),
    Stage("finetuning", (PURIFIED_FILE,), PROJECTOR_FILE, False, ("finetune",),
          "projector-only fine-tuning on the purified samples"),
    Stage("pruning", (), PROJECTOR_FILE, False, ("prune_ratio",),
          "the smallest-magnitude projector weights zeroed"),
    Stage("exporting", (), PROJECTOR_FILE, False, (), "the checkpoint's projector, unchanged"),
    Stage("evaluating", (SALIENCY_FILE, PURIFIED_FILE, PROJECTOR_FILE), REPORT_FILE, False, ("purify",),
          "the defense's report; the changed samples re-answered unmasked by the purified model"),
)}


@dataclass(frozen=True)
class Defense:
    """One defense: the stages it runs, in order.

    Args:
        name: the `DefenseConfig.defense` value.
        stages: its stages, in order (each a key of STAGES); "evaluating" comes last.
        masking: for a defense that purifies, which visual tokens are held: "saliency" (top-ρ by saliency),
            "random" (ρ of them at random) or "none".
        needs_manifest: it reads the attack's ground truth, so it is an evaluation upper bound, not a defense
            a service can run.
        summary: one line on what it is.
    """

    name: str
    stages: tuple[str, ...]
    masking: str | None = None
    needs_manifest: bool = False
    summary: str = ""


DEFENSES: dict[str, Defense] = {d.name: d for d in (
    Defense("disp", ("scoring", "purifying", "finetuning", "evaluating"), masking="saliency",
            summary="DiSP: hold the most salient visual tokens, re-answer, fine-tune the projector"),
    Defense("none", ("exporting", "evaluating"), summary="no defense: the projector as given"),
    Defense("no_mask", ("purifying", "finetuning", "evaluating"), masking="none",
            summary="ablation: re-answer with no visual token held, then fine-tune"),
    Defense("random_mask", ("purifying", "finetuning", "evaluating"), masking="random",
            summary="ablation: hold randomly chosen visual tokens, re-answer, fine-tune"),
    Defense("random_drop", ("filtering", "finetuning", "evaluating"),
            summary="baseline: drop a random drop_ratio of the samples, fine-tune on the rest"),
    Defense("pruning", ("pruning", "evaluating"), summary="baseline: zero prune_ratio of the projector's weights"),
    Defense("oracle_filter", ("filtering", "finetuning", "evaluating"), needs_manifest=True,
            summary="upper bound: drop exactly the poisoned samples (reads the attack's manifest)"),
)}


def plan(defense: str) -> list[Stage]:
    """The stages `defense` runs, in order."""
    if defense not in DEFENSES:
        raise ValueError(f"defense must be one of {tuple(DEFENSES)}, got {defense!r}")
    return [STAGES[name] for name in DEFENSES[defense].stages]


def inputs_of(stage: Stage, defense: str) -> tuple[str, ...]:
    """The files `stage` reads under `defense`: those of its needs that an earlier stage of the plan writes."""
    earlier = {s.writes for s in plan(defense)[: DEFENSES[defense].stages.index(stage.name)]}
    return tuple(f for f in stage.needs if f in earlier)


def _check_table() -> None:
    for d in DEFENSES.values():
        unknown = [s for s in d.stages if s not in STAGES]
        if unknown or d.stages[-1] != "evaluating":
            raise AssertionError(f"defense {d.name!r}: stages {d.stages} (unknown {unknown}; last must be evaluating)")
        if ("purifying" in d.stages) != (d.masking is not None):
            raise AssertionError(f"defense {d.name!r}: masking is set exactly when it purifies")


_check_table()
