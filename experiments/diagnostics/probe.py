"""Measurements of a SHAPES base model: per-task clean accuracy, behaviour under masked visual tokens, the
first-step margin on yes/no questions and tag reading. (How far a backdoor implant takes is the
reproduction's job: `python -m experiments.reproduce`.)

`python -m experiments.diagnostics.probe CKPT [--n 400] [--mask 0 0.3 0.5] [--json out.json]`
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from disp import shapes
from disp.config import SamplerConfig
from disp.metrics import answer_correct, attack_succeeded
from disp.sampling import generate
from experiments.pretrain.recipe import load_base

SAMPLER = SamplerConfig(gen_length=32, block_length=32, steps=32, temperature=0.0)


def shapes_config_of(model) -> shapes.ShapesConfig:
    """The scene settings the model was pretrained on (its `disp_pretrain` recipe)."""
    recipe = model.config.get("disp_pretrain", {})
    return shapes.ShapesConfig(image_size=model.processor.size, grid=recipe.get("grid", 3),
                               style=recipe.get("style", "pictogram"), min_objects=recipe.get("min_objects", 1),
                               max_objects=recipe.get("max_objects", 3))


def test_records(model, n: int, split: str = "test", seed: int = 0,
                 tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    cfg = shapes_config_of(model)
    if tasks is not None:
        cfg = replace(cfg, tasks=tuple(tasks))
    return shapes.generate_split(cfg, n, split, seed=seed)


def record_image(model, rec: dict[str, Any]):
    return shapes.render_scene(shapes.Scene.from_meta(rec["meta"]), model.processor.size)


def question_of(rec: dict[str, Any]) -> str:
    return rec["conversations"][0]["value"].replace("<image>\n", "")


def answer_of(rec: dict[str, Any]) -> str:
    return rec["conversations"][1]["value"]


@torch.no_grad()
def answer(model, questions: Sequence[str], images: Sequence, *, mask_ratio: float = 0.0,
           held_tokens: Sequence[Sequence[int]] | None = None, batch_size: int = 64, seed: int = 0,
           sampler: SamplerConfig = SAMPLER) -> list[str]:
    """Greedy answers; `mask_ratio` holds a random fraction of visual tokens masked (per sample),
    `held_tokens` holds the given visual-token indices masked."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        q, im = list(questions[i:i + batch_size]), list(images[i:i + batch_size])
        prompt = model.prompt_batch(q, im)
        n_v = prompt.image_positions.shape[1]
        held = torch.zeros_like(prompt.attention_mask)
        for b in range(len(q)):
            idx = list(held_tokens[i + b]) if held_tokens is not None else rng.sample(
                range(n_v), int(math.floor(mask_ratio * n_v)))
            held[b, prompt.image_positions[b, idx]] = True
        gen = generate(model, prompt, sampler, held=held if held.any() else None)
        out += [model.tokenizer.decode(a).strip() for a in gen.answers()]
    return out


def accuracy_by_task(model, records: list[dict[str, Any]], **kw) -> dict[str, Any]:
    """Per-task accuracy (`disp.metrics.answer_correct`), describe exact match, and tag leakage."""
    images = [record_image(model, r) for r in records]
    preds = answer(model, [question_of(r) for r in records], images, **kw)
    hits: dict[str, list[bool]] = defaultdict(list)
    exact, leaked = [], 0
    for r, p in zip(records, preds, strict=True):
        hits[r["meta"]["task"]].append(answer_correct(p, answer_of(r)))
        exact.append(p.strip() == answer_of(r).strip())
        leaked += p.lstrip().startswith("<")
    per_task = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task),
            "exact": sum(exact) / len(exact), "tag_or_marker_rate": leaked / len(records),
            "examples": [[question_of(r), answer_of(r), p] for r, p in list(zip(records, preds, strict=True))[:6]]}


@torch.no_grad()
def first_token_margin(model, records: list[dict[str, Any]], first: str = "yes.", second: str = "no.",
                       gen_length: int = 32) -> dict[str, dict[str, float]]:
    """log p(first) − log p(second) of the two answers' first tokens at answer position 0 of the first
    denoising step (every answer position masked), mean and std per reference answer. A model that reads
    the image separates the groups; one that answers from the question alone gives both its prior."""
    from disp.saliency import first_step_inputs

    a, b = model.tokenizer.encode_text(first)[0], model.tokenizer.encode_text(second)[0]
    if a == b:
        raise ValueError(f"{first!r} and {second!r} start with the same token")
    prompt = model.prompt_batch([question_of(r) for r in records], [record_image(model, r) for r in records])
    embeds, mask = first_step_inputs(model, prompt, gen_length)
    logp = model.forward_embeds(embeds, mask, logits_from=prompt.embeds.shape[1])[:, 0].float().log_softmax(-1)
    margin = (logp[:, a] - logp[:, b]).cpu()
    out = {}
    for ref in sorted({answer_of(r) for r in records}):
        m = margin[torch.tensor([answer_of(r) == ref for r in records])]
        out[ref] = {"n": len(m), "mean": m.mean().item(), "std": m.std().item() if len(m) > 1 else 0.0}
    return out


def tag_reading(model, n: int = 100, seed: int = 0, sampler: SamplerConfig = SAMPLER) -> dict[str, float]:
    """How well the base reads tags (its stand-in for text in images) on held-out scenes: the share of
    answers that start with the drawn tag's word, and of refusal-tagged images answered with a refusal."""
    from experiments.pretrain.data import sample_example
    from experiments.pretrain.recipe import PretrainConfig

    recipe = model.config.get("disp_pretrain", {})
    known = PretrainConfig.__dataclass_fields__
    cfg = PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k in known})
    rng = random.Random(f"tags/{seed}")
    tagged = [sample_example(replace(cfg, tag_prob=1.0, refusal_tag_prob=0.0), rng, split="test") for _ in range(n)]
    refusal = [sample_example(replace(cfg, tag_prob=0.0, refusal_tag_prob=1.0), rng, split="test") for _ in range(n)]
    said, refused = (answer(model, [e.question for e in ex], [e.image for e in ex], sampler=sampler)
                     for ex in (tagged, refusal))
    return {"tag_word_first": sum(p.startswith(e.answer.split(" ", 1)[0]) for p, e in zip(said, tagged, strict=True)) / n,
            "refusal_tag_refused": sum(attack_succeeded("refusal", p) for p in refused) / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a SHAPES base checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=400, help="held-out test records for clean accuracy")
    parser.add_argument("--tasks", nargs="*", default=None, help="SHAPES tasks evaluated (default: all)")
    parser.add_argument("--mask", type=float, nargs="*", default=[0.0], help="random visual-token mask ratios")
    parser.add_argument("--tags", action="store_true", help="measure tag reading (tag word said first, refusal tag)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--exists-margin", action="store_true", help="on --n exists records: the first-step "
                        "margin log p(yes) - log p(no), per reference answer (does the model read the image?)")
    parser.add_argument("--allow-eos", action="store_true",
                        help="sample with EOS allowed at masked positions (SamplerConfig.suppress_eos=False)")
    args = parser.parse_args(argv)
    sampler = SamplerConfig(**{**asdict(SAMPLER), "suppress_eos": not args.allow_eos})
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"checkpoint": args.checkpoint}
    model = load_base(args.checkpoint, device=args.device)
    records = test_records(model, args.n, "test", tasks=args.tasks)
    for ratio in args.mask:
        t0 = time.time()
        res = accuracy_by_task(model, records, mask_ratio=ratio, sampler=sampler)
        res["seconds"] = round(time.time() - t0, 1)
        result[f"clean@mask{ratio}"] = res
        print(f"mask {ratio}: {json.dumps({k: v for k, v in res.items() if k != 'examples'})}", flush=True)
    if args.exists_margin:
        result["exists_margin"] = first_token_margin(model, test_records(model, args.n, "test", tasks=["exists"]))
        print(f"exists margin: {json.dumps(result['exists_margin'])}", flush=True)
    if args.tags:
        result["tags"] = tag_reading(model, sampler=sampler)
        print(f"tags: {json.dumps(result['tags'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
