"""What ``ldm-export`` can be asked for, and the defaults of its flags (no heavy imports: ``--help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BATCH_RANGE = (1, 2, 8)  # UNet rows, guidance doubling included: 1 to 4 guided requests per call
MAX_VALIDATION_SEED = 2**32 - 1  # torch.Generator takes 64 bits; the sampled requests add their index


@dataclass(frozen=True)
class ExportOptions:
    """What ``ldm-export`` was asked for; its flags' defaults are these. ``batch_range`` (min, opt, max) counts UNet
    rows (guidance doubles a request batch); ``size_range`` (min, max) is the image side in pixels; None picks
    ``DEFAULT_BATCH_RANGE`` and the model's image size up to its ``max_image_size``. ``backend`` None picks
    ``ldm_export.engine_dir.default_backend()``."""

    precision: str = "fp32"
    backend: str | None = None
    batch_range: tuple[int, int, int] | None = None
    size_range: tuple[int, int] | None = None
    opset: int | None = None
    force: bool = False
    fp32_io: bool = False
    skip_validation: bool = False
    validation_seed: int | None = None  # None: a fresh seed per export (recorded in the manifest)
    lora_slots: int | None = None  # the rank of the UNet graphs' per-row LoRA inputs; None: no such inputs
