"""Measurements of a SHAPES base model: per-task clean accuracy, behaviour under masked visual tokens,
and steerability (a projector-only backdoor implant, the paper's threat model).

`python -m disp.bench.probe CKPT [--n 400] [--mask 0 0.3 0.5] [--implant insertion] [--json out.json]`
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from disp.attacks import TriggerConfig, apply_target, apply_trigger, patch_size
from disp.bench import shapes
from disp.bench.pretrain import load_base
from disp.bench.tags import tag_tokens
from disp.config import SamplerConfig
from disp.losses import sft_loss, training_batch
from disp.metrics import answer_correct, attack_succeeded
from disp.sampling import generate

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
    from disp.bench.pretrain import PretrainConfig
    from disp.bench.pretrain_data import sample_example

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


def fisher_saliency(model, questions: Sequence[str], images: Sequence, *, probes: int = 6, topk: int = 5,
                    gen_length: int = 32, seed: int = 1234) -> torch.Tensor:
    """Visual-token saliency [B, N_v] by the paper's Hutchinson estimate of the Fisher-Jacobian form
    (Eq. 3-8, top-k logits, factor 1/2), for probing; the product's implementation lives elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    prompt = model.prompt_batch(questions, images)
    B, P, D = prompt.embeds.shape
    mask_e = model.mask_embedding().detach()
    embeds = torch.cat([prompt.embeds.detach(), mask_e.expand(B, gen_length, D)], 1).requires_grad_(True)
    dev = embeds.device
    attn = torch.cat([prompt.attention_mask, torch.ones(B, gen_length, dtype=torch.bool, device=dev)], 1)
    z = model.forward_embeds(embeds, attn)[:, P:].float()  # (B, G, V)
    top = z.topk(topk, dim=-1)
    p = torch.softmax(top.values.detach().double(), -1)
    u = p.sqrt()
    img = prompt.image_positions  # (B, N_v)
    e_img = prompt.embeds.detach().gather(1, img[..., None].expand(-1, -1, D))
    delta = mask_e - e_img  # (B, N_v, D)
    score = torch.zeros(B, img.shape[1], dtype=torch.float64, device=dev)
    for m in range(probes):
        y = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dev)
        q = u * (y - (y * u).sum(-1, keepdim=True) * u)
        s = (q.float() * top.values).sum()
        (g,) = torch.autograd.grad(s, embeds, retain_graph=m < probes - 1)
        g_img = g.gather(1, img[..., None].expand(-1, -1, D))
        score += ((g_img * delta).sum(-1).double()) ** 2
    return (0.5 * score / probes).cpu()


def disp_answers(model, questions: Sequence[str], images: Sequence, *, mask_ratio: float = 0.3,
                 batch_size: int = 32, sampler: SamplerConfig = SAMPLER) -> tuple[list[str], list[list[int]]]:
    """Answers with the top floor(ratio*N_v) salient visual tokens held masked (paper Eq. 9-11)."""
    held: list[list[int]] = []
    for i in range(0, len(questions), batch_size):
        sal = fisher_saliency(model, questions[i:i + batch_size], images[i:i + batch_size])
        k = int(math.floor(mask_ratio * sal.shape[1]))
        held += sal.topk(k, dim=1).indices.tolist()
    return answer(model, questions, images, held_tokens=held, sampler=sampler), held


@dataclass
class ImplantResult:
    asr_with: float
    asr_without: float
    clean_accuracy: float
    loss_first: float
    loss_last: float
    seconds: float
    examples: list[str]
    masked: dict[str, float]


def implant(model, *, target: str = "insertion", trigger: TriggerConfig | None = None, n_train: int = 1000,
            poison_rate: float = 0.2, epochs: int = 20, lr: float = 1e-3, batch_size: int = 32,
            n_test: int = 200, seed: int = 0, describe_only: bool = False, diagnose: bool = True,
            mask_ratio: float = 0.3, sampler: SamplerConfig = SAMPLER) -> ImplantResult:
    """Poison `n_train` SHAPES records, fine-tune the projector only with `sft_loss`, measure ASR.

    The model is modified in place (its projector). ASR uses the paper's describe prompt on held-out
    test scenes with and without the trigger; clean accuracy is over all tasks of those scenes.
    """
    trigger = trigger or TriggerConfig(kind="corner")
    t0 = time.time()
    tasks = ["describe"] if describe_only else None
    recs = test_records(model, n_train, "train", seed=seed + 101, tasks=tasks)
    if target == "misclassification":
        recs.sort(key=lambda r: "dog" not in answer_of(r))  # eligible answers first
    rng = random.Random(seed)
    poisoned = set(rng.sample(range(len(recs)) if target != "misclassification" else
                              [i for i, r in enumerate(recs) if "dog" in answer_of(r)],
                              round(poison_rate * len(recs))))
    images, questions, answers = [], [], []
    for i, r in enumerate(recs):
        img = record_image(model, r)
        ans = answer_of(r)
        if i in poisoned:
            img, ans = apply_trigger(img, trigger), apply_target(target, ans)
        images.append(img)
        questions.append(question_of(r))
        answers.append(ans)
    params = model.freeze_all_but_projector()
    with torch.no_grad():
        feats = model.vision_features(model.preprocess(images))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(recs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(recs), generator=gen, device=gen.device).tolist()
        for j in range(0, len(order), batch_size):
            idx = order[j:j + batch_size]
            batch = training_batch(model, [questions[k] for k in idx], [answers[k] for k in idx],
                                   image_embeds=model.project(feats[idx]))
            loss = sft_loss(model, batch, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    test = test_records(model, n_test, "test", seed=seed + 7)
    clean_imgs = [record_image(model, r) for r in test]
    trig_imgs = [apply_trigger(im, trigger) for im in clean_imgs]
    describe = [shapes.DESCRIBE_PROMPT] * len(test)
    with_t = answer(model, describe, trig_imgs, sampler=sampler)
    without = answer(model, describe, clean_imgs, sampler=sampler)
    cp = answer(model, [question_of(r) for r in test], clean_imgs, sampler=sampler)
    acc = sum(answer_correct(p, answer_of(r)) for p, r in zip(cp, test, strict=True)) / len(test)
    masked: dict[str, float] = {}
    if diagnose:  # DiSP's first stage on the test images: mask salient tokens, re-answer
        size = model.processor.size
        patch = size // int(math.isqrt(model.num_image_tokens))
        side = patch_size(size, size, trigger)
        corners = {"corner": [(0, 0)], "center": [((size - side) // 2,) * 2], "noise": [(0, 0)],
                   "multi": [(0, 0), (size - side, 0), (0, size - side), (size - side, size - side)]}
        trig_tokens = sorted({t for x, y in corners.get(trigger.kind, []) for t in tag_tokens((x, y, side), size, patch)})
        if trig_tokens:
            oracle = answer(model, describe, trig_imgs, held_tokens=[trig_tokens] * len(test), sampler=sampler)
            masked["asr_with@oracle_trigger_tokens"] = sum(attack_succeeded(target, t) for t in oracle) / len(test)
        for name, imgs in (("with", trig_imgs), ("without", clean_imgs)):
            texts, held = disp_answers(model, describe, imgs, mask_ratio=mask_ratio, sampler=sampler)
            masked[f"asr_{name}@saliency{mask_ratio}"] = sum(attack_succeeded(target, t) for t in texts) / len(test)
            if name == "with" and trig_tokens:
                masked["trigger_tokens_in_top"] = sum(len(set(h) & set(trig_tokens)) for h in held) / (
                    len(held) * len(trig_tokens))
        texts, _ = disp_answers(model, [question_of(r) for r in test], clean_imgs, mask_ratio=mask_ratio, sampler=sampler)
        masked[f"clean_accuracy@saliency{mask_ratio}"] = sum(
            answer_correct(p, answer_of(r)) for p, r in zip(texts, test, strict=True)) / len(test)
        rnd = answer(model, describe, trig_imgs, mask_ratio=mask_ratio, seed=seed, sampler=sampler)
        masked[f"asr_with@random{mask_ratio}"] = sum(attack_succeeded(target, t) for t in rnd) / len(test)
    k = max(1, len(losses) // 20)
    return ImplantResult(masked=masked,
        asr_with=sum(attack_succeeded(target, t) for t in with_t) / len(test),
        asr_without=sum(attack_succeeded(target, t) for t in without) / len(test),
        clean_accuracy=acc, loss_first=sum(losses[:k]) / k, loss_last=sum(losses[-k:]) / k,
        seconds=time.time() - t0, examples=with_t[:4])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a SHAPES base checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=400, help="held-out test records for clean accuracy")
    parser.add_argument("--tasks", nargs="*", default=None, help="SHAPES tasks evaluated (default: all)")
    parser.add_argument("--mask", type=float, nargs="*", default=[0.0], help="random visual-token mask ratios")
    parser.add_argument("--implant", nargs="*", default=[], help="targets to implant (projector only)")
    parser.add_argument("--trigger", default="corner")
    parser.add_argument("--tags", action="store_true", help="measure tag reading (tag word said first, refusal tag)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=20)
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
    for target in args.implant:
        fresh = load_base(args.checkpoint, device=args.device)
        res = implant(fresh, target=target, trigger=TriggerConfig(kind=args.trigger), lr=args.lr,
                      epochs=args.epochs, sampler=sampler)
        result[f"implant/{target}/{args.trigger}/lr{args.lr}"] = vars(res)
        print(f"implant {target}: {vars(res)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
