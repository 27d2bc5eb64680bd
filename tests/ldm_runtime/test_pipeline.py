"""The text-to-image pipeline over the torch engine: per-request determinism, guidance in one UNet call,
step-level batching, request validation, and engine loading. A tiny random-weight checkpoint (16 px images,
8x8 latents, a one-layer scratch text encoder) is written once through train's API."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_runtime.arrays import host_to_array_like
from ldm_runtime.checkpoint import CheckpointError, load_tensors
from ldm_runtime.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from ldm_runtime.engines import EngineLoadError, load_engine
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from ldm_runtime.schedulers import DDIMConfig
from ldm_train.checkpoint import write_random_checkpoint

TINY_CONFIG = ModelConfig(
    image_size=16,
    autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_groups=8),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(False, True),
                    num_heads=2, context_dim=32, num_groups=8),
    text_encoder=TextEncoderConfig(kind="scratch", max_length=16, hidden_size=32, num_layers=1, num_heads=2,
                                   intermediate_size=64),
    latent_scale_factor=0.7,
)
PROMPTS = ["a red circle", "a blue square on the left", "a small green triangle", "two yellow stars"]


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A complete checkpoint dir with random weights, as ``ldm-train unet`` lays it out."""
    write_random_checkpoint(folder, TINY_CONFIG, seed)
    return folder


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ldm"))


@pytest.fixture(scope="session")
def engine(checkpoint_dir) -> TorchEngine:
    return TorchEngine(checkpoint_dir, device="cpu")


@pytest.fixture
def pipeline(engine) -> Pipeline:
    return Pipeline(engine)


def random_requests(rng: np.random.Generator, count: int, **settings) -> list[GenerationRequest]:
    seeds = rng.choice(2**62, size=count, replace=False).tolist()
    settings = {"sampler": "ddim", "steps": 3, **settings}
    return [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], seed=seed, **settings)
            for i, seed in enumerate(seeds)]


def sample_latents(pipeline: Pipeline, requests: list[GenerationRequest]) -> list[torch.Tensor]:
    """The final latents of each request, all sampled together."""
    states = pipeline.start(requests)
    while not all(state.done for state in states):
        active = [k for k, state in enumerate(states) if not state.done]
        for k, state in zip(active, pipeline.advance([states[k] for k in active])):
            states[k] = state
    return [state.latents for state in states]


class CountingEngine:
    """The wrapped engine, recording the batch of every UNet call."""

    def __init__(self, engine):
        self.engine = engine
        self.info = engine.info
        self.unet_calls: list[dict] = []

    def unet(self, latents, timesteps, context, context_mask):
        self.unet_calls.append({"latents": latents, "timesteps": timesteps.copy(), "context": context})
        return self.engine.unet(latents, timesteps, context, context_mask)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class NumpyEngine:
    """The wrapped torch engine behind host numpy arrays, as the onnxruntime engine presents its arrays."""

    def __init__(self, engine):
        self.engine = engine
        self.info = engine.info

    def encode_text(self, prompts):
        return tuple(array.numpy() for array in self.engine.encode_text(prompts))

    def unet(self, latents, timesteps, context, context_mask):
        inputs = (torch.from_numpy(latents), timesteps, torch.from_numpy(context), torch.from_numpy(context_mask))
        return self.engine.unet(*inputs).numpy()

    def decode(self, latents):
        return self.engine.decode(torch.from_numpy(latents)).numpy()

    def to_array(self, values, like=None):
        return np.asarray(values) if like is None else host_to_array_like(values, like)

    def to_host(self, array):
        return array


# ---------------------------------------------------------------- each image depends on its own request only


def test_four_prompts_with_four_seeds_in_one_batch_equal_four_single_runs_bit_for_bit(pipeline, rng):
    requests = random_requests(rng, 4)
    requests[1] = dataclasses.replace(requests[1], eta=0.7, steps=4)
    requests[2] = dataclasses.replace(requests[2], negative_prompt="blurry", guidance_scale=1.0)
    requests[3] = dataclasses.replace(requests[3], guidance_scale=2.5, steps=2)
    batched_latents = sample_latents(pipeline, requests)
    batched_images = pipeline.generate(requests)
    for request, latents, image in zip(requests, batched_latents, batched_images):
        assert torch.equal(latents, sample_latents(pipeline, [request])[0]), request
        assert np.array_equal(image, pipeline.generate([request])[0]), request


def test_torch_engine_unet_rows_do_not_depend_on_the_batch_size(engine, rng):
    batch = 11  # a full chunk of 8 and a padded one of 3
    latents = torch.from_numpy(rng.standard_normal((batch, 4, 8, 8), dtype=np.float32))
    timesteps = rng.integers(0, 1000, size=batch)
    context, context_mask = engine.encode_text([PROMPTS[i % 4] for i in range(batch)])
    together = engine.unet(latents, timesteps, context, context_mask)
    for row in range(batch):
        alone = engine.unet(latents[row:row + 1], timesteps[row:row + 1], context[row:row + 1],
                            context_mask[row:row + 1])
        assert torch.equal(together[row:row + 1], alone), f"row {row}"


def test_same_request_twice_gives_identical_bytes(pipeline, rng):
    request = random_requests(rng, 1, eta=0.5)[0]
    first, second = pipeline.generate([request])[0], pipeline.generate([request])[0]
    assert first.dtype == np.uint8 and first.shape == (16, 16, 3)
    assert first.tobytes() == second.tobytes()


def test_different_seeds_give_different_images(pipeline, rng):
    request = random_requests(rng, 1)[0]
    images = pipeline.generate([request, dataclasses.replace(request, seed=request.seed + 1)])
    assert not np.array_equal(images[0], images[1])


def test_negative_prompt_changes_the_image(pipeline, rng):
    request = random_requests(rng, 1)[0]
    plain, steered = pipeline.generate([request, dataclasses.replace(request, negative_prompt="a blue square")])
    assert not np.array_equal(plain, steered)


def test_step_level_batching_with_different_steps_equals_sequential_runs(pipeline, rng):
    """Requests join a running batch at step boundaries, so one UNet call mixes rows at different timesteps."""
    requests = random_requests(rng, 3)
    requests = [dataclasses.replace(requests[0], steps=5),
                dataclasses.replace(requests[1], steps=3, eta=1.0, negative_prompt="noise"),
                dataclasses.replace(requests[2], steps=2, guidance_scale=1.0)]
    joins_at = [0, 1, 2]
    states = [None] * 3
    mixed_step_calls = 0
    iteration = 0
    while any(state is None or not state.done for state in states):
        for k, start in enumerate(joins_at):
            if start == iteration:
                states[k] = pipeline.start([requests[k]])[0]
        active = [k for k, state in enumerate(states) if state is not None and not state.done]
        mixed_step_calls += len({states[k].step_index for k in active}) > 1
        for k, state in zip(active, pipeline.advance([states[k] for k in active])):
            states[k] = state
        iteration += 1
    assert mixed_step_calls >= 2
    for request, state in zip(requests, states):
        assert torch.equal(state.latents, sample_latents(pipeline, [request])[0]), request


def test_states_keep_latents_as_float32_tensors_on_the_engine_device(pipeline, engine, rng):
    states = pipeline.advance(pipeline.start(random_requests(rng, 2)))
    for state in states:
        assert isinstance(state.latents, torch.Tensor)
        assert state.latents.device == engine.device and state.latents.dtype == torch.float32
        assert state.latents.shape == (1, 4, 8, 8) and state.step_index == 1


def test_pipeline_runs_the_same_loop_over_an_engine_of_numpy_arrays(pipeline, engine, rng):
    requests = random_requests(rng, 2, eta=0.5)
    on_numpy = Pipeline(NumpyEngine(engine))
    assert all(isinstance(state.latents, np.ndarray) for state in on_numpy.advance(on_numpy.start(requests)))
    for numpy_image, torch_image in zip(on_numpy.generate(requests), pipeline.generate(requests)):
        assert np.abs(numpy_image.astype(int) - torch_image.astype(int)).max() <= 1  # float32 in both


def test_decode_is_latents_over_the_scale_factor_rounded_to_uint8(pipeline, engine, rng):
    request = random_requests(rng, 1, steps=1)[0]
    state = pipeline.advance(pipeline.start([request]))[0]
    decoded = engine.decode(state.latents / engine.info.latent_scale_factor)[0]
    expected = ((decoded + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = pipeline.decode([state])[0]
    assert np.array_equal(image, expected)
    assert 0 < image.std()


# ---------------------------------------------------------------- guidance


def test_guidance_is_one_unet_call_per_step_on_a_doubled_batch(engine, rng):
    counting = CountingEngine(engine)
    requests = random_requests(rng, 3, steps=4, guidance_scale=5.0)
    requests[1] = dataclasses.replace(requests[1], negative_prompt="a dark background")
    Pipeline(counting).generate(requests)
    assert len(counting.unet_calls) == 4
    negative_context, _ = engine.encode_text(["", "a dark background", ""])
    prompt_context, _ = engine.encode_text([request.prompt for request in requests])
    for call in counting.unet_calls:
        assert call["latents"].shape[0] == 6
        assert torch.equal(call["latents"][:3], call["latents"][3:])
        assert np.array_equal(call["timesteps"][:3], call["timesteps"][3:])
        assert torch.equal(call["context"][:3], negative_context)  # the unconditional half reads negative prompts
        assert torch.equal(call["context"][3:], prompt_context)


def test_guidance_scale_one_needs_no_unconditional_rows(engine, rng):
    counting = CountingEngine(engine)
    requests = random_requests(rng, 3, steps=2)
    requests[1] = dataclasses.replace(requests[1], guidance_scale=1.0)
    Pipeline(counting).generate(requests)
    assert [call["latents"].shape[0] for call in counting.unet_calls] == [5, 5]


# ---------------------------------------------------------------- validation

BAD_FIELDS = [
    ("prompt", ""), ("prompt", "   "), ("prompt", 3), ("negative_prompt", None),
    ("steps", 0), ("steps", -2), ("steps", 1000), ("steps", 1001), ("steps", 2.5), ("steps", True),
    ("guidance_scale", -1.0), ("guidance_scale", math.nan), ("guidance_scale", math.inf), ("guidance_scale", "5"),
    ("eta", -0.1), ("eta", 1.5), ("eta", math.nan), ("eta", False),
    ("seed", -1), ("seed", 2**63), ("seed", True), ("seed", 1.0), ("seed", "7"),
    ("height", 18), ("height", 0), ("width", 68), ("width", 16.0), ("height", "16"),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS)
def test_bad_request_field_raises_request_error_naming_field_and_value(pipeline, field, value):
    request = dataclasses.replace(GenerationRequest(prompt="a red circle", seed=1), **{field: value})
    with pytest.raises(RequestError) as caught:
        pipeline.generate([request])
    message = str(caught.value)
    assert message.startswith(f"{field} is {value!r}; expected ") and "\n" not in message
    assert caught.value.field == field  # as data, for the HTTP error's "field"


def test_size_error_names_the_allowed_multiple_and_range(pipeline):
    with pytest.raises(RequestError, match=r"height is 18; expected a multiple of 4 from 4 to 32"):
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, height=18))


def test_steps_the_leading_spacing_cannot_plan_are_refused_naming_the_limit(engine):
    # "leading" with steps_offset 1 would start at timestep 1000 for 1000 steps; "trailing" plans all 1000
    request = GenerationRequest(prompt="a red circle", seed=1, sampler="ddim", steps=1000)
    with pytest.raises(RequestError, match="steps is 1000; expected an integer from 1 to 999"):
        Pipeline(engine).validate(request)
    Pipeline(engine, DDIMConfig(timestep_spacing="trailing")).validate(request)
    # offset 5: 500 steps of stride 2 would start at timestep 1003, though 995 steps of stride 1 fit
    message = "steps is 500; the 'leading' spacing with steps_offset 5 would start past timestep 999"
    with pytest.raises(RequestError, match=message):
        Pipeline(engine, DDIMConfig(steps_offset=5)).validate(dataclasses.replace(request, steps=500))


def test_a_bad_request_anywhere_in_the_list_stops_generate_before_any_unet_call(engine):
    counting = CountingEngine(engine)
    requests = [GenerationRequest(prompt="a red circle", seed=1, steps=2),
                GenerationRequest(prompt="a red circle", seed=2, eta=2.0)]
    with pytest.raises(RequestError, match="eta is 2.0"):
        Pipeline(counting).generate(requests)
    assert counting.unet_calls == []


@pytest.mark.parametrize("batch_size", [0, 33, 2.0])
def test_batch_size_outside_what_the_engine_holds_is_refused(pipeline, batch_size):
    with pytest.raises(RequestError, match=f"batch_size is {batch_size!r}; expected an integer from 1 to 32"):
        pipeline.generate([GenerationRequest(prompt="a red circle", seed=1)], batch_size=batch_size)


def test_other_sizes_are_sampled_at_their_own_size_in_their_own_batch(pipeline, rng):
    requests = random_requests(rng, 3)
    requests[1] = dataclasses.replace(requests[1], height=8, width=24)
    images = pipeline.generate(requests, batch_size=2)
    assert [image.shape for image in images] == [(16, 16, 3), (8, 24, 3), (16, 16, 3)]
    assert np.array_equal(images[1], pipeline.generate([requests[1]])[0])


# ---------------------------------------------------------------- engines


def test_torch_engine_describes_the_checkpoint(engine):
    info = engine.info
    assert (info.name, info.latent_channels, info.latent_factor, info.image_size) == ("torch", 4, 2, 16)
    # sides up to MAX_SIZE_OVER_TRAINED = 2 times the trained 16 px, as ldm-export's default --size-range
    assert (info.image_size_multiple, info.min_image_size, info.max_image_size) == (4, 4, 32)
    assert info.latent_scale_factor == pytest.approx(0.7) and info.text_max_length == 16
    assert info.schedule["num_train_timesteps"] == 1000


def test_scratch_text_encoder_weights_come_from_the_checkpoint(engine, checkpoint_dir):
    saved = load_tensors(checkpoint_dir / "text_encoder.safetensors")
    loaded = engine.text_encoder.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)


def test_load_engine_opens_a_checkpoint_dir_with_the_torch_engine(checkpoint_dir):
    engine = load_engine(checkpoint_dir, device="cpu")
    assert isinstance(engine, TorchEngine) and engine.info.name == "torch"


@pytest.mark.parametrize("name", ["tensorflow", "Torch", ""])
def test_load_engine_refuses_unknown_engine_names_listing_the_choices(checkpoint_dir, name):
    with pytest.raises(EngineLoadError, match=f"engine {name!r} is not one of auto, torch, triton, onnxruntime, openvino"):
        load_engine(checkpoint_dir, engine=name)


def test_load_engine_refuses_a_folder_that_is_neither_kind(tmp_path):
    with pytest.raises(EngineLoadError, match="has neither model.json nor manifest.json"):
        load_engine(tmp_path)
    with pytest.raises(EngineLoadError, match="does not exist"):
        load_engine(tmp_path / "missing")


def test_onnxruntime_engine_is_refused_for_a_checkpoint_dir(checkpoint_dir):
    with pytest.raises(EngineLoadError, match="has no manifest.json"):
        load_engine(checkpoint_dir, engine="onnxruntime")


def test_torch_engine_refuses_a_checkpoint_without_a_unet(checkpoint_dir, tmp_path):
    (tmp_path / "model.json").write_text((checkpoint_dir / "model.json").read_text())
    (tmp_path / "autoencoder.safetensors").write_bytes((checkpoint_dir / "autoencoder.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has no unet.safetensors"):
        load_engine(tmp_path)


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_torch_engine_refuses_a_device_it_cannot_use(checkpoint_dir, device):
    with pytest.raises(ValueError, match=f"device {device!r}"):
        TorchEngine(checkpoint_dir, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_engine_keeps_latents_on_the_device_and_matches_the_cpu_image(checkpoint_dir, pipeline, rng):
    cuda = Pipeline(TorchEngine(checkpoint_dir, device="cuda"))
    request = random_requests(rng, 1)[0]
    state = cuda.advance(cuda.start([request]))[0]
    assert state.latents.is_cuda
    on_gpu, on_cpu = cuda.generate([request])[0], pipeline.generate([request])[0]
    assert np.abs(on_gpu.astype(int) - on_cpu.astype(int)).max() <= 2


def test_runtime_modules_import_neither_torch_nor_train():
    script = ("import sys, ldm_runtime.pipeline, ldm_runtime.sample, ldm_runtime.engines\n"
              "print(sorted(name for name in ('torch', 'ldm_train', 'transformers') if name in sys.modules))")
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
