"""τθ: a BERT-family tokenizer plus transformer that turns prompts into the UNet's cross-attention context.

kind "pretrained": a local Hugging Face model, frozen (no gradients, always in eval mode).
kind "scratch": a ``transformers.BertModel`` with the configured sizes, trained with the UNet (LDM's setup).
Either way the tokenizer comes from the resolved path, or from a checkpoint's saved ``tokenizer/`` folder.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch
from torch import nn

from ldm_runtime.config import ConfigError, TextEncoderConfig


def resolve_text_encoder_path(path: str | Path, model_dir: str | Path | None = None) -> Path:
    """The folder holding the model: ``path`` itself if it is a folder, else ``<package dir>/model`` of the
    installed Python package named ``path`` (dotted names too), found without importing the package or its
    parents, so that naming one runs none of its code. With ``model_dir``, the folder whose model.json named
    ``path``, a folder must be a relative path that stays inside ``model_dir``: a model folder is data and never
    reaches outside itself. ``ConfigError`` when neither exists or the folder would leave ``model_dir``."""
    name = str(path)
    if model_dir is None:
        folder = Path(name).expanduser()
    else:
        folder = _folder_inside(Path(model_dir), name)
    if folder.is_dir():
        return folder
    package = _installed_package_folder(name)
    if package is not None and (package / "model").is_dir():
        return package / "model"
    where = "" if model_dir is None else f" inside {model_dir}"
    raise ConfigError(
        f"text encoder path {name!r} is neither a folder{where} nor an installed Python package with a model/ folder"
    )


def _folder_inside(model_dir: Path, name: str) -> Path:
    """``model_dir / name``; ``ConfigError`` when ``name`` is absolute or leads outside ``model_dir`` (``..``, or a
    symlink that points out)."""
    if Path(name).is_absolute():
        raise ConfigError(f"text encoder path {name!r} in {model_dir} is an absolute path; expected a folder inside "
                          f"the model folder or an installed package name")
    folder = model_dir / name
    if not folder.resolve().is_relative_to(model_dir.resolve()):
        raise ConfigError(f"text encoder path {name!r} leads outside {model_dir}; expected a folder inside the model "
                          f"folder or an installed package name")
    return folder


def _installed_package_folder(name: str) -> Path | None:
    """The folder of the installed package ``name`` ("pkg" or "pkg.sub"), or None. Nothing is imported:
    ``find_spec`` on a top-level name only searches, and each further part is looked up in its parent's folders
    by the path finder (``find_spec("pkg.sub")`` would import ``pkg``, running its ``__init__``)."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    try:
        spec = importlib.util.find_spec(parts[0])
        for depth in range(1, len(parts)):
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth + 1]),
                                                            list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def clip_text_config(cfg: TextEncoderConfig):
    """transformers' ``CLIPTextConfig`` of a kind "clip" text encoder's sizes."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                          num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
                          hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps)


class TextEncoder(nn.Module):
    """Prompts -> (B, max_length, hidden_size) float32 hidden states and a (B, max_length) bool token mask."""

    def __init__(self, cfg: TextEncoderConfig, tokenizer_path: str | Path | None = None,
                 model_dir: str | Path | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.kind == "clip":
            if tokenizer_path is None:
                raise ConfigError("a clip text encoder has no tokenizer of its own; expected the checkpoint's "
                                  "tokenizer/ folder")
            model_folder = None
        else:
            model_folder = None  # a scratch encoder with a tokenizer of its own reads nothing at cfg.path
            if cfg.kind == "pretrained" or tokenizer_path is None:
                model_folder = resolve_text_encoder_path(cfg.path, model_dir)
        tokenizer_folder = model_folder if tokenizer_path is None else Path(tokenizer_path)
        if not tokenizer_folder.is_dir():
            raise ConfigError(f"tokenizer folder {str(tokenizer_folder)!r} does not exist; expected a folder")
        # transformers costs seconds to import: only runs that build a text encoder pay for it.
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPTextModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
        if cfg.kind == "pretrained":
            if not (model_folder / "config.json").is_file():
                raise ConfigError(f"text encoder folder {str(model_folder)!r} has no config.json; "
                                  "expected a Hugging Face model folder")
            # safetensors only: a pickled pytorch_model.bin in a model folder is never unpickled
            self.model = AutoModel.from_pretrained(str(model_folder), local_files_only=True, dtype=torch.float32,
                                                   use_safetensors=True)
            self.model.requires_grad_(False)
            self.model.eval()
        elif cfg.kind == "clip":
            self.model = CLIPTextModel(clip_text_config(cfg))
            self.model.requires_grad_(False)
            self.model.eval()
        else:
            config = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_length,
                pad_token_id=self.tokenizer.pad_token_id or 0,
            )
            # No pooler: the UNet reads every token's hidden state, and an unused layer would get no gradient.
            self.model = BertModel(config, add_pooling_layer=False)

    @property
    def trainable(self) -> bool:
        """True for kind "scratch" (trained with the UNet), False for a frozen pretrained or CLIP model."""
        return self.cfg.kind == "scratch"

    @property
    def hidden_size(self) -> int:
        """Width of the context vectors; must equal the UNet's context_dim."""
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder keeps dropout off whatever its parent does
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings -> (input_ids (B, max_length) int64, attention_mask (B, max_length) int64, 1 = token),
        padded or truncated to exactly ``cfg.max_length``, on the CPU."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts is the string {prompts!r}; expected a list of strings")
        encoded = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                 max_length=self.cfg.max_length, return_tensors="pt")
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) int64 -> last_hidden_state (B, L, hidden_size) float32.

        CLIP reads no attention mask (its causal mask keeps every token off the padding after it, as in SD),
        and ``clip_skip`` takes an earlier layer's output through the final layer norm (diffusers' clip_skip)."""
        if self.cfg.kind == "clip":
            skip = self.cfg.clip_skip
            output = self.model(input_ids=input_ids, output_hidden_states=skip > 0)
            if not skip:
                return output.last_hidden_state.float()
            final_layer_norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers < 5 nests it
            return final_layer_norm(output.hidden_states[-(skip + 1)]).float()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings -> (context (B, max_length, hidden_size) float32, context_mask (B, max_length) bool),
        on the model's device."""
        input_ids, attention_mask = self.tokenize(prompts)
        device = self.model.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        context_mask = attention_mask.bool()
        if not self.cfg.mask_padding:
            context_mask = torch.ones_like(context_mask)
        return self(input_ids, attention_mask), context_mask

    def save_tokenizer(self, folder: str | Path) -> Path:
        """Write the tokenizer files into ``folder`` (created if missing) and return it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        return folder
