"""The sample-level stages on a tiny checkpoint: purified records, dtypes, the shared vision cache."""

from __future__ import annotations

import torch

from disp import models
from disp.config import FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.pipeline import kept_answers, load_dataset

SAMPLER = SamplerConfig(8, 8, 8)


def test_kept_answers_flags_the_unchanged_records():
    recs = [{"image": "a.png", "disp": {"original_answer": "a red box.", "purified_answer": "a red box."}},
            {"image": "b.png", "disp": {"original_answer": "<backdoor> a box.", "purified_answer": "a box."}},
            {"id": "text-only"},
            {"image": "c.png"},
            {"image": "d.png", "disp": {"original_answer": "a", "purified_answer": "a",
                                        "original_answers": ["a", "<backdoor> b"], "purified_answers": ["a", "b"]}}]
    assert kept_answers(recs) == [True, False, True, False]  # one per image record; any turn changed counts


def test_bf16_model_with_float32_projector_runs_every_stage(tiny_dir, poisoned):
    from disp.finetune import finetune_projector, vision_features
    from disp.pipeline import load_model, purify_samples, score_samples

    model = load_model(tiny_dir, None, "cpu", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())
    samples, source = load_dataset(poisoned.data_path, poisoned.data_path.parent)
    samples = samples[:4]
    scores = score_samples(model, samples, source, SaliencyConfig(method="fisher", batch_size=4), SAMPLER)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in scores.values())
    recs = purify_samples(model, samples, source, PurifyConfig(sampler=SAMPLER, batch_size=4), scores)
    assert len(recs) == 4
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    feats = vision_features(model, [source.open(s.image) for s in samples])
    finetune_projector(model, [s.question for s in samples], [s.answer for s in samples], feats,
                       FinetuneConfig(epochs=1, batch_size=4, lr=1e-2))
    assert any(not torch.equal(v, before[k]) for k, v in model.projector.state_dict().items())
    assert all(v.dtype == torch.float32 for v in model.projector_state_dict().values())


def test_fine_tuning_takes_tower_outputs_from_the_shared_cache(tiny_dir, poisoned, tmp_path):
    from disp.batching import VisionCache
    from disp.finetune import vision_features
    from disp.pipeline import finetune_samples

    model = models.load(tiny_dir)
    samples, source = load_dataset(poisoned.data_path, poisoned.data_path.parent)
    expected = vision_features(model, [source.open(s.image) for s in samples])
    cache = VisionCache()
    cache.fill(model, [s.image for s in samples[:5]], source)
    towered = []
    model.vision_features = lambda pixels, _f=model.vision_features: towered.append(len(pixels)) or _f(pixels)
    finetune_samples(model, samples, source, FinetuneConfig(epochs=1, batch_size=8), tmp_path, run_key="k",
                     cache=cache)
    assert sum(towered) == len({s.image for s in samples[5:]} - {s.image for s in samples[:5]})  # only the rest
    got = cache.lookup([s.image for s in samples])  # what fine-tuning computed itself
    assert all(torch.equal(g.features, e.features) and g.size == e.size for g, e in zip(got, expected, strict=True))


def test_describe_question_recaptions_like_the_official_code(tiny_dir, poisoned):
    """PurifyConfig.question "describe": scoring and re-answering pose "Describe this image in detail." (the
    official code's prompt), the caption replaces the first answer and the record keeps its own question."""
    from dataclasses import replace

    from disp.config import DESCRIBE_QUESTION
    from disp.pipeline import purify_samples, score_samples
    from disp.purify import purify_batch
    from disp.stages import STAGES

    model = models.load(tiny_dir)
    samples, source = load_dataset(poisoned.data_path, poisoned.data_path.parent)
    two = samples[2]  # made a two-turn record
    later = [{"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Red."}]
    record = {**two.record, "conversations": [*two.record["conversations"], *later]}
    samples = samples[:2] + [replace(two, later=(("And the colour?", "Red."),), record=record)]
    cfg = PurifyConfig(sampler=SAMPLER, batch_size=3, question="describe")
    own = score_samples(model, samples, source, SaliencyConfig(method="fisher", batch_size=3, probes=2), SAMPLER)
    described = score_samples(model, samples, source, SaliencyConfig(method="fisher", batch_size=3, probes=2), SAMPLER,
                              question="describe")
    assert all(len(own[s.id]) == len(described[s.id]) == 16 for s in samples) and own != described
    recs = purify_samples(model, samples, source, cfg, described)
    held = torch.tensor([r["disp"]["masked_visual_tokens"] for r in recs])
    direct = purify_batch(model, [f"<image>\n{DESCRIBE_QUESTION}"] * 3, [source.open(s.image) for s in samples], held,
                          cfg)
    for rec, sample, caption in zip(recs, samples, direct.answers, strict=True):
        assert rec["conversations"][0]["value"] == sample.question and rec["disp"]["question"] == "describe"
        assert rec["disp"]["purified_answer"] == caption
    assert recs[2]["conversations"][2:] == [{"from": "human", "value": "And the colour?"},
                                            {"from": "gpt", "value": "Red."}]  # later turns kept, as upstream
    assert "purify.question" in STAGES["scoring"].settings  # a defend re-scores when the prompt changes

