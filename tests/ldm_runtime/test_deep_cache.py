"""Feature caching across steps (DeepCache): the UNet whole at one step in N and its shallow part on the kept deep
features between; the shallow part equals the whole UNet on the same step's features, the schedule runs as many
whole steps as it says, an image is the same alone or in any batch, and every engine that has the graphs runs it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from ldm_runtime.config import CACHE_SCHEDULES, MAX_CACHE_INTERVAL, SamplerDefaults, UNetConfig, preset
from ldm_runtime.deep_cache import whole_steps
from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.errors import ConfigError
from ldm_runtime.manifest import EngineDirError, load_manifest
from ldm_runtime.models.unet import ShallowUNet, UNet
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from tests.ldm_export.tiny_checkpoint import shared_tiny_engine
from test_pipeline import PROMPTS, checkpoint_dir, engine  # noqa: F401 (session fixtures)


class CallRecorder:
    """The wrapped engine, recording each UNet call's kind ("whole", "features" or "shallow") and rows."""

    def __init__(self, engine):
        self.engine = engine
        self.info = engine.info
        self.calls: list[tuple[str, int]] = []

    def unet(self, latents, timesteps, context, context_mask):
        self.calls.append(("whole", len(timesteps)))
        return self.engine.unet(latents, timesteps, context, context_mask)

    def unet_with_deep_features(self, latents, timesteps, context, context_mask):
        self.calls.append(("features", len(timesteps)))
        return self.engine.unet_with_deep_features(latents, timesteps, context, context_mask)

    def unet_shallow(self, latents, timesteps, context, context_mask, deep_features):
        self.calls.append(("shallow", len(timesteps)))
        return self.engine.unet_shallow(latents, timesteps, context, context_mask, deep_features)

    def __getattr__(self, name):
        return getattr(self.engine, name)


UNET_SHAPES = {
    "two levels (the demo model's)": preset("shapes").unet,
    "one level": UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(True,),
                            num_heads=2, context_dim=16, num_groups=8),
    "four levels, attention below the top (SD's shape)": UNetConfig(
        model_channels=16, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attention_levels=(False, True, True, True),
        num_heads=2, context_dim=16, num_groups=8),
}


@pytest.mark.parametrize("shape", list(UNET_SHAPES))
def test_the_shallow_part_on_the_same_steps_features_is_the_whole_unet(shape, rng):
    cfg = UNET_SHAPES[shape]
    torch.manual_seed(int(rng.integers(2**31)))
    unet = UNet(cfg).eval()
    side = 2 ** (len(cfg.channel_mult) + 1)
    latents = torch.randn(3, cfg.in_channels, side, side)
    timesteps = torch.from_numpy(rng.choice(1000, 3, replace=False))  # distinct: flipped, rows 0 and 2 differ
    context = torch.randn(3, 5, cfg.context_dim)
    mask = torch.from_numpy(rng.random((3, 5)) < 0.7)
    with torch.no_grad():
        whole = unet(latents, timesteps, context, mask)
        prediction, features = unet.forward_with_deep_features(latents, timesteps, context, mask)
        shallow = ShallowUNet(unet)(latents, timesteps, context, mask, features)
        other_step = unet.forward_shallow(latents, timesteps.flip(0), context, mask, features)
    assert features.shape == (3, unet.deep_feature_channels, side, side)
    assert torch.equal(prediction, whole) and torch.equal(shallow, whole)
    assert not torch.allclose(other_step, whole)  # the shallow part does read its own inputs
    shallow_weights = sum(p.numel() for p in ShallowUNet(unet).parameters())
    assert shallow_weights < sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("schedule", CACHE_SCHEDULES)
@pytest.mark.parametrize("calls, interval", [(50, 5), (50, 3), (25, 2), (25, 3), (10, 2), (6, 3), (7, 2), (3, 5),
                                             (1, 4), (9, 1)])
def test_a_schedule_runs_one_whole_step_in_n_starting_with_the_first(calls, interval, schedule):
    steps = sorted(whole_steps(calls, interval, schedule))
    assert steps[0] == 0 and steps[-1] < calls and len(set(steps)) == len(steps)
    assert len(steps) == -(-calls // interval)
    if schedule == "uniform":
        assert steps == list(range(0, calls, interval))


def test_the_quadratic_schedule_packs_whole_steps_around_its_centre():
    steps = sorted(whole_steps(50, 5, "quadratic"))
    gaps = np.diff(steps)
    assert gaps.min() < 5 < gaps.max()  # denser than uniform around the centre, sparser toward the ends
    nearest_centre = int(np.argmin(np.abs(np.array(steps) - 15)))
    assert gaps[max(nearest_centre - 1, 0)] <= gaps[-1]


def test_a_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="cache schedule is 'cubic'; expected one of uniform, quadratic"):
        whole_steps(10, 2, "cubic")


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("schedule", CACHE_SCHEDULES)
def test_the_pipeline_runs_the_whole_unet_at_the_scheduled_steps_only(engine, interval, schedule, rng):  # noqa: F811
    request = GenerationRequest(prompt=PROMPTS[0], seed=int(rng.integers(2**62)), sampler="ddim", steps=8,
                                cache_interval=interval, cache_schedule=schedule)
    recorder = CallRecorder(engine)
    Pipeline(recorder).generate([request])
    expected = ["features" if step in whole_steps(8, interval, schedule) else "shallow" for step in range(8)]
    assert [kind for kind, _ in recorder.calls] == expected
    assert all(rows == 2 for _, rows in recorder.calls)  # guided: two rows at every step, whole or shallow


def test_interval_one_is_the_plain_unet_and_caching_changes_the_image_a_little(engine, rng):  # noqa: F811
    request = GenerationRequest(prompt=PROMPTS[1], seed=int(rng.integers(2**62)), sampler="ddim", steps=10)
    pipeline = Pipeline(engine)
    recorder = CallRecorder(engine)
    [plain] = Pipeline(recorder).generate([request])
    [one, two] = pipeline.generate([dataclasses.replace(request, cache_interval=1),
                                    dataclasses.replace(request, cache_interval=2)])
    assert {kind for kind, _ in recorder.calls} == {"whole"}
    assert np.array_equal(plain, one)
    assert not np.array_equal(plain, two)
    error = np.abs(plain.astype(np.float64) - two.astype(np.float64)).mean()
    assert error < 64, error  # the same picture, not another one


def test_a_row_guided_now_but_not_at_its_last_whole_step_runs_whole(engine, rng):  # noqa: F811
    pipeline = Pipeline(engine)
    request = GenerationRequest(prompt=PROMPTS[2], seed=int(rng.integers(2**62)), sampler="ddim", steps=6,
                                cache_interval=3)
    recorder = CallRecorder(engine)
    Pipeline(recorder).generate([request])
    trajectory = pipeline._trajectory(pipeline.resolve(request))
    sigmas = pipeline._timestep_sigmas[np.asarray(trajectory.timesteps, dtype=np.int64)]
    # guidance from the second call on only: call 0 (whole) keeps no unconditional features, so call 1, guided,
    # cannot run shallow and runs whole, keeping both rows' features for call 2; call 3 is whole by the schedule
    limited = dataclasses.replace(request, guidance_interval=(0.0, float((sigmas[0] + sigmas[1]) / 2)))
    recorder = CallRecorder(engine)
    Pipeline(recorder).generate([limited])
    assert recorder.calls == [("features", 1), ("features", 2), ("shallow", 2), ("features", 2), ("shallow", 2),
                              ("shallow", 2)]


def test_an_image_is_the_same_alone_or_batched_with_other_settings(engine, rng):  # noqa: F811
    seed = int(rng.integers(2**62))
    requests = [
        GenerationRequest(prompt=PROMPTS[0], seed=seed, sampler="ddim", steps=9, cache_interval=3),
        GenerationRequest(prompt=PROMPTS[1], seed=seed + 1, sampler="euler", steps=6),
        GenerationRequest(prompt=PROMPTS[2], seed=seed + 2, sampler="dpmpp-2m", steps=7, cache_interval=2,
                          cache_schedule="quadratic", guidance_interval=(0.5, 8.0)),
        GenerationRequest(prompt=PROMPTS[3], seed=seed + 3, sampler="ddim", steps=5, cache_interval=2,
                          guidance_scale=1.0),
    ]
    pipeline = Pipeline(engine)
    recorder = CallRecorder(engine)
    together = Pipeline(recorder).generate(requests)
    assert {"shallow", "features", "whole"} <= {kind for kind, _ in recorder.calls}
    for request, image in zip(requests, together):
        assert np.array_equal(pipeline.generate([request])[0], image), request


@pytest.mark.parametrize("field, value, message", [
    ("cache_interval", 0, "cache_interval is 0; expected an integer from 1 to 100"),
    ("cache_interval", MAX_CACHE_INTERVAL + 1, "cache_interval is 101; expected an integer from 1 to 100"),
    ("cache_interval", 2.0, "cache_interval is 2.0; expected an integer"),
    ("cache_interval", True, "cache_interval is True; expected an integer"),
    ("cache_schedule", "cubic", "cache_schedule is 'cubic'; expected one of uniform, quadratic"),
    ("cache_schedule", 3, "cache_schedule is 3; expected one of uniform, quadratic"),
])
def test_a_bad_cache_setting_is_refused_naming_it(engine, field, value, message):  # noqa: F811
    request = GenerationRequest(prompt="a red circle", seed=1, **{field: value})
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        Pipeline(engine).validate(request)
    assert raised.value.field == field


def test_the_model_folder_sets_the_defaults_a_request_leaves_out(engine):  # noqa: F811
    pipeline = Pipeline(engine)
    pipeline.defaults = SamplerDefaults(guidance_interval=[0.5, 8], cache_interval=3, cache_schedule="quadratic")
    resolved = pipeline.resolve(GenerationRequest(prompt="a red circle", seed=1))
    assert (resolved.guidance_interval, resolved.cache_interval, resolved.cache_schedule) == ((0.5, 8.0), 3,
                                                                                              "quadratic")
    own = pipeline.resolve(GenerationRequest(prompt="a red circle", seed=1, cache_interval=1, cache_schedule="uniform",
                                             guidance_interval=(0.0, 1e6)))
    assert (own.guidance_interval, own.cache_interval, own.cache_schedule) == ((0.0, 1e6), 1, "uniform")
    plain = Pipeline(engine).resolve(GenerationRequest(prompt="a red circle", seed=1))
    assert (plain.guidance_interval, plain.cache_interval, plain.cache_schedule) == (None, 1, "uniform")


@pytest.mark.parametrize("entry, message", [
    ({"cache_interval": 0}, "default_sampler.cache_interval is 0; expected an integer from 1 to 100 or null"),
    ({"cache_schedule": "cubic"}, "default_sampler.cache_schedule is 'cubic'; expected one of uniform, quadratic"),
    ({"guidance_interval": [3, 1]}, r"default_sampler.guidance_interval is \[3, 1\]; expected two noise levels"),
    ({"guidance_interval": 2}, "default_sampler.guidance_interval is 2; expected two noise levels"),
])
def test_a_bad_default_in_model_json_is_refused_naming_it(entry, message):
    with pytest.raises(ConfigError, match=message):
        SamplerDefaults.from_dict(entry)
    assert SamplerDefaults.from_dict({"guidance_interval": [0.5, 8]}).to_dict()["guidance_interval"] == [0.5, 8.0]


# ------------------------------------------------------------------------------------------------ engine dirs

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    checkpoint, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return checkpoint, engine_dir


def engine_dir_engines(engine_dir):
    yield "onnxruntime", OnnxRuntimeEngine(engine_dir, intra_op_threads=1)
    try:
        from ldm_runtime.engines.openvino_engine import OpenVinoEngine, OpenVinoUnavailable
        yield "openvino", OpenVinoEngine(engine_dir, intra_op_threads=1, cache_dir=None)
    except (ImportError, OpenVinoUnavailable) as error:
        print(f"openvino not tested: {error}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_an_engine_dir_caches_features_as_the_torch_engine_does(exported, rng):
    seed = int(rng.integers(2**62))
    requests = [GenerationRequest(prompt=PROMPTS[k], seed=seed + k, sampler="ddim", steps=6, cache_interval=interval)
                for k, interval in enumerate((1, 2, 3))]
    eager = Pipeline(TorchEngine(exported[0], device="cpu")).generate(requests)
    for name, compiled in engine_dir_engines(exported[1]):
        assert compiled.deep_cache
        recorder = CallRecorder(compiled)
        images = Pipeline(recorder).generate(requests)
        assert {"shallow", "features"} <= {kind for kind, _ in recorder.calls}, name
        for got, want in zip(images, eager):
            assert psnr(got, want) >= 40, name


def test_an_engine_dir_without_the_shallow_graph_refuses_caching_in_one_line(exported, tmp_path):
    old = tmp_path / "engine"
    shutil.copytree(exported[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["unet_shallow"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    compiled = OnnxRuntimeEngine(old, intra_op_threads=1)
    assert not compiled.deep_cache
    pipeline = Pipeline(compiled)
    with pytest.raises(RequestError, match="cache_interval is 2; the onnxruntime engine cannot cache the UNet's "
                                           "features across steps .*has no unet_shallow graph; re-export it") as raised:
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, cache_interval=2))
    assert raised.value.field == "cache_interval"
    assert len(pipeline.generate([GenerationRequest(prompt="a red circle", seed=1, steps=2)])) == 1


@pytest.mark.parametrize("damage, message", [
    ("drop the unet's deep_features output", "lists a unet_shallow graph but its unet graph has no deep_features "
                                             "output"),
    ("name an unknown graph", r"lists graphs \['unet_deeper'\] the runtime does not know"),
])
def test_a_manifest_whose_cache_graphs_do_not_fit_is_refused(exported, tmp_path, damage, message):
    folder = tmp_path / "engine"
    shutil.copytree(exported[1], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage.startswith("drop"):
        manifest["graphs"]["unet"]["outputs"] = manifest["graphs"]["unet"]["outputs"][:1]
    else:
        manifest["graphs"]["unet_deeper"] = manifest["graphs"]["unet_shallow"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineDirError, match=message):
        load_manifest(folder)
