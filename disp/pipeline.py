"""Sample-level stages with files in and out: the work inside each stage of `disp.defend`.

    score_samples      saliency of every visual token (Eq. 3-8)
    purify_samples     answers rewritten with the top-ρ tokens held masked (Eq. 9-11)
    finetune_samples   projector-only SFT on the purified samples

Each takes `on_progress(done, total)` and `should_stop()` (polled between batches; raises `Cancelled`).
Scoring and purification batch samples of similar prompt length together (outputs keep the input
order), decode the next batch's images on a background thread while the model works, and run the
vision tower once per distinct image: pass one `VisionCache` to every stage to share its outputs.
On a CPU, `workers` > 1 runs that many batches at once, one per core (`disp.parallel`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from disp import models
from disp.batching import VisionCache, length_buckets, loaded_batches, visual_counts
from disp.config import DESCRIBE_QUESTION, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.constants import IMAGE_PLACEHOLDER
from disp.data import ImageSource, Sample, answers_kept, is_text_only, purified_record, write_json
from disp.finetune import Cancelled, finetune_projector, result_dict
from disp.formats import Dataset, open_dataset
from disp.models.base import MDLM, PromptBatch
from disp.models.checkpoint import write_state_dict
from disp.parallel import map_ordered, resolve_workers
from disp.purify import PurifiedBatch, choose_masked, purify_batch
from disp.saliency import first_step_inputs, input_grads_only, per_sample, visual_saliency
from disp.stages import PROJECTOR_FILE

Progress = Callable[[int, int], None]
StopCheck = Callable[[], bool]

__all__ = ["Cancelled", "score", "score_samples", "purify_samples", "finetune_samples", "first_step_top1",
           "merge_shards", "file_hash", "load_model", "read_saliency"]


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


def images_hash(ds: Dataset) -> str:
    """sha256 of the images the samples name (names and bytes), for images found beside or inside the data."""
    h = hashlib.sha256()
    for name in sorted({s.image for s in ds.samples}):
        h.update(name.encode())
        h.update(ds.source.read_bytes(name))
    return h.hexdigest()


def load_dataset(data_json: str | Path, images: str | Path | None = None) -> tuple[list[Sample], ImageSource]:
    """Samples (records with an image) and their image source, of any format `disp.formats` reads."""
    ds = open_dataset(data_json, images)
    return ds.samples, ds.source


def _tick(should_stop: StopCheck | None, on_progress: Progress | None, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, total)
    if should_stop is not None and should_stop():
        raise Cancelled(f"stopped after {done} of {total}")


def load_model(model_dir, projector=None, device=None, dtype: torch.dtype | None = None) -> MDLM:
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
    """The first prompt a stage poses for `sample`: its own question ("sample") or the official re-captioning
    prompt ("describe", `PurifyConfig.question`)."""
    return sample.question if question == "sample" else f"{IMAGE_PLACEHOLDER}\n{DESCRIBE_QUESTION}"


@torch.no_grad()
def first_step_top1(model: MDLM, prompt: PromptBatch, sampler: SamplerConfig) -> torch.Tensor:
    """The first denoising step's top-1 probability at the first answer position (every answer token masked):
    [B] float64. Near 1 the step is saturated and the Fisher form of Eq. 3-8 is blind (docs/findings.md)."""
    embeds, mask = first_step_inputs(model, prompt, sampler.gen_length)
    logits = model.forward_embeds(embeds, mask, logits_from=prompt.embeds.shape[1])[:, 0]
    return torch.softmax(logits.double(), -1).max(-1).values.cpu()


def score_samples(model: MDLM, samples: list[Sample], source: ImageSource, config: SaliencyConfig,
                  sampler: SamplerConfig, *, on_progress: Progress | None = None,
                  should_stop: StopCheck | None = None, cache: VisionCache | None = None,
                  workers: int | None = 1, question: str = "sample",
                  confidence: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Saliency of every visual token of every sample: {id: [N_b floats]}, in the order of `samples`; N_b is
    the number of visual tokens of the sample's image (the same for every image unless the model is anyres).
    With a dict `confidence`, also fills it with each sample's `first_step_top1` (one more forward per batch).

    A sample's scores do not depend on the batch it is scored in (the probe noise is seeded per batch).
    `workers` batches run at once on CPU threads (`disp.parallel`; None or 0: one per core on a CPU).
    `question`: "sample" scores each sample's own first question, "describe" the official re-captioning prompt.
    """
    cache = cache if cache is not None else VisionCache()
    ids = [model.tokenizer.encode_prompt(question_of(s, question), system=s.system) for s in samples]
    counts = visual_counts(model, samples, source)
    # the exact form switches SDPA kernels process-wide, so it runs on one thread
    workers = 1 if config.exact else resolve_workers(workers, model.device)

    def run(batch: list[int]) -> tuple[list[torch.Tensor], list[float]]:
        prompt = model.build_prompts([ids[i] for i in batch], cache.embeds(model, [samples[i].image for i in batch]))
        top1 = first_step_top1(model, prompt, sampler).tolist() if confidence is not None else []
        return per_sample(visual_saliency(model, prompt, config, sampler).cpu(), prompt), top1

    out: dict[str, list[float]] = {}
    lengths = [len(x) - 1 + n for x, n in zip(ids, counts, strict=True)]
    batches = loaded_batches(model, samples, source, length_buckets(lengths, config.batch_size), cache)
    with input_grads_only(model):  # set once here: worker threads share the parameters' flags
        for batch, (scores, top1) in map_ordered(run, batches, workers):
            out.update({samples[i].id: row.tolist() for i, row in zip(batch, scores, strict=True)})
            if confidence is not None:
                confidence.update({samples[i].id: p for i, p in zip(batch, top1, strict=True)})
            _tick(should_stop, on_progress, len(out), len(samples))
    return {s.id: out[s.id] for s in samples}


def score(*, model_dir, data_json, images, out_json, config: SaliencyConfig | None = None,
          sampler: SamplerConfig | None = None, projector=None, device=None, on_progress: Progress | None = None,
          should_stop: StopCheck | None = None, workers: int | None = 1, question: str = "sample") -> Path:
    """Write {"config": ..., "saliency": {id: [...]}} for every sample of a dataset."""
    config, sampler = config or SaliencyConfig(), sampler or SamplerConfig()
    samples, source = load_dataset(data_json, images)
    saliency = score_samples(load_model(model_dir, projector, device), samples, source, config, sampler,
                             on_progress=on_progress, should_stop=should_stop, workers=workers, question=question)
    return write_json(out_json, {"config": asdict(config), "saliency": saliency})


def read_saliency(path: str | Path, samples: Sequence[Sample]) -> dict[str, list[float]]:
    """The saliency a scoring stage wrote, checked to cover every sample."""
    saliency = json.loads(Path(path).read_text())["saliency"]
    missing = [s.id for s in samples if s.id not in saliency]
    if missing:
        raise ValueError(f"{Path(path).name}: no saliency for ids {missing[:5]}")
    return saliency


def purify_samples(model: MDLM, samples: list[Sample], source: ImageSource, config: PurifyConfig,
                   saliency: dict[str, list[float]] | None, *, masking: str = "saliency",
                   on_progress: Progress | None = None, should_stop: StopCheck | None = None,
                   cache: VisionCache | None = None, workers: int | None = 1) -> list[dict]:
    """Purified LLaVA records with a `disp` field recording what was done, in input order.

    Every answer of a sample is rewritten with the same visual tokens held masked: the first (the image
    question's, whose prompt was scored) from the prompt alone, each later one on the purified turns before
    it; user turns and the system prompt are kept (`disp.data.purified_record`). With `config.question`
    "describe" (the official code) only the first answer is rewritten, as the re-captioning of the image, and
    the later turns are kept. `saliency` maps sample id -> one score per visual token (`score_samples`);
    each must cover exactly the visual tokens its image gives (it is unused unless `masking` is "saliency").

    `workers` batches run at once on CPU threads (`disp.parallel`; None or 0: one per core on a CPU). Each
    batch samples from its own generator, seeded with `config.seed` and its place in the batch order.
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
        s = _score_rows([saliency[x.id] for x in chunk], [x.id for x in chunk], n) if masking == "saliency" else None
        held += list(choose_masked(s, n, len(chunk), config.rho, masking, mask_gen, min_score=config.min_score or 0.0))
        sal += [row[:c] for row, c in zip(s, n, strict=True)] if s is not None else [None] * len(chunk)
    # every answer is rewritten under the sample's held tokens, turn by turn, each on the purified turns before it
    turns = [1 if config.question == "describe" else len(x.answers) for x in samples]
    tok, answers, masked_of = model.tokenizer, [[] for _ in samples], {}
    for turn in range(max(turns, default=0)):
        active = [i for i, t in enumerate(turns) if t > turn]
        prompts = {i: tok.encode_prompt(samples[i].questions[turn] if turn else question_of(samples[i], config.question),
                                        system=samples[i].system,
                                        history=list(zip(samples[i].questions[:turn], answers[i], strict=True)))
                   for i in active}

        def run(item: tuple[int, list[int]], turn: int = turn, prompts: dict = prompts) -> PurifiedBatch:
            k, batch = item
            gen = torch.Generator(device=model.device).manual_seed(config.seed + k + 1_000_003 * turn)
            return purify_batch(model, [prompts[i] for i in batch], None, _stack_padded([held[i] for i in batch]),
                                config, generator=gen,
                                image_embeds=cache.embeds(model, [samples[i].image for i in batch]))

        lengths = [len(prompts[i]) - 1 + counts[i] for i in active]
        buckets = [[active[j] for j in b] for b in length_buckets(lengths, config.batch_size)]
        for (_, batch), res in map_ordered(run, enumerate(loaded_batches(model, samples, source, buckets, cache)),
                                           workers):
            for i, ans, masked in zip(batch, res.answers, res.masked, strict=True):
                answers[i].append(ans)
                masked_of[i] = masked
            _tick(should_stop, on_progress, sum(map(len, answers)), sum(turns))
    out = []
    for i, x in enumerate(samples):
        info: dict[str, Any] = {"masked_visual_tokens": masked_of[i], "masking": masking,
                                "visual_tokens": counts[i], "question": config.question}
        if sal[i] is not None:
            s_i = sal[i]
            info["saliency"] = {"max": float(s_i.max()), "mean": float(s_i.mean()),
                                "top": s_i.topk(min(5, s_i.shape[0])).indices.tolist()}
        out.append(purified_record(x, answers[i] + list(x.answers[len(answers[i]):]), info))
    return out


def _score_rows(rows: list[list[float]], ids: list[str], counts: list[int]) -> torch.Tensor:
    """Per-sample saliency lists → [B, max N_b] padded with −inf, each checked against its image's count."""
    for sid, row, n in zip(ids, rows, counts, strict=True):
        if len(row) != n:
            raise ValueError(f"scores of sample {sid!r} cover {len(row)} visual tokens, its image gives the model {n}")
    out = torch.full((len(rows), max(counts)), float("-inf"))
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Index rows of different lengths → [B, max] padded with −1 (no token)."""
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - len(r),), -1)]) for r in rows])


def merge_shards(*, shard_jsons: Sequence[str | Path], out_json: str | Path) -> Path:
    """Concatenate shard outputs in the order given: scoring shards merge their dicts (scores and first-step
    top-1 probabilities), purifying shards their lists."""
    parts = [json.loads(Path(p).read_text()) for p in shard_jsons]
    if all(isinstance(p, list) for p in parts):
        return write_json(out_json, [r for p in parts for r in p])
    merged: dict[str, list[float]] = {}
    top1: dict[str, float] = {}
    for p in parts:
        merged.update(p["saliency"])
        top1.update(p.get("first_step_top1") or {})
    out = {"config": parts[0].get("config"), "saliency": merged}
    return write_json(out_json, out | {"first_step_top1": top1} if top1 else out)


def save_projector(model: MDLM, path: Path) -> Path:
    """Write the projector as one safetensors file with `model.mm_projector.*` keys."""
    tmp = path.parent / f".{path.name}.tmp"
    write_state_dict(model.projector_state_dict(), tmp)
    (tmp / "model.safetensors").replace(path)
    tmp.rmdir()
    return path


def kept_answers(records: list[dict]) -> list[bool]:
    """Per purified image record (text-only ones are skipped, as they are no samples): True where the defense
    kept every original answer (records without a `disp` entry, such as a filtered or plain data set, count as
    kept). The feature anchor's samples."""
    return [answers_kept(r) for r in records if not is_text_only(r)]


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
    cache.fill(model, [s.image for s in samples], source, samples=samples)
    feats = cache.lookup([s.image for s in samples])
    result = finetune_projector(model, [s.questions for s in samples], [s.answers for s in samples], feats, config,
                                anchor=anchor, systems=[s.system for s in samples], state_dir=out_dir / f"finetune_state-{run_key[:16]}",
                                on_progress=on_progress, should_stop=should_stop)
    save_projector(model, out_dir / PROJECTOR_FILE)
    metrics = result_dict(result)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
