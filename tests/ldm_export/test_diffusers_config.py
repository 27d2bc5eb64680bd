"""Our configuration -> diffusers' class -> the config diffusers records -> our configuration again: the two
directions of ``ldm_export.diffusers_config`` agree, on what diffusers itself writes into config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ldm_export.diffusers_config import (autoencoder_from_diffusers, autoencoder_to_diffusers, schedule_to_diffusers,
                                         unet_from_diffusers, unet_to_diffusers)
from ldm_export.diffusers_scheduler import schedule_from_diffusers
from ldm_runtime.config import AutoencoderConfig, DDIMConfig, ScheduleConfig, UNetConfig, preset

WHERE = Path("component")
SD15_UNET = preset("sd15").unet
UNETS = {
    "sd15": SD15_UNET,
    "sd21_64_wide_heads_linear_fp32_attention": dataclasses.replace(
        SD15_UNET, num_heads=20, level_heads=(5, 10, 20, 20), context_dim=1024, use_linear_projection=True,
        upcast_attention=True),
    "tiny_depth2_first_level_without_attention": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(False, True), num_heads=4,
        context_dim=24, num_groups=8, transformer_depth=2),
}
AUTOENCODERS = {
    "sd15": preset("sd15").autoencoder,
    "tiny_without_mid_attention": AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                                    latent_channels=3, num_groups=8, mid_attention=False),
}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_a_unet_config_comes_back_from_the_config_diffusers_records(name):
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_to_diffusers(UNETS[name], sample_size=8))
    assert unet_from_diffusers(dict(theirs.config), WHERE) == UNETS[name]


@pytest.mark.parametrize("name", sorted(AUTOENCODERS))
def test_an_autoencoder_config_comes_back_with_its_scaling_factor(name):
    with torch.device("meta"):
        theirs = AutoencoderKL(**autoencoder_to_diffusers(AUTOENCODERS[name]), scaling_factor=0.13025)
    assert autoencoder_from_diffusers(dict(theirs.config), WHERE) == (AUTOENCODERS[name], 0.13025)


def test_a_schedule_and_ddim_settings_come_back_from_the_config_ddim_scheduler_records():
    schedule = ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="v_prediction")
    sampler = DDIMConfig(timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=True, clip_sample=False,
                         clip_sample_range=2.0, previous_timestep="diffusers")
    theirs = DDIMScheduler(**schedule_to_diffusers(schedule, sampler))
    assert schedule_from_diffusers(dict(theirs.config), WHERE)[:2] == (schedule, sampler)
