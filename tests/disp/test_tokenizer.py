"""Special tokens by name, the chat template, image placeholder splicing."""

from __future__ import annotations

import pytest

from disp.constants import IMAGE_TOKEN_INDEX
from disp.tokenizer import ChatTokenizer, PromptTemplate, TokenizerError


def test_special_tokens_by_name(tiny_model):
    tok = tiny_model.tokenizer
    ids = {tok.mask_id, tok.bos_id, tok.eos_id, tok.eot_id, tok.start_header_id, tok.end_header_id}
    assert len(ids) == 6
    assert tok.decode([tok.mask_id]) == "<|mdm_mask|>"
    assert tok.decode([tok.eot_id]) == "<|eot_id|>"


def test_chat_template_matches_llada_v(tiny_model):
    text = tiny_model.tokenizer.render_prompt("What is it?")
    assert text.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful")
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_has_one_image_slot_and_answer_ends_with_eot(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.encode_prompt("<image>\nWhat is it?")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[0] == tok.bos_id
    assert tok.decode(tok.encode_answer(" A red ball. ")) == "A red ball.<|eot_id|>"
    with pytest.raises(ValueError, match="exactly one"):
        tok.encode_prompt("<image> and <image>")


def test_template_without_system(tiny_dir):
    tok = ChatTokenizer.from_dir(tiny_dir, template=PromptTemplate(system=None))
    assert "system" not in tok.render_prompt("hi")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)


def test_checkpoint_declares_its_prompt_template(tmp_path):
    import json

    from disp import models
    from disp.models.checkpoint import CheckpointError
    from disp.models.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "disp_prompt": {"system": None}}))
    text = models.load(d).tokenizer.render_prompt("hi")
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>")
    (d / "config.json").write_text(json.dumps({**cfg, "disp_prompt": {"sistem": None}}))
    with pytest.raises(CheckpointError, match="sistem"):
        models.load(d)


def test_dialogue_is_the_templates_own_rendering(tiny_model):
    tok = tiny_model.tokenizer
    prompt, rest, targets = tok.encode_dialogue(["What is it?", "Colour?"], ["A ball.", "Red."], system="Short.")
    assert prompt == tok.encode_prompt("What is it?", system="Short.")
    whole = tok.render_prompt("Colour?", history=[("What is it?", "A ball.")], system="Short.")
    assert tok.decode(prompt + rest[: len(rest) - len(tok.encode_answer("Red."))]).replace("<image>", "") == \
        whole.replace("<image>", "")
    assert [i for i, t in zip(rest, targets, strict=True) if t] == tok.encode_answer("A ball.") + tok.encode_answer("Red.")
    assert tok.render_prompt("Q", system="").startswith("<|startoftext|><|start_header_id|>user")
