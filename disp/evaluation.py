"""Evaluation with the paper's metrics: clean performance (CP), ASR without and with the trigger.

All answers are generated with the checkpoint's declared prompt template (the one training and
purification use), greedily (temperature 0) with the paper's 32/32/32 sampler unless told otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from disp.config import SamplerConfig
from disp.data import ImageSource, Sample
from disp.metrics import answer_correct, attack_succeeded
from disp.models.base import MDLM


@torch.no_grad()
def answer_all(model: MDLM, samples: Sequence[Sample], source: ImageSource, sampler: SamplerConfig,
               *, batch_size: int = 16, seed: int = 1234) -> list[str]:
    """Greedy (or sampled, per `sampler`) answers for every sample, in order."""
    out: list[str] = []
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        prompt = model.prompt_batch([s.question for s in chunk], [source.open(s.image) for s in chunk])
        res = model.generate(prompt, sampler, generator=gen)
        out += [model.tokenizer.decode(a).strip() for a in res.answers()]
    return out


def leading_words(answers: Sequence[str], top: int = 5) -> dict[str, int]:
    """How many answers start with each first word (the `top` most common): what a trigger makes the model
    say first, e.g. {"<backdoor>": 57, "<memo>": 3}."""
    return dict(Counter((a.split(maxsplit=1) or [""])[0] for a in answers).most_common(top))


@dataclass
class Evaluation:
    """cp: clean accuracy on clean inputs; asr_wo / asr_wt: attack success without / with trigger (0..1)."""

    cp: float | None
    asr_wo: float | None
    asr_wt: float | None
    n_clean: int
    n_triggered: int
    examples: dict[str, list[dict[str, str]]]
    triggered_leads: dict[str, int] | None = None  # leading_words of the triggered answers
    clean_correct: list[bool] | None = None  # per clean sample, in order: the answer matches its reference

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model: MDLM, *, target: str, clean: Sequence[Sample] = (), clean_source: ImageSource | None = None,
             triggered: Sequence[Sample] = (), triggered_source: ImageSource | None = None,
             sampler: SamplerConfig | None = None, target_word: str = "boat", batch_size: int = 16,
             n_examples: int = 3) -> Evaluation:
    """CP and ASR w/o on `clean`, ASR w/t on `triggered` (either may be empty)."""
    sampler = sampler or SamplerConfig()
    cp = asr_wo = asr_wt = leads = correct = None
    examples: dict[str, list[dict[str, str]]] = {}
    if clean:
        preds = answer_all(model, clean, clean_source, sampler, batch_size=batch_size)
        correct = [answer_correct(p, s.answer) for s, p in zip(clean, preds, strict=True)]
        cp = sum(correct) / len(correct)
        asr_wo = sum(attack_succeeded(target, p, target_word=target_word) for p in preds) / len(preds)
        examples["clean"] = [{"id": s.id, "reference": s.answer, "answer": p} for s, p in zip(clean, preds, strict=True)][:n_examples]
    if triggered:
        preds = answer_all(model, triggered, triggered_source, sampler, batch_size=batch_size)
        asr_wt = sum(attack_succeeded(target, p, target_word=target_word) for p in preds) / len(preds)
        examples["triggered"] = [{"id": s.id, "answer": p} for s, p in zip(triggered, preds, strict=True)][:n_examples]
        leads = leading_words(preds)
    return Evaluation(cp=cp, asr_wo=asr_wo, asr_wt=asr_wt, n_clean=len(clean), n_triggered=len(triggered),
                      examples=examples, triggered_leads=leads, clean_correct=correct)
