"""LoRA adapters chosen per request (``GenerationRequest.lora``), against the same adapters fused into the checkpoint
with ``ldm-import --lora`` (``ldm_export.lora.fuse_checkpoint``), on the torch engine and on an onnxruntime engine
dir exported with ``--lora-slots``.

The adapters are kohya-layout files written here for the tiny random checkpoint with fresh random weights: the
UNet's attention projections, feed-forward, time embedding projections, 1x1 convolutions (proj_in, shortcuts) and,
for the torch engine, its 3x3 convolutions (LoCon); the text encoder's query and value."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_export.lora import AdapterFile, fuse_checkpoint
from ldm_runtime.adapters import AdapterError, MAX_REQUEST_ADAPTERS
from ldm_runtime.checkpoint import load_checkpoint
from ldm_runtime.errors import RequestError
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import base_seed
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint

UNET_MODULES = ("to_q", "to_v", "to_out.0", "ff.net.2", "time_emb_proj", "proj_in", "conv_shortcut")
LOCON_MODULES = ("conv1",)
TEXT_MODULES = ("query", "value")
STEPS = 4


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:adapters:{name}".encode()).digest()[:4], "little")


def write_kohya_adapter(checkpoint: Path, path: Path, seed: int, rank: int, locon: bool = True,
                        text: bool = True) -> Path:
    """A kohya LoRA of ``checkpoint``'s networks with random weights big enough to change its images visibly."""
    networks = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    parts = [("lora_unet_", networks.unet, "", UNET_MODULES + (LOCON_MODULES if locon else ()))]
    if text:
        parts.append(("lora_te_", networks.text_encoder, "model.", TEXT_MODULES))
    for prefix, network, strip, suffixes in parts:
        for name, module in network.named_modules():
            if not (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                    and any(name.endswith("." + suffix) for suffix in suffixes)):
                continue
            weight = module.weight
            kernel = tuple(weight.shape[2:])
            down = torch.randn(rank, weight.shape[1], *kernel, generator=generator) / weight[0].numel() ** 0.5
            up = 0.5 * torch.randn(weight.shape[0], rank, *((1, 1) if kernel else ()), generator=generator)
            key = prefix + name.removeprefix(strip).replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter_files(checkpoint, tmp_path_factory):
    """name -> a LoRA file of the tiny checkpoint: "x" and "y" adapt UNet (3x3 convolutions included) and text
    encoder; "z" and "w" the UNet's linear layers and 1x1 convolutions only."""
    root = tmp_path_factory.mktemp("adapters")
    return {"x": write_kohya_adapter(checkpoint, root / "x.safetensors", _seed("x"), rank=4),
            "y": write_kohya_adapter(checkpoint, root / "y.safetensors", _seed("y"), rank=2),
            "z": write_kohya_adapter(checkpoint, root / "z.safetensors", _seed("z"), rank=3, locon=False,
                                     text=False),
            "w": write_kohya_adapter(checkpoint, root / "w.safetensors", _seed("w"), rank=2, locon=False,
                                     text=False)}


@pytest.fixture(scope="module")
def torch_engine(checkpoint, adapter_files):
    from ldm_runtime.engines.torch_engine import TorchEngine

    return TorchEngine(checkpoint, device="cpu", adapters=adapter_files)


def _requests(lora_per_request, seeds=None, prompts=("a red square", "a blue circle", "a green field")):
    seeds = seeds or [_seed(f"request{index}") for index in range(len(lora_per_request))]
    return [GenerationRequest(prompt=prompts[index % len(prompts)], negative_prompt="blurry", seed=seeds[index],
                              sampler="ddim", steps=STEPS, guidance_scale=4.0, lora=lora)
            for index, lora in enumerate(lora_per_request)]


def _fused_engine(checkpoint: Path, files: list[AdapterFile], out: Path):
    from ldm_runtime.engines.torch_engine import TorchEngine

    return TorchEngine(fuse_checkpoint(checkpoint, out, files), device="cpu")


def _max_pixel_difference(first: list[np.ndarray], second: list[np.ndarray]) -> int:
    return max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in zip(first, second))


@pytest.mark.parametrize("lora", [(("x", 0.7),), (("x", 1.0), ("y", -0.5))], ids=["one", "two"])
def test_adapter_per_request_on_torch_equals_the_checkpoint_with_it_fused(checkpoint, adapter_files, torch_engine,
                                                                         lora, tmp_path):
    fused = _fused_engine(checkpoint, [AdapterFile(adapter_files[name], scale) for name, scale in lora],
                          tmp_path / "fused")
    requests = _requests([lora, lora])
    per_request = Pipeline(torch_engine).generate(requests)
    expected = Pipeline(fused).generate([GenerationRequest(**{**vars(r), "lora": ()}) for r in requests])
    base = Pipeline(torch_engine).generate([GenerationRequest(**{**vars(r), "lora": ()}) for r in requests])
    assert _max_pixel_difference(base, expected) > 16, "the adapter must change the images visibly"
    assert _max_pixel_difference(per_request, expected) <= 1  # fp32 rounding: W x + B (A x) vs (W + B A) x
    # and the UNet's prediction itself, to fp32 rounding
    generator = torch.Generator().manual_seed(_seed("unet inputs"))
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context, mask = fused.encode_text(["a red square", ""])
    timesteps = np.array([500, 20])
    want = fused.unet(latents, timesteps, context, mask)
    got = torch_engine.unet(latents, timesteps, *torch_engine.encode_text(["a red square", ""], [lora, lora]),
                            adapters=[lora, lora])
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_rows_with_different_adapters_in_one_step_batch_each_make_their_image_alone(torch_engine):
    lora = [(("x", 0.8),), (("y", 1.0), ("z", 0.5)), ()]
    requests = _requests(lora)
    pipeline = Pipeline(torch_engine)
    together = pipeline.generate(requests)
    for request, image in zip(requests, together):
        (alone,) = pipeline.generate([request])
        assert np.array_equal(alone, image), request.lora


def test_unknown_adapter_and_scale_out_of_range_are_one_line_request_errors(torch_engine):
    pipeline = Pipeline(torch_engine)
    cases = {(("v", 1.0),): "'v', which is not loaded; expected one of: w, x, y, z",
             (("x", 11.0),): "adapter 'x' the scale 11.0; expected a number from -10 to 10",
             (("x", float("nan")),): "adapter 'x' the scale nan",
             (("x", 1.0), ("x", 0.5)): "repeats",
             tuple((name, 1.0) for name in "xyzxy"[:MAX_REQUEST_ADAPTERS + 1]): f"at most {MAX_REQUEST_ADAPTERS}"}
    for lora, named in cases.items():
        with pytest.raises(RequestError, match="lora") as error:
            pipeline.validate(_requests([lora])[0])
        assert named in str(error.value) and "\n" not in str(error.value), str(error.value)
        assert error.value.field == "lora"


def test_adapter_that_does_not_fit_the_model_is_refused_at_load_in_one_line(checkpoint, adapter_files, tmp_path):
    from ldm_runtime.engines.torch_engine import TorchEngine

    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1)}, str(bad))
    nan = tmp_path / "nan.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.full((2, 4, 3, 3), float("nan")),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1)}, str(nan))
    for path, named in ((bad, "[2, 5, 3, 3]"), (nan, "not finite"), (tmp_path / "absent.safetensors", "absent")):
        with pytest.raises(AdapterError) as error:
            TorchEngine(checkpoint, device="cpu", adapters={"bad": path})
        assert named in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


# --- the onnxruntime engine over an engine dir with LoRA slots -----------------------------------------------------

SLOT_RANK = 8


@pytest.fixture(scope="module")
def slot_engine_dir(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with ``--lora-slots 8`` (validated against eager PyTorch with random factors)."""
    from ldm_export.engine_dir import export_engine
    from ldm_export.options import ExportOptions

    return export_engine(checkpoint, tmp_path_factory.mktemp("slots") / "engine",
                         ExportOptions(precision="fp32", lora_slots=SLOT_RANK, validation_seed=_seed("validation")))


@pytest.fixture(scope="module")
def onnxruntime_engine(slot_engine_dir, adapter_files):
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(slot_engine_dir, device="cpu", adapters={name: adapter_files[name] for name in "zw"})


def test_slot_engine_dir_lists_its_slots_and_passed_validation(slot_engine_dir):
    import json

    manifest = json.loads((slot_engine_dir / "manifest.json").read_text())
    assert manifest["validation"]["passed"] is True
    slots = manifest["lora_slots"]
    assert slots["rank"] == SLOT_RANK and "mid_block.attentions.0.proj_in" in slots["modules"]
    for graph in ("unet", "unet_shallow"):
        names = [spec["name"] for spec in manifest["graphs"][graph]["inputs"]]
        downs = [name.removeprefix("lora_down.") for name in names if name.startswith("lora_down.")]
        assert downs and set(downs) <= set(slots["modules"]) and len(names) == 4 + (graph != "unet") + 2 * len(downs)
    assert len(downs) < len(slots["modules"]), "the shallow graph takes the slots of the layers it runs only"


@pytest.mark.parametrize("scale", [0.6, -1.5])
def test_adapter_per_request_on_onnxruntime_equals_the_checkpoint_with_it_fused(checkpoint, adapter_files,
                                                                               onnxruntime_engine, scale, tmp_path):
    fused = _fused_engine(checkpoint, [AdapterFile(adapter_files["z"], scale)], tmp_path / "fused")
    requests = _requests([(("z", scale),), (("z", scale),)])
    per_request = Pipeline(onnxruntime_engine).generate(requests)
    expected = Pipeline(fused).generate([GenerationRequest(**{**vars(r), "lora": ()}) for r in requests])
    base = Pipeline(onnxruntime_engine).generate([GenerationRequest(**{**vars(r), "lora": ()}) for r in requests])
    assert _max_pixel_difference(base, expected) > 16, "the adapter must change the images visibly"
    assert _max_pixel_difference(per_request, expected) <= 1  # onnxruntime vs eager fp32, as validation allows


@pytest.mark.parametrize("lora", [[(("z", 1.0),), (), (("z", -0.5),)], [(("z", 1.0),), (("w", 0.7),), ()]],
                         ids=["one adapter at two scales and none", "two adapters and none"])
def test_onnxruntime_rows_with_different_adapters_or_none_each_make_their_image_alone(onnxruntime_engine, lora):
    requests = _requests(lora)
    pipeline = Pipeline(onnxruntime_engine)
    together = pipeline.generate(requests)
    for request, image in zip(requests, together):
        (alone,) = pipeline.generate([request])
        assert _max_pixel_difference([alone], [image]) <= 1, request.lora
        if request.lora:  # each adapter changes its row's image, by far more than the rounding allowed above (an
            # adapter at scale -0.5 moved a pixel by exactly 16 with LDM_TEST_SEED=2100087242)
            (plain,) = pipeline.generate([GenerationRequest(**{**vars(request), "lora": ()})])
            assert _max_pixel_difference([plain], [image]) > 4, request.lora


def test_engine_dir_refuses_what_its_slots_cannot_serve_in_one_line(checkpoint, slot_engine_dir, adapter_files,
                                                                   tmp_path, tmp_path_factory):
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from tests.ldm_export.tiny_checkpoint import shared_tiny_engine

    for name, named in (("x", "LoCon"),):
        with pytest.raises(AdapterError) as error:
            OnnxRuntimeEngine(slot_engine_dir, device="cpu", adapters={name: adapter_files[name]})
        message = str(error.value)
        assert named in message and "ldm-import --lora" in message and "\n" not in message, message
    wide = write_kohya_adapter(checkpoint, tmp_path / "wide.safetensors", _seed("wide"), rank=SLOT_RANK + 1,
                               locon=False, text=False)
    with pytest.raises(AdapterError, match=f"rank {SLOT_RANK + 1}; .* hold rank {SLOT_RANK}"):
        OnnxRuntimeEngine(slot_engine_dir, device="cpu", adapters={"wide": wide})
    _, plain_dir, code, _ = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0
    plain = OnnxRuntimeEngine(plain_dir, device="cpu")
    with pytest.raises(RequestError) as error:
        Pipeline(plain).validate(_requests([(("z", 1.0),)])[0])
    message = str(error.value)
    assert "no LoRA slots" in message and "--lora-slots" in message and "\n" not in message, message
    assert error.value.field == "lora"
