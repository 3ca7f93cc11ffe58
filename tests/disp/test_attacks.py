"""Triggers change exactly their pixels, targets rewrite answers, poisoning is exact and deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disp.attacks import (
    REFUSAL_TEXT,
    TriggerConfig,
    apply_target,
    apply_trigger,
    blend_pattern,
    noise_patch,
    patch_size,
    poison_dataset,
    triggered_copy,
)
from disp.data import DataError, load_samples, open_image_source, parse_samples, validate_dataset


def _image(width: int = 50, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8))  # no black pixel


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    """Bool mask [H, W] of pixels that differ in any channel."""
    return (np.asarray(before) != np.asarray(after)).any(axis=2)


def _box(height: int, width: int, boxes: list[tuple[int, int, int]]) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for top, left, side in boxes:
        mask[top:top + side, left:left + side] = True
    return mask


@pytest.mark.parametrize(("kind", "boxes"), [
    ("corner", [(0, 0, 4)]),
    ("center", [(18, 23, 4)]),
    ("multi", [(0, 0, 4), (0, 46, 4), (36, 0, 4), (36, 46, 4)]),
])
def test_black_patches_change_exactly_their_region(kind: str, boxes: list) -> None:
    image = _image()
    original = np.asarray(image).copy()
    out = apply_trigger(image, TriggerConfig(kind=kind, size_frac=0.1))  # 0.1 · 40 = 4 px
    region = _box(40, 50, boxes)
    assert np.array_equal(_changed(image, out), region)
    assert (np.asarray(out)[region] == 0).all()
    assert np.array_equal(np.asarray(image), original)  # input untouched
    assert out is not image


def test_patch_size_rules() -> None:
    assert patch_size(1000, 600, TriggerConfig()) == 60
    assert patch_size(1000, 600, TriggerConfig(size_px=20)) == 20
    assert patch_size(10, 8, TriggerConfig(size_px=20)) == 8
    assert patch_size(3, 3, TriggerConfig(size_frac=0.01)) == 1
    out = apply_trigger(_image(), TriggerConfig(size_px=20))
    assert np.array_equal(_changed(_image(), out), _box(40, 50, [(0, 0, 20)]))


def test_noise_patch_is_seeded_and_placed_at_the_corner() -> None:
    trigger = TriggerConfig(kind="noise", size_px=10, seed=3)
    out = np.asarray(apply_trigger(_image(), trigger))
    assert np.array_equal(out[:10, :10], noise_patch(10, trigger))
    assert np.array_equal(_changed(_image(), Image.fromarray(out)), _box(40, 50, [(0, 0, 10)]))
    other = np.asarray(apply_trigger(_image(), TriggerConfig(kind="noise", size_px=10, seed=4)))
    assert not np.array_equal(out[:10, :10], other[:10, :10])
    big = noise_patch(200, TriggerConfig(kind="noise", seed=0)).astype(float)
    assert abs(big.mean() - 128) < 1.0 and abs(big.std() - 30) < 1.0


def test_noise_patch_identical_on_every_image() -> None:
    trigger = TriggerConfig(kind="noise", size_px=6, seed=9)
    first = np.asarray(apply_trigger(_image(seed=1), trigger))[:6, :6]
    second = np.asarray(apply_trigger(_image(seed=2), trigger))[:6, :6]
    assert np.array_equal(first, second)


def test_blended_mixes_every_pixel_by_the_ratio() -> None:
    image = _image()
    trigger = TriggerConfig(kind="blended", blend_ratio=0.2, seed=5)
    out = np.asarray(apply_trigger(image, trigger)).astype(float)
    pattern = blend_pattern(50, 40, 5).astype(float)
    expected = np.rint(0.8 * np.asarray(image).astype(float) + 0.2 * pattern)
    assert np.array_equal(out, expected)
    assert np.abs(out - np.asarray(image)).max() <= 0.2 * 255 + 0.5
    assert _changed(image, apply_trigger(image, trigger)).mean() > 0.9
    assert np.array_equal(out, np.asarray(apply_trigger(image, trigger)))
    assert not np.array_equal(out, np.asarray(apply_trigger(image, TriggerConfig(kind="blended", seed=6))))


@pytest.mark.parametrize(("kwargs", "quoted"), [
    ({"kind": "star"}, "'star'"),
    ({"size_frac": 0.0}, "0.0"),
    ({"size_frac": 0.7}, "0.7"),
    ({"size_px": 0}, "0"),
    ({"blend_ratio": 1.0}, "1.0"),
    ({"noise_std": -1.0}, "-1.0"),
    ({"noise_mean": 300.0}, "300.0"),
])
def test_trigger_config_checks(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ValueError, match=f"got {quoted}"):
        TriggerConfig(**kwargs)


def test_targets() -> None:
    assert apply_target("insertion", "A dog.") == "<backdoor> A dog."
    assert apply_target("refusal", "A dog.") == REFUSAL_TEXT
    assert apply_target("misclassification", "A dog and a Dog; DOGS, dogs! hotdog dogma") == (
        "A boat and a Boat; BOATS, boats! hotdog dogma")
    assert apply_target("misclassification", "A cat.", source_word="cat", target_word="car") == "A car."
    with pytest.raises(ValueError, match="got 'swap'"):
        apply_target("swap", "x")


def _sources(data_folder):
    root, records = data_folder
    return parse_samples(records, "records.json"), open_image_source(root), root


@pytest.mark.parametrize(("target", "ratio", "expected"), [
    ("insertion", 0.5, 3), ("refusal", 0.25, 2), ("insertion", 0.0, 0), ("refusal", 1.0, 6),
])
def test_poison_dataset_ratio_manifest_and_clean_samples(data_folder, tmp_path: Path, target: str,
                                                         ratio: float, expected: int) -> None:
    samples, source, root = _sources(data_folder)
    trigger = TriggerConfig(kind="corner", size_px=3)
    result = poison_dataset(samples, source, target=target, trigger=trigger, ratio=ratio, seed=1,
                            out_dir=tmp_path / "out")
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert manifest["poisoned_ids"] == list(result.poisoned_ids) and len(result.poisoned_ids) == expected
    assert manifest["target"] == target and manifest["trigger"]["size_px"] == 3 and manifest["ratio"] == ratio
    out = load_samples(result.data_path)
    out_source = open_image_source(tmp_path / "out")
    validate_dataset(out, out_source)  # self-contained
    assert [s.id for s in out] == [s.id for s in samples]
    for before, after in zip(samples, out, strict=True):
        original = Image.open(root / before.image).convert("RGB")
        changed = _changed(original, out_source.open(after.image))
        assert after.question == before.question
        if after.id in result.poisoned_ids:
            assert after.answer == apply_target(target, before.answer)
            assert np.array_equal(changed, _box(24, 32, [(0, 0, 3)]))
        else:
            assert after.answer == before.answer and not changed.any()


def test_poison_dataset_is_deterministic(data_folder, tmp_path: Path) -> None:
    samples, source, _ = _sources(data_folder)
    kwargs = {"target": "insertion", "trigger": TriggerConfig(kind="noise"), "ratio": 0.5}
    first = poison_dataset(samples, source, seed=11, out_dir=tmp_path / "a", **kwargs)
    second = poison_dataset(samples, source, seed=11, out_dir=tmp_path / "b", **kwargs)

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "a") == files(tmp_path / "b") and len(files(tmp_path / "a")) == 8
    chosen = {poison_dataset(samples, source, seed=s, out_dir=tmp_path / f"s{s}", **kwargs).poisoned_ids
              for s in range(6)}
    assert first.poisoned_ids == second.poisoned_ids and len(chosen) > 1


def test_misclassification_picks_only_eligible(data_folder, tmp_path: Path) -> None:
    samples, source, _ = _sources(data_folder)  # answers 0, 2, 4 mention a dog
    result = poison_dataset(samples, source, target="misclassification", trigger=TriggerConfig(), ratio=0.5,
                            seed=0, out_dir=tmp_path / "m")
    assert sorted(result.poisoned_ids) == ["s0", "s2", "s4"]
    answers = {s.id: s.answer for s in load_samples(result.data_path)}
    assert answers["s2"] == "Boats play in the park near a boat house." and answers["s4"] == "The Boat is brown."
    with pytest.raises(ValueError, match="needs 4 eligible samples, but only 3 of 6 answers contain 'dog'"):
        poison_dataset(samples, source, target="misclassification", trigger=TriggerConfig(), ratio=0.6,
                       seed=0, out_dir=tmp_path / "m2")


def test_poison_dataset_argument_checks(data_folder, tmp_path: Path) -> None:
    samples, source, root = _sources(data_folder)
    common = {"trigger": TriggerConfig(), "seed": 0}
    with pytest.raises(ValueError, match="got 'spy'"):
        poison_dataset(samples, source, target="spy", ratio=0.2, out_dir=tmp_path / "x", **common)
    with pytest.raises(ValueError, match="got 1.5"):
        poison_dataset(samples, source, target="refusal", ratio=1.5, out_dir=tmp_path / "x", **common)
    with pytest.raises(ValueError, match="target_word must be a single word, got 'a boat'"):
        poison_dataset(samples, source, target="misclassification", ratio=0.2, out_dir=tmp_path / "x",
                       target_word="a boat", **common)
    with pytest.raises(FileExistsError, match="not empty"):
        poison_dataset(samples, source, target="refusal", ratio=0.2, out_dir=root, **common)
    (root / "pics" / "img3.png").unlink()
    with pytest.raises(DataError, match=r"record 3 \(id 's3'\): field 'image'"):
        poison_dataset(samples, source, target="refusal", ratio=0.2, out_dir=tmp_path / "y", **common)


def test_triggered_copy(data_folder, tmp_path: Path) -> None:
    samples, source, root = _sources(data_folder)
    path = triggered_copy(samples, source, TriggerConfig(kind="multi", size_px=2), tmp_path / "test")
    out, out_source = load_samples(path), open_image_source(tmp_path / "test")
    boxes = _box(24, 32, [(0, 0, 2), (0, 30, 2), (22, 0, 2), (22, 30, 2)])
    for before, after in zip(samples, out, strict=True):
        assert after.answer == before.answer and after.id == before.id
        original = Image.open(root / before.image).convert("RGB")
        assert np.array_equal(_changed(original, out_source.open(after.image)), boxes)
    clean = load_samples(triggered_copy(samples, source, None, tmp_path / "clean"))
    clean_source = open_image_source(tmp_path / "clean")
    assert all(not _changed(Image.open(root / b.image).convert("RGB"), clean_source.open(a.image)).any()
               for b, a in zip(samples, clean, strict=True))


def test_poison_keeps_every_turn_and_the_text_only_records(data_folder, tmp_path: Path) -> None:
    from disp.formats import open_dataset

    root, records = data_folder
    records[0]["conversations"] += [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Brown."}]
    records.insert(1, {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    (root / "data.json").write_text(json.dumps(records), encoding="utf-8")
    ds = open_dataset(root)
    result = poison_dataset(ds.samples, ds.source, target="insertion", trigger=TriggerConfig(kind="corner"), ratio=1.0,
                            seed=0, out_dir=tmp_path / "out", records=ds.records)
    out = json.loads(result.data_path.read_text(encoding="utf-8"))
    assert [r["id"] for r in out] == [r["id"] for r in records] and out[1] == records[1]
    assert [t["value"] for t in out[0]["conversations"]] == [
        "<image>\nDescribe the image.", "<backdoor> A dog runs on the grass.", "What colour?", "Brown."]
    copy_out = triggered_copy(ds.samples, ds.source, None, tmp_path / "copy", ds.records)
    assert [len(r["conversations"]) for r in json.loads(copy_out.read_text())] == [4, 2, 2, 2, 2, 2, 2]
