"""Loader round trips, shards, projector overlays, pickle refusal, key mismatches, padding invariance."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from disp import models
from disp.models.checkpoint import CheckpointError, read_state_dict, write_state_dict
from disp.models.tiny import write_tiny_checkpoint


def test_tiny_checkpoint_has_published_layout(tiny_dir):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1, "tiny checkpoint should be sharded"
    for key in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"]:
        assert key in keys, key
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["model_type"] == "llava_llada"


def test_round_trip_reproduces_weights_and_logits(tiny_dir, tiny_model, tmp_path):
    # write the loaded model back unsharded, reload, compare every tensor and a forward
    out = tmp_path / "copy"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    write_state_dict(tiny_model.state_dict(), out)
    assert (out / "model.safetensors").is_file()
    again = models.load(out)
    a, b = tiny_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 7, tiny_model.lm_config.hidden_size)
    assert torch.equal(tiny_model.forward_embeds(x), again.forward_embeds(x))


def test_token_count_follows_vision_config(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "m", vision={"image_size": 42, "patch_size": 7})
    m = models.load(d)
    assert m.num_image_tokens == 36
    from PIL import Image

    feats = m.encode_images(m.preprocess([Image.new("RGB", (10, 20))]))
    assert feats.shape == (1, 36, m.lm_config.hidden_size)


def test_last_tower_layer_is_dropped(tiny_dir, tiny_model):
    keys = read_state_dict(tiny_dir).keys()
    tower = tiny_model.model.vision_tower.vision_tower
    assert tower.total_layers == 3 and tower.used_layers == 2
    assert len(tower.vision_model.encoder.layers) == 2
    # a checkpoint that still holds the dropped layer loads (it is read past, by name)
    assert not any(".encoder.layers.2." in k for k in keys)


def test_projector_overlay(tiny_dir, tmp_path):
    m = models.load(tiny_dir)
    state = {k: torch.full_like(v, 0.5) for k, v in m.projector_state_dict().items()}
    assert all(k.startswith("model.mm_projector.") for k in state)
    write_state_dict(state, tmp_path / "proj")
    over = models.load(tiny_dir, projector=tmp_path / "proj" / "model.safetensors")
    assert all(torch.all(v == 0.5) for v in over.projector.state_dict().values())
    base = models.load(tiny_dir).state_dict()
    for k, v in over.state_dict().items():
        if "mm_projector" not in k:
            assert torch.equal(v, base[k]), k


def test_projector_overlay_with_wrong_keys_is_named(tiny_dir):
    m = models.load(tiny_dir)
    state = m.projector_state_dict()
    state["model.mm_projector.9.weight"] = torch.zeros(2)
    del state["model.mm_projector.0.bias"]
    with pytest.raises(CheckpointError) as err:
        m.load_projector_state_dict(state)
    assert "model.mm_projector.9.weight" in str(err.value) and "model.mm_projector.0.bias" in str(err.value)


def test_mismatch_lists_missing_and_unexpected_keys(tiny_dir, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = read_state_dict(tiny_dir)
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(3)
    del state["model.layers.1.self_attn.k_proj.weight"]
    write_state_dict(state, out)
    with pytest.raises(CheckpointError) as err:
        models.load(out)
    msg = str(err.value)
    assert "missing keys (1): model.layers.1.self_attn.k_proj.weight" in msg
    assert "unexpected keys (1): model.layers.7.mlp.up_proj.weight" in msg


class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl"])
def test_pickles_are_refused_unopened(tiny_dir, tmp_path, suffix, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / f"mm_projector{suffix}"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        models.load(tiny_dir, projector=evil)
    only_pickles = tmp_path / "ckpt"
    only_pickles.mkdir()
    shutil.copy(tiny_dir / "config.json", only_pickles)
    shutil.copy(tiny_dir / "tokenizer.json", only_pickles)
    (only_pickles / f"pytorch_model{suffix}").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        models.load(only_pickles)
    assert not (tmp_path / "PWNED").exists()


def test_missing_shard_is_named(tiny_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(tiny_dir, out)
    (out / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors"):
        models.load(out)


def test_family_detection():
    assert models.detect_family({"architectures": ["LlavaLLaDAModelLM"], "hidden_size": 8}) == "llada-v"
    assert models.detect_family({"model_type": "llava_llada", "d_model": 8}) == "lavida"
    with pytest.raises(CheckpointError, match="cannot tell"):
        models.detect_family({"model_type": "llama"})


def test_padding_does_not_change_a_samples_logits(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(["What is it?", "Describe this image in detail, please, carefully."],
                                 solid_images[:2])
    assert not pb.attention_mask[0].all() and pb.attention_mask[1].all()
    alone = tiny_model.prompt_batch(["What is it?"], solid_images[:1])
    n = alone.embeds.shape[1]
    with torch.no_grad():
        batched = tiny_model.forward_embeds(pb.embeds, pb.attention_mask)[0, -n:]
        single = tiny_model.forward_embeds(alone.embeds, alone.attention_mask)[0]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_image_is_spliced_in_place(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(["What is it?"], solid_images[:1])
    vis = tiny_model.encode_images(tiny_model.preprocess(solid_images[:1]))[0]
    cols = pb.image_positions[0]
    assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + tiny_model.num_image_tokens))
    torch.testing.assert_close(pb.embeds[0, cols], vis)
    ids = tiny_model.tokenizer.encode_prompt("What is it?")
    before = tiny_model.embed_tokens(torch.tensor(ids[: ids.index(-200)]))
    torch.testing.assert_close(pb.embeds[0, : int(cols[0])], before)


def test_logits_from_equals_the_sliced_full_forward(tiny_model, solid_images):
    pb = tiny_model.prompt_batch(["What is it?", "Describe this image in detail."], solid_images[:2])
    with torch.no_grad():
        full = tiny_model.forward_embeds(pb.embeds, pb.attention_mask)
        tail = tiny_model.forward_embeds(pb.embeds, pb.attention_mask, logits_from=20)
    assert tail.shape[1] == full.shape[1] - 20
    torch.testing.assert_close(tail, full[:, 20:], atol=1e-5, rtol=1e-5)
