"""Dataset-level stages of a defense, with files in and files out.

    score     → scores.json       Fisher–Jacobian saliency of every visual token (Eq. 3–8)
    purify    → purified.json     answers rewritten with the top-ρ tokens held masked (Eq. 9–11)
    finetune  → projector.safetensors + metrics.json   projector-only SFT on the purified data
    defend    → all of the above + report.json, for any defense in `DefenseConfig.DEFENSES`

Each stage takes `on_progress(done, total)` and `should_stop()` (polled between batches; raises
`Cancelled`). `defend` records a fingerprint of each stage's inputs (file hashes and settings) in
`stages.json` and skips a stage whose output exists with the same fingerprint.

Scoring and purification batch samples of similar prompt length together (outputs keep the input
order), decode the next batch's images on a background thread while the model works, and run the
vision tower once per distinct image: pass one `VisionCache` to both stages to share its outputs.
On a CPU, `workers` > 1 runs that many batches at once, one per core (`disp.parallel`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from disp import models
from disp.baselines import magnitude_prune, oracle_filter, random_drop, read_manifest
from disp.batching import VisionCache, length_buckets, loaded_batches, visual_counts
from disp.config import DESCRIBE_QUESTION, DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.constants import IMAGE_PLACEHOLDER
from disp.data import ImageSource, Sample, load_records, open_image_source, parse_samples, write_json
from disp.finetune import Cancelled, finetune_projector, result_dict
from disp.models.base import MDLM
from disp.models.checkpoint import write_state_dict
from disp.parallel import map_ordered, resolve_workers
from disp.purify import PurifiedBatch, choose_masked, purify_batch
from disp.saliency import input_grads_only, per_sample, visual_saliency

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]
PROJECTOR_FILE, PURIFIED_FILE, REPORT_FILE, SCORES_FILE = (
    "projector.safetensors", "purified.json", "report.json", "scores.json")

__all__ = ["Cancelled", "score", "purify", "finetune", "merge_shards", "defend", "file_hash"]


# -- inputs -------------------------------------------------------------------------------------
def file_hash(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_dataset(data_json: str | Path, images: str | Path) -> tuple[list[Sample], ImageSource]:
    return parse_samples(load_records(data_json), Path(data_json).name), open_image_source(images)


def _select(samples: list[Sample], indices: Sequence[int] | None) -> list[Sample]:
    if indices is None:
        return samples
    bad = [i for i in indices if not 0 <= i < len(samples)]
    if bad:
        raise ValueError(f"shard indices out of range 0..{len(samples) - 1}: {bad[:5]}")
    return [samples[i] for i in indices]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _tick(should_stop: StopCheck | None, on_progress: Progress | None, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, total)
    if should_stop is not None and should_stop():
        raise Cancelled(f"stopped after {done} of {total}")


def _model(model_dir, projector, device, dtype: torch.dtype | None = None) -> MDLM:
    """Load for a stage. On a GPU the towers run in bf16 by default; the projector, which is trained and
    shipped, stays float32 (its outputs are cast to the language model's dtype where they are spliced)."""
    device = models.resolve_device(device)
    if dtype is None and torch.device(device).type == "cuda":
        dtype = torch.bfloat16
    model = models.load(model_dir, projector=projector, device=device, dtype=dtype)
    model.projector.float()
    return model


# -- stages ---------------------------------------------------------------------------------------
def question_of(sample: Sample, question: str) -> str:
    """The prompt a stage poses for `sample`: its own question ("sample") or the official re-captioning
    prompt ("describe", `PurifyConfig.question`)."""
    return sample.question if question == "sample" else f"{IMAGE_PLACEHOLDER}\n{DESCRIBE_QUESTION}"


def score_samples(model: MDLM, samples: list[Sample], source: ImageSource, config: SaliencyConfig,
                  sampler: SamplerConfig, *, on_progress: Progress | None = None,
                  should_stop: StopCheck | None = None, cache: VisionCache | None = None,
                  workers: int | None = 1, question: str = "sample") -> dict[str, list[float]]:
    """Saliency of every visual token of every sample: {id: [N_b floats]}, in the order of `samples`; N_b is
    the number of visual tokens of the sample's image (the same for every image unless the model is anyres).

    A sample's scores do not depend on the batch it is scored in (the probe noise is seeded per batch).
    `workers` batches run at once on CPU threads (`disp.parallel`; None or 0: one per core on a CPU).
    `question`: "sample" scores each sample's own question, "describe" the official re-captioning prompt.
    """
    cache = cache if cache is not None else VisionCache()
    ids = [model.tokenizer.encode_prompt(question_of(s, question)) for s in samples]
    counts = visual_counts(model, samples, source)
    # the exact form switches SDPA kernels process-wide, so it runs on one thread
    workers = 1 if config.exact else resolve_workers(workers, model.device)

    def run(batch: list[int]) -> list[torch.Tensor]:
        prompt = model.build_prompts([ids[i] for i in batch], cache.embeds(model, [samples[i].image for i in batch]))
        return per_sample(visual_saliency(model, prompt, config, sampler).cpu(), prompt)

    out: dict[str, list[float]] = {}
    lengths = [len(x) - 1 + n for x, n in zip(ids, counts, strict=True)]
    batches = loaded_batches(model, samples, source, length_buckets(lengths, config.batch_size), cache)
    with input_grads_only(model):  # set once here: worker threads share the parameters' flags
        for batch, scores in map_ordered(run, batches, workers):
            out.update({samples[i].id: row.tolist() for i, row in zip(batch, scores, strict=True)})
            _tick(should_stop, on_progress, len(out), len(samples))
    return {s.id: out[s.id] for s in samples}


def score(*, model_dir, data_json, images, out_json, config: SaliencyConfig | None = None,
          sampler: SamplerConfig | None = None, indices: Sequence[int] | None = None, projector=None,
          device=None, on_progress: Progress | None = None, should_stop: StopCheck | None = None,
          workers: int | None = 1, question: str = "sample") -> Path:
    """Write {"scores": {id: [...]}} for the selected samples (all by default)."""
    config, sampler = config or SaliencyConfig(), sampler or SamplerConfig()
    samples, source = load_dataset(data_json, images)
    model = _model(model_dir, projector, device)
    scores = score_samples(model, _select(samples, indices), source, config, sampler,
                           on_progress=on_progress, should_stop=should_stop, workers=workers, question=question)
    return write_json(out_json, {"config": asdict(config), "scores": scores})


def purify_samples(model: MDLM, samples: list[Sample], source: ImageSource, config: PurifyConfig,
                   scores: dict[str, list[float]] | None, *, masking: str = "saliency",
                   on_progress: Progress | None = None, should_stop: StopCheck | None = None,
                   cache: VisionCache | None = None, workers: int | None = 1) -> list[dict]:
    """Purified LLaVA records (answer rewritten) with a `disp` field recording what was done, in input order.

    Each sample's scores must cover exactly the visual tokens its image gives the model. With
    `config.question` "describe" every sample is re-captioned and the caption becomes its answer (the
    record keeps the sample's question). `workers` batches run at once on CPU threads (`disp.parallel`;
    None or 0: one per core on a CPU). Each batch samples from its own generator, seeded with
    `config.seed` and its place in the batch order.
    """
    cache = cache if cache is not None else VisionCache()
    workers = resolve_workers(workers, model.device)
    counts = visual_counts(model, samples, source)
    mask_gen = torch.Generator().manual_seed(config.seed)
    # which tokens to hold, chosen per sample in input order (random masking draws as it always did)
    held: list[torch.Tensor] = []
    sal: list[torch.Tensor | None] = []
    for lo in range(0, len(samples), config.batch_size):
        chunk, n = samples[lo : lo + config.batch_size], counts[lo : lo + config.batch_size]
        s = None
        if masking == "saliency":
            wrong = [(x.id, len(scores[x.id]), c) for x, c in zip(chunk, n, strict=True) if len(scores[x.id]) != c]
            if wrong:
                sid, got, want = wrong[0]
                raise ValueError(f"scores of sample {sid!r} cover {got} visual tokens, its image gives the model "
                                 f"{want}")
            s = torch.full((len(chunk), max(n)), float("-inf"))
            for b, x in enumerate(chunk):
                s[b, : n[b]] = torch.tensor(scores[x.id])
        rows = choose_masked(s, n, len(chunk), config.mask_ratio, masking, mask_gen, min_score=config.min_score)
        held += list(rows)
        sal += [row[:c] for row, c in zip(s, n, strict=True)] if s is not None else [None] * len(chunk)
    questions = [question_of(x, config.question) for x in samples]
    ids = [model.tokenizer.encode_prompt(q) for q in questions]

    def run(item: tuple[int, list[int]]) -> PurifiedBatch:
        k, batch = item
        gen = torch.Generator(device=model.device).manual_seed(config.seed + k)
        width = max(len(held[i]) for i in batch)
        idx = torch.stack([torch.cat([held[i], held[i].new_full((width - len(held[i]),), -1)]) for i in batch])
        return purify_batch(model, [questions[i] for i in batch], None, idx, config, generator=gen,
                            image_embeds=cache.embeds(model, [samples[i].image for i in batch]))

    out: dict[int, dict] = {}
    lengths = [len(x) - 1 + n for x, n in zip(ids, counts, strict=True)]
    batches = enumerate(loaded_batches(model, samples, source, length_buckets(lengths, config.batch_size), cache))
    for (_, batch), res in map_ordered(run, batches, workers):
        for i, ans, masked in zip(batch, res.answers, res.masked, strict=True):
            x, s_i = samples[i], sal[i]
            info: dict[str, Any] = {"original_answer": x.answer, "purified_answer": ans,
                                    "masked_visual_tokens": masked, "masking": masking,
                                    "visual_tokens": counts[i], "question": config.question}
            if s_i is not None:
                info["saliency"] = {"max": float(s_i.max()), "mean": float(s_i.mean()),
                                    "top": s_i.topk(min(5, s_i.shape[0])).indices.tolist()}
            out[i] = {"id": x.id, "image": x.image, "conversations": [
                {"from": "human", "value": x.question}, {"from": "gpt", "value": ans}], "disp": info}
        _tick(should_stop, on_progress, len(out), len(samples))
    return [out[i] for i in range(len(samples))]


def purify(*, model_dir, data_json, images, scores_json=None, out_json, config: PurifyConfig | None = None,
           masking: str = "saliency", indices: Sequence[int] | None = None, projector=None, device=None,
           on_progress: Progress | None = None, should_stop: StopCheck | None = None,
           workers: int | None = 1) -> Path:
    """Write the purified records (LLaVA format plus a `disp` field) for the selected samples."""
    config = config or PurifyConfig()
    samples, source = load_dataset(data_json, images)
    scores = json.loads(Path(scores_json).read_text())["scores"] if masking == "saliency" else None
    if scores is not None:
        missing = [s.id for s in _select(samples, indices) if s.id not in scores]
        if missing:
            raise ValueError(f"{scores_json}: no scores for ids {missing[:5]}")
    model = _model(model_dir, projector, device)
    recs = purify_samples(model, _select(samples, indices), source, config, scores, masking=masking,
                          on_progress=on_progress, should_stop=should_stop, workers=workers)
    return write_json(out_json, recs)


def merge_shards(*, shard_jsons: Sequence[str | Path], out_json: str | Path) -> Path:
    """Concatenate shard outputs in the order given: score shards merge their dicts, purify shards their lists."""
    parts = [json.loads(Path(p).read_text()) for p in shard_jsons]
    if all(isinstance(p, list) for p in parts):
        return write_json(out_json, [r for p in parts for r in p])
    merged: dict[str, list[float]] = {}
    for p in parts:
        merged.update(p["scores"])
    return write_json(out_json, {"config": parts[0].get("config"), "scores": merged})


def save_projector(model: MDLM, path: Path) -> Path:
    """Write the projector as one safetensors file with `model.mm_projector.*` keys."""
    tmp = path.parent / f".{path.name}.tmp"
    write_state_dict(model.projector_state_dict(), tmp)
    (tmp / "model.safetensors").replace(path)
    tmp.rmdir()
    return path


def kept_answers(records: list[dict]) -> list[bool]:
    """Per purified record: True where the defense kept the original answer (records without a `disp`
    entry, such as a filtered or plain data set, count as kept). The feature anchor's samples."""
    return [r.get("disp", {}).get("purified_answer") == r.get("disp", {}).get("original_answer") for r in records]


def finetune_samples(model: MDLM, samples: list[Sample], source: ImageSource, config: FinetuneConfig,
                     out_dir: Path, *, run_key: str, anchor: list[bool] | None = None,
                     on_progress: Progress | None = None, should_stop: StopCheck | None = None,
                     cache: VisionCache | None = None) -> dict:
    """Fine-tune the projector on samples, write projector.safetensors and metrics.json; return metrics.

    `anchor` flags the samples of the feature anchor (`FinetuneConfig.anchor_weight`; default: all).
    Resumes from `out_dir/finetune_state-<run_key>` if an earlier run with the same key was interrupted.
    Tower outputs come from `cache` where it has them (scoring and purification fill it in `defend`).
    """
    cache = cache if cache is not None else VisionCache()
    cache.fill(model, [s.image for s in samples], source)
    feats = cache.lookup([s.image for s in samples])
    result = finetune_projector(model, [s.question for s in samples], [s.answer for s in samples], feats, config,
                                anchor=anchor, state_dir=out_dir / f"finetune_state-{run_key[:16]}",
                                on_progress=on_progress, should_stop=should_stop)
    save_projector(model, out_dir / PROJECTOR_FILE)
    metrics = result_dict(result)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def finetune(*, model_dir, purified_json, images, out_dir, config: FinetuneConfig | None = None, projector=None,
             device=None, on_progress: Progress | None = None, should_stop: StopCheck | None = None) -> Path:
    """Projector-only fine-tuning on a (purified) LLaVA dataset; resumable from `out_dir`."""
    out_dir = Path(out_dir)
    records = load_records(purified_json)
    samples, source = parse_samples(records, Path(purified_json).name), open_image_source(images)
    config = config or FinetuneConfig()
    key = _Stages.fingerprint(file_hash(model_dir), file_hash(purified_json), file_hash(images),
                              file_hash(projector) if projector else None, asdict(config))
    model = _model(model_dir, projector, device)
    finetune_samples(model, samples, source, config, out_dir, run_key=key,
                     anchor=kept_answers(records), on_progress=on_progress,
                     should_stop=should_stop)
    return out_dir / PROJECTOR_FILE


# -- the whole defense ----------------------------------------------------------------------------
class _Stages:
    """stages.json: each finished stage's input fingerprint, so a re-run skips it."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "stages.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def fingerprint(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def fresh(self, stage: str, fp: str, outputs: Sequence[Path]) -> bool:
        return self.done.get(stage, {}).get("fingerprint") == fp and all(p.exists() for p in outputs)

    def finish(self, stage: str, fp: str, seconds: float, **extra: Any) -> None:
        self.done[stage] = {"fingerprint": fp, "seconds": round(seconds, 3), **extra}
        write_json(self.path, self.done)


def defend(*, model_dir, data_json, images, out_dir, config: DefenseConfig | None = None, projector=None,
           manifest=None, device=None, on_progress: Callable[[str, int, int], None] | None = None,
           should_stop: StopCheck | None = None, workers: int | None = 1) -> dict:
    """Run one defense end to end; writes projector.safetensors, purified.json and report.json.

    `on_progress(stage, done, total)`; `manifest` is read only by "oracle_filter" and for diagnostics.
    `workers`: scoring and purification batches at once on CPU threads (`disp.parallel`; None or 0: one per
    core on a CPU); no output depends on it. Fine-tuning uses torch's own threads.
    """
    config = config or DefenseConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, source = load_dataset(data_json, images)
    inputs = {"model": file_hash(model_dir), "data": file_hash(data_json), "images": file_hash(images),
              "projector": file_hash(projector) if projector else None}
    stages = _Stages(out_dir)
    model = _model(model_dir, projector, device)
    sampler = config.purify.sampler
    report: dict[str, Any] = {"defense": config.defense, "config": config.to_dict(), "inputs": inputs,
                              "num_samples": len(samples), "num_visual_tokens": model.num_image_tokens}

    def progress(stage: str) -> Progress:
        return lambda done, total: on_progress(stage, done, total) if on_progress else None

    cache = VisionCache()  # the tower runs once per image for all three stages

    train, anchor = samples, None
    masking = {"disp": "saliency", "no_mask": "none", "random_mask": "random"}.get(config.defense)
    if masking is not None:
        scores = None
        if masking == "saliency":
            fp = stages.fingerprint(inputs, asdict(config.saliency), asdict(sampler), config.purify.question)
            if not stages.fresh("scoring", fp, [out_dir / SCORES_FILE]):
                t = time.perf_counter()
                s = score_samples(model, samples, source, config.saliency, sampler,
                                  on_progress=progress("scoring"), should_stop=should_stop, cache=cache,
                                  workers=workers, question=config.purify.question)
                write_json(out_dir / SCORES_FILE, {"config": asdict(config.saliency), "scores": s})
                stages.finish("scoring", fp, time.perf_counter() - t)
            scores = json.loads((out_dir / SCORES_FILE).read_text())["scores"]
        fp = stages.fingerprint(inputs, stages.done.get("scoring"), masking, asdict(config.purify))
        if not stages.fresh("purifying", fp, [out_dir / PURIFIED_FILE]):
            t = time.perf_counter()
            recs = purify_samples(model, samples, source, config.purify, scores, masking=masking,
                                  on_progress=progress("purifying"), should_stop=should_stop, cache=cache,
                                  workers=workers)
            write_json(out_dir / PURIFIED_FILE, recs)
            stages.finish("purifying", fp, time.perf_counter() - t)
        purified = json.loads((out_dir / PURIFIED_FILE).read_text())
        train, anchor = parse_samples(purified, PURIFIED_FILE), kept_answers(purified)
        report["answers_changed"] = len(anchor) - sum(anchor)
    elif config.defense in ("random_drop", "oracle_filter"):
        if config.defense == "random_drop":
            train = random_drop(samples, config.drop_ratio, config.finetune.seed)
        else:
            if manifest is None:
                raise ValueError("oracle_filter needs the attack's manifest (--manifest)")
            train = oracle_filter(samples, read_manifest(manifest)["poisoned_ids"])
        write_json(out_dir / PURIFIED_FILE, [{"id": s.id, "image": s.image, "conversations": [
            {"from": "human", "value": s.question}, {"from": "gpt", "value": s.answer}]} for s in train])
    report["num_train"] = len(train)

    if config.defense in ("none", "pruning"):
        if config.defense == "pruning":
            report["sparsity"] = magnitude_prune(model, config.prune_ratio)
        save_projector(model, out_dir / PROJECTOR_FILE)
        if not (out_dir / PURIFIED_FILE).exists():
            write_json(out_dir / PURIFIED_FILE, [])
    else:
        fp = stages.fingerprint(inputs, stages.done.get("purifying"), config.defense, asdict(config.finetune),
                                file_hash(out_dir / PURIFIED_FILE))
        if not stages.fresh("finetuning", fp, [out_dir / PROJECTOR_FILE]):
            t = time.perf_counter()
            metrics = finetune_samples(model, train, source, config.finetune, out_dir, run_key=fp, anchor=anchor,
                                       on_progress=progress("finetuning"), should_stop=should_stop, cache=cache)
            stages.finish("finetuning", fp, time.perf_counter() - t, metrics=metrics)
        report["finetune"] = stages.done["finetuning"].get("metrics")
    report["stages"] = {k: v["seconds"] for k, v in stages.done.items()}
    report["outputs"] = {"projector": PROJECTOR_FILE, "purified": PURIFIED_FILE}
    write_json(out_dir / REPORT_FILE, report)
    return report
