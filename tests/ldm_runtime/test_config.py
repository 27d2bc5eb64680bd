import dataclasses
import json
import math
from pathlib import Path

import pytest

from ldm_runtime.config import PRESETS, ConfigError, DDIMConfig, ModelConfig, channel_mult_for_factor, preset


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


# --- every number of model.json has a range: its edges are accepted, one past them is refused ------------------

def edited(config: ModelConfig, changes: dict) -> ModelConfig:
    """``config`` with ``changes`` made: keys are model.json paths ("unet.num_heads", "unet.level_heads[1]")."""
    for key, value in changes.items():
        config = _replace(config, key.split("."), value)
    return config


def _replace(config, path: list[str], value):
    name, _, index = path[0].partition("[")
    if len(path) > 1:
        return dataclasses.replace(config, **{name: _replace(getattr(config, name), path[1:], value)})
    if index:
        entries = list(getattr(config, name))
        entries[int(index.rstrip("]"))] = value
        value = tuple(entries)
    return dataclasses.replace(config, **{name: value})


# (the keys that all take the value, lowest, highest, other settings that make both edges a valid model)
INTEGER_RANGES = [
    (("image_size",), 1, 4096, {"autoencoder.channel_mult": (1,)}),
    (("autoencoder.in_channels",), 1, 16, {}),
    (("autoencoder.latent_channels", "unet.in_channels"), 1, 64, {}),
    (("autoencoder.num_res_blocks",), 1, 8, {}),
    (("autoencoder.codebook_size",), 1, 262_144, {}),
    (("autoencoder.base_channels",), 1, 4096, {"autoencoder.num_groups": 1, "autoencoder.channel_mult": (1,)}),
    (("autoencoder.num_groups",), 1, 256, {"autoencoder.base_channels": 256, "autoencoder.channel_mult": (1,)}),
    (("autoencoder.channel_mult[1]",), 1, 16, {}),
    (("unet.out_channels",), 1, 64, {}),
    (("unet.model_channels",), 1, 4096, {"unet.channel_mult": (1,), "unet.attention_levels": (True,),
                                         "unet.num_groups": 1, "unet.num_heads": 1}),
    (("unet.num_groups",), 1, 256, {"unet.model_channels": 256, "unet.channel_mult": (1,),
                                    "unet.attention_levels": (True,)}),
    (("unet.channel_mult[1]",), 1, 16, {}),
    (("unet.num_res_blocks",), 1, 8, {}),
    (("unet.num_heads",), 1, 64, {"unet.model_channels": 64}),
    (("unet.level_heads[1]",), 1, 64, {"unet.model_channels": 64, "unet.level_heads": (1, 1)}),
    (("unet.transformer_depth",), 1, 16, {}),
    (("unet.context_dim",), 1, 4096, {}),
    (("text_encoder.max_length",), 1, 512, {}),
    (("text_encoder.hidden_size",), 1, 4096, {"text_encoder.num_heads": 1}),
    (("text_encoder.num_layers",), 1, 48, {}),
    (("text_encoder.num_heads",), 1, 64, {"text_encoder.hidden_size": 64}),
    (("text_encoder.intermediate_size",), 1, 16_384, {}),
    (("text_encoder.vocab_size",), 1, 262_144, {}),
    (("text_encoder.clip_skip",), 0, 47, {}),
    (("text_encoder.clip_skip",), 0, 11, {"text_encoder.kind": "clip", "text_encoder.num_layers": 12}),
    (("schedule.num_train_timesteps",), 1, 10_000, {"sampler": DDIMConfig(steps_offset=0)}),
]


@pytest.mark.parametrize("keys, lowest, highest, settings", INTEGER_RANGES, ids=lambda value: str(value))
def test_every_integer_of_model_json_accepts_its_edges_and_refuses_one_past_them(keys, lowest, highest, settings):
    base = edited(preset("tiny"), settings)
    for value in (lowest, highest):
        edited(base, dict.fromkeys(keys, value)).validate()
    for value in (lowest - 1, highest + 1, True, float(highest)):
        with pytest.raises(ConfigError) as error:
            edited(base, dict.fromkeys(keys, value)).validate()
        message = str(error.value)
        expected = f"{keys[0]} is {value!r}; expected an integer from {lowest} to {highest}"
        assert message.startswith(expected) and "\n" not in message, message


NUMBER_RANGES = [
    ("latent_scale_factor", 1e-3, 1e3),
    ("text_encoder.layer_norm_eps", 1e-12, 0.1),
]


@pytest.mark.parametrize("key, lowest, highest", NUMBER_RANGES)
def test_every_real_number_of_model_json_accepts_its_edges_and_refuses_what_lies_past_them(key, lowest, highest):
    for value in (lowest, highest):
        edited(preset("tiny"), {key: value}).validate()
    for value in (math.nextafter(lowest, 0), math.nextafter(highest, math.inf), 1e-300, 10**400, -lowest,
                  math.nan, math.inf, True):
        with pytest.raises(ConfigError) as error:
            edited(preset("tiny"), {key: value}).validate()
        shown = "an integer of 401 digits" if value == 10**400 else repr(value)  # a line stays short
        assert str(error.value).startswith(f"{key} is {shown}; expected a number from {lowest:g} to {highest:g}")


def test_a_level_wider_than_the_widest_published_unet_is_refused_though_each_number_is_in_range():
    config = edited(preset("tiny"), {"unet.model_channels": 4096})  # x mult 2 = 8192 channels
    with pytest.raises(ConfigError, match=r"^unet channels 8192 \(model_channels 4096 x mult 2\) are more than 4096"):
        config.validate()


@pytest.mark.parametrize("key, entries", [("unet.channel_mult", 7), ("autoencoder.channel_mult", 0)])
def test_a_level_count_outside_one_to_six_is_refused(key, entries):
    changes = {key: (1,) * entries}
    if key.startswith("unet"):
        changes["unet.attention_levels"] = (True,) * entries
    with pytest.raises(ConfigError, match=rf"^{key} has {entries} entries; expected one per level, 1 to 6 levels$"):
        edited(preset("tiny"), changes).validate()


@pytest.mark.parametrize("steps_offset, message", [
    (1000, "sampler.steps_offset is 1000; expected an integer from 0 to 999 (below schedule.num_train_timesteps)"),
    (10**9, "model.json.sampler: ddim steps_offset is 1000000000; expected an integer from 0 to 9999"),
    (-1, "model.json.sampler: ddim steps_offset is -1; expected an integer from 0 to 9999"),
    (True, "model.json.sampler: ddim steps_offset is True; expected an integer from 0 to 9999"),
])
def test_a_steps_offset_past_the_last_timestep_is_refused(steps_offset, message):
    data = json.loads(preset("tiny").to_json())
    data["sampler"]["steps_offset"] = 999
    ModelConfig.from_dict(data).validate()
    data["sampler"]["steps_offset"] = steps_offset
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict(data).validate()
    assert str(error.value) == message


def test_a_format_version_of_true_is_not_version_one():
    with pytest.raises(ConfigError, match="format_version True is not 1"):
        dataclasses.replace(preset("tiny"), format_version=True).validate()


@pytest.mark.parametrize("name", ["sd15", "shapes", "tiny"])
def test_the_presets_and_the_shipped_demo_lie_inside_the_bounds(name):
    PRESETS[name].validate()
    ModelConfig.from_json((Path(__file__).parents[2] / "models" / "shapes-demo" / "model.json").read_text()).validate()
