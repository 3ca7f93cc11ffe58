"""The loader's peak memory: a random bf16 checkpoint in LLaDA-V's published layout, loaded in a fresh process,
adds at most 1.2x its size on disk to the peak RSS (experiments/benchmarks/load_memory.py prints the figure
for a multi-GB checkpoint)."""

from __future__ import annotations

import pytest
import torch

from disp import models
from disp.models.tiny import LLADA_V_ANYRES, write_random_checkpoint
from experiments.benchmarks.load_memory import TARGET, measure_load

# ~190 M parameters (380 MB in bf16): big enough that the runtime's own noise is small against it
LM = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
      "num_key_value_heads": 12}
VISION = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 56, "patch_size": 14}


@pytest.mark.slow
def test_peak_rss_of_loading_stays_within_1_2x_the_checkpoint(tmp_path):
    path = write_random_checkpoint(tmp_path / "ckpt", vocab_size=65536, lm=LM, vision=VISION, image=LLADA_V_ANYRES,
                                   max_shard_bytes=64 << 20)
    assert len(list(path.glob("*.safetensors"))) > 4  # sharded, with an index, as published
    res = measure_load(path)
    assert res["dtypes"] == ["torch.bfloat16"]  # materialised in the checkpoint's dtype
    assert abs(res["param_bytes"] - res["checkpoint_bytes"]) < 0.01 * res["checkpoint_bytes"]
    assert res["checkpoint_bytes"] > 300 << 20
    assert res["ratio"] <= TARGET, res


def test_random_checkpoint_loads_with_its_keys_and_dtype(tmp_path):
    """bfloat16 stays bfloat16; float16 (the SHAPES bases' format) is read into float32 on a CPU."""
    small = {**LM, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4}
    path = write_random_checkpoint(tmp_path / "ckpt", vocab_size=1024, lm=small, vision={**VISION, "hidden_size": 32,
                                   "intermediate_size": 64, "num_attention_heads": 2}, image=LLADA_V_ANYRES,
                                   max_shard_bytes=1 << 16)
    model = models.load(path)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert model.image_newline is not None and not any(t.is_meta for t in model.state_dict().values())
    assert models.load(path, dtype=torch.float32).dtype == torch.float32
    half = write_random_checkpoint(tmp_path / "half", vocab_size=1024, lm=small, dtype=torch.float16,
                                   vision={**VISION, "hidden_size": 32, "intermediate_size": 64,
                                           "num_attention_heads": 2})
    assert {t.dtype for t in models.load(half).state_dict().values()} == {torch.float32}  # float16 on a CPU
