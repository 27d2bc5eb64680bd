"""The eager PyTorch engine: a checkpoint dir written by ``ldm-train``, run as it was trained.

It is the baseline every compiled engine is compared with. It imports torch and the networks
(``ldm_runtime.models``); ``ldm_runtime.engines.load_engine`` imports it only when a checkpoint dir is opened.

Batch invariance: eager kernels pick their algorithm by batch size (oneDNN's convolution at batch 1,
MKL's GEMM below 4 rows on the CPU, cuDNN / cuBLAS heuristics on a GPU), which moves results in the last
bits. So that an image never depends on the batch it was drawn in, every call runs on fixed-size slices:
the UNet on chunks of exactly ``unet_chunk_size`` rows (the last chunk padded with copies of its last
row), the text encoder one prompt at a time, the autoencoder one image at a time (which is also what
bounds the decoder's memory at large sizes). ``unet_chunk_size=None`` runs each UNet call as one batch:
faster for batches that are not a multiple of the chunk, equal across batch sizes only to about 1e-6.

LoRA adapters (``adapters``: {name: file}) are loaded once and applied per row (``torch_adapters``): the UNet and
text calls take ``adapters``, one ``AdapterChoice`` per row, and a row's factors are padded to one slot rank for
the engine, so a row's image stays the same whatever adapters the rows beside it use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ldm_kernels import dispatch
from ldm_runtime.adapters import (TEXT_ENCODER, UNET, AdapterChoice, LoadedAdapter, load_adapter,
                                   slot_rank_for)
from ldm_runtime.arrays import host_to_array_like
from ldm_runtime.checkpoint import CheckpointNetworks, load_checkpoint
from ldm_runtime.engines.base import DEFAULT_MAX_BATCH_SIZE, EngineInfo
from ldm_runtime.engines.torch_adapters import AdapterRows, RowLora, network_targets
from ldm_runtime.errors import EngineLoadError

DEFAULT_UNET_CHUNK_SIZE = 8  # one guided request pads 2 rows to 8; batches of 4 guided requests fill a chunk
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TorchEngine:
    """The autoencoder, UNet and text encoder of a checkpoint dir, in eval mode on one device.

    ``checkpoint_dir``: a checkpoint dir, or the ``CheckpointNetworks`` already loaded from one, which the engine
    then runs (moved to its device and dtype) in place of loading a second copy of the weights.
    ``device``: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N".
    ``dtype``: the networks' precision; latents and model outputs stay float32 (the sampler's arithmetic),
    and are cast at the network's boundary.
    ``ldm_kernels``: the GroupNorm and attention implementation, "reference" (plain PyTorch ops: the eager
    baseline), "triton", "auto" (Triton on CUDA tensors), or None to follow LDM_KERNELS
    (``ldm_kernels.dispatch``).
    ``adapters``: {name: LoRA .safetensors file} loaded once, for requests to name (``ldm_runtime.adapters``).
    Raises ``CheckpointError`` (one sentence) for a folder that is not a complete checkpoint dir,
    ``EngineLoadError`` for a device this machine does not have, ``AdapterError`` for an adapter file that does
    not fit the model, and ``ValueError`` for an unknown dtype.
    """

    name = "torch"  # EngineInfo.name
    deep_cache = True  # unet_with_deep_features and unet_shallow: feature caching across steps
    adapters_missing: str | None = None  # why the engine applies no adapters per request, or None

    def __init__(self, checkpoint_dir: str | Path | CheckpointNetworks, device: str = "auto",
                 dtype: torch.dtype = torch.float32, unet_chunk_size: int | None = DEFAULT_UNET_CHUNK_SIZE,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, kernels: str | None = None,
                 adapters: Mapping[str, str | Path] | None = None):
        if kernels is not None and kernels not in dispatch.BACKENDS:
            raise ValueError(f"kernels is {kernels!r}; expected one of {', '.join(dispatch.BACKENDS)} or None")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in FLOAT_DTYPES]}")
        if unet_chunk_size is not None and (isinstance(unet_chunk_size, bool) or not isinstance(unet_chunk_size, int)
                                            or unet_chunk_size < 1):
            raise ValueError(f"unet_chunk_size is {unet_chunk_size!r}; expected a positive integer or None")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 2:
            raise ValueError(f"max_batch_size is {max_batch_size!r}; expected an integer >= 2 (guidance doubles)")
        self.device = resolve_device(device)
        networks = checkpoint_dir if isinstance(checkpoint_dir, CheckpointNetworks) else load_checkpoint(checkpoint_dir)
        self.dtype = dtype
        self.unet_chunk_size = unet_chunk_size
        self.config = config = networks.config
        self.autoencoder = networks.autoencoder
        self.unet_model = networks.unet
        self.text_encoder = networks.text_encoder
        for module in (self.autoencoder, self.unet_model, self.text_encoder):
            module.to(device=self.device, dtype=dtype)
            dispatch.use_backend(module, kernels)
        self._load_adapters(adapters or {})

        self.info = EngineInfo(
            name=self.name,
            latent_channels=config.autoencoder.latent_channels,
            inpainting=config.inpainting,
            latent_factor=config.autoencoder.factor,
            latent_scale_factor=float(config.latent_scale_factor),
            image_size=config.image_size,
            min_image_size=config.image_size_multiple,
            max_image_size=config.max_image_size,
            image_size_multiple=config.image_size_multiple,
            max_batch_size=max_batch_size,
            text_max_length=config.text_encoder.max_length,
            schedule=config.schedule.to_dict(),
            sampler=config.sampler.to_dict(),
            default_sampler=config.default_sampler.to_dict(),
        )

    def _load_adapters(self, files: Mapping[str, str | Path]) -> None:
        """``self.adapters`` ({name: LoadedAdapter}; None where the engine applies none) and the hooks that apply
        them to the UNet and the text encoder."""
        if self.adapters_missing is not None:
            if files:
                raise EngineLoadError(f"the {self.name} engine cannot apply adapters per request "
                                      f"({self.adapters_missing}); expected the torch engine, or the adapters fused "
                                      f"with ldm-import --lora")
            self.adapters = None
            return
        targets = {UNET: network_targets(self.unet_model), TEXT_ENCODER: network_targets(self.text_encoder, "model.")}
        self.adapters: dict[str, LoadedAdapter] | None = {
            name: load_adapter(name, path, targets) for name, path in files.items()}
        rank = slot_rank_for(self.adapters)
        self._adapter_rows = {network: AdapterRows(network, self.adapters, rank, self.device, self.dtype)
                              for network in (UNET, TEXT_ENCODER)}
        self._row_lora = {network: RowLora(module, self._adapter_rows[network].keys) for network, module in
                          ((UNET, self.unet_model), (TEXT_ENCODER, self.text_encoder))}

    def _rows_adapted(self, network: str, choices: Sequence[AdapterChoice] | None):
        """The context in which ``network``'s calls apply ``choices`` (one per row), or a null context."""
        if not choices or not self.adapters or not self._adapter_rows[network].adapts(choices):
            return contextlib.nullcontext()
        return self._row_lora[network].rows(self._adapter_rows[network].factors(choices))

    @torch.inference_mode()
    def encode_text(self, prompts: list[str],
                    adapters: Sequence[AdapterChoice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> (context (B, L, D) float32, context_mask (B, L) bool), L = text_max_length; ``adapters``:
        each prompt's adapters (those with text encoder weights change its encoding)."""
        contexts, masks = [], []
        for index, prompt in enumerate(prompts):  # one at a time: see the module docstring
            with self._rows_adapted(TEXT_ENCODER, None if adapters is None else [adapters[index]]):
                context, mask = self.text_encoder.encode([prompt])
            contexts.append(context.float())
            masks.append(mask)
        return torch.cat(contexts), torch.cat(masks)

    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
             context_mask: torch.Tensor, adapters: Sequence[AdapterChoice] | None = None) -> torch.Tensor:
        """latents (B, C, h, w) scaled, timesteps (B,) int64 host, context (B, L, D), context_mask (B, L) bool,
        ``adapters`` (None, or each row's ``AdapterChoice``) -> the UNet's prediction (B, C, h, w) in latents'
        dtype."""
        inputs = self._unet_inputs(latents, timesteps, context, context_mask)
        (noise_pred,) = self._chunked(lambda *chunk: (self._run_unet(list(chunk)),), inputs, adapters)
        return noise_pred.to(latents.dtype)

    @torch.inference_mode()
    def unet_with_deep_features(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
                                context_mask: torch.Tensor, adapters: Sequence[AdapterChoice] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``unet``'s prediction and the deep features DeepCache keeps between steps, (B, F, h, w) in the
        engine's dtype (``UNet.forward_with_deep_features``)."""
        inputs = self._unet_inputs(latents, timesteps, context, context_mask)
        noise_pred, features = self._chunked(self.unet_model.forward_with_deep_features, inputs, adapters)
        return noise_pred.to(latents.dtype), features

    @torch.inference_mode()
    def unet_shallow(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
                     context_mask: torch.Tensor, deep_features: torch.Tensor,
                     adapters: Sequence[AdapterChoice] | None = None) -> torch.Tensor:
        """The prediction from the UNet's shallow part on deep features kept from an earlier
        ``unet_with_deep_features`` call (``UNet.forward_shallow``)."""
        inputs = (*self._unet_inputs(latents, timesteps, context, context_mask), deep_features.to(self.dtype))
        (noise_pred,) = self._chunked(lambda *chunk: (self.unet_model.forward_shallow(*chunk),), inputs, adapters)
        return noise_pred.to(latents.dtype)

    def _chunked(self, run, inputs: tuple[torch.Tensor, ...],
                 adapters: Sequence[AdapterChoice] | None = None) -> tuple[torch.Tensor, ...]:
        """``run(*inputs)`` (a tuple of outputs) on chunks of the rows, each padded to the chunk size, each row
        with its ``adapters``."""
        batch = inputs[0].shape[0]
        assert adapters is None or len(adapters) == batch, (len(adapters), batch)
        chunk = self._unet_chunk(batch)
        outputs = []
        for start in range(0, batch, chunk):
            rows = min(chunk, batch - start)
            # pad with copies of the last row: a call's row count depends only on ``rows``
            padded_rows = self._padded_rows(rows, chunk)
            padded = [_pad_rows(tensor[start:start + rows], padded_rows) for tensor in inputs]
            choices: Any = None
            if adapters is not None:
                choices = [*adapters[start:start + rows]]
                choices += [choices[-1]] * (padded_rows - rows)
            with self._rows_adapted(UNET, choices):
                outputs.append([output[:rows] for output in run(*padded)])
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def _unet_chunk(self, batch: int) -> int:
        """The most rows one UNet call takes."""
        return self.unet_chunk_size or batch

    def _padded_rows(self, rows: int, chunk: int) -> int:
        """The rows a call of ``rows`` real rows is padded to: always the full chunk here."""
        return chunk

    def _run_unet(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.unet_model(*inputs)

    def _unet_inputs(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
                     context_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The UNet's four inputs on the engine's device, floats in the engine's dtype."""
        batch = latents.shape[0]
        assert timesteps.shape == (batch,) and context.shape[0] == batch == context_mask.shape[0], \
            (latents.shape, timesteps.shape, context.shape, context_mask.shape)
        return (latents.to(self.dtype), torch.as_tensor(np.asarray(timesteps, dtype=np.int64), device=self.device),
                context.to(self.dtype), context_mask.bool())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32, roughly in [-1, 1] (not clamped)."""
        return torch.cat([self.autoencoder.decode(row.unsqueeze(0).to(self.dtype)).float() for row in latents])

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, C, H/f, W/f) float32, the posterior mode."""
        return torch.cat([self.autoencoder.encode(row.unsqueeze(0).to(self.dtype)).mode().float()
                          for row in images])

    def to_array(self, values: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
        """Host values as a tensor on the engine's device (``like``'s dtype when given, else the values' dtype)."""
        if like is not None:
            return host_to_array_like(values, like)
        return torch.as_tensor(np.array(values), device=self.device)  # np.array copies: torch needs writable memory

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        """A tensor as a host numpy array of the same dtype and shape."""
        return array.detach().cpu().numpy()


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; ``EngineLoadError`` for a device torch cannot use here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineLoadError(f"device {device!r} is not valid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (resolved.index or 0) >= count:
            raise EngineLoadError(f"device {device!r} is not available (this machine has {count} CUDA devices); "
                                  f"expected 'auto' or 'cpu'")
    elif resolved.type != "cpu":
        raise EngineLoadError(f"device {device!r} is not supported; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with its last row repeated until it has ``rows`` rows."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
