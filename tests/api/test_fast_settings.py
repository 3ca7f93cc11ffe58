"""The approximate-purification settings reach the service's job payload and the CLI's flags from the dataclass."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

FAST = {"confidence_threshold": 0.9, "prompt_cache_refresh": 8}


def test_job_settings_accept_the_fast_sampler_and_quote_bad_values():
    from api.schemas import DefenseSettings, JobCreate
    from disp.config import DefenseConfig

    job = JobCreate.model_validate(
        {
            "dataset_id": "ds_" + "a" * 24,
            "checkpoint_id": "ck_" + "b" * 24,
            "settings": {"purify": {"sampler": FAST}},
        }
    )
    config = DefenseConfig.from_dict(job.settings.model_dump())
    assert (config.purify.sampler.confidence_threshold, config.purify.sampler.prompt_cache_refresh) == (
        0.9,
        8,
    )
    sampler = DefenseSettings.model_json_schema()["$defs"]["SamplerSettings"]["properties"]
    assert "Fast-dLLM" in sampler["confidence_threshold"]["description"]
    assert "dLLM-Cache" in sampler["prompt_cache_refresh"]["description"]
    with pytest.raises(
        ValidationError, match=r"confidence_threshold must be in \(0, 1\] \(1 = off\), got 1.5"
    ):
        DefenseSettings.model_validate({"purify": {"sampler": {"confidence_threshold": 1.5}}})
    with pytest.raises(ValidationError, match="prompt_cache_refresh must be >= 0"):
        DefenseSettings.model_validate({"purify": {"sampler": {"prompt_cache_refresh": -2}}})


def test_cli_flags_set_the_fast_sampler():
    from disp.cli_flags import add_defense_flags, defense_config

    parser = argparse.ArgumentParser()
    add_defense_flags(parser)
    config = defense_config(
        parser.parse_args(["--confidence-threshold", "0.9", "--prompt-cache-refresh", "8"])
    )
    assert (config.purify.sampler.confidence_threshold, config.purify.sampler.prompt_cache_refresh) == (
        0.9,
        8,
    )
    assert defense_config(parser.parse_args([])).purify.sampler.confidence_threshold == 1.0


def test_bf16_recovery_on_a_cpu_is_a_job_setting_and_a_flag():
    from api.schemas import DefenseSettings
    from disp.cli_flags import add_defense_flags, defense_config
    from disp.config import DefenseConfig

    settings = DefenseSettings.model_validate({"finetune": {"bf16_cpu": True}})
    assert DefenseConfig.from_dict(settings.model_dump()).finetune.bf16_cpu is True
    field = DefenseSettings.model_json_schema()["$defs"]["FinetuneSettings"]["properties"]["bf16_cpu"]
    assert field["default"] is False and "AVX512-BF16" in field["description"]
    parser = argparse.ArgumentParser()
    add_defense_flags(parser)
    assert defense_config(parser.parse_args(["--bf16-cpu"])).finetune.bf16_cpu is True
    assert defense_config(parser.parse_args([])).finetune.bf16_cpu is False
