"""What the engines of an engine dir share: the Engine protocol over the dir's four graphs on host numpy arrays.

The onnxruntime and openvino engines differ only in how they run one graph (``run``); everything the model
asks of an engine is here, once: the tokenizer, the engine info (with the model's DDIM settings), the
context mask (all True for a model whose UNet attends to padding too, as Stable Diffusion does), the range
checks and the casts to the dtypes the manifest lists. Imports numpy and the ``tokenizers`` library only.

An engine dir exported with ``ldm-export --lora-slots RANK`` has per-row LoRA inputs on its UNet graphs
(``lora_down.<module>`` (B, RANK, in), ``lora_up.<module>`` (B, out, RANK), listed under the manifest's
``lora_slots``): adapters loaded here (``load_adapters``) fill them row by row, zeros for a row without one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ldm_runtime.adapters import (TEXT_ENCODER, UNET, AdapterChoice, AdapterError, LoadedAdapter, load_adapter,
                                   row_factors, targets_from_shapes)
from ldm_runtime.engines.base import EngineInfo
from ldm_runtime.errors import one_line
from ldm_runtime.files import shown
from ldm_runtime.manifest import (
    DEEP_FEATURES,
    MANIFEST_JSON,
    SHALLOW_UNET_GRAPH,
    TOKENIZER_DIR,
    EngineDirError,
    EngineManifest,
    load_manifest,
    verify_engine_files,
)


GraphTensor = tuple[str, str, "tuple[int | None, ...] | None"]  # (name, numpy dtype name, shape) of a graph file


class EngineDirEngine:
    """The Engine protocol over an engine dir's graphs; a subclass runs one graph (``run``) and calls
    ``_open_engine_dir`` before anything else that reads the manifest."""

    engine_dir: Path
    manifest: EngineManifest
    info: EngineInfo
    # Whether prompts are encoded at their own lengths where the engine dir allows it (``_encode_by_length``)
    encodes_by_length = True

    def _open_engine_dir(self, engine_dir: str | Path, name: str, verify: bool) -> None:
        """Read the manifest (and with ``verify`` check every graph's and the tokenizer's sha256 against it),
        load the tokenizer and describe the model in ``self.info`` for the engine called ``name``."""
        self.engine_dir = Path(engine_dir)
        self.manifest = load_manifest(self.engine_dir)
        if verify:
            verify_engine_files(self.engine_dir, self.manifest)
        self.tokenizer = load_tokenizer(self.engine_dir / TOKENIZER_DIR, self.manifest.model.text_max_length)
        model = self.manifest.model
        image = self.manifest.image_size
        self.info = EngineInfo(
            name=name,
            latent_channels=model.latent_channels,
            inpainting=model.inpainting,
            latent_factor=model.latent_factor,
            latent_scale_factor=float(model.latent_scale_factor),
            image_size=model.image_size,
            min_image_size=image.min,
            max_image_size=image.max,
            image_size_multiple=image.multiple,
            max_batch_size=self.manifest.batch.max,
            text_max_length=model.text_max_length,
            schedule=dict(self.manifest.schedule),
            sampler=dict(self.manifest.sampler),
            default_sampler=dict(self.manifest.default_sampler),
        )
        self._open_lora_slots()

    def _open_lora_slots(self) -> None:
        """``adapter_slot_rank`` and ``_slot_modules`` {module: (in, out)} from the manifest's ``lora_slots``;
        ``adapters`` {} where the engine dir has slots, else None (``adapters_missing`` says why)."""
        slots = self.manifest.raw.get("lora_slots")
        self.adapter_slot_rank: int | None = None
        self._slot_modules: dict[str, tuple[int, int]] = {}
        self.adapters: dict[str, LoadedAdapter] | None = None
        self.adapters_missing: str | None = (f"engine dir {self.engine_dir} has no LoRA slots; re-export it with "
                                             f"ldm-export --lora-slots RANK")
        if slots is None:
            return
        where = f"{self.engine_dir / 'manifest.json'}: lora_slots"
        try:
            rank, modules = slots["rank"], slots["modules"]
            self._slot_modules = {str(name): (int(size[0]), int(size[1])) for name, size in modules.items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise EngineDirError(f"{where} is {slots!r:.80}; expected {{rank, modules: {{name: [in, out]}}}}") from None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise EngineDirError(f"{where}.rank is {rank!r}; expected a whole number from 1")
        self.adapter_slot_rank, self.adapters, self.adapters_missing = rank, {}, None
        self._slot_factors: dict[tuple[str, tuple[AdapterChoice, ...]], dict[str, np.ndarray]] = {}

    def load_adapters(self, files: Mapping[str, str | Path]) -> None:
        """Load LoRA files {name: path} for requests to name: UNet linear and 1x1 layers of the slots only, each of
        a rank the slots hold. ``AdapterError`` (or ``EngineDirError`` for an engine dir without slots) otherwise."""
        if not files:
            return
        if self.adapters is None:
            raise EngineDirError(f"adapters {sorted(files)} cannot be served: {self.adapters_missing}")
        targets = {UNET: targets_from_shapes({f"{name}.weight": (out, size_in)
                                              for name, (size_in, out) in self._slot_modules.items()})}
        why = (f"the engine dir's graphs apply LoRA to the UNet's linear and 1x1 layers only; expected such an "
               f"adapter, or fuse it with ldm-import --lora and re-export")
        for name, path in files.items():
            adapter = load_adapter(name, path, targets, {TEXT_ENCODER: why}, pointwise_only=why)
            if adapter.rank > self.adapter_slot_rank:
                raise AdapterError(f"{path} has rank {adapter.rank}; engine dir {self.engine_dir}'s slots hold rank "
                                   f"{self.adapter_slot_rank} (re-export it with --lora-slots {adapter.rank} or more)")
            self.adapters[name] = adapter

    def _lora_feeds(self, graph: str, batch: int, adapters: Sequence[AdapterChoice] | None) -> dict[str, np.ndarray]:
        """The ``lora_down.*`` and ``lora_up.*`` inputs of ``graph`` for ``batch`` rows choosing ``adapters``."""
        names = [spec.name.removeprefix("lora_down.") for spec in self.manifest.graphs[graph].inputs
                 if spec.name.startswith("lora_down.")]
        if not names:
            return {}
        choices = tuple(adapters) if adapters is not None else ((),) * batch
        key = (graph, choices)
        feeds = self._slot_factors.get(key)
        if feeds is not None:
            return feeds
        if len(self._slot_factors) >= 32:  # a server repeats its mixes; keep the recent ones
            self._slot_factors.clear()
        rank, feeds = self.adapter_slot_rank, {}
        for name in names:
            size_in, out = self._slot_modules[name]
            rows = [row_factors((UNET, f"{name}.weight"), choice, self.adapters or {}, rank) for choice in choices]
            feeds[f"lora_down.{name}"] = np.stack([np.zeros((rank, size_in), np.float32) if row is None else row[0]
                                                   for row in rows])
            feeds[f"lora_up.{name}"] = np.stack([np.zeros((out, rank), np.float32) if row is None else row[1]
                                                 for row in rows])
        self._slot_factors[key] = feeds
        return feeds

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph ``graph`` on named host arrays; float outputs as float32, in the manifest's output order."""
        raise NotImplementedError

    def check_graph_tensors(self, graph: str, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> None:
        """``EngineDirError`` unless the inputs and outputs of the file that graph ``graph``'s session opened (each
        (name, numpy dtype name, shape: an int per axis of fixed size, None for one of any size; None for a shape of
        unknown rank)) are the ones its manifest entry lists, in its order, with its dtypes and ranks and its fixed
        sizes where both are fixed. The message names the file, the graph and the first tensor that differs."""
        entry = self.manifest.graphs[graph]
        path = self.engine_dir / entry.file
        for kind, listed, found in (("input", entry.inputs, inputs), ("output", entry.outputs, outputs)):
            names, found_names = [spec.name for spec in listed], [name for name, _, _ in found]
            if names != found_names:
                raise EngineDirError(f"{path} does not match the {graph} graph of its {MANIFEST_JSON}: the file's "
                                     f"{kind}s are {shown(found_names)} but the manifest lists {shown(names)}; "
                                     f"expected the graph and manifest ldm-export wrote together (re-export the "
                                     f"engine)")
            for spec, (name, dtype, shape) in zip(listed, found):
                if dtype != spec.dtype:
                    difference = f"is {dtype} in the file but {spec.dtype} in the manifest"
                elif shape is not None and len(shape) != len(spec.shape):
                    difference = f"has rank {len(shape)} in the file but {len(spec.shape)} in the manifest"
                else:
                    axis = next((axis for axis, (size, listed_size) in enumerate(zip(shape or (), spec.shape))
                                 if isinstance(size, int) and isinstance(listed_size, int) and size != listed_size),
                                None)
                    if axis is None:
                        continue
                    difference = (f"has {shape[axis]} on axis {axis} in the file but {spec.shape[axis]} in the "
                                  f"manifest")
                raise EngineDirError(f"{path} does not match the {graph} graph of its {MANIFEST_JSON}: {kind} {name} "
                                     f"{difference}; expected the graph and manifest ldm-export wrote together "
                                     f"(re-export the engine)")

    # --- the Engine protocol -------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str],
                    adapters: Sequence[AdapterChoice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """B prompts -> (context (B, L, D) float32, context_mask (B, L) bool: True = a token the UNet attends
        to; every token, padding included, for a model with ``mask_padding`` false). ``adapters``: each prompt's,
        which leave it as it is (``load_adapters`` takes UNet adapters only)."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts is the string {prompts!r}; expected a list of strings")
        self.manifest.check_batch(len(prompts), "text encoder batch")
        input_ids, attention_mask = self.tokenize(list(prompts))
        masked = self.manifest.model.mask_padding
        if masked and self.encodes_by_length:
            context = self._encode_by_length(input_ids, attention_mask)
        else:
            (context,) = self.run("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})
        return context, attention_mask.astype(bool) if masked else np.ones(attention_mask.shape, dtype=bool)

    def _encode_by_length(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The context of prompts whose padding the UNet masks, each encoded at ``manifest.text_length`` of its
        token count (one text encoder call per length) and padded with zeros to ``text_max_length``: the rows the
        UNet attends to are those of an encoding at ``text_max_length``, to rounding, and a prompt's row does not
        depend on the prompts beside it."""
        lengths = np.array([self.manifest.text_length(int(tokens)) for tokens in attention_mask.sum(axis=1)])
        context = np.zeros((*input_ids.shape, self.manifest.model.context_dim), np.float32)
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            (context[rows, :length],) = self.run("text_encoder", {"input_ids": input_ids[rows, :length],
                                                                  "attention_mask": attention_mask[rows, :length]})
        return context

    def unet(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
             context_mask: np.ndarray, adapters: Sequence[AdapterChoice] | None = None) -> np.ndarray:
        """latents (B, C, h, w) scaled, timesteps (B,) int64 (one per sample), context (B, L, D),
        context_mask (B, L) bool, ``adapters`` (None, or each row's ``AdapterChoice``) -> the UNet's prediction
        (B, C, h, w) float32."""
        return self.unet_with_deep_features(latents, timesteps, context, context_mask, adapters)[0]

    @property
    def deep_cache(self) -> bool:
        """Whether the engine dir has the graphs of feature caching across steps (``unet_shallow``)."""
        return SHALLOW_UNET_GRAPH in self.manifest.graphs

    @property
    def deep_cache_missing(self) -> str | None:
        """Why the engine dir cannot cache features across steps, or None."""
        if self.deep_cache:
            return None
        return f"engine dir {self.engine_dir} has no {SHALLOW_UNET_GRAPH} graph; re-export it with this ldm-export"

    def unet_with_deep_features(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
                                context_mask: np.ndarray, adapters: Sequence[AdapterChoice] | None = None
                                ) -> tuple[np.ndarray, np.ndarray | None]:
        """``unet``'s prediction and the deep features DeepCache keeps (None from an engine dir without them)."""
        timesteps = self.unet_timesteps(latents, timesteps)
        outputs = self.run("unet", {"latents": latents, "timesteps": timesteps, "context": context,
                                    "context_mask": np.asarray(context_mask, dtype=bool),
                                    **self._lora_feeds("unet", latents.shape[0], adapters)})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def unet_shallow(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray, context_mask: np.ndarray,
                     deep_features: np.ndarray, adapters: Sequence[AdapterChoice] | None = None) -> np.ndarray:
        """The prediction from the UNet's shallow part on deep features kept from ``unet_with_deep_features``."""
        timesteps = self.unet_timesteps(latents, timesteps)
        (noise_pred,) = self.run(SHALLOW_UNET_GRAPH, {
            "latents": latents, "timesteps": timesteps, "context": context,
            "context_mask": np.asarray(context_mask, dtype=bool), DEEP_FEATURES: deep_features,
            **self._lora_feeds(SHALLOW_UNET_GRAPH, latents.shape[0], adapters)})
        return noise_pred

    def unet_timesteps(self, latents, timesteps) -> np.ndarray:
        """Checks a UNet call's batch and latent size against the manifest; its timesteps as (B,) int64 on the
        host, one timestep repeated for every row."""
        batch = latents.shape[0]
        self.manifest.check_batch(batch, "UNet batch")
        self.manifest.check_latent_size(latents.shape[2], latents.shape[3])
        timesteps = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        if timesteps.shape[0] == 1 and batch > 1:
            timesteps = np.repeat(timesteps, batch)
        return timesteps

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32, roughly in [-1, 1]."""
        self.manifest.check_batch(latents.shape[0], "decoder batch")
        self.manifest.check_latent_size(latents.shape[2], latents.shape[3])
        (images,) = self.run("vae_decoder", {"latents": latents})
        return images

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, C, H/f, W/f) float32, the posterior mode."""
        self.manifest.check_batch(images.shape[0], "encoder batch")
        self.manifest.check_image_size(images.shape[2], images.shape[3])
        (latents,) = self.run("vae_encoder", {"images": images})
        return latents

    def to_array(self, values: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
        """Host values as an engine array: a numpy array (``like``'s dtype when given)."""
        return np.asarray(values, dtype=None if like is None else like.dtype)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    # --- below the protocol --------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """B prompts -> (input_ids (B, L) int64, attention_mask (B, L) int64, 1 = token), padded or truncated
        to L = text_max_length exactly as the training tokenizer does."""
        encodings = self.tokenizer.encode_batch(prompts)
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention_mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        assert input_ids.shape == (len(prompts), self.manifest.model.text_max_length), input_ids.shape
        return input_ids, attention_mask

    def cast_inputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` checked against the manifest's inputs of ``graph`` (names, ranks, fixed sizes) and cast to
        their dtypes as contiguous arrays; ``ValueError`` naming the input that does not fit."""
        entry = self.manifest.graphs[graph]
        expected = {spec.name for spec in entry.inputs}
        if set(feeds) != expected:
            raise ValueError(f"{graph} takes inputs {sorted(expected)}; got {sorted(feeds)}")
        cast = {}
        for spec in entry.inputs:
            value = np.asarray(feeds[spec.name])
            fixed = [(axis, size) for axis, size in enumerate(spec.shape) if isinstance(size, int)]
            if value.ndim != len(spec.shape) or any(value.shape[axis] != size for axis, size in fixed):
                raise ValueError(f"{graph} input {spec.name} has shape {value.shape}; expected {tuple(spec.shape)}")
            cast[spec.name] = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))
        return cast


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; ``EngineDirError`` naming it where it cannot be looked at (a folder this
    user may not read)."""
    try:
        return path.is_file()
    except OSError as error:
        raise EngineDirError(f"cannot read {path} ({error.strerror or error}); expected a file this user can "
                             f"read") from None


def load_tokenizer(folder: Path, max_length: int):
    """The engine dir's tokenizer.json as a ``tokenizers.Tokenizer`` that pads and truncates to ``max_length``."""
    from tokenizers import Tokenizer  # a Rust library with no torch dependency

    path = folder / "tokenizer.json"
    if not _is_file(path):
        raise EngineDirError(f"engine dir {folder.parent} has no {TOKENIZER_DIR}/tokenizer.json; re-export it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise EngineDirError(f"{path} is not a tokenizer the tokenizers library can read ({one_line(error)})") from None
    config_path = folder / "tokenizer_config.json"
    try:
        settings = json.loads(config_path.read_text()) if _is_file(config_path) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EngineDirError(f"cannot read {config_path} ({one_line(error)})") from None
    if not isinstance(settings, dict):
        raise EngineDirError(f"{config_path} holds {shown(settings)}; expected an object")
    pad_token = settings.get("pad_token") or "[PAD]"
    if isinstance(pad_token, dict):  # older transformers write AddedToken objects
        pad_token = pad_token.get("content", "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise EngineDirError(f"{path} has no padding token {pad_token!r}; expected the tokenizer the model was "
                             f"trained with")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer
