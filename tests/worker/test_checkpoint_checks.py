"""The worker's checkpoint checks, without the services: anyres checkpoints (LLaDA-V's and LaViDa's published
image settings) and adapters carrying model.image_newline are accepted; unreadable image fields are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from api.archive import ArchiveError
from disp import models
from disp.models.checkpoint import write_state_dict
from disp.models.tiny import LLADA_V_ANYRES, lavida_anyres, write_tiny_checkpoint
from tests.service_conftest import checkpoint_archive
from worker.validation import _check_adapter, _check_config


@pytest.mark.parametrize(("family", "image"), [("llada-v", LLADA_V_ANYRES), ("lavida", lavida_anyres(56))])
def test_anyres_checkpoint_and_its_adapter_are_accepted(tmp_path, family, image):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", family=family, image=image)
    _check_config(checkpoint_archive(ckpt, tmp_path / "ck.tar"), "tar")
    model = models.load(ckpt)
    write_state_dict(model.projector_state_dict(), tmp_path / "adapter")
    _check_adapter(tmp_path / "adapter" / "model.safetensors")  # projector and image_newline


def test_bad_image_fields_and_foreign_adapter_tensors_are_named(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", image=LLADA_V_ANYRES)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "image_grid_pinpoints": [[56, 60]]}))
    with pytest.raises(ArchiveError, match="image_grid_pinpoints must be positive multiples"):
        _check_config(checkpoint_archive(bad, tmp_path / "bad.tar"), "tar")
    write_state_dict({"model.image_newline": torch.zeros(64), "lm_head.weight": torch.zeros(2, 2)}, tmp_path / "a")
    with pytest.raises(ArchiveError, match="lm_head.weight"):
        _check_adapter(tmp_path / "a" / "model.safetensors")
