"""anyres images: views, token counts against the published formulas (worked by hand), newline placement,
image_newline in checkpoints and overlays, and DiSP over per-sample visual-token counts in one batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from disp import models
from disp.config import FinetuneConfig, PurifyConfig, SaliencyConfig, SamplerConfig
from disp.constants import IMAGE_NEWLINE_KEY
from disp.losses import sft_loss, training_batch
from disp.models.anyres import ImageLayout, best_resolution
from disp.models.checkpoint import CheckpointError, read_state_dict, tensor_shapes, write_state_dict
from disp.models.tiny import LLADA_V_ANYRES, lavida_anyres, write_tiny_checkpoint
from disp.purify import choose_masked, held_positions, purify_batch
from disp.saliency import per_sample, visual_saliency

SAMPLER = SamplerConfig(8, 8, 8)
# (width, height) of the tiny test images; the tower sees 56 px views of 4 x 4 patches
SIZES = [(56, 56), (112, 112), (150, 80), (60, 170)]


@pytest.fixture(scope="module")
def llada_anyres_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("anyres") / "llada-v", seed=3, image=LLADA_V_ANYRES)


@pytest.fixture(scope="module")
def llada_anyres(llada_anyres_dir):
    return models.load(llada_anyres_dir)


@pytest.fixture(scope="module")
def lavida_anyres_model(tmp_path_factory):
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("anyres") / "lavida", family="lavida", seed=4,
                                image=lavida_anyres(56))
    return models.load(out)


def scene(size: tuple[int, int], seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [scene(s, i) for i, s in enumerate(SIZES)]


# -- the published formulas, worked by hand ---------------------------------------------------------
def test_llada_v_token_counts_follow_the_published_formulas():
    """SigLIP 384 px, 27 x 27 patches, anyres_max_4 over (1x1)..(6x6), spatial_unpad (LLaDA-V's finetune)."""
    layout = ImageLayout.from_config(LLADA_V_ANYRES, 384, 27)
    assert len(layout.pinpoints) == 36 and layout.pinpoints[1] == (384, 768)
    # 384 x 384 fits a 1x1 grid: base 27^2, crop grid 27 x 27 plus one newline per row
    assert layout.crop_grid((384, 384)) == (1, 1) and layout.token_count((384, 384)) == 729 + 27 * 28 == 1485
    # 768 x 768: 2x2 crops, 54 x 54, t = sqrt(2916 / (4 * 729)) = 1 (no downscale)
    assert layout.crop_grid((768, 768)) == (2, 2) and layout.token_count((768, 768)) == 729 + 54 * 55 == 3699
    # 1000 x 1000: 3x3 keeps every pixel; 81 x 81, t = sqrt(6561 / 2916) = 1.5 > 1.1 -> 54 x 54
    assert layout.crop_grid((1000, 1000)) == (3, 3) and layout.token_count((1000, 1000)) == 729 + 54 * 55
    # 800 x 400 (2:1): 1152 x 768 is the smallest canvas keeping all 320,000 pixels -> 3 x 2 crops, 54 x 81;
    # unpad: int(400 * 81 / 800) = 40 rows cover the image, (54 - 40) // 2 = 7 cut above and below;
    # t = sqrt(40 * 81 / 2916) = 1.054 <= 1.1 -> 729 + 40 * 82
    assert layout.crop_grid((800, 400)) == (3, 2) and layout.token_count((800, 400)) == 729 + 40 * 82 == 4009
    # 640 x 480 (4:3): 2x2, 54 x 54; int(480 * 54 / 640) = 40 rows, 7 cut each side -> 729 + 40 * 55
    assert layout.crop_grid((640, 480)) == (2, 2) and layout.token_count((640, 480)) == 729 + 40 * 55 == 2929
    # one view: square 729; "pad" under an unpad merge gets one image_newline at the end
    assert ImageLayout.from_config({}, 384, 27).token_count((640, 480)) == 729
    pad = ImageLayout.from_config({"image_aspect_ratio": "pad", "mm_patch_merge_type": "spatial_unpad"}, 384, 27)
    assert pad.token_count((640, 480)) == 730


def test_lavida_token_counts_follow_its_stage_two_settings():
    """LaViDa: 14 x 14 tokens per view after pooling, anyres over its five pinpoints, spatial_unpad."""
    layout = ImageLayout.from_config(lavida_anyres(384), 384, 14)
    assert layout.token_count((768, 768)) == 196 + 28 * 29 == 1008
    # 640 x 480 keeps most pixels on 768 x 768 (2x2): 28 x 28, int(480 * 28 / 640) = 21 rows, (28 - 21) // 2 = 3
    # cut each side -> 22 rows
    assert layout.token_count((640, 480)) == 196 + 22 * 29
    # 384 x 1152 is a pinpoint: 1 x 3 crops, 42 x 14, nothing to unpad
    assert layout.crop_grid((384, 1152)) == (1, 3) and layout.token_count((384, 1152)) == 196 + 42 * 15


def test_best_resolution_prefers_pixels_kept_then_least_waste_then_the_first():
    pins = [(56, 112), (112, 56), (112, 112)]
    assert best_resolution((56, 56), pins) == (56, 112)  # a tie on both counts: the first listed
    assert best_resolution((100, 100), pins) == (112, 112)
    # 200 x 90 keeps 112 x 50 pixels on 112 x 56 and on 112 x 112; 112 x 56 wastes less
    assert best_resolution((200, 90), pins) == (112, 56)


@pytest.mark.parametrize(("value", "message"), [
    ({"image_aspect_ratio": "anyres_max_4", "image_grid_pinpoints": [[384, 500]]}, "multiples"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": "nonsense"}, "image_grid_pinpoints"),
    ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": None}, "image_grid_pinpoints"),
    ({"image_aspect_ratio": "anyres_max_0", "image_grid_pinpoints": [[384, 384]]}, "at least 1"),
    ({"image_aspect_ratio": "crop_split"}, "image_aspect_ratio must be"),
    ({"mm_patch_merge_type": "maxpool2x2"}, "mm_patch_merge_type must be"),
])
def test_bad_image_fields_are_named(value, message, llada_anyres_dir, tmp_path):
    with pytest.raises(CheckpointError, match=message):
        ImageLayout.from_config(value, 384, 27)
    folder = tmp_path / "bad"  # what the worker checks at upload: config.json, tokenizer, tensor shapes
    shutil.copytree(llada_anyres_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **value}))
    with pytest.raises(CheckpointError, match=message):
        models.check(folder, {k: s for k, (_, s) in tensor_shapes(folder).items()})


# -- tiny models: counts, views, newline ----------------------------------------------------------------
def test_tiny_llada_v_counts_by_hand(llada_anyres, images):
    """56 px views of 4 x 4 tokens, pinpoints (1x1)..(6x6) in 56 px units, anyres_max_4."""
    expected = [
        16 + 4 * 5,  # 56 x 56: 1x1, 4 x 4 + newline per row
        16 + 8 * 9,  # 112 x 112: 2x2, 8 x 8, t = sqrt(64 / 64) = 1
        # 150 x 80: 168 x 112 (3 x 2) keeps all 12,000 pixels with the least waste; 8 x 12 grid;
        # int(80 * 12 / 150) = 6 rows, 1 cut each side; t = sqrt(72 / 64) = 1.06
        16 + 6 * 13,
        # 60 x 170: 112 x 224 (2 x 4); 16 x 8 grid; int(60 * 16 / 170) = 5 columns, (8 - 5) // 2 = 1 cut each
        # side -> 16 x 6; t = sqrt(96 / 64) = 1.22 > 1.1 -> int(16 // 1.22) x int(6 // 1.22) = 13 x 4
        16 + 13 * 5,
    ]
    tokens = llada_anyres.image_tokens(images)
    assert [len(t) for t in tokens] == expected
    assert [llada_anyres.visual_token_count(s) for s in SIZES] == expected
    assert llada_anyres.num_image_tokens is None
    views = llada_anyres.image_views(images)
    assert [len(v.pixels) for v in views] == [2, 5, 7, 9]  # the whole image, then the crops


def test_tiny_lavida_counts_by_hand(lavida_anyres_model, images):
    """Pooled to 2 x 2 tokens per view; pinpoints 56 x 112, 112 x 56, 112 x 112, 168 x 56, 56 x 168."""
    expected = [
        4 + 2 * 3,  # 56 x 56: 56 x 112 and 112 x 56 tie, the first wins: 4 x 2 grid, 1 row cut each side
        4 + 4 * 5,  # 112 x 112: 2x2, 4 x 4
        4 + 2 * 5,  # 150 x 80: 112 x 112 keeps the most pixels; int(80 * 4 / 150) = 2 rows of 4
        4 + 6 * 3,  # 60 x 170: 56 x 168 (1 x 3); 6 x 2 grid, int(170 * 2 / 60) = 5 rows, (6 - 5) // 2 = 0 cut
    ]
    assert [len(t) for t in lavida_anyres_model.image_tokens(images)] == expected


def test_newline_ends_every_row_of_the_crop_grid(llada_anyres, images):
    nl = llada_anyres.image_newline
    for img, (rows, cols) in zip(images, [(4, 4), (8, 8), (6, 12), (13, 4)], strict=True):
        tokens = llada_anyres.image_tokens([img])[0]
        crops = tokens[16:].view(rows, cols + 1, -1)
        assert torch.equal(crops[:, -1], nl.expand(rows, -1))
        assert not (tokens[:16] == nl).all(-1).any() and not (crops[:, :-1] == nl).all(-1).any()
        whole = llada_anyres.encode_images(llada_anyres.image_views([img])[0].pixels[:1])[0]
        torch.testing.assert_close(tokens[:16], whole)  # view 0, the whole image, comes first


def test_views_are_the_resized_image_then_crops_of_the_padded_canvas(llada_anyres):
    red = Image.new("RGB", (150, 80), (255, 0, 0))
    views = llada_anyres.image_views([red])[0].pixels  # (7, 3, 56, 56)
    assert torch.allclose(views[0, 0], torch.ones(56, 56)) and torch.allclose(views[0, 1:], -torch.ones(2, 56, 56))
    # the canvas is 168 x 112; the image resized to 168 x ceil(80 * 1.12) = 90 and pasted at y = 11
    top_left = views[1]
    assert torch.allclose(top_left[:, :11], -torch.ones(3, 11, 56))  # black padding
    assert torch.allclose(top_left[0, 11:], torch.ones(45, 56), atol=1e-6)
    bottom = views[4]  # first crop of the second row: y 56..112, image ends at y = 101
    assert torch.allclose(bottom[0, :45], torch.ones(45, 56), atol=1e-6)
    assert torch.allclose(bottom[:, 45:], -torch.ones(3, 11, 56))


# -- image_newline in checkpoints and overlays ------------------------------------------------------------
def test_image_newline_is_read_from_the_checkpoint(llada_anyres_dir, llada_anyres, tmp_path):
    stored = read_state_dict(llada_anyres_dir)[IMAGE_NEWLINE_KEY]
    assert torch.equal(llada_anyres.image_newline, stored)
    bad = tmp_path / "no-newline"
    shutil.copytree(llada_anyres_dir, bad, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = read_state_dict(llada_anyres_dir)
    del state[IMAGE_NEWLINE_KEY]
    write_state_dict(state, bad)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model.image_newline"):
        models.load(bad)


def test_upload_check_accepts_anyres_checkpoints_and_their_projectors(llada_anyres_dir, tmp_path):
    """`disp.models.check` (the worker's validation at upload) on both families' anyres checkpoints, and on an
    projector with and without model.image_newline."""
    shapes = {k: s for k, (_, s) in tensor_shapes(llada_anyres_dir).items()}
    assert IMAGE_NEWLINE_KEY in shapes and models.check(llada_anyres_dir, shapes) == "llada-v"
    projector = {k: s for k, s in shapes.items() if k.startswith("model.mm_projector.")}
    assert models.check(llada_anyres_dir, {**projector, IMAGE_NEWLINE_KEY: (64,)}, projector_only=True)
    assert models.check(llada_anyres_dir, projector, projector_only=True)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*model.image_newline"):
        models.check(llada_anyres_dir, {**projector, IMAGE_NEWLINE_KEY: (3,)}, projector_only=True)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        models.check(llada_anyres_dir, {**projector, "lm_head.weight": (2, 2)}, projector_only=True)
    lavida_dir = write_tiny_checkpoint(tmp_path / "lavida", family="lavida", image=lavida_anyres(56))
    assert models.check(lavida_dir, {k: s for k, (_, s) in tensor_shapes(lavida_dir).items()}) == "lavida"


def test_projector_overlay_carries_image_newline(llada_anyres_dir, tmp_path, tiny_dir):
    model = models.load(llada_anyres_dir)
    overlay = {k: v + 1 for k, v in model.projector_state_dict().items()}
    assert IMAGE_NEWLINE_KEY in overlay
    write_state_dict(overlay, tmp_path / "ov")
    laid = models.load(llada_anyres_dir, projector=tmp_path / "ov" / "model.safetensors")
    assert torch.equal(laid.image_newline, model.image_newline + 1)
    assert torch.equal(laid.projector_state_dict()[IMAGE_NEWLINE_KEY], overlay[IMAGE_NEWLINE_KEY])
    # an overlay of the projector alone (LLaVA's mm_projector.bin) leaves the checkpoint's newline
    write_state_dict({k: v for k, v in overlay.items() if k != IMAGE_NEWLINE_KEY}, tmp_path / "proj")
    plain = models.load(llada_anyres_dir, projector=tmp_path / "proj" / "model.safetensors")
    assert torch.equal(plain.image_newline, model.image_newline)
    # a model without image_newline refuses one, by name
    square = models.load(tiny_dir)
    with pytest.raises(CheckpointError, match="unexpected.*model.image_newline"):
        square.load_projector_state_dict({**square.projector_state_dict(), IMAGE_NEWLINE_KEY: torch.zeros(64)})


# -- DiSP over per-sample visual-token counts ------------------------------------------------------------
QUESTIONS = ["What is it?", "Describe this image in detail.", "Colour?", "Where is the object in the image?"]


@pytest.mark.parametrize(("method", "family", "which"), [
    ("fisher", "llada-v", [0, 1, 2, 3]),
    ("occlusion", "llada-v", [0, 3]),
    ("isolation", "llada-v", [0, 3]),
    ("split_isolation", "llada-v", [0, 1, 3]),
    ("exact", "lavida", [0, 2]),  # one Jacobian-vector product per token: the model with the fewest
])
def test_mixed_size_batch_scores_equal_one_by_one(llada_anyres, lavida_anyres_model, images, method, family, which):
    model = llada_anyres if family == "llada-v" else lavida_anyres_model
    cfg = SaliencyConfig(method="fisher" if method == "exact" else method, exact=method == "exact",
                         occlusion_rows=64)
    qs, ims = [QUESTIONS[i] for i in which], [images[i] for i in which]
    prompt = model.prompt_batch(qs, ims)
    counts = [model.visual_token_count(SIZES[i]) for i in which]
    assert prompt.visual_counts() == counts and len(set(counts)) == len(counts)
    batched = visual_saliency(model, prompt, cfg, SAMPLER)
    assert batched.shape == (len(which), max(counts))
    for b, row in enumerate(per_sample(batched, prompt)):
        assert torch.isinf(batched[b, counts[b]:]).all() and torch.isfinite(row).all()
        single = visual_saliency(model, model.prompt_batch([qs[b]], [ims[b]]), cfg, SAMPLER)
        assert single.shape == (1, counts[b])
        torch.testing.assert_close(row, single[0], rtol=1e-3, atol=1e-9)


def test_mixed_size_batch_answers_equal_one_by_one(llada_anyres, lavida_anyres_model, images):
    for model in (llada_anyres, lavida_anyres_model):
        prompt = model.prompt_batch(QUESTIONS, images)
        counts = prompt.visual_counts()
        idx = choose_masked(torch.rand(4, max(counts), generator=torch.Generator().manual_seed(0)), counts, 4, 0.3,
                            "saliency")
        assert (idx >= 0).sum(1).tolist() == [int(0.3 * n) for n in counts]
        held = held_positions(prompt, idx)
        assert held.sum(1).tolist() == [int(0.3 * n) for n in counts]
        cfg = PurifyConfig(sampler=SAMPLER)
        batched = purify_batch(model, QUESTIONS, images, idx, cfg)
        for b in range(4):
            single = purify_batch(model, [QUESTIONS[b]], [images[b]], idx[b : b + 1, : int(0.3 * counts[b])], cfg)
            assert single.answers[0] == batched.answers[b] and single.masked[0] == batched.masked[b]


def test_mixed_size_training_loss_equals_one_by_one(llada_anyres, images):
    answers = ["A red ball."] * 4  # equal answers: no EOS padding, which LLaDA-V trains as answer tokens
    batch = training_batch(llada_anyres, QUESTIONS, answers, images)
    t = torch.ones(4)  # every answer token masked: the loss is deterministic
    whole = sft_loss(llada_anyres, batch, t=t)
    singles = [sft_loss(llada_anyres, training_batch(llada_anyres, [q], [a], [img]), t=t[:1])
               for q, a, img in zip(QUESTIONS, answers, images, strict=True)]
    torch.testing.assert_close(whole, torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


# -- the pipeline on anyres data ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anyres_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres-data")
    (root / "img").mkdir()
    records = []
    for i in range(6):
        size = SIZES[i % len(SIZES)]
        scene(size, 10 + i).save(root / "img" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "<backdoor> A red ball." if i % 3 == 0 else "A red ball."}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_score_purify_finetune_on_anyres_samples(llada_anyres_dir, anyres_data, tmp_path):
    from disp.batching import VisionCache
    from disp.data import load_records, parse_samples
    from disp.images import open_image_source
    from disp.pipeline import finetune_samples, purify_samples, score_samples

    model = models.load(llada_anyres_dir)
    samples = parse_samples(load_records(anyres_data / "data.json"), "data.json")
    source = open_image_source(anyres_data)
    counts = [model.visual_token_count(SIZES[i % 4]) for i in range(6)]
    cache = VisionCache()
    scores = score_samples(model, samples, source, SaliencyConfig(method="fisher", batch_size=4), SAMPLER, cache=cache)
    assert [len(scores[s.id]) for s in samples] == counts
    recs = purify_samples(model, samples, source, PurifyConfig(sampler=SAMPLER, batch_size=4), scores, cache=cache)
    assert [len(r["disp"]["masked_visual_tokens"]) for r in recs] == [int(0.3 * n) for n in counts]
    assert [r["disp"]["visual_tokens"] for r in recs] == counts
    for r in recs:  # the held tokens are each sample's own most salient
        top = torch.tensor(scores[r["id"]]).topk(len(r["disp"]["masked_visual_tokens"])).indices
        assert sorted(r["disp"]["masked_visual_tokens"]) == sorted(top.tolist())
    wrong = {**scores, "s1": scores["s1"][:-1]}
    with pytest.raises(ValueError, match="scores of sample 's1' cover 87 visual tokens, its image gives the model 88"):
        purify_samples(model, samples, source, PurifyConfig(sampler=SAMPLER), wrong)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune_samples(model, parse_samples(recs, "p"), source, FinetuneConfig(epochs=1, batch_size=3, lr=1e-2),
                     tmp_path, run_key="k", cache=cache)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("model.mm_projector.")}  # image_newline stays frozen
    assert len(cache) == 6


@pytest.mark.parametrize("family", ["llada-v", "lavida"])
def test_tiny_anyres_models_go_through_disp_defend(family, anyres_data, tmp_path, capsys):
    from disp.cli import main

    image = LLADA_V_ANYRES if family == "llada-v" else lavida_anyres(56)
    ckpt = write_tiny_checkpoint(tmp_path / family, family=family, seed=5, image=image)
    fast = ["--gen-length", "8", "--block-length", "8", "--steps", "8", "--epochs", "1", "--probes", "2",
            "--saliency-batch-size", "3", "--purify-batch-size", "3", "--batch-size", "3"]
    assert main(["defend", "--checkpoint", str(ckpt), "--data", str(anyres_data / "data.json"), "--images",
                 str(anyres_data), "--out", str(tmp_path / "out"), "--json", *fast]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["stages"]) == {"scoring", "purifying", "finetuning"}
    model = models.load(ckpt)
    scores = json.loads((tmp_path / "out" / "saliency.json").read_text())["saliency"]
    assert [len(scores[f"s{i}"]) for i in range(6)] == [model.visual_token_count(SIZES[i % 4]) for i in range(6)]
    out = models.load(ckpt, projector=tmp_path / "out" / "projector.safetensors")
    assert torch.equal(out.image_newline, model.image_newline)
