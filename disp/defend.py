"""A whole defense, stage by stage, as `disp.stages` lays it out.

Each stage has a body here (`STAGE_BODIES`): it reads the dataset, the checkpoint and the files of earlier
stages from a `StageRun`, writes its one output file and returns its metrics. `defend` runs a defense's
stages in one process (the model loaded once, the vision tower once per image for all stages); `run_stage`
runs one stage alone, on a shard of the samples where the stage is sharded (the service's worker).

`defend` records each finished stage's fingerprint (the settings it depends on, the files it read and the
fingerprints of the stages before it) in `stages.json` and skips a stage whose output exists with the same
fingerprint, so a re-run resumes where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from disp.baselines import magnitude_prune, oracle_filter, random_drop, read_manifest
from disp.batching import VisionCache
from disp.config import DefenseConfig
from disp.data import (
    ImageSource,
    Sample,
    answers_kept,
    is_text_only,
    load_records,
    merge_records,
    parse_samples,
    write_json,
)
from disp.formats import open_dataset
from disp.models.base import MDLM
from disp.models.checkpoint import read_state_dict
from disp.pipeline import (
    Progress,
    StopCheck,
    file_hash,
    finetune_samples,
    images_hash,
    load_model,
    purify_samples,
    read_saliency,
    save_projector,
    score_samples,
)
from disp.report import SATURATED_P, build_report, first_answer_changed
from disp.stages import (
    DEFENSES,
    PROJECTOR_FILE,
    PURIFIED_FILE,
    SALIENCY_FILE,
    STAGES,
    Stage,
    inputs_of,
    plan,
)


@dataclass
class StageRun:
    """What a stage body reads: settings, data, model, earlier files and metrics, callbacks."""

    config: DefenseConfig
    samples: list[Sample]  # the whole dataset's records with an image
    source: ImageSource
    open_model: Callable[[], MDLM]
    work_dir: Path  # resumable state (fine-tuning) lives here
    files: dict[str, Path] = field(default_factory=dict)  # earlier stages' outputs, by file name
    metrics: dict[str, dict] = field(default_factory=dict)  # earlier stages' metrics, by stage name
    indices: Sequence[int] | None = None  # a sharded stage's records, by position in the file (None: all)
    records: list[dict] = field(default_factory=list)  # every record, text-only ones included
    manifest: Path | None = None
    run_key: str = ""  # the stage's fingerprint: names its resumable state
    workers: int | None = 1
    cache: VisionCache = field(default_factory=VisionCache)
    on_progress: Progress | None = None
    should_stop: StopCheck | None = None

    @cached_property
    def model(self) -> MDLM:
        return self.open_model()

    @property
    def selected(self) -> list[Sample]:
        """The samples among the records at `indices` (a shard counts text-only records too)."""
        if self.indices is None:
            return self.samples
        n = len(self.records) or len(self.samples)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"shard indices out of range 0..{n - 1}: {bad[:5]}")
        wanted = set(self.indices)
        return [s for s in self.samples if s.index in wanted]

    def with_records(self, purified: Sequence[dict], samples: Sequence[Sample]) -> list[dict]:
        """The selected records in order: the samples' as given in `purified`, text-only ones as they are."""
        if not self.records:
            return list(purified)
        return merge_records(self.records, {s.index: r for s, r in zip(samples, purified, strict=True)},
                             self.indices)


def _scoring(run: StageRun, out: Path) -> dict:
    cfg = run.config
    top1: dict[str, float] = {}
    saliency = score_samples(run.model, run.selected, run.source, cfg.saliency, cfg.purify.sampler,
                             on_progress=run.on_progress, should_stop=run.should_stop, cache=run.cache,
                             workers=run.workers, question=cfg.purify.question, confidence=top1)
    write_json(out, {"config": asdict(cfg.saliency), "saliency": saliency, "first_step_top1": top1})
    return {"num_scored": len(saliency), "num_saturated": sum(p >= SATURATED_P for p in top1.values())}


def _purifying(run: StageRun, out: Path) -> dict:
    masking = DEFENSES[run.config.defense].masking
    saliency = read_saliency(run.files[SALIENCY_FILE], run.selected) if masking == "saliency" else None
    samples = run.selected
    records = purify_samples(run.model, samples, run.source, run.config.purify, saliency, masking=masking,
                             on_progress=run.on_progress, should_stop=run.should_stop, cache=run.cache,
                             workers=run.workers)
    write_json(out, run.with_records(records, samples))
    return {"answers_changed": sum(not answers_kept(r) for r in records)}


def _filtering(run: StageRun, out: Path) -> dict:
    cfg = run.config
    if DEFENSES[cfg.defense].needs_manifest:
        if run.manifest is None:
            raise ValueError(f"{cfg.defense} needs the attack's manifest (--manifest)")
        kept = oracle_filter(run.samples, read_manifest(run.manifest)["poisoned_ids"])
    else:
        kept = random_drop(run.samples, cfg.drop_ratio, cfg.finetune.seed)
    kept_at = {s.index for s in kept}
    write_json(out, [r for i, r in enumerate(run.records) if i in kept_at or is_text_only(r)])
    return {"num_train": len(kept)}


def _finetuning(run: StageRun, out: Path) -> dict:
    train = parse_samples(load_records(run.files[PURIFIED_FILE]), PURIFIED_FILE)
    metrics = finetune_samples(run.model, train, run.source, run.config.finetune, out.parent, run_key=run.run_key,
                               anchor=[answers_kept(s.record) for s in train], on_progress=run.on_progress,
                               should_stop=run.should_stop, cache=run.cache)
    return {"num_train": len(train), **metrics}


def _pruning(run: StageRun, out: Path) -> dict:
    sparsity = magnitude_prune(run.model, run.config.prune_ratio)
    save_projector(run.model, out)
    return {"sparsity": sparsity}


def _exporting(run: StageRun, out: Path) -> dict:
    save_projector(run.model, out)
    return {}


def _unmasked_answers(run: StageRun, purified: dict[str, dict]) -> dict[str, str]:
    """The purified model's (the stage's projector laid over the checkpoint) unmasked first answer to each sample
    whose first answer the purification changed: {id: answer}. Regenerated as purification generates (its
    sampler and seed) with no visual token held, to each sample's own first question."""
    changed = first_answer_changed(run.samples, purified)
    if not changed or PROJECTOR_FILE not in run.files:
        return {}
    model = run.model
    model.load_projector_state_dict(read_state_dict(run.files[PROJECTOR_FILE]))
    records = purify_samples(model, [replace(s, later=()) for s in changed], run.source,
                             replace(run.config.purify, question="sample"), None, masking="none",
                             on_progress=run.on_progress, should_stop=run.should_stop, cache=run.cache,
                             workers=run.workers)
    return {s.id: r["disp"]["purified_answer"] for s, r in zip(changed, records, strict=True)}


def _evaluating(run: StageRun, out: Path) -> dict:
    """The report: settings, what each stage did, per sample what the defense saw and changed, the suspected
    samples, the residual backdoor of the purified model and the first step's saturation (`disp.report`)."""
    if run.on_progress:
        run.on_progress(0, 1)
    records = load_records(run.files[PURIFIED_FILE]) if PURIFIED_FILE in run.files else []
    changed = [r["id"] for r in records if not answers_kept(r)]  # any of a record's answers changed
    scored = json.loads(run.files[SALIENCY_FILE].read_text()) if SALIENCY_FILE in run.files else {}
    purified = {str(r["id"]): r for r in records if not is_text_only(r)} if PURIFIED_FILE in run.files else None
    unmasked = _unmasked_answers(run, purified) if purified else {}
    truth = read_manifest(run.manifest)["poisoned_ids"] if run.manifest is not None else None
    detail = build_report(run.samples, purified=purified, saliency=scored.get("saliency"),
                          top1=scored.get("first_step_top1"), unmasked=unmasked,
                          method=(scored.get("config") or {}).get("method"), poisoned_ids=truth)
    n = len(run.samples)
    finetune = run.metrics.get("finetuning", {})
    losses = finetune.get("epoch_losses") or []
    summary = {"num_samples": n, "num_text_only": len(run.records) - n if run.records else 0,
               "num_train": sum(not is_text_only(r) for r in records) if PURIFIED_FILE in run.files else None,
               "answers_changed": len(changed), "answers_changed_fraction": round(len(changed) / n, 6) if n else 0.0,
               "final_loss": losses[-1] if losses else None, "finetune_steps": finetune.get("steps"),
               **detail.pop("summary")}
    report = {"defense": run.config.defense, "config": run.config.to_dict(), "summary": summary,
              "stages": run.metrics, "changed_ids": changed[:10_000], **detail}
    write_json(out, report)
    if run.on_progress:
        run.on_progress(1, 1)
    return summary


MANIFEST_READERS = ("filtering", "evaluating")  # stages whose output depends on the attack's manifest, if given

STAGE_BODIES: dict[str, Callable[[StageRun, Path], dict]] = {
    "scoring": _scoring, "purifying": _purifying, "filtering": _filtering, "finetuning": _finetuning,
    "pruning": _pruning, "exporting": _exporting, "evaluating": _evaluating}
assert set(STAGE_BODIES) == set(STAGES), "every stage of disp.stages has a body"


def _setting(config: DefenseConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def fingerprint(stage: Stage, config: DefenseConfig, inputs: dict, files: dict[str, Path],
                before: Sequence[str]) -> str:
    """What a stage's output depends on: the run's inputs, its settings, the files it reads and the
    fingerprints of the stages before it."""
    settings = {p: _setting(config, p) for p in stage.settings}
    for path in stage.ignores:
        head, _, field = path.rpartition(".")
        owner = next((p for p in stage.settings if head == p or head.startswith(p + ".")), None)
        if owner is None:
            raise ValueError(f"stage {stage.name}: ignored field {path!r} is not inside its settings")
        node = settings[owner]
        for part in head[len(owner):].split(".")[1:]:
            node = node[part]
        node.pop(field)
    parts = [stage.name, inputs, settings,
             {name: file_hash(path) for name, path in sorted(files.items())}, list(before)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(stage: str, *, model_dir, data_json, images=None, out: str | Path, config: DefenseConfig,
              files: dict[str, Path] | None = None, metrics: dict[str, dict] | None = None, projector=None,
              manifest=None, indices: Sequence[int] | None = None, run_key: str = "", device=None,
              workers: int | None = 1, on_progress: Progress | None = None,
              should_stop: StopCheck | None = None) -> dict:
    """Run one stage alone (sharded stages on `indices`); write `out`; return the stage's metrics.
    `files` holds the outputs of the stages before it (see `disp.stages.inputs_of`)."""
    ds = open_dataset(data_json, images)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    run = StageRun(config, ds.samples, ds.source, lambda: load_model(model_dir, projector, device), out.parent,
                   files=dict(files or {}), metrics=dict(metrics or {}), indices=indices, records=ds.records,
                   manifest=manifest,
                   run_key=run_key, workers=workers, on_progress=on_progress, should_stop=should_stop)
    if indices is not None and not STAGES[stage].sharded:
        raise ValueError(f"stage {stage!r} is not sharded")
    return STAGE_BODIES[stage](run, out)


class _Record:
    """stages.json: each finished stage's fingerprint, seconds and metrics, so a re-run skips it."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "stages.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fresh(self, stage: str, fp: str, output: Path) -> bool:
        return self.done.get(stage, {}).get("fingerprint") == fp and output.exists()

    def finish(self, stage: str, fp: str, seconds: float, metrics: dict) -> None:
        self.done[stage] = {"fingerprint": fp, "seconds": round(seconds, 3), "metrics": metrics}
        write_json(self.path, self.done)


def defend(*, model_dir, data_json, images=None, out_dir, config: DefenseConfig | None = None, projector=None,
           manifest=None, device=None, on_progress: Callable[[str, int, int], None] | None = None,
           should_stop: StopCheck | None = None, workers: int | None = 1) -> dict:
    """Run one defense end to end; writes every stage's output under out_dir and returns the report.

    `on_progress(stage, done, total)`; `manifest` (the attack's ground truth) is read by "oracle_filter" and by
    the report, which then gives the suspected samples' precision and recall. `workers`: scoring and
    purification batches at once on CPU threads (`disp.parallel`; None or 0: one per core on a CPU); no
    output depends on it. Fine-tuning uses torch's own threads.
    """
    config = config or DefenseConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(data_json, images)
    inputs = {"model": file_hash(model_dir), "data": file_hash(data_json),
              "images": file_hash(images) if images is not None else images_hash(ds),
              "projector": file_hash(projector) if projector else None}
    record = _Record(out_dir)
    run = StageRun(config, ds.samples, ds.source, lambda: load_model(model_dir, projector, device), out_dir,
                   records=ds.records, manifest=manifest, workers=workers, should_stop=should_stop)
    before: list[str] = []
    for stage in plan(config.defense):
        out = out_dir / stage.writes
        run.files = {f: out_dir / f for f in inputs_of(stage, config.defense)}
        reads = inputs | {"manifest": file_hash(manifest)} if manifest and stage.name in MANIFEST_READERS else inputs
        fp = fingerprint(stage, config, reads, run.files, before)
        if not record.fresh(stage.name, fp, out):
            run.run_key = fp
            run.on_progress = (lambda done, total, s=stage.name: on_progress(s, done, total)) if on_progress else None
            t = time.perf_counter()
            metrics = STAGE_BODIES[stage.name](run, out)
            record.finish(stage.name, fp, time.perf_counter() - t, metrics)
        run.metrics[stage.name] = record.done[stage.name]["metrics"]
        before.append(fp)
    report = json.loads((out_dir / STAGES["evaluating"].writes).read_text())
    report |= {"inputs": inputs, "seconds": {s.name: record.done[s.name]["seconds"] for s in plan(config.defense)},
               "outputs": sorted({s.writes for s in plan(config.defense)} | {"stages.json"})}
    write_json(out_dir / STAGES["evaluating"].writes, report)
    return report


__all__ = ["StageRun", "STAGE_BODIES", "defend", "run_stage", "fingerprint", "PROJECTOR_FILE", "PURIFIED_FILE",
           "SALIENCY_FILE"]
