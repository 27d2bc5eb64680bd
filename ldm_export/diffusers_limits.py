"""The values ldm-import takes in a Stable Diffusion component's config.json, by key: each one's type and range.

The ranges hold every published Stable Diffusion-family config with room to spare (SD 1.x/2.x, SDXL and its
refiner, OpenCLIP ViT-bigG): a value past them is a typo or a hostile file, and would build networks too large to
hold or a schedule that breaks sampling. ``check_values`` raises ``ImportRefusedError`` in one sentence naming the
first key whose value is of the wrong type or out of range; keys without a limit are left to the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_export.errors import ImportRefusedError
from ldm_runtime.config import (LAYER_NORM_EPS, MAX_CHANNELS, MAX_CONTEXT_DIM, MAX_HEADS, MAX_LATENT_CHANNELS,
                                MAX_LEVELS, MAX_RES_BLOCKS, MAX_TEXT_INTERMEDIATE, MAX_TRAIN_TIMESTEPS,
                                MAX_TRANSFORMER_DEPTH, MAX_VOCAB_SIZE)
from ldm_runtime.files import describe

MAX_TEXT_CHARS = 64


@dataclass(frozen=True)
class Limit:
    """One key's values: ``kind`` "integer" (``low`` to ``high``), "number" (above ``low``, at most ``high``),
    "flag" or "text"; ``items`` > 0 also takes a list of 1 to ``items`` of them (``single`` False: only a list);
    ``nullable``: null means the default."""

    kind: str
    low: float = 0
    high: float = 0
    items: int = 0
    single: bool = True
    nullable: bool = False

    def _takes_one(self, value: Any) -> bool:
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "text":
            return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "integer":
            return isinstance(value, int) and self.low <= value <= self.high
        return math.isfinite(value) and self.low < value <= self.high

    def takes(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, (list, tuple)):
            return 1 <= len(value) <= self.items and all(self._takes_one(item) for item in value)
        return self.single and self._takes_one(value)

    def expected(self) -> str:
        one = {"integer": f"an integer from {self.low} to {self.high}", "flag": "true or false",
               "number": f"a number above {self.low} and at most {self.high}",
               "text": f"a string of at most {MAX_TEXT_CHARS} characters"}[self.kind]
        if self.items:
            many = f"a list of 1 to {self.items} of them"
            one = f"{one}, or {many}" if self.single else f"{many}, each {one}"
        return f"{one}, or null" if self.nullable else one


TEXT = Limit("text")
FLAG = Limit("flag", nullable=True)
BLOCK_TYPES = Limit("text", items=MAX_LEVELS, single=False)
# SD 1.x/2.x: 320 to 1280 channels a level, SDXL refiner 1536
LEVEL_CHANNELS = Limit("integer", 1, MAX_CHANNELS, items=MAX_LEVELS, single=False)
LAYERS_PER_BLOCK = Limit("integer", 1, MAX_RES_BLOCKS)  # SD and SDXL: 2
GROUPS = Limit("integer", 1, 128)  # SD: 32
CHANNELS = Limit("integer", 1, 16)  # RGB: 3; SD's latents: 4; SD's inpainting UNets take 9

UNET_LIMITS = {
    "_class_name": TEXT, "in_channels": CHANNELS, "out_channels": CHANNELS, "block_out_channels": LEVEL_CHANNELS,
    "layers_per_block": LAYERS_PER_BLOCK, "down_block_types": BLOCK_TYPES, "up_block_types": BLOCK_TYPES,
    "sample_size": Limit("integer", 1, 256, items=2),  # latents: SD 2.x 96, SDXL 128
    # heads (diffusers' attention_head_dim is a count of heads): SD 2.x [5, 10, 20, 20]
    "attention_head_dim": Limit("integer", 1, 256, items=MAX_LEVELS),
    "num_attention_heads": Limit("integer", 1, 256, items=MAX_LEVELS, nullable=True),
    "transformer_layers_per_block": Limit("integer", 1, MAX_TRANSFORMER_DEPTH, items=MAX_LEVELS),  # SDXL: up to 10
    "cross_attention_dim": Limit("integer", 1, MAX_CONTEXT_DIM, items=MAX_LEVELS),  # SD 2.x 1024, SDXL 2048
    "norm_num_groups": GROUPS, "use_linear_projection": FLAG, "upcast_attention": FLAG,
}
VAE_LIMITS = {
    "_class_name": TEXT, "in_channels": CHANNELS, "out_channels": CHANNELS, "block_out_channels": LEVEL_CHANNELS,
    "layers_per_block": LAYERS_PER_BLOCK, "down_block_types": BLOCK_TYPES, "up_block_types": BLOCK_TYPES,
    "latent_channels": Limit("integer", 1, MAX_LATENT_CHANNELS), "norm_num_groups": GROUPS,
    "mid_block_add_attention": FLAG,
    "scaling_factor": Limit("number", 0, 100),  # SD 0.18215, SDXL 0.13025, SD 3 1.5305
}
TEXT_ENCODER_LIMITS = {  # OpenCLIP ViT-bigG: 1280 wide, 32 layers, 20 heads, 5120 MLP
    "model_type": TEXT, "architectures": Limit("text", items=4, single=False, nullable=True),
    "hidden_size": Limit("integer", 1, MAX_CONTEXT_DIM), "num_hidden_layers": Limit("integer", 1, 64),
    "num_attention_heads": Limit("integer", 1, MAX_HEADS),
    "intermediate_size": Limit("integer", 1, MAX_TEXT_INTERMEDIATE),
    "vocab_size": Limit("integer", 1, MAX_VOCAB_SIZE), "max_position_embeddings": Limit("integer", 1, 1024),
    "hidden_act": TEXT, "layer_norm_eps": Limit("number", 0, LAYER_NORM_EPS[1]),
}
TEXT_ENCODER_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "vocab_size")
SCHEDULER_LIMITS = {
    "num_train_timesteps": Limit("integer", 1, MAX_TRAIN_TIMESTEPS), "beta_start": Limit("number", 0, 1),
    "beta_end": Limit("number", 0, 1), "beta_schedule": TEXT, "prediction_type": TEXT, "timestep_spacing": TEXT,
    "steps_offset": Limit("integer", 0, 1000),  # SD: 1, within its 1000 training timesteps
    "set_alpha_to_one": Limit("flag"), "clip_sample": Limit("flag"), "clip_sample_range": Limit("number", 0, 100),
    "thresholding": Limit("flag"), "rescale_betas_zero_snr": Limit("flag"),
    # the other classes' settings that decide which sampler a config describes (diffusers_scheduler.py)
    "skip_prk_steps": FLAG, "use_karras_sigmas": FLAG, "use_exponential_sigmas": FLAG, "use_beta_sigmas": FLAG,
    "use_lu_lambdas": FLAG, "use_flow_sigmas": FLAG, "lower_order_final": FLAG, "euler_at_final": FLAG,
    "predict_x0": FLAG, "use_dynamic_shifting": FLAG,
    "solver_order": Limit("integer", 1, 3), "original_inference_steps": Limit("integer", 1, MAX_TRAIN_TIMESTEPS),
    "timestep_scaling": Limit("number", 0, 1000), "algorithm_type": TEXT, "solver_type": TEXT,
    "final_sigmas_type": TEXT, "interpolation_type": TEXT, "timestep_type": TEXT,
    "variance_type": Limit("text", nullable=True),
}
MODEL_INDEX_LIMITS = {"_class_name": TEXT}


def check_values(config: dict[str, Any], limits: dict[str, Limit], what: str, where: Path,
                 required: tuple[str, ...] = ()) -> None:
    """``ImportRefusedError`` for the first key of ``limits`` whose value in ``config`` it does not take, or the
    first of ``required`` that ``config`` lacks (``what``: whose config it is, e.g. "the UNet's")."""
    for key in required:
        if key not in config:
            raise ImportRefusedError(f"{where}: {what} config has no {key}; expected {limits[key].expected()}")
    for key, limit in limits.items():
        if key in config and not limit.takes(config[key]):
            raise ImportRefusedError(f"{where}: {what} {key} is {describe(config[key])}; expected "
                                     f"{limit.expected()}")
