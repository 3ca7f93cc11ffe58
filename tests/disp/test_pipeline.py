"""The dataset-level stages and `defend` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from disp import models
from disp.attacks import TriggerConfig, poison_dataset
from disp.bench.shapes import ShapesConfig, write_dataset
from disp.config import DefenseConfig, FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.data import DataError
from disp.pipeline import defend, kept_answers, load_dataset, merge_shards, purify, score

SAMPLER = SamplerConfig(8, 8, 8)


def small_config(defense: str = "disp", **kw) -> DefenseConfig:
    return DefenseConfig(defense=defense, saliency=SaliencyConfig(batch_size=8),
                         purify=PurifyConfig(sampler=SAMPLER, **kw),
                         finetune=FinetuneConfig(epochs=1, batch_size=8))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = write_dataset(root / "shapes", ShapesConfig(), sizes={"train": 12, "val": 2, "test": 2}, seed=0)
    samples, source = load_dataset(paths["train"], root / "shapes")
    res = poison_dataset(samples, source, target="insertion", trigger=TriggerConfig(kind="corner", size_frac=0.25),
                         ratio=0.25, seed=0, out_dir=root / "poisoned")
    return res


def test_defend_writes_the_three_outputs_and_skips_finished_stages(tiny_dir, poisoned, tmp_path):
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent, out_dir=tmp_path)
    report = defend(config=small_config(), **kw)
    for name in ("projector.safetensors", "purified.json", "report.json", "scores.json", "stages.json"):
        assert (tmp_path / name).is_file(), name
    purified = json.loads((tmp_path / "purified.json").read_text())
    original = json.loads(poisoned.data_path.read_text())
    assert [r["id"] for r in purified] == [r["id"] for r in original]
    for p, o in zip(purified, original, strict=True):
        assert p["image"] == o["image"] and p["conversations"][0] == o["conversations"][0]
        assert p["disp"]["original_answer"] == o["conversations"][1]["value"]
        assert p["conversations"][1]["value"] == p["disp"]["purified_answer"]
        assert len(p["disp"]["masked_visual_tokens"]) == int(0.3 * report["num_visual_tokens"])
    assert set(report["stages"]) == {"scoring", "purifying", "finetuning"}
    # the projector loads over the base checkpoint
    models.load(tiny_dir, projector=tmp_path / "projector.safetensors")

    stamps = {n: os.stat(tmp_path / n).st_mtime_ns for n in ("scores.json", "purified.json", "projector.safetensors")}
    again = defend(config=small_config(), **kw)
    assert again["stages"] == report["stages"]
    assert stamps == {n: os.stat(tmp_path / n).st_mtime_ns for n in stamps}

    # a changed purification setting re-runs purification and fine-tuning, not scoring
    defend(config=small_config(mask_ratio=0.5), **kw)
    assert os.stat(tmp_path / "scores.json").st_mtime_ns == stamps["scores.json"]
    assert os.stat(tmp_path / "purified.json").st_mtime_ns != stamps["purified.json"]


def test_kept_answers_flags_the_unchanged_records():
    recs = [{"disp": {"original_answer": "a red box.", "purified_answer": "a red box."}},
            {"disp": {"original_answer": "<backdoor> a box.", "purified_answer": "a box."}},
            {"id": 3}]
    assert kept_answers(recs) == [True, False, True]


def test_anchor_weight_reruns_only_fine_tuning_and_moves_the_projector(tiny_dir, poisoned, tmp_path):
    # oracle_filter keeps every answer it trains on, so every sample is anchored (a random tiny model's
    # DiSP rewrites change every answer and would anchor none)
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent, out_dir=tmp_path,
              manifest=poisoned.manifest_path)
    cfg = small_config("oracle_filter")
    cfg.finetune = FinetuneConfig(epochs=3, batch_size=4, lr=1e-2)
    defend(config=cfg, **kw)
    plain = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    cfg.finetune = FinetuneConfig(epochs=3, batch_size=4, lr=1e-2, anchor_weight=1000.0)
    report = defend(config=cfg, **kw)
    assert report["config"]["finetune"]["anchor_weight"] == 1000.0
    anchored = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    start = models.load(tiny_dir).projector_state_dict()
    moved = {name: sum((sd[k] - start[k]).pow(2).sum().item() for k in start) for name, sd in
             (("plain", plain), ("anchored", anchored))}
    assert 0 < moved["anchored"] < moved["plain"]


@pytest.mark.parametrize("defense", ["none", "no_mask", "random_mask", "random_drop", "pruning", "oracle_filter"])
def test_every_defense_runs(tiny_dir, poisoned, tmp_path, defense):
    report = defend(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent,
                    out_dir=tmp_path, config=small_config(defense), manifest=poisoned.manifest_path)
    base = models.load(tiny_dir).projector_state_dict()
    out = models.load(tiny_dir, projector=tmp_path / "projector.safetensors").projector_state_dict()
    same = all(torch.equal(base[k], out[k]) for k in base)
    assert same == (defense == "none")
    expected_train = {"random_drop": 10, "oracle_filter": 9}.get(defense, 12)
    assert report["num_train"] == expected_train


def test_oracle_needs_the_manifest(tiny_dir, poisoned, tmp_path):
    with pytest.raises(ValueError, match="manifest"):
        defend(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent,
               out_dir=tmp_path, config=small_config("oracle_filter"))


def test_sharded_stages_merge_to_the_whole(tiny_dir, poisoned, tmp_path):
    kw = dict(model_dir=tiny_dir, data_json=poisoned.data_path, images=poisoned.data_path.parent)
    cfg = SaliencyConfig(exact=True, batch_size=4)
    whole = score(out_json=tmp_path / "all.json", config=cfg, sampler=SAMPLER, **kw)
    parts = [score(out_json=tmp_path / f"s{i}.json", config=cfg, sampler=SAMPLER, indices=idx, **kw)
             for i, idx in enumerate([[0, 1, 2, 3, 4], list(range(5, 12))])]
    merged = json.loads(merge_shards(shard_jsons=parts, out_json=tmp_path / "m.json").read_text())["scores"]
    full = json.loads(whole.read_text())["scores"]
    assert merged.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(torch.tensor(merged[k]), torch.tensor(full[k]), rtol=1e-4, atol=1e-10)
    pcfg = PurifyConfig(sampler=SAMPLER)
    shards = [purify(scores_json=whole, out_json=tmp_path / f"p{i}.json", config=pcfg, indices=idx, **kw)
              for i, idx in enumerate([[0, 1, 2], list(range(3, 12))])]
    recs = json.loads(merge_shards(shard_jsons=shards, out_json=tmp_path / "pm.json").read_text())
    assert len(recs) == 12
    with pytest.raises(ValueError, match="out of range"):
        score(out_json=tmp_path / "x.json", indices=[99], **kw)


def test_bad_dataset_is_named_before_any_model_work(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="record 0"):
        defend(model_dir=tiny_dir, data_json=bad, images=tmp_path / "imgs", out_dir=tmp_path / "o")


def test_bf16_model_with_float32_projector_runs_every_stage(tiny_dir, poisoned):
    from disp.finetune import finetune_projector, vision_features
    from disp.pipeline import _model, purify_samples, score_samples

    model = _model(tiny_dir, None, "cpu", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())
    samples, source = load_dataset(poisoned.data_path, poisoned.data_path.parent)
    samples = samples[:4]
    scores = score_samples(model, samples, source, SaliencyConfig(batch_size=4), SAMPLER)
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
