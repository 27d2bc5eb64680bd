"""The tensorrt engine, on a machine without TensorRT or a GPU.

What is decided without TensorRT is tested directly: which profile and batch bucket serve a call, the one-line
error for a shape outside the plan's profile, a plan whose tensors or GPU/version differ from the manifest, and
the one-line refusal where tensorrt or a CUDA GPU is missing (``ldm-sample`` / ``ldm-serve --engine tensorrt``
exit 2 with it).

How the engine uses TensorRT is tested against ``fake_tensorrt``, a FAKE tensorrt module (not TensorRT: it runs
each plan's ONNX graph with onnxruntime on host memory at the addresses the engine binds, and records every call),
with the engine's device patched to the CPU: one context per profile, tensors bound by the manifest's names,
padded shapes set, buffers reused across steps, and every call and a whole sampling run equal to the onnxruntime
engine's. Nothing here has run on TensorRT; ``scripts/gpu_check.sh`` does that where TensorRT imports.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from ldm_export.tensorrt_build import _profile_shape
from ldm_runtime import sample
from ldm_runtime.engines import load_engine, pick_engine, tensorrt_engine, tensorrt_plans
from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.engines.tensorrt_engine import TensorRtEngine, TensorRtUnavailable, tensorrt_device
from ldm_runtime.engines.tensorrt_plans import PlanProfile, check_plan_tensors, plan_call, tensorrt_missing
from ldm_runtime.errors import EngineDirError, OutOfRangeError
from ldm_runtime.files import sha256_file
from ldm_runtime.manifest import MANIFEST_JSON, load_manifest
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_serve import cli as serve_cli
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_engine
from tests.ldm_runtime import fake_tensorrt

FAKE_GPU = ("Fake GPU 80GB", "9.0")
LENGTH = TINY_CONFIG.text_encoder.max_length


def unet_profile(batch=(1, 2, 8), size=(8, 8, 16)) -> PlanProfile:
    """A UNet profile over ``batch`` and square latent ``size`` (min, opt, max), as the builder makes them."""
    return PlanProfile({
        "latents": tuple((b, 4, s, s) for b, s in zip(batch, size)),
        "timesteps": tuple((b,) for b in batch),
        "context": tuple((b, LENGTH, 32) for b in batch),
        "context_mask": tuple((b, LENGTH) for b in batch),
    })


def unet_shapes(rows: int, size: int = 8) -> dict[str, tuple[int, ...]]:
    return {"latents": (rows, 4, size, size), "timesteps": (rows,), "context": (rows, LENGTH, 32),
            "context_mask": (rows, LENGTH)}


# --- decisions without TensorRT ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, expected", [((1, 2, 8), (1, 2, 4, 8)), ((3, 4, 12), (4, 8, 12)), ((1, 1, 1), (1,)),
                                             ((2, 2, 6), (2, 4, 6))])
def test_batch_buckets_are_the_powers_of_two_inside_the_profile_and_its_maximum(batch, expected):
    assert unet_profile(batch=batch).batch_buckets() == expected


@pytest.mark.parametrize("rows, bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8)])
def test_a_call_is_padded_to_the_smallest_bucket_that_holds_it(rows, bucket):
    call = plan_call("unet", [unet_profile()], unet_shapes(rows, 12))
    assert (call.profile, call.bucket) == (0, bucket)
    assert call.shapes == unet_shapes(bucket, 12)


def test_the_profile_with_the_smallest_bucket_that_fits_serves_the_call():
    profiles = [unet_profile(batch=(1, 2, 4)), unet_profile(batch=(8, 16, 32)), unet_profile(size=(32, 32, 64))]
    assert (plan_call("unet", profiles, unet_shapes(3)).profile, plan_call("unet", profiles, unet_shapes(3)).bucket) \
        == (0, 4)
    assert (plan_call("unet", profiles, unet_shapes(6)).profile, plan_call("unet", profiles, unet_shapes(6)).bucket) \
        == (1, 8)
    wide = plan_call("unet", profiles, unet_shapes(3, 48))
    assert (wide.profile, wide.bucket) == (2, 4)


@pytest.mark.parametrize("rows, size, shape, allowed", [
    (9, 8, "(9, 4, 8, 8)", "(1..8, 4, 8..16, 8..16)"),
    (2, 18, "(2, 4, 18, 18)", "(1..8, 4, 8..16, 8..16)"),
])
def test_a_shape_outside_the_profile_is_one_error_naming_the_shape_and_the_range(rows, size, shape, allowed):
    with pytest.raises(OutOfRangeError) as error:
        plan_call("unet", [unet_profile()], unet_shapes(rows, size))
    message = str(error.value)
    assert message == (f"unet input latents has shape {shape}, outside the TensorRT plan's range {allowed}; "
                       f"re-export with a wider --batch-range or --size-range")


def test_inputs_that_disagree_on_the_batch_are_a_bug_not_a_user_error():
    shapes = {**unet_shapes(2), "timesteps": (3,)}
    with pytest.raises(ValueError, match=r"different batch sizes \[2, 3\]") as error:
        plan_call("unet", [unet_profile()], shapes)
    assert not isinstance(error.value, OutOfRangeError)


def test_a_plan_whose_tensors_differ_from_the_manifest_is_refused_saying_how_to_rebuild(exported):
    graph = load_manifest(exported[1]).graphs["vae_decoder"]
    check_plan_tensors("vae_decoder.plan", graph, {"latents": ("INPUT", "FLOAT"), "images": ("OUTPUT", "FLOAT")})
    for tensors, differing in [({"latent": ("INPUT", "FLOAT"), "images": ("OUTPUT", "FLOAT")}, "'latent'"),
                               ({"latents": ("INPUT", "HALF"), "images": ("OUTPUT", "FLOAT")}, "'latents'")]:
        with pytest.raises(EngineDirError, match=f"differ in {differing}.*--rebuild-plans") as error:
            check_plan_tensors("vae_decoder.plan", graph, tensors)
        assert "\n" not in str(error.value)


def test_without_tensorrt_or_a_gpu_the_refusal_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert tensorrt_missing("the tensorrt engine") == (
        "the tensorrt engine needs the tensorrt Python package (pip install 'ldm-runtime[tensorrt]'), which is not "
        "installed here")
    with pytest.raises(TensorRtUnavailable, match="^the tensorrt engine needs the tensorrt Python package"):
        tensorrt_device("auto")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRtUnavailable) as error:
        tensorrt_device("cuda")
    assert str(error.value) == "the tensorrt engine needs a CUDA GPU, and none is visible on this machine"


@pytest.mark.parametrize("device, message", [("cpu", "device 'cpu' is not valid for the tensorrt engine, which runs "
                                                      "on a CUDA GPU"),
                                             ("tpu", "device 'tpu' is not valid for the tensorrt engine"),
                                             ("cuda:x", "device 'cuda:x' is not valid")])
def test_a_device_the_tensorrt_engine_cannot_use_is_refused_before_anything_loads(device, message):
    with pytest.raises(TensorRtUnavailable, match=message):
        tensorrt_device(device)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    checkpoint, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return checkpoint, engine_dir


def test_ldm_sample_and_ldm_serve_engine_tensorrt_exit_2_with_one_line_where_tensorrt_is_missing(
        exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "image.png"
    assert sample.main(["--model", str(exported[1]), "a red circle", "--engine", "tensorrt", "--out", str(out)]) == 2
    expected = ("the tensorrt engine needs the tensorrt Python package (pip install 'ldm-runtime[tensorrt]'), which "
                "is not installed here\n")
    assert capsys.readouterr().err == "ldm-sample: error: " + expected
    assert serve_cli.main(["--model", str(exported[1]), "--engine", "tensorrt", "--port", "0"]) == 2
    assert capsys.readouterr().err == "ldm-serve: error: " + expected
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)  # TensorRT imports, but there is no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sample.main(["--model", str(exported[1]), "a red circle", "--engine", "tensorrt", "--out", str(out)]) == 2
    assert capsys.readouterr().err == ("ldm-sample: error: the tensorrt engine needs a CUDA GPU, and none is visible "
                                       "on this machine\n")
    assert not out.exists()


# --- the engine over a FAKE tensorrt -------------------------------------------------------------------------


def write_fake_plans(engine_dir, profiles_per_plan: int = 1, gpu=FAKE_GPU, version=fake_tensorrt.__version__):
    """Give ``engine_dir`` fake plans (``fake_tensorrt``) with the builder's profile shapes, and the manifest's
    "tensorrt" entry as ``ldm_export/tensorrt_build.py`` writes it. With 2 profiles per plan, profile 0 takes the
    batch range up to its opt and profile 1 the rest."""
    manifest = json.loads((engine_dir / MANIFEST_JSON).read_text())
    dims = manifest["dims"]
    plans = {}
    for name, graph in manifest["graphs"].items():
        full = {tensor["name"]: [list(_profile_shape(tensor["shape"], _dim_ranges(dims), which))
                                 for which in ("min", "opt", "max")] for tensor in graph["inputs"]}
        profiles = [full]
        if profiles_per_plan == 2:
            split = dims["batch"]["opt"]
            low = {tensor: [shapes[0], [split, *shapes[1][1:]], [split, *shapes[2][1:]]]
                   for tensor, shapes in full.items()}
            high = {tensor: [[split + 1, *shapes[0][1:]], [split + 1, *shapes[1][1:]], shapes[2]]
                    for tensor, shapes in full.items()}
            profiles = [low, high]
        path = engine_dir / f"{name}.plan"
        path.write_bytes(fake_tensorrt.fake_plan_bytes(name, engine_dir / graph["file"], profiles))
        plans[name] = {"file": path.name, "sha256": sha256_file(path), "profile": full}
    manifest["backend"] = "tensorrt"
    manifest["tensorrt"] = {"tensorrt_version": version, "gpu_name": gpu[0], "compute_capability": gpu[1],
                            "precision": manifest["precision"], "plans": plans}
    (engine_dir / MANIFEST_JSON).write_text(json.dumps(manifest, indent=2) + "\n")
    return engine_dir


def _dim_ranges(dims):
    from ldm_runtime.manifest import DimRange

    return {name: DimRange(**value) for name, value in dims.items()}


@pytest.fixture(scope="module")
def planned(exported, tmp_path_factory):
    """A copy of the tiny fp32 engine dir with one-profile fake plans."""
    folder = tmp_path_factory.mktemp("planned") / "engine"
    shutil.copytree(exported[1], folder)
    return write_fake_plans(folder)


@pytest.fixture(scope="module")
def two_profiles(exported, tmp_path_factory):
    """A copy of the tiny fp32 engine dir with fake plans of two profiles each (batch 1..2 and 3..8)."""
    folder = tmp_path_factory.mktemp("two-profiles") / "engine"
    shutil.copytree(exported[1], folder)
    return write_fake_plans(folder, profiles_per_plan=2)


@pytest.fixture
def fake(monkeypatch):
    """The fake tensorrt imported as ``tensorrt``, its call record emptied, and the engine's device and GPU
    patched to the CPU and the GPU the fake plans name."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    fake_tensorrt.CALLS.clear()
    monkeypatch.setattr(tensorrt_engine, "tensorrt_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(tensorrt_engine, "gpu_identity", lambda device: FAKE_GPU)
    return fake_tensorrt.CALLS


@pytest.fixture(scope="module")
def onnxruntime_engine(exported):
    return OnnxRuntimeEngine(exported[1], intra_op_threads=1)


def unet_inputs(rng, rows: int, size: int = 8):
    latents = rng.standard_normal((rows, 4, size, size)).astype(np.float32)
    timesteps = rng.integers(0, 1000, rows).astype(np.int64)
    context = rng.standard_normal((rows, LENGTH, 32)).astype(np.float32)
    mask = np.ones((rows, LENGTH), dtype=bool)
    mask[:, rng.integers(1, LENGTH):] = False
    return latents, timesteps, context, mask


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


def test_every_call_on_the_fake_matches_the_onnxruntime_engine(planned, fake, onnxruntime_engine, rng):
    engine = TensorRtEngine(planned)
    prompts = ["a red circle", "", "two blue squares on a green background"]
    context, mask = engine.encode_text(prompts)
    expected_context, expected_mask = onnxruntime_engine.encode_text(prompts)
    assert isinstance(context, torch.Tensor) and context.dtype == torch.float32 and mask.dtype == torch.bool
    assert relative_error(engine.to_host(context), expected_context) < 1e-6
    assert np.array_equal(engine.to_host(mask), expected_mask)
    for rows in (1, 3, 8):
        latents, timesteps, context, mask = unet_inputs(rng, rows)
        output = engine.unet(engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))
        assert output.shape == (rows, 4, 8, 8) and output.dtype == torch.float32
        assert relative_error(engine.to_host(output), onnxruntime_engine.unet(latents, timesteps, context, mask)) < 1e-6
    latents = rng.standard_normal((3, 4, 10, 12)).astype(np.float32)
    images = engine.decode(engine.to_array(latents))
    assert images.shape == (3, 3, 20, 24)
    assert relative_error(engine.to_host(images), onnxruntime_engine.decode(latents)) < 1e-6
    pixels = rng.uniform(-1, 1, (2, 3, 16, 20)).astype(np.float32)
    encoded = engine.encode_images(engine.to_array(pixels))
    assert relative_error(engine.to_host(encoded), onnxruntime_engine.encode_images(pixels)) < 1e-6


def test_one_context_per_profile_and_tensors_bound_by_the_manifest_names(two_profiles, fake, rng):
    engine = TensorRtEngine(two_profiles)
    manifest = load_manifest(two_profiles)
    contexts = [call[1] for call in fake if call[0] == "create_execution_context"]
    assert sorted(contexts) == sorted(list(manifest.graphs) * 2)
    profiles = [(call[1], call[2]) for call in fake if call[0] == "set_optimization_profile_async"]
    assert sorted(profiles) == sorted((graph, index) for graph in manifest.graphs for index in (0, 1))
    for rows, profile, bucket in [(3, 1, 4), (1, 0, 1), (2, 0, 2), (5, 1, 8)]:
        fake.clear()
        latents, timesteps, context, mask = unet_inputs(rng, rows)
        engine.unet(engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))
        shapes = {call[3]: call[4] for call in fake if call[0] == "set_input_shape"}
        assert shapes == unet_shapes(bucket)
        assert {call[2] for call in fake if call[0] == "set_input_shape"} == {profile}
        bound = {call[3] for call in fake if call[0] == "set_tensor_address"}
        assert bound == {"latents", "timesteps", "context", "context_mask", "noise_pred", "deep_features"}
        assert [call[:3] for call in fake if call[0] == "execute_async_v3"] == [("execute_async_v3", "unet", profile)]


def test_buffers_are_allocated_once_per_bucket_and_reused_across_steps(planned, fake, rng):
    engine = TensorRtEngine(planned)
    addresses = []
    for rows in (3, 3, 1, 4, 3):
        fake.clear()
        latents, timesteps, context, mask = unet_inputs(rng, rows)
        engine.unet(engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))
        addresses.append({call[3]: call[4] for call in fake if call[0] == "set_tensor_address"})
    # four inputs, noise_pred and deep_features; the same bucket again: shapes and addresses kept
    assert len(addresses[0]) == 6 and addresses[1] == {}
    assert set(addresses[2].values()).isdisjoint(addresses[0].values())  # bucket 1 has buffers of its own
    assert addresses[3] == addresses[0] and addresses[4] == {}  # 4 rows fill bucket 4: its buffers again
    assert len(engine.plans["unet"].buffers) == 2


def test_a_row_does_not_depend_on_the_rows_beside_it_in_its_bucket(planned, fake, rng):
    engine = TensorRtEngine(planned)
    latents, timesteps, context, mask = unet_inputs(rng, 4)
    together = engine.to_host(engine.unet(engine.to_array(latents), timesteps, engine.to_array(context),
                                          engine.to_array(mask)))
    first_three = engine.to_host(engine.unet(engine.to_array(latents[:3]), timesteps[:3],
                                             engine.to_array(context[:3]), engine.to_array(mask[:3])))
    np.testing.assert_array_equal(first_three, together[:3])


def test_sampling_on_the_fake_keeps_latents_on_the_engine_and_matches_the_onnxruntime_engine(
        planned, fake, onnxruntime_engine, seed):
    engine = TensorRtEngine(planned)
    requests = [GenerationRequest(prompt="a red circle", seed=seed, steps=4),
                GenerationRequest(prompt="a blue square", seed=seed + 1, sampler="ddim", steps=3, eta=0.5, height=20)]
    pipeline = Pipeline(engine)
    states = pipeline.advance(pipeline.start(requests[:1]))
    assert isinstance(states[0].latents, torch.Tensor) and states[0].latents.device == engine.device
    images = pipeline.generate(requests)
    expected = Pipeline(onnxruntime_engine).generate(requests)
    for image, reference in zip(images, expected):
        assert image.shape == reference.shape
        assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


def test_load_engine_opens_an_engine_dir_with_plans_and_auto_picks_tensorrt_only_for_plans_built_here(
        planned, exported, fake, monkeypatch):
    assert isinstance(load_engine(planned, engine="tensorrt"), TensorRtEngine)
    monkeypatch.setattr(tensorrt_plans, "tensorrt_missing", lambda what="": None)  # as if a GPU were here
    monkeypatch.setattr(tensorrt_plans, "gpu_identity", lambda index=0: FAKE_GPU)
    name, reason = pick_engine(planned, "auto")
    assert name == "tensorrt" and "TensorRT plans built for this GPU" in reason
    assert isinstance(load_engine(planned), TensorRtEngine)
    assert pick_engine(planned, "cpu")[0] != "tensorrt"
    assert pick_engine(exported[1], "auto")[0] != "tensorrt"  # no plans
    monkeypatch.setattr(tensorrt_plans, "gpu_identity", lambda index=0: ("NVIDIA A100-SXM4-80GB", "8.0"))
    assert pick_engine(planned, "auto")[0] != "tensorrt"  # plans for another GPU


def test_an_engine_dir_without_plans_is_refused_saying_how_to_export_them(exported, fake):
    with pytest.raises(EngineDirError, match=r"holds no TensorRT plans; export it with `ldm-export --backend "
                                             r"tensorrt` on a GPU, or use --engine onnxruntime"):
        TensorRtEngine(exported[1])


@pytest.mark.parametrize("gpu, version, message", [
    (("NVIDIA H100 80GB HBM3", "9.0"), fake_tensorrt.__version__,
     "built for gpu name 'NVIDIA H100 80GB HBM3' but this machine has 'Fake GPU 80GB'"),
    (FAKE_GPU, "10.3.0", f"built for tensorrt version '10.3.0' but this machine has '{fake_tensorrt.__version__}'"),
])
def test_plans_of_another_gpu_or_tensorrt_version_are_refused_in_one_line_saying_how_to_rebuild(
        exported, fake, tmp_path, gpu, version, message):
    folder = tmp_path / "engine"
    shutil.copytree(exported[1], folder)
    write_fake_plans(folder, gpu=gpu, version=version)
    with pytest.raises(EngineDirError) as error:
        TensorRtEngine(folder)
    assert message in str(error.value) and "ldm-export --rebuild-plans ENGINE_DIR" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_changed_or_unreadable_plan_is_refused_naming_it(exported, fake, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(exported[1], folder)
    write_fake_plans(folder)
    (folder / "unet.plan").write_bytes(b"not a plan")
    with pytest.raises(EngineDirError, match=r"unet\.plan does not match the sha256"):
        TensorRtEngine(folder)
    with pytest.raises(EngineDirError, match=r"TensorRT cannot load the plan .*unet\.plan .*--rebuild-plans"):
        TensorRtEngine(folder, verify=False)


def test_a_batch_outside_the_exported_range_is_refused_naming_it(planned, fake, rng):
    engine = TensorRtEngine(planned)
    latents, timesteps, context, mask = unet_inputs(rng, 9)
    with pytest.raises(OutOfRangeError, match=r"UNet batch size 9 is outside the engine's exported range 1\.\.8"):
        engine.unet(engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))


@pytest.fixture(scope="module")
def planned_fp16(tmp_path_factory):
    """A copy of the tiny fp16 engine dir (float16 inputs and outputs) with one-profile fake plans."""
    _, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp16")
    assert code == 0, output
    folder = tmp_path_factory.mktemp("planned-fp16") / "engine"
    shutil.copytree(engine_dir, folder)
    return write_fake_plans(folder)


def test_an_fp16_plan_gets_float16_buffers_and_gives_float32_like_the_onnxruntime_engine(planned_fp16, fake, rng):
    engine = TensorRtEngine(planned_fp16)
    reference = OnnxRuntimeEngine(planned_fp16, intra_op_threads=1)
    latents, timesteps, context, mask = unet_inputs(rng, 3)
    output = engine.unet(engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))
    assert output.dtype == torch.float32
    (buffers,) = engine.plans["unet"].buffers.values()
    assert buffers["latents"].dtype == buffers["noise_pred"].dtype == torch.float16
    assert relative_error(engine.to_host(output), reference.unet(latents, timesteps, context, mask)) < 1e-3
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    images = engine.decode(engine.to_array(latents))
    assert images.dtype == torch.float32
    assert relative_error(engine.to_host(images), reference.decode(latents)) < 1e-3


class CpuCapturedCall:
    """A CPU stand-in for ``cuda_graph.CapturedCall`` (there is no CUDA here), for the FAKE tensorrt: it "captures"
    the third call as CUDA graph capture does (after two warm-up calls), keeping the fake context's tensor addresses
    and shapes of that call, and "replays" by running the fake context on exactly those (as a CUDA graph replays
    its launches with the addresses they were captured with), after checking that the engine re-bound the context
    to them."""

    made: list["CpuCapturedCall"] = []

    def __init__(self, module, example, pool=None):
        self.static_inputs = [tensor.clone() for tensor in example]
        for _ in range(2):
            module(*self.static_inputs)
        self.static_output = module(*self.static_inputs)
        self.context, self.addresses, self.shapes = fake_tensorrt.LAST_EXECUTED
        CpuCapturedCall.made.append(self)

    def replay(self, inputs):
        for buffer, tensor in zip(self.static_inputs, inputs):
            buffer.copy_(tensor)
        assert (self.context.addresses, self.context.shapes) == (self.addresses, self.shapes), \
            "the context was not re-bound to the captured call's shapes and buffers"
        assert self.context.run_with(self.addresses, self.shapes)
        if isinstance(self.static_output, tuple):
            return tuple(output.clone() for output in self.static_output)
        return self.static_output.clone()


def test_each_unet_bucket_is_captured_once_and_replays_give_the_uncaptured_results(planned, fake, rng, monkeypatch):
    monkeypatch.setattr(tensorrt_engine, "CapturedCall", CpuCapturedCall)
    monkeypatch.setattr(CpuCapturedCall, "made", [])
    captured, uncaptured = TensorRtEngine(planned), TensorRtEngine(planned)
    captured.plans["unet"].capture = True  # as on a GPU with cuda_graphs=True
    for rows in (3, 1, 4, 8, 1, 3):  # buckets 4, 1, 4, 8, 1, 4: replays follow other buckets' replays
        latents, timesteps, context, mask = unet_inputs(rng, rows)
        inputs = (captured.to_array(latents), timesteps, captured.to_array(context), captured.to_array(mask))
        np.testing.assert_array_equal(captured.to_host(captured.unet(*inputs)),
                                      uncaptured.to_host(uncaptured.unet(*inputs)))
    assert len(CpuCapturedCall.made) == 3
    assert [(graph, profile, shapes[0]) for graph, profile, shapes in captured.captured_shapes] == [
        ("unet", 0, (1, 4, 8, 8)), ("unet", 0, (4, 4, 8, 8)), ("unet", 0, (8, 4, 8, 8))]
    assert uncaptured.captured_shapes == []


def test_a_unet_plan_that_cannot_be_captured_runs_uncaptured_with_a_warning(planned, fake, rng, monkeypatch):
    def refuse_capture(module, example, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    monkeypatch.setattr(tensorrt_engine, "CapturedCall", refuse_capture)
    warnings = []
    monkeypatch.setattr(tensorrt_engine.log, "warning", lambda message, *args: warnings.append(message % args))
    engine, reference = TensorRtEngine(planned), TensorRtEngine(planned)
    engine.plans["unet"].capture = True
    for rows in (3, 3, 1):
        latents, timesteps, context, mask = unet_inputs(rng, rows)
        inputs = (engine.to_array(latents), timesteps, engine.to_array(context), engine.to_array(mask))
        np.testing.assert_array_equal(engine.to_host(engine.unet(*inputs)), reference.to_host(reference.unet(*inputs)))
    assert not engine.plans["unet"].capture and engine.captured_shapes == []
    assert warnings == ["the TensorRT plan of unet cannot be captured in a CUDA graph (operation not permitted when "
                        "stream is capturing); it runs uncaptured"]
