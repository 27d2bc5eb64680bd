import dataclasses

import pytest

from ldm_runtime.config import PRESETS, ConfigError, ModelConfig, channel_mult_for_factor, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_json_round_trips_every_preset_exactly(name):
    config = PRESETS[name]
    config.validate()
    assert ModelConfig.from_json(config.to_json()) == config


def test_model_json_with_an_unknown_key_is_refused_naming_it():
    text = preset("shapes").to_json().replace('"image_size"', '"imagesize"')
    with pytest.raises(ConfigError, match="imagesize"):
        ModelConfig.from_json(text)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"'nope'.*sd15.*shapes|'nope'.*shapes.*sd15"):
        preset("nope")


@pytest.mark.parametrize("factor,expected", [(4, (1, 2, 4)), (8, (1, 2, 4, 4))])
def test_factor_maps_to_one_level_per_halving(factor, expected):
    assert channel_mult_for_factor(factor) == expected


@pytest.mark.parametrize("factor", [3, 6, 0, 1, -4])
def test_factor_that_is_not_a_power_of_two_is_refused(factor):
    with pytest.raises(ConfigError, match=f"f={factor}"):
        channel_mult_for_factor(factor)


def test_channels_not_divisible_by_groups_are_refused_naming_both():
    config = preset("shapes")
    bad = dataclasses.replace(config, unet=dataclasses.replace(config.unet, model_channels=60))
    with pytest.raises(ConfigError, match="60.*num_groups 16"):
        bad.validate()
    bad = dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, base_channels=24))
    with pytest.raises(ConfigError, match="24.*num_groups 16"):
        bad.validate()


def test_image_size_must_be_divisible_by_the_factor():
    with pytest.raises(ConfigError, match="image_size 30"):
        dataclasses.replace(preset("shapes"), image_size=30).validate()
