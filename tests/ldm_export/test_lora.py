"""LoRA adapters fused by ``ldm-import --lora`` (ldm_export/lora.py), against diffusers and PEFT.

The adapters are written here for tiny random SD 1.x-like and SD 2.x-like pipelines, in both layouts people
download: diffusers/PEFT (made by PEFT and saved by diffusers' ``save_lora_weights``, with per-module ranks and
alphas in its metadata) and kohya (``lora_unet_*``/``lora_te_*``, ``lora_down``/``lora_up``/``alpha``, built from
its documented key format). Each adapts UNet and text-encoder modules, linear layers, 1x1 convolutions and 3x3 ones
(LoCon). The oracle is diffusers' ``load_lora_weights`` + ``set_adapters`` (images from the same noise) and
``fuse_lora`` (the fused weights); for our own checkpoints, PEFT's own merge."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm_export.lora
from ldm_export.errors import ImportRefusedError
from ldm_export.lora import AdapterFile, adapter_argument, read_adapter, targets_from_shapes
from ldm_export.sd_import import import_source, main
from ldm_runtime.adapters import UNET, load_adapter
from ldm_runtime.config import ConfigError, ModelConfig
from ldm_runtime.noise import initial_noise
from tests.conftest import base_seed
from tests.ldm_export.tiny_sd import (IMAGE_SIZE, LATENT_SIZE, PROMPTS, SD1_LIKE, SD2_LIKE, write_diffusers_folder,
                                      write_original_file)

STEPS = 6
GUIDANCE = 7.5
SCALES = (0.5, 1.0)
# What the adapters change, by the last part of the module's name: attention projections, the feed-forward output,
# proj_in/proj_out (1x1 convolutions in SD 1.x, linear in SD 2.x), the ResNets' 3x3 convolutions (LoCon), their
# time embedding projections and 1x1 shortcuts; in CLIP, the attention projections and the MLP. kohya writes a text
# encoder's q, k, v and out projections together (diffusers reads them only so).
UNET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2",
                "time_emb_proj", "conv_shortcut")
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# The spread of the up weights, the down ones' being 1 / sqrt(fan-in): enough for the adapters to change the images
# of these random models visibly at scale 0.5
UP_STD = 0.5


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:lora:{name}".encode()).digest()[:4], "little")


@pytest.fixture(autouse=True)
def _transformers_takes_this_peft(monkeypatch):
    """diffusers loads a text encoder's LoRA through transformers' adapter calls, which ask for a newer peft than
    the package index offers (transformers 5.25: 0.22; newest peft: 0.21.2), which does what those calls need."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    if Version(peft.__version__) < Version(transformers_peft.MIN_PEFT_VERSION):
        monkeypatch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)


@pytest.fixture(scope="module", params=[SD1_LIKE, SD2_LIKE], ids=lambda sizes: sizes.name)
def source(request, tmp_path_factory):
    """(a tiny random diffusers Stable Diffusion folder, its sizes)."""
    sizes = request.param
    return write_diffusers_folder(sizes, tmp_path_factory.mktemp(f"lora-{sizes.name}") / "diffusers",
                                  _seed(sizes.name)), sizes


def _diffusers_pipeline(folder: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapted(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """The names of ``model``'s linear and convolution modules whose names end in one of ``suffixes``."""
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)]


def _randomise_lora(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fresh random down (lora_A) and up (lora_B) weights."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
            elif ".lora_B." in name:
                parameter.copy_(UP_STD * torch.randn(parameter.shape, generator=generator))


def write_peft_adapter(folder: Path, path: Path, seed: int) -> Path:
    """A diffusers-layout LoRA of the pipeline in ``folder``: PEFT layers on the UNet (rank 4, alpha 8; rank 2 for
    the ResNets' first convolution, alpha 2 for to_k and 3 for one anchored module) and the text encoder (rank 2,
    alpha 4), saved by diffusers' ``save_lora_weights`` with their LoraConfigs as metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _diffusers_pipeline(folder)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=list(UNET_MODULES), rank_pattern={"conv1": 2},
                             alpha_pattern={"to_k": 2, "^down_blocks.0.resnets.0.conv2": 3})
    text_config = LoraConfig(r=2, lora_alpha=4, target_modules=list(TEXT_MODULES))
    inject_adapter_in_model(unet_config, pipe.unet)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    _randomise_lora(pipe.unet, generator)
    _randomise_lora(pipe.text_encoder, generator)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return path


def write_kohya_adapter(folder: Path, path: Path, seed: int) -> Path:
    """A kohya-layout LoRA of the pipeline in ``folder``, tensors laid out by hand: ``lora_unet_<module>`` and
    ``lora_te_text_model_<module>`` (dots as underscores), rank 4 (3x3 downs in the 3x3 convolutions: LoCon), each
    module with its alpha: 2 for the linear layers, 1 for the convolutions (kohya's network_alpha and conv_alpha;
    diffusers takes the alpha most modules share for attention projections and text-encoder layers, whatever their
    own says)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(seed)
    rank = 4
    tensors = {}
    for prefix, model, suffixes in (("lora_unet_", pipe.unet, UNET_MODULES),
                                    ("lora_te_text_model_", pipe.text_encoder, TEXT_MODULES)):
        modules = dict(model.named_modules())
        for name in _adapted(model, suffixes):
            weight = modules[name].weight
            kernel = tuple(weight.shape[2:])
            down = torch.randn(rank, weight.shape[1], *kernel, generator=generator) / weight[0].numel() ** 0.5
            up = UP_STD * torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()), generator=generator)
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(1.0 if kernel else 2.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


WRITERS = {"diffusers": write_peft_adapter, "kohya": write_kohya_adapter}


@pytest.fixture(scope="module")
def adapters(source, tmp_path_factory):
    """layout -> a LoRA file of the module's model in that layout."""
    folder, sizes = source
    root = tmp_path_factory.mktemp(f"adapters-{sizes.name}")
    return {layout: write(folder, root / f"{layout}.safetensors", _seed(f"{sizes.name}:{layout}"))
            for layout, write in WRITERS.items()}


def _diffusers_images(pipe, seeds: list[int]) -> list[np.ndarray]:
    latents = torch.from_numpy(initial_noise(seeds, (4, LATENT_SIZE, LATENT_SIZE)))
    output = pipe(list(PROMPTS), negative_prompt=[""] * len(PROMPTS), num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, latents=latents, output_type="np")
    return list(output.images.astype(np.float64))


def _our_images(checkpoint: Path, seeds: list[int]) -> list[np.ndarray]:
    from ldm_runtime.engines.torch_engine import TorchEngine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    requests = [GenerationRequest(prompt=prompt, seed=seed, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE)
                for prompt, seed in zip(PROMPTS, seeds)]
    engine = TorchEngine(checkpoint, device="cpu")
    return [image.astype(np.float64) / 255.0 for image in Pipeline(engine).generate(requests)]


def psnr_db(expected: np.ndarray, actual: np.ndarray) -> float:
    mse = float(np.mean((expected - actual) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-30))


@pytest.mark.parametrize("layout", WRITERS)
def test_fused_lora_samples_like_diffusers_load_lora_weights_at_scales_half_and_one(source, adapters, layout, rng,
                                                                                    tmp_path):
    folder, sizes = source
    seeds = [int(seed) for seed in rng.integers(0, 2**31, len(PROMPTS))]
    pipe = _diffusers_pipeline(folder)
    base = _diffusers_images(pipe, seeds)
    pipe.load_lora_weights(str(adapters[layout]), adapter_name=layout)
    for scale in SCALES:
        pipe.set_adapters([layout], adapter_weights=[scale])
        expected = _diffusers_images(pipe, seeds)
        checkpoint = import_source(folder, tmp_path / f"fused-{scale}", adapters=[AdapterFile(adapters[layout], scale)])
        actual = _our_images(checkpoint, seeds)
        for prompt, before, want, got in zip(PROMPTS, base, expected, actual):
            assert want.shape == got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            # ours are 8-bit, whose rounding alone is 59 dB: a fuse that missed the adapter would be below 35 dB
            assert psnr_db(before, want) < 35.0, "an adapter that changes nothing visible proves nothing"
            assert psnr_db(want, got) >= 55.0, (scale, prompt, psnr_db(want, got))


def _diffusers_fused(folder: Path, files: list[Path], scales: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """network -> its state dict after diffusers' ``load_lora_weights`` of ``files``, ``set_adapters`` at
    ``scales``, ``fuse_lora`` and ``unload_lora_weights`` (which keeps the fused weights)."""
    pipe = _diffusers_pipeline(folder)
    names = [f"adapter{index}" for index in range(len(files))]
    for name, path in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()
    return {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}


def _ours(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """network -> the checkpoint's state dict, the text encoder's under CLIPTextModel's names."""
    text = load_file(str(checkpoint / "text_encoder.safetensors"))
    return {"unet": load_file(str(checkpoint / "unet.safetensors")),
            "text_encoder": {name.removeprefix("model.").removeprefix("text_model."): tensor
                             for name, tensor in text.items()}}


def _assert_fused_alike(folder: Path, ours: dict, theirs: dict) -> int:
    """Every weight of ``ours`` equals diffusers' ``theirs`` to fp32 rounding; returns how many the adapters
    changed (diffusers' base weights: the folder's)."""
    base = _diffusers_pipeline(folder)
    base = {"unet": base.unet.state_dict(), "text_encoder": base.text_encoder.state_dict()}
    changed = 0
    for network, expected in theirs.items():
        for name, want in expected.items():
            name = name.removeprefix("text_model.")
            if name.endswith("position_ids"):
                continue
            got, before = ours[network][name], base[network][name]
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) <= 4e-7 * scale, (network, name)
            changed += not torch.equal(want, before)
    return changed


@pytest.mark.parametrize("layout", WRITERS)
def test_fused_weights_equal_diffusers_fuse_lora_to_fp32_rounding(source, adapters, layout, tmp_path):
    folder, sizes = source
    checkpoint = import_source(folder, tmp_path / "fused", adapters=[AdapterFile(adapters[layout], 0.5)])
    theirs = _diffusers_fused(folder, [adapters[layout]], [0.5])
    changed = _assert_fused_alike(folder, _ours(checkpoint), theirs)
    pipe = _diffusers_pipeline(folder)
    expected = len(_adapted(pipe.unet, UNET_MODULES)) + len(_adapted(pipe.text_encoder, TEXT_MODULES))
    assert changed == expected


def _old_diffusers_layout(path: Path, out: Path) -> Path:
    """``path``'s PEFT keys under the names diffusers used before PEFT: ``processor.to_q_lora.down`` for the UNet's
    attention projections, ``.lora.down``/``.lora.up`` for its other layers, ``text_model.`` +
    ``lora_linear_layer.down``/``.up`` for the text encoder; no metadata (alpha = rank)."""
    renamed = {}
    for name, tensor in load_file(str(path)).items():
        role = "down" if ".lora_A." in name else "up"
        module = name.split(".lora_")[0]
        if module.startswith("text_encoder."):
            module = "text_encoder.text_model." + module.removeprefix("text_encoder.")
            renamed[f"{module}.lora_linear_layer.{role}.weight"] = tensor
        elif module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or module.endswith("to_out.0"):
            parent, projection = module.removesuffix(".0").rsplit(".", 1)
            renamed[f"{parent}.processor.{projection}_lora.{role}.weight"] = tensor
        else:
            renamed[f"{module}.lora.{role}.weight"] = tensor
    save_file(renamed, str(out))
    return out


def _without_metadata(path: Path, out: Path) -> Path:
    """``path`` without its lora_adapter_metadata: every module's alpha is its rank."""
    save_file(load_file(str(path)), str(out))
    return out


@pytest.mark.parametrize("variant", [_old_diffusers_layout, _without_metadata], ids=lambda variant: variant.__name__)
def test_older_diffusers_keys_and_rank_scaling_fuse_as_diffusers_does(source, adapters, variant, tmp_path):
    folder, sizes = source
    if sizes is not SD1_LIKE:
        pytest.skip("the names do not depend on the model: one of the two is enough")
    path = variant(adapters["diffusers"], tmp_path / "variant.safetensors")
    checkpoint = import_source(folder, tmp_path / "fused", adapters=[AdapterFile(path, 1.0)])
    _assert_fused_alike(folder, _ours(checkpoint), _diffusers_fused(folder, [path], [1.0]))


def test_repeated_lora_flags_fuse_in_order_and_are_recorded_in_model_json(source, adapters, tmp_path, capsys):
    folder, sizes = source
    if sizes is not SD2_LIKE:
        pytest.skip("the flags do not depend on the model: one of the two is enough")
    out = tmp_path / "fused"
    code = main([str(folder), "--out", str(out), "--lora", f"{adapters['diffusers']}:0.5",
                 "--lora", f"{adapters['kohya']}:-0.75"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "model.json").read_text())["adapters"]
    assert recorded == [{"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "scale": scale}
                        for path, scale in ((adapters["diffusers"], 0.5), (adapters["kohya"], -0.75))]
    theirs = _diffusers_fused(folder, [adapters["diffusers"], adapters["kohya"]], [0.5, -0.75])
    _assert_fused_alike(folder, _ours(out), theirs)


def test_lora_fuses_alike_into_a_single_file_import_and_into_an_earlier_import(source, adapters, tmp_path):
    folder, sizes = source
    if sizes is not SD1_LIKE:
        pytest.skip("the route does not depend on the model: one of the two is enough")
    adapter = [AdapterFile(adapters["kohya"], 0.5)]
    expected = import_source(folder, tmp_path / "folder", adapters=adapter)
    path = write_original_file(folder, expected, tmp_path / "model.safetensors", openclip=False,
                               extra_text_layer=False)
    from_file = import_source(path, tmp_path / "file", tokenizer=folder / "tokenizer", image_size=IMAGE_SIZE,
                              adapters=adapter)
    afterwards = import_source(import_source(folder, tmp_path / "plain"), tmp_path / "afterwards", adapters=adapter)
    for checkpoint in (from_file, afterwards):
        for name in ("unet.safetensors", "text_encoder.safetensors"):
            want, got = (load_file(str(written / name)) for written in (expected, checkpoint))
            assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want), name
        assert (json.loads((checkpoint / "model.json").read_text())["adapters"]
                == json.loads((expected / "model.json").read_text())["adapters"])


# --- our own checkpoints --------------------------------------------------------------------------------------------

def _peft_adapter_of_checkpoint(checkpoint: Path, path: Path, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA of checkpoint dir ``checkpoint`` made with PEFT on our own networks (the UNet's
    attention projections, its 3x3 and 1x1 convolutions; the BERT text encoder's query and value), saved to
    ``path``; returns the weights PEFT's own merge at ``scale`` gives, keyed as our state dicts."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    from ldm_runtime.checkpoint import load_checkpoint

    networks = load_checkpoint(checkpoint)
    unet, text = networks.unet, networks.text_encoder.model
    unet_config = LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "conv1", "conv_shortcut", "proj_in"],
                             alpha_pattern={"conv1": 2})
    text_config = LoraConfig(r=2, lora_alpha=1, target_modules=["query", "value"], use_rslora=True)
    inject_adapter_in_model(unet_config, unet)
    inject_adapter_in_model(text_config, text)
    generator = torch.Generator().manual_seed(seed)
    _randomise_lora(unet, generator)
    _randomise_lora(text, generator)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text), unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    merged = {}
    for prefix, model in (("unet.", unet), ("text_encoder.model.", text)):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.scale_layer(scale)
                module.merge()
        for name, tensor in model.state_dict().items():
            if "lora_" not in name:
                merged[prefix + name.replace(".base_layer.", ".")] = tensor
    return merged


def test_lora_fused_into_our_own_checkpoint_equals_peft_merge(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "adapter.safetensors"
    expected = _peft_adapter_of_checkpoint(tiny_checkpoint, path, _seed("own"), 0.7)
    out = tmp_path / "fused"
    assert main([str(tiny_checkpoint), "--lora", f"{path}:0.7", "--out", str(out)]) == 0, capsys.readouterr().err
    changed = 0
    for network in ("unet", "text_encoder"):
        ours, before = (load_file(str(folder / f"{network}.safetensors")) for folder in (out, tiny_checkpoint))
        for name, tensor in ours.items():
            want = expected[f"{network}.{name}"]
            assert float((tensor - want).abs().max()) <= 4e-7 * float(want.abs().max()), (network, name)
            changed += not torch.equal(tensor, before[name])
    assert changed >= 10
    assert (out / "autoencoder.safetensors").read_bytes() == (tiny_checkpoint / "autoencoder.safetensors").read_bytes()
    assert not (out / "train_state.safetensors").exists(), "resuming would train the weights without the adapter"
    state = json.loads((out / "train_state.json").read_text())
    for name, digest in state["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert any(name.startswith("tokenizer/") for name in state["files"])
    model, base = (json.loads((folder / "model.json").read_text()) for folder in (out, tiny_checkpoint))
    assert model.pop("adapters") == [*base.pop("adapters"), {"file": path.name, "scale": 0.7,
                                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert model == base


@pytest.mark.slow
def test_exported_fused_checkpoint_is_an_engine_dir_like_any_other(tiny_checkpoint, tmp_path):
    """ldm-export validates the graphs against the eager model of the fused checkpoint it reads."""
    from ldm_export.engine_dir import ExportOptions, export_engine

    path = tmp_path / "adapter.safetensors"
    _peft_adapter_of_checkpoint(tiny_checkpoint, path, _seed("export"), 1.0)
    fused = import_source(tiny_checkpoint, tmp_path / "fused", adapters=[AdapterFile(path)])
    engine = export_engine(fused, tmp_path / "engine", ExportOptions(precision="fp32"))
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["validation"]["passed"] is True
    assert manifest["source"]["files"]["model.json"] == hashlib.sha256((fused / "model.json").read_bytes()).hexdigest()


# --- refusals: one line, exit status 2, nothing written ---------------------------------------------------------------

def _tensors(**shapes) -> dict[str, torch.Tensor]:
    return {name.replace("__", "."): torch.zeros(shape) for name, shape in shapes.items()}


def _hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (an adapter file that must be refused, a part of the line that must name what is wrong)."""
    folder.mkdir()
    conv_in = "lora_unet_conv_in"  # (out, 4, 3, 3) in every model here
    cases = {}

    def case(name: str, tensors: dict | None, named: str, data: bytes | None = None, metadata=None) -> None:
        path = folder / name
        if tensors is not None:
            save_file(tensors, str(path), metadata=metadata)
        else:
            path.write_bytes(data)
        cases[path.stem] = (path, named)

    case("unknown_key.safetensors", {"unet.no_such_block.lora_A.weight": torch.zeros(2, 4),
                                     "unet.no_such_block.lora_B.weight": torch.zeros(4, 2)}, "no_such_block")
    case("not_lora.safetensors", {"conv_in.weight": torch.zeros(2, 2)}, "'conv_in.weight'")
    case("misshapen.safetensors", {f"{conv_in}.lora_down.weight": torch.zeros(2, 5, 3, 3),
                                   f"{conv_in}.lora_up.weight": torch.zeros(16, 2, 1, 1)}, "[2, 5, 3, 3]")
    case("loha.safetensors", {f"{conv_in}.hada_w1_a": torch.zeros(2, 2)}, "LoHa")
    case("down_only.safetensors", {f"{conv_in}.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "no up weight")
    case("nan_alpha.safetensors", {f"{conv_in}.lora_down.weight": torch.zeros(2, 4, 3, 3),
                                   f"{conv_in}.lora_up.weight": torch.zeros(16, 2, 1, 1),
                                   f"{conv_in}.alpha": torch.tensor(float("nan"))}, "alpha")
    case("regex_pattern.safetensors", {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
                                       "unet.conv_in.lora_B.weight": torch.zeros(16, 2, 1, 1)},
         "rank_pattern", metadata={"lora_adapter_metadata": json.dumps(
             {"unet.r": 2, "unet.lora_alpha": 2, "unet.rank_pattern": {"(a+)+$": 2}})})
    nan_up = torch.zeros(16, 2, 1, 1)
    nan_up[3, 1] = float("nan")
    case("nan_weight.safetensors", {f"{conv_in}.lora_down.weight": torch.zeros(2, 4, 3, 3),
                                    f"{conv_in}.lora_up.weight": nan_up}, "holds values that are not finite")
    case("zero_alpha.safetensors", {f"{conv_in}.lora_down.weight": torch.zeros(2, 4, 3, 3),
                                    f"{conv_in}.lora_up.weight": torch.zeros(16, 2, 1, 1),
                                    f"{conv_in}.alpha": torch.tensor(0.0)},
         f"'{conv_in}.alpha' is 0.0; expected a number above 0 and at most 65536 (kohya reads an alpha of 0")
    case("sdxl.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                              "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)},
         "the two text encoders of an SDXL model")
    case("five_bytes.safetensors", None, "is 5 bytes, fewer than the 8", data=b"\x00" * 5)
    case("garbage.safetensors", None, "header", data=b"\x10\x00\x00\x00\x00\x00\x00\x00not json, not a header")
    case("huge_header.safetensors", None, "header", data=(1 << 40).to_bytes(8, "little") + b"{}")
    case("pickled.pt", None, "never unpickles", data=b"not even a pickle: it must never be read")
    case("not_safetensors.txt", None, "not a .safetensors file", data=b"{}")
    return cases


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return _hostile_files(tmp_path_factory.mktemp("hostile") / "files")


HOSTILE = ("unknown_key", "not_lora", "misshapen", "loha", "down_only", "nan_alpha", "regex_pattern", "nan_weight",
           "zero_alpha", "sdxl", "five_bytes", "garbage", "huge_header", "pickled", "not_safetensors")


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_adapter_is_refused_in_one_line_naming_it_before_anything_is_written(tiny_checkpoint, hostile, name,
                                                                                      tmp_path, capsys):
    path, named = hostile[name]
    line = _refused(capsys, [str(tiny_checkpoint), "--lora", str(path), "--out", str(tmp_path / "out")])
    assert named in line and str(path) in line, line
    assert list(tmp_path.iterdir()) == [], "nothing written, not even a temporary folder"


def test_an_adapter_whose_change_overflows_the_weights_is_refused_and_nothing_is_written(tiny_checkpoint, tmp_path,
                                                                                       capsys):
    out_channels = load_file(str(tiny_checkpoint / "unet.safetensors"))["conv_in.weight"].shape[0]
    path = tmp_path / "overflowing.safetensors"  # finite factors whose product is not: an inf weight, exit 0
    save_file({"lora_unet_conv_in.lora_down.weight": torch.full((2, 4, 3, 3), 1e20),
               "lora_unet_conv_in.lora_up.weight": torch.full((out_channels, 2, 1, 1), 1e20)}, str(path))
    code = main([str(tiny_checkpoint), "--lora", str(path), "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"ldm-import: error: {path}: 'lora_unet_conv_in.lora_down.weight' and 'lora_unet_conv_in.lora_up.weight' at "
        f"scale 1 change 'conv_in.weight' past what its dtype holds (values that are not finite); expected an adapter "
        f"whose change fits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflowing.safetensors"]


def test_hostile_adapter_to_a_stable_diffusion_import_is_refused_before_anything_is_written(source, hostile, tmp_path,
                                                                                           capsys):
    folder, sizes = source
    if sizes is not SD1_LIKE:
        pytest.skip("the source does not matter here: one of the two is enough")
    path, named = hostile["misshapen"]
    line = _refused(capsys, [str(folder), "--lora", str(path), "--out", str(tmp_path / "out")])
    assert named in line and "lora_unet_conv_in.lora_down.weight" in line and "[32, 4, 3, 3]" in line, line
    assert list(tmp_path.iterdir()) == []


def test_text_encoder_adapter_of_a_checkpoint_without_text_encoder_weights_is_refused(tiny_checkpoint, tmp_path,
                                                                                      capsys):
    path = tmp_path / "text.safetensors"
    save_file({"lora_te_encoder_layer_0_attention_self_query.lora_down.weight": torch.zeros(2, 32),
               "lora_te_encoder_layer_0_attention_self_query.lora_up.weight": torch.zeros(32, 2)}, str(path))
    targets = {"unet": targets_from_shapes({"conv_in.weight": (4, 4, 3, 3)})}
    with pytest.raises(ImportRefusedError, match="text encoder, whose weights this checkpoint does not hold") as error:
        read_adapter(AdapterFile(path), targets, {"text_encoder": "its text encoder is the pretrained minilm"})
    assert "lora_te_encoder_layer_0_attention_self_query.lora_down.weight" in str(error.value)


@pytest.mark.parametrize(("value", "named"), [("style.safetensors:strong", "FILE[:SCALE]"),
                                              ("style.safetensors:11", "from -10 to 10"),
                                              ("style.safetensors:nan", "from -10 to 10")])
def test_bad_lora_flag_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys, value, named):
    line = _refused(capsys, [str(tiny_checkpoint), "--lora", value, "--out", str(tmp_path / "out")])
    assert named in line and value in line, line


def test_the_same_adapter_twice_is_refused_naming_both_flags(tiny_checkpoint, own_adapter, tmp_path, capsys):
    again = tmp_path / "link.safetensors"
    again.symlink_to(own_adapter)  # fused it twice, at twice the scale
    line = _refused(capsys, [str(tiny_checkpoint), "--lora", str(own_adapter), "--lora", f"{again}:0.5",
                             "--out", str(tmp_path / "out")])
    assert line == (f"ldm-import: error: --lora {again} is given twice (as {own_adapter} too); expected each adapter "
                    f"once, with the scale meant (PATH:SCALE)")
    assert not (tmp_path / "out").exists()


def test_an_integer_alpha_fuses_as_the_same_float_alpha(tiny_checkpoint, tmp_path, capsys):
    base = load_file(str(tiny_checkpoint / "unet.safetensors"))["conv_in.weight"]
    generator = torch.Generator().manual_seed(_seed("int-alpha"))
    down, up = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(base.shape[0], 2, 1, 1, generator=generator)
    for name, alpha in (("int", torch.tensor(3)), ("float", torch.tensor(3.0))):  # kohya's svd_merge writes int64
        path = tmp_path / f"{name}.safetensors"
        save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
                   "lora_unet_conv_in.alpha": alpha}, str(path))
        assert main([str(tiny_checkpoint), "--lora", str(path), "--out", str(tmp_path / name)]) == 0, \
            capsys.readouterr().err
        assert load_adapter(name, path, {UNET: targets_from_shapes({"conv_in.weight": tuple(base.shape)})}).modules
    fused = {name: load_file(str(tmp_path / name / "unet.safetensors"))["conv_in.weight"] for name in ("int", "float")}
    assert torch.equal(fused["int"], fused["float"]) and not torch.equal(fused["int"], base)


def test_lora_flag_reads_the_scale_after_the_last_colon_unless_the_path_exists(tmp_path):
    assert adapter_argument("a:b.safetensors:-0.5") == AdapterFile(Path("a:b.safetensors"), -0.5)
    assert adapter_argument("style.safetensors") == AdapterFile(Path("style.safetensors"), 1.0)
    existing = tmp_path / "odd:name.safetensors"
    existing.write_bytes(b"")
    assert adapter_argument(str(existing)) == AdapterFile(existing, 1.0)


def test_checkpoint_dir_without_lora_or_with_sd_flags_is_refused(tiny_checkpoint, hostile, tmp_path, capsys):
    line = _refused(capsys, [str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    assert "already a checkpoint dir" in line and "--lora" in line
    line = _refused(capsys, [str(tiny_checkpoint), "--lora", "x.safetensors", "--clip-skip", "1",
                             "--out", str(tmp_path / "out")])
    assert "--clip-skip" in line
    assert list(tmp_path.iterdir()) == []


def test_too_many_adapters_are_refused(tiny_checkpoint, hostile, tmp_path, capsys):
    path, _ = hostile["unknown_key"]
    line = _refused(capsys, [str(tiny_checkpoint), *["--lora", str(path)] * 17, "--out", str(tmp_path / "out")])
    assert "17" in line and "at most 16" in line


@pytest.mark.parametrize(("adapters", "named"), [
    ([{"file": "a.safetensors", "sha256": "0" * 64}], "adapters[0]"),
    ([{"file": "../a.safetensors", "sha256": "0" * 64, "scale": 1}], "adapters[0].file"),
    ([{"file": "a.safetensors", "sha256": "xyz", "scale": 1}], "adapters[0].sha256"),
    ([{"file": "a.safetensors", "sha256": "0" * 64, "scale": 50}], "adapters[0].scale"),
    ([{"file": "a.safetensors", "sha256": "0" * 64, "scale": True}], "adapters[0].scale"),
])
def test_model_json_adapters_out_of_range_are_refused_naming_the_field(adapters, named):
    data = json.loads(ModelConfig().to_json())
    data["adapters"] = adapters
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(data).validate()


def test_imported_lora_source_points_to_the_lora_flag(tmp_path, capsys):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, str(path))
    line = _refused(capsys, [str(path), "--out", str(tmp_path / "out")])
    assert "LoRA" in line and "--lora" in line


# --- a fused copy on a full disk, and its permissions ----------------------------------------------------------------

@pytest.fixture(scope="module")
def own_adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own-adapter") / "adapter.safetensors"
    _peft_adapter_of_checkpoint(tiny_checkpoint, path, _seed("own-adapter"), 1.0)
    return path


def test_a_full_disk_fusing_into_a_checkpoint_dir_is_one_line_and_leaves_nothing(tiny_checkpoint, own_adapter,
                                                                                 tmp_path, capsys, monkeypatch):
    def out_of_space_halfway(source, destination):
        Path(destination).write_bytes(b"\x08\x07" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(ldm_export.lora, "shutil", SimpleNamespace(copyfile=out_of_space_halfway))
    out = tmp_path / "fused"
    code = main([str(tiny_checkpoint), "--lora", str(own_adapter), "--out", str(out)])
    assert code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"ldm-import: error: no space left on device writing {out} (nothing was written to {out}: free space and "
        f"import again)")
    assert list(tmp_path.iterdir()) == [], "nothing written, not even a temporary folder"


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask 022", "umask 002"])
def test_a_fused_copy_has_the_permissions_the_umask_gives_a_new_folder_and_file(tiny_checkpoint, own_adapter, tmp_path,
                                                                                umask):
    previous = os.umask(umask)
    try:
        out = import_source(tiny_checkpoint, tmp_path / "fused", adapters=[AdapterFile(own_adapter)])
    finally:
        os.umask(previous)
    modes = {path.relative_to(out).as_posix(): stat.S_IMODE(path.lstat().st_mode) for path in [out, *out.rglob("*")]}
    assert "unet.safetensors" in modes and "autoencoder.safetensors" in modes
    assert modes == {name: (0o777 if (out / name).is_dir() else 0o666) & ~umask for name in modes}
