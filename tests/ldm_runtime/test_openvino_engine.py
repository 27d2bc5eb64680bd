"""The openvino engine on the tiny checkpoint's fp32 export: every call matches the onnxruntime and the eager
torch engines, a whole sampling run stays within 40 dB of eager, a row's result does not depend on the rows
beside it or on the bucket it is padded to, graphs are compiled once per bucket and shape, it samples without
importing torch, and what this machine cannot do (bf16 without native bf16, no openvino) is refused in one line.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")  # the dev extra installs it

from ldm_export.validate import psnr_db
from ldm_runtime.engines import load_engine, pick_engine
from ldm_runtime.engines import compile_cache, openvino_engine
from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.engines.openvino_engine import (
    OpenVinoEngine, OpenVinoUnavailable, batch_buckets_for, default_cache_dir,
)
from ldm_runtime.manifest import EngineDirError, OutOfRangeError
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_engine
from tests.ldm_runtime.file_damage import (MISMATCHED_GRAPH_ENTRIES, copy_with_manifest_edited, flip_middle_bytes,
                                           swap_names)

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on a green background in the top left corner of the image", "",
           "a yellow triangle"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    checkpoint, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return checkpoint, engine_dir


@pytest.fixture(scope="module", params=[True, False], ids=["compiled-per-bucket", "compiled-once"])
def engine(exported, request):
    """The engine both ways it compiles a graph: once per batch bucket, and once for every bucket."""
    return OpenVinoEngine(exported[1], intra_op_threads=1, compile_per_bucket=request.param)


@pytest.fixture(scope="module")
def onnxruntime_engine(exported):
    return OnnxRuntimeEngine(exported[1], intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_engine(exported):
    from ldm_runtime.engines.torch_engine import TorchEngine

    return TorchEngine(exported[0], device="cpu", unet_chunk_size=None)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


def test_openvino_engine_info_comes_from_the_manifest(engine, onnxruntime_engine):
    assert engine.info == dataclasses.replace(onnxruntime_engine.info, name="openvino")
    assert engine.batch_buckets == (1, 2, 4, 8)  # the tiny export's batch range is 1..8


def test_every_call_matches_the_onnxruntime_and_torch_engines_within_1e_4(engine, onnxruntime_engine,
                                                                         torch_engine, rng):
    import torch

    context, mask = engine.encode_text(PROMPTS[:3])
    expected_context, expected_mask = torch_engine.encode_text(PROMPTS[:3])
    np.testing.assert_array_equal(mask, expected_mask.numpy())
    assert relative_error(context, expected_context) < 1e-4
    assert relative_error(context, onnxruntime_engine.encode_text(PROMPTS[:3])[0]) < 1e-4

    latents = rng.standard_normal((3, 4, 8, 12)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=3)
    noise_pred = engine.unet(latents, timesteps, context, mask)
    expected = torch_engine.unet(torch.from_numpy(latents), timesteps, expected_context, expected_mask)
    assert noise_pred.dtype == np.float32 and noise_pred.shape == latents.shape
    assert relative_error(noise_pred, expected) < 1e-4
    assert relative_error(noise_pred, onnxruntime_engine.unet(latents, timesteps, context, mask)) < 1e-4

    images = engine.decode(latents)
    assert images.shape == (3, 3, 16, 24)
    assert relative_error(images, torch_engine.decode(torch.from_numpy(latents))) < 1e-4
    assert relative_error(images, onnxruntime_engine.decode(latents)) < 1e-4
    clipped = np.clip(images, -1, 1)
    encoded = engine.encode_images(clipped)
    assert relative_error(encoded, torch_engine.encode_images(torch.from_numpy(clipped))) < 1e-4
    assert relative_error(encoded, onnxruntime_engine.encode_images(clipped)) < 1e-4


def test_whole_sampling_run_is_within_40_db_of_eager_torch(engine, torch_engine, rng):
    requests = [GenerationRequest(prompt=PROMPTS[i], seed=int(rng.integers(2**31)), steps=25) for i in range(2)]
    images = Pipeline(engine).generate(requests)
    expected = Pipeline(torch_engine).generate(requests)
    assert psnr_db(images, expected) >= 40


def test_unet_rows_are_bit_identical_alone_or_in_any_bucket(engine, rng):
    batch = 7  # padded to the bucket of 8; each row alone runs in the bucket of 1
    latents = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=batch)
    context, mask = engine.encode_text([PROMPTS[i % 4] for i in range(batch)])
    together = engine.unet(latents, timesteps, context, mask)
    for row in range(batch):
        alone = engine.unet(latents[row:row + 1], timesteps[row:row + 1], context[row:row + 1], mask[row:row + 1])
        assert np.array_equal(together[row:row + 1], alone), f"row {row}"
    pair = engine.unet(latents[2:5], timesteps[2:5], context[2:5], mask[2:5])  # the bucket of 4
    assert np.array_equal(pair, together[2:5])


def test_padding_rows_do_not_change_the_real_rows(engine, rng):
    latents = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=4)
    context, mask = engine.encode_text(PROMPTS)
    full = engine.unet(latents, timesteps, context, mask)  # a fourth real row where padding would go
    padded = engine.unet(latents[:3], timesteps[:3], context[:3], mask[:3])  # row 3 padded with a copy of row 2
    assert padded.shape == (3, 4, 8, 8) and np.array_equal(padded, full[:3])
    assert not np.array_equal(full[3], full[2])  # the fourth row differs, so the test can see a leak
    images = engine.decode(latents)
    assert np.array_equal(engine.decode(latents[:3]), images[:3])


def test_images_are_bit_identical_alone_or_in_a_batch(engine, rng):
    requests = [GenerationRequest(prompt=PROMPTS[i], seed=int(rng.integers(2**31)), steps=3) for i in (0, 1, 3)]
    pipeline = Pipeline(engine)
    together = pipeline.generate(requests)  # guided: 6 UNet rows, the bucket of 8
    for request, image in zip(requests, together):
        assert np.array_equal(image, pipeline.generate([request])[0]), request


@pytest.mark.parametrize("max_batch, expected", [(8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 12)), (1, (1,)),
                                                 (64, (1, 2, 4, 8, 16, 32, 64)), (100, (1, 2, 4, 8, 16, 32, 64, 100))])
def test_batch_buckets_are_powers_of_two_up_to_the_largest_batch(max_batch, expected):
    assert batch_buckets_for(max_batch) == expected


def test_bucket_is_the_smallest_that_holds_the_rows(engine):
    assert [engine.bucket_for(rows) for rows in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_each_graph_is_compiled_once_per_bucket_and_shape(exported, rng):
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False)
    assert engine.compiled_shapes == []  # nothing is compiled before first use
    context, mask = engine.encode_text(PROMPTS[:3])
    for rows, height in ((3, 8), (1, 8), (2, 8), (3, 8), (4, 8), (3, 12)):
        latents = rng.standard_normal((rows, 4, height, 8)).astype(np.float32)
        engine.unet(latents, np.full(rows, 10), context[:1].repeat(rows, 0), mask[:1].repeat(rows, 0))
    unet_shapes = [dict(shapes)["latents"] for graph, shapes in engine.compiled_shapes if graph == "unet"]
    assert unet_shapes == [(1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8), (4, 4, 12, 8)]
    assert [dict(shapes)["input_ids"] for graph, shapes in engine.compiled_shapes if graph == "text_encoder"] == [
        (4, TINY_CONFIG.text_encoder.max_length)]


def test_a_graph_compiled_once_serves_every_bucket_of_its_spatial_size(exported, rng):
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, compile_per_bucket=False)
    context, mask = engine.encode_text(PROMPTS[:3])
    for rows, height in ((3, 8), (1, 8), (2, 8), (8, 8), (3, 12)):
        latents = rng.standard_normal((rows, 4, height, 8)).astype(np.float32)
        engine.unet(latents, np.full(rows, 10), context[:1].repeat(rows, 0), mask[:1].repeat(rows, 0))
    unet_shapes = [dict(shapes)["latents"] for graph, shapes in engine.compiled_shapes if graph == "unet"]
    assert unet_shapes == [(-1, 4, 8, 8), (-1, 4, 12, 8)]  # one per spatial size, the batch axis a range


def test_by_default_only_graphs_with_large_weights_are_compiled_once_for_every_bucket(exported, monkeypatch):
    assert set(OpenVinoEngine(exported[1], verify=False).per_bucket.values()) == {True}  # the tiny model's graphs
    sizes = {name: sum((exported[1] / file).stat().st_size for file in graph["files"])
             for name, graph in json.loads((exported[1] / "manifest.json").read_text())["graphs"].items()}
    threshold = sorted(sizes.values())[1]  # the two smallest graphs stay per bucket, the rest are "large"
    monkeypatch.setattr(openvino_engine, "ONE_COMPILE_ABOVE_BYTES", threshold)
    per_bucket = OpenVinoEngine(exported[1], verify=False).per_bucket
    assert per_bucket == {name: size <= threshold for name, size in sizes.items()}
    assert OpenVinoEngine(exported[1], verify=False, compile_per_bucket=True).per_bucket == dict.fromkeys(sizes, True)


def test_a_profile_holds_one_compiled_copy_per_shape_and_the_next_call_compiles_plain_again(exported, rng):
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=None)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    expected = engine.decode(latents)
    held = []
    compile_plain = engine._compile

    def counting(graph, shapes, **extra):  # what is compiled, and how many decoders are held when it is
        held.append((extra, sum(1 for key in engine._compiled if key[0] == "vae_decoder")))
        return compile_plain(graph, shapes, **extra)

    engine._compile = counting
    times = engine.operator_times("vae_decoder", lambda: engine.decode(latents))
    assert times and all(value >= 0 for value in times.values()) and {"Convolution"} & set(times), times
    assert held == [({"PERF_COUNT": "YES"}, 0)]  # the plain decoder was let go before the profiled one was made
    assert engine.compiled_shapes == []  # the profiled one is not kept for timing
    assert np.array_equal(engine.decode(latents), expected) and held[-1] == ({}, 0)
    # a second profile, of another shape, counts that shape: the one a run profiles is the one it calls
    wider = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    assert engine.operator_times("vae_decoder", lambda: engine.decode(wider))
    assert held[-1] == ({"PERF_COUNT": "YES"}, 1)  # the 2-row plain decoder stays, the 3-row one is counted


def test_compiled_graph_cache_is_written_once_and_gives_the_same_rows(exported, engine, tmp_path, rng):
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    expected = engine.decode(latents)
    first = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=tmp_path)
    assert np.array_equal(first.decode(latents), expected)
    cached = sorted(path.name for path in tmp_path.iterdir())
    assert cached  # the compiled decoder for the bucket of 2
    second = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=tmp_path)
    assert np.array_equal(second.decode(latents), expected)
    assert sorted(path.name for path in tmp_path.iterdir()) == cached  # loaded, not compiled again


def generate_from_cache(engine_dir, cache_dir, seed):
    engine = OpenVinoEngine(engine_dir, intra_op_threads=1, verify=False, cache_dir=cache_dir)
    return Pipeline(engine).generate([GenerationRequest(prompt=PROMPTS[0], seed=seed, steps=2)])[0]


def flip_bytes_in_every_blob(blobs):
    for blob in blobs:
        flip_middle_bytes(blob)
    return blobs


def swap_two_blobs(blobs):
    swap_names(blobs[0], blobs[1])
    return blobs[:2]


def swap_two_entries(blobs):  # each blob with its record, so that the sha256 in the record matches the blob
    swap_names(blobs[0], blobs[1])
    if blobs[0].with_suffix(".json").exists():
        swap_names(blobs[0].with_suffix(".json"), blobs[1].with_suffix(".json"))
    return blobs[:2]


@pytest.mark.parametrize("damage", [flip_bytes_in_every_blob, swap_two_blobs, swap_two_entries],
                         ids=lambda damage: damage.__name__)
def test_a_damaged_compile_cache_is_dropped_with_a_warning_and_recompiled_to_the_clean_runs_image(
        exported, tmp_path, seed, caplog, damage):
    clean = generate_from_cache(exported[1], tmp_path, seed)
    blobs = sorted(tmp_path.glob("*.blob"))
    assert len(blobs) >= 2  # the text encoder, the UNet and the decoder
    damaged = damage(blobs)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(generate_from_cache(exported[1], tmp_path, seed), clean)
    lines = sorted(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)
    assert [line.split(" is not used (")[0] for line in lines] == [
        f"the openvino compile cache entry {blob}" for blob in sorted(damaged)]
    assert all(line.endswith("dropped it and compiling again") for line in lines)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # and recompiled into the cache, which serves the next process
        assert np.array_equal(generate_from_cache(exported[1], tmp_path, seed), clean)
    assert not caplog.records


@pytest.mark.parametrize("mode", [0o777, 0o775], ids=oct)
def test_a_compile_cache_folder_other_users_can_write_to_is_not_used_saying_why_in_one_line(
        exported, tmp_path, rng, caplog, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with caplog.at_level(logging.WARNING):
        engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=shared)
    assert engine.cache_dir is None
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith(f"the openvino compile cache {shared} cannot be used (other users can write to it")
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(engine.decode(latents), OpenVinoEngine(exported[1], verify=False, cache_dir=None,
                                                                 intra_op_threads=1).decode(latents))
    assert list(shared.iterdir()) == []  # nothing read or written there


def test_a_compile_lock_held_past_the_bound_is_waited_for_then_the_graph_compiled_without_the_cache(
        exported, tmp_path, rng, caplog, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setenv(compile_cache.LOCK_TIMEOUT_ENV, "0.2")
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=tmp_path)
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with open(tmp_path / compile_cache.CACHE_LOCK, "a") as other:  # as another process, stuck, would hold it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with caplog.at_level(logging.WARNING):
            decoded = engine.decode(latents)
    assert np.array_equal(decoded, OpenVinoEngine(exported[1], verify=False, cache_dir=None,
                                                  intra_op_threads=1).decode(latents))
    waiting, giving_up = [record.getMessage() for record in caplog.records]
    assert waiting.startswith(f"waiting up to 0.2 s ({compile_cache.LOCK_TIMEOUT_ENV}) for another process")
    assert giving_up.endswith("after 0.2 s (LDM_COMPILE_LOCK_TIMEOUT); compiling without the cache")
    assert not list(tmp_path.glob("*.blob"))  # compiled without the cache: nothing written


def test_processes_sharing_a_compile_cache_compile_one_at_a_time(exported, tmp_path, rng):
    # two test workers or two server replicas starting together compile a graph once, not once each
    fcntl = pytest.importorskip("fcntl")
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=tmp_path)
    probes = []
    compile_model = engine.core.compile_model

    def probing_compile(*args, **kwargs):
        with open(tmp_path / compile_cache.CACHE_LOCK, "a") as other:  # as another process would
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                probes.append("free")
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                probes.append("held")
        return compile_model(*args, **kwargs)

    engine.core = _CoreWith(engine.core, compile_model=probing_compile)
    engine.decode(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    assert probes == ["held"]
    with open(tmp_path / compile_cache.CACHE_LOCK, "a") as other:  # and it is let go afterwards
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


class _CoreWith:
    """An OpenVINO Core with some of its methods replaced."""

    def __init__(self, core, **methods):
        self._core, self._methods = core, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._core, name)


def test_the_default_compile_cache_follows_ldm_compile_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_COMPILE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    for off in ("off", "OFF", ""):
        monkeypatch.setenv("LDM_COMPILE_CACHE", off)
        assert default_cache_dir() is None
    monkeypatch.delenv("LDM_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ldm-runtime" / "openvino"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ldm-runtime" / "openvino"


def test_an_engine_keeps_its_compiled_graphs_in_the_default_cache(exported, monkeypatch, tmp_path, rng):
    monkeypatch.setenv("LDM_COMPILE_CACHE", str(tmp_path / "cache"))
    engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False)
    assert engine.cache_dir == tmp_path / "cache"
    engine.decode(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    assert any((tmp_path / "cache").iterdir())
    monkeypatch.setenv("LDM_COMPILE_CACHE", "off")
    assert OpenVinoEngine(exported[1], intra_op_threads=1, verify=False).cache_dir is None


def test_a_cache_folder_that_cannot_be_made_turns_the_cache_off_with_a_warning(exported, tmp_path, rng, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.engines.compile_cache"):
        engine = OpenVinoEngine(exported[1], intra_op_threads=1, verify=False, cache_dir=blocker / "cache")
    assert engine.cache_dir is None
    assert f"the openvino compile cache {blocker / 'cache'} cannot be used" in caplog.text
    assert engine.decode(rng.standard_normal((1, 4, 8, 8)).astype(np.float32)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("edit, message", [(edit, message) for _, edit, message in MISMATCHED_GRAPH_ENTRIES],
                         ids=[name for name, _, _ in MISMATCHED_GRAPH_ENTRIES])
def test_a_graph_entry_that_does_not_describe_its_graph_is_refused_as_the_engine_loads(edit, message, exported,
                                                                                      tmp_path):
    edited = copy_with_manifest_edited(exported[1], tmp_path / "engine", edit)
    with pytest.raises(EngineDirError, match=message) as error:
        OpenVinoEngine(edited, intra_op_threads=1, cache_dir=None)
    assert "\n" not in str(error.value)


def test_batch_and_size_outside_the_exported_range_are_refused_naming_them(engine, rng):
    latents = rng.standard_normal((9, 4, 8, 8)).astype(np.float32)
    context = np.zeros((9, TINY_CONFIG.text_encoder.max_length, 32), dtype=np.float32)
    with pytest.raises(OutOfRangeError, match=r"UNet batch size 9 is outside the engine's exported range 1\.\.8"):
        engine.unet(latents, np.full(9, 10), context, np.ones(context.shape[:2], dtype=bool))
    with pytest.raises(OutOfRangeError, match="16..32 in multiples of 4"):
        engine.decode(rng.standard_normal((1, 4, 20, 8)).astype(np.float32))


def test_bf16_without_native_bf16_is_refused_in_one_line_naming_what_is_missing(exported, monkeypatch):
    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    with pytest.raises(OpenVinoUnavailable, match=r"bf16 needs a CPU with native bf16 \(AVX-512 BF16 or AMX\).*"
                                                  r"only FP32, INT8, BIN, EXPORT_IMPORT.*--precision fp32") as error:
        OpenVinoEngine(exported[1], precision="bf16")
    assert "\n" not in str(error.value)


def test_bf16_on_this_cpu_is_refused_unless_openvino_reports_native_bf16(exported):
    import openvino

    if "BF16" in openvino_engine.cpu_capabilities(openvino.Core()):
        engine = OpenVinoEngine(exported[1], precision="bf16", intra_op_threads=1)
        assert engine.compile_config["INFERENCE_PRECISION_HINT"] == "bf16"
    else:
        with pytest.raises(OpenVinoUnavailable, match="native bf16"):
            OpenVinoEngine(exported[1], precision="bf16")


def test_fp32_pins_openvinos_inference_precision_to_f32(engine):
    assert engine.compile_config["INFERENCE_PRECISION_HINT"] == "f32"  # not bf16, the default on AMX CPUs
    assert engine.compile_config["INFERENCE_NUM_THREADS"] == "1"


def test_without_openvino_the_engine_is_refused_saying_to_install_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # "import openvino" now raises ImportError
    with pytest.raises(OpenVinoUnavailable, match=r"needs the openvino package, which is not installed; "
                                                  r"pip install 'ldm-runtime\[openvino\]'"):
        load_engine(exported[1], engine="openvino")


def test_bad_engine_options_are_refused(exported):
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16"):
        OpenVinoEngine(exported[1], precision="fp16")
    with pytest.raises(ValueError, match="intra_op_threads"):
        OpenVinoEngine(exported[1], intra_op_threads=0)
    with pytest.raises(OpenVinoUnavailable, match="device 'cuda' .* runs on the CPU"):
        OpenVinoEngine(exported[1], device="cuda")
    with pytest.raises(ValueError, match="batch_buckets"):
        OpenVinoEngine(exported[1], batch_buckets=(0, 2))
    with pytest.raises(ValueError, match="compile_per_bucket is 'yes'"):
        OpenVinoEngine(exported[1], compile_per_bucket="yes")


def test_load_engine_opens_an_engine_dir_with_openvino_when_asked(exported):
    assert isinstance(load_engine(exported[1], engine="openvino", intra_op_threads=1), OpenVinoEngine)
    assert isinstance(load_engine(exported[1], engine="onnxruntime", intra_op_threads=1), OnnxRuntimeEngine)


def test_auto_picks_openvino_on_the_cpu_and_onnxruntime_without_it_or_on_a_gpu(exported, monkeypatch):
    import importlib.util

    assert pick_engine(exported[1], "cpu")[0] == "openvino"
    assert isinstance(load_engine(exported[1], device="cpu", intra_op_threads=1), OpenVinoEngine)
    assert pick_engine(exported[1], "cuda:0")[0] == "onnxruntime"
    assert pick_engine(exported[0], "cpu")[0] == "torch"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "openvino"
                        else real_find_spec(name, *args))
    name, reason = pick_engine(exported[1], "cpu")
    assert name == "onnxruntime" and "openvino is not installed" in reason
    assert isinstance(load_engine(exported[1], device="cpu", intra_op_threads=1), OnnxRuntimeEngine)


def test_ldm_sample_with_engine_auto_says_which_engine_it_picked(exported, tmp_path, capsys):
    from ldm_runtime.sample import main

    out = tmp_path / "image.png"
    assert main(["--model", str(exported[1]), "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert "ldm-sample: --engine auto picked openvino" in capsys.readouterr().err and out.is_file()


def test_engine_samples_without_importing_torch(exported):
    script = (
        "import sys\n"
        "from ldm_runtime.engines.openvino_engine import OpenVinoEngine\n"
        "from ldm_runtime.pipeline import GenerationRequest, Pipeline\n"
        f"engine = OpenVinoEngine({str(exported[1])!r}, intra_op_threads=1)\n"
        "images = Pipeline(engine).generate([GenerationRequest(prompt='a red circle', seed=3, steps=3)])\n"
        "assert images[0].shape == (16, 16, 3) and images[0].std() > 0\n"
        "print('torch imported:', 'torch' in sys.modules, 'ldm_train imported:', 'ldm_train' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "torch imported: False ldm_train imported: False" in result.stdout


def test_ldm_sample_precision_bf16_is_refused_in_one_line_without_native_bf16_or_on_another_engine(
        exported, tmp_path, capsys, monkeypatch):
    from ldm_runtime.sample import main

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: ["FP32", "INT8"])
    base = ["--model", str(exported[1]), "a red circle", "--steps", "2", "--out", str(tmp_path / "image.png")]
    assert main(base + ["--engine", "openvino", "--precision", "bf16"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ldm-sample: error: precision bf16 needs a CPU with native bf16") and "\n" not in error
    assert main(base + ["--engine", "onnxruntime", "--precision", "bf16"]) == 2
    assert "--precision bf16 applies to the openvino engine, not onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "image.png").exists()


MET_BAR = openvino_engine.Bf16Measurement(
    worst_run_psnr_db=45.5, worst_model="sd15", adherence_difference=0.005,
    cold_first_image_s={"fp32": 20.0, "bf16": 25.0, "onnxruntime": 40.0}, source="a test's figures")
NATIVE_BF16 = ["WINOGRAD", "FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"]  # what OpenVINO reports on AVX-512 BF16
NO_BF16 = ["WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"]


def test_auto_takes_bf16_only_on_native_bf16_where_the_measured_fidelity_met_the_bar():
    auto_precision = openvino_engine.auto_precision
    precision, note = auto_precision(NATIVE_BF16, False, MET_BAR)
    assert precision == "bf16" and note.startswith("--precision auto took bf16 on the openvino engine: this CPU has "
                                                   "native bf16 and bf16 met the fidelity bar (its worst whole "
                                                   "sampling run 45.5 dB against fp32, on sd15; prompt adherence "
                                                   "within 0.005 of fp32's: BENCHMARKS.md)")
    precision, note = auto_precision(NO_BF16, False, MET_BAR)
    assert (precision, note) == ("fp32", "--precision auto took fp32 on the openvino engine: this CPU has no native "
                                         "bf16 (OpenVINO reports WINOGRAD, FP32, INT8, BIN, EXPORT_IMPORT)")
    for missed in (dataclasses.replace(MET_BAR, worst_run_psnr_db=39.4),
                   dataclasses.replace(MET_BAR, adherence_difference=0.025),
                   dataclasses.replace(MET_BAR, worst_run_psnr_db=float("nan"))):  # never measured
        precision, note = auto_precision(NATIVE_BF16, False, missed)
        assert precision == "fp32" and "bf16 missed the fidelity bar of 40 dB and 0.02" in note, note
        assert note.endswith("--precision bf16 takes it anyway") and "\n" not in note
    assert "its worst whole sampling run 39.4 dB against fp32, on sd15;" in auto_precision(
        NATIVE_BF16, False, dataclasses.replace(MET_BAR, worst_run_psnr_db=39.4))[1]


def test_auto_names_a_cold_start_of_minutes_at_sds_size_and_the_alternative_that_starts_sooner():
    auto_precision = openvino_engine.auto_precision
    slow_bf16 = dataclasses.replace(MET_BAR, cold_first_image_s={"fp32": 191.0, "bf16": 830.0, "onnxruntime": 21.0})
    precision, note = auto_precision(NATIVE_BF16, True, slow_bf16)
    assert precision == "bf16" and note.endswith(
        "; at SD's size its first image in a new process took 13.8 min (sd15 at 16x16 latents, 1 thread: "
        "BENCHMARKS.md), and --engine onnxruntime took 21 s")
    without_onnxruntime = dataclasses.replace(slow_bf16, cold_first_image_s={"fp32": 191.0, "bf16": 830.0})
    assert auto_precision(NATIVE_BF16, True, without_onnxruntime)[1].endswith(", and --precision fp32 took 191 s")
    assert "min" not in auto_precision(NATIVE_BF16, False, slow_bf16)[1]  # the demo model's size: not measured slow
    # fp32 taken for want of native bf16: bf16 is no alternative on this CPU, however soon it started
    slow_fp32 = dataclasses.replace(MET_BAR, cold_first_image_s={"fp32": 191.0, "bf16": 1.0})
    precision, note = auto_precision(NO_BF16, True, slow_fp32)
    assert precision == "fp32" and note.endswith("took 3.2 min (sd15 at 16x16 latents, 1 thread: BENCHMARKS.md)")
    assert "took 1 s" in auto_precision(NATIVE_BF16, True, dataclasses.replace(slow_fp32, worst_run_psnr_db=30.0))[1]
    assert "min" not in auto_precision(NATIVE_BF16, True, MET_BAR)[1]  # 25 s is not a slow start


def test_the_measurement_auto_reads_is_the_recorded_benchmark_result():
    measured = openvino_engine.BF16_MEASURED
    fidelity = json.loads((REPO / "benchmarks/results/cpu-openvino-bf16-fidelity.json").read_text())
    assert "avx512_bf16" in fidelity["machine"]["cpu_flags"] or "amx_bf16" in fidelity["machine"]["cpu_flags"]
    assert set(fidelity["models"]) == {"demo", "sd15"} and "adherence" in fidelity  # every run the bar asks for
    assert fidelity["worst_run"]["model"] == measured.worst_model
    assert fidelity["worst_run"]["psnr_db"] == pytest.approx(measured.worst_run_psnr_db, abs=0.05)
    assert fidelity["adherence"]["max_difference"] == pytest.approx(measured.adherence_difference, abs=1e-4)
    assert fidelity["meets_bar"] == measured.meets_bar
    cold_start = json.loads((REPO / "benchmarks/results/cpu-openvino-cold-start-sd15.json").read_text())
    assert cold_start["settings"]["threads"] == 1 and cold_start["settings"]["code"]["after"] == "this tree"
    medians = cold_start["first_image_median_s"]["after"]  # the engine as it is: an empty compile cache
    cold = {"fp32": medians["openvino fp32 cold"], "bf16": medians["openvino bf16 cold"],
            "onnxruntime": medians["onnxruntime none"]}
    assert cold == pytest.approx(measured.cold_first_image_s, abs=0.05)


def test_precision_auto_on_the_engine_takes_what_the_cpu_and_the_measurement_allow(exported, monkeypatch):
    monkeypatch.setattr(openvino_engine, "BF16_MEASURED", MET_BAR)
    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: NATIVE_BF16)
    engine = OpenVinoEngine(exported[1], precision="auto", verify=False)
    assert engine.precision == "bf16" and engine.compile_config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "took bf16" in engine.precision_choice and "min" not in engine.precision_choice  # a tiny model
    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: NO_BF16)
    engine = OpenVinoEngine(exported[1], precision="auto", verify=False)
    assert engine.precision == "fp32" and engine.compile_config["INFERENCE_PRECISION_HINT"] == "f32"
    assert "no native bf16" in engine.precision_choice
    assert OpenVinoEngine(exported[1], precision="fp32", verify=False).precision_choice is None


def test_engine_for_flags_gives_auto_to_openvino_only_and_refuses_an_explicit_precision_elsewhere(exported):
    from ldm_runtime.engines import EngineLoadError, engine_for_flags

    engine_dir, checkpoint = exported[1], exported[0]
    assert engine_for_flags(engine_dir, "auto", "cpu", "auto") == ("auto", {"precision": "auto"})  # picked on load
    assert engine_for_flags(engine_dir, "openvino", "cpu", "auto") == ("openvino", {"precision": "auto"})
    assert engine_for_flags(engine_dir, "onnxruntime", "cpu", "auto") == ("onnxruntime", {})
    assert engine_for_flags(checkpoint, "torch", "cpu", "auto", threads=1) == ("torch", {})
    assert engine_for_flags(engine_dir, "auto", "cpu", "bf16", 1) == ("openvino", {"precision": "bf16",
                                                                                   "intra_op_threads": 1})
    for precision in ("fp32", "bf16"):
        with pytest.raises(EngineLoadError, match=f"--precision {precision} applies to the openvino engine, not "
                                                  f"onnxruntime; expected --engine openvino or --precision auto"):
            engine_for_flags(engine_dir, "onnxruntime", "cpu", precision)


def test_load_engine_gives_precision_auto_to_openvino_and_leaves_other_engines_at_their_own(exported, monkeypatch):
    from ldm_runtime.engines import precision_note

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: NO_BF16)
    openvino = load_engine(exported[1], engine="auto", device="cpu", precision="auto", intra_op_threads=1)
    assert isinstance(openvino, OpenVinoEngine) and openvino.precision == "fp32"
    assert precision_note(openvino, "auto") == openvino.precision_choice
    assert "no native bf16" in openvino.precision_choice
    assert precision_note(openvino, "fp32") is None
    onnxruntime = load_engine(exported[1], engine="onnxruntime", precision="auto", intra_op_threads=1)
    assert isinstance(onnxruntime, OnnxRuntimeEngine) and precision_note(onnxruntime, "auto") is None


def test_ldm_sample_says_in_one_line_what_precision_auto_took_before_sampling(exported, tmp_path, capsys,
                                                                              monkeypatch):
    from ldm_runtime.sample import main

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: NO_BF16)
    base = ["--model", str(exported[1]), "a red circle", "--steps", "2", "--out", str(tmp_path / "image.png")]
    assert main(base + ["--engine", "openvino"]) == 0
    lines = capsys.readouterr().err.splitlines()
    said = [line for line in lines if "--precision auto" in line]
    assert said == ["ldm-sample: --precision auto took fp32 on the openvino engine: this CPU has no native bf16 "
                    "(OpenVINO reports WINOGRAD, FP32, INT8, BIN, EXPORT_IMPORT)"]
    assert lines.index(said[0]) < lines.index(next(line for line in lines if "wrote" in line))
    for other in (["--engine", "onnxruntime"], ["--engine", "openvino", "--precision", "fp32"]):
        assert main(base + other) == 0
        assert "--precision" not in capsys.readouterr().err  # onnxruntime keeps its own precision without a word


def test_graphs_with_weights_past_the_cache_limit_are_compiled_in_every_process_and_never_kept(
        exported, tmp_path, seed, monkeypatch):
    sizes = {name: sum((exported[1] / file).stat().st_size for file in graph["files"])
             for name, graph in json.loads((exported[1] / "manifest.json").read_text())["graphs"].items()}
    monkeypatch.setattr(openvino_engine, "CACHE_UP_TO_BYTES", sizes["unet"] - 1)  # the UNet is "large"
    clean = generate_from_cache(exported[1], None, seed)
    first = generate_from_cache(exported[1], tmp_path, seed)
    kept = sorted(json.loads(path.read_text())["graph"] for path in tmp_path.glob("*.json"))
    assert kept == sorted(name for name in ("text_encoder", "vae_decoder") if sizes[name] <= sizes["unet"] - 1)
    assert "unet" not in kept and kept  # the tiny model's text encoder and decoder are smaller than its UNet
    assert np.array_equal(first, clean) and np.array_equal(generate_from_cache(exported[1], tmp_path, seed), clean)


def test_ldm_serve_says_what_precision_auto_took_once_its_flags_are_good(exported, monkeypatch, capsys):
    from ldm_serve import cli, server

    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core: NO_BF16)
    logger = logging.getLogger("ldm_runtime")  # each build_app adds a handler writing to stderr: one per process
    handlers = list(logger.handlers)
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    base = ["--model", str(exported[1]), "--engine", "openvino", "--port", "0"]
    monkeypatch.setattr(logger, "handlers", list(handlers))
    with pytest.raises(server.ServeError, match="--max-batch is 999"):
        server.build_app(cli.build_parser().parse_args(base + ["--max-batch", "999"]))
    assert "--precision" not in capsys.readouterr().err  # a bad flag is the only line
    monkeypatch.setattr(logger, "handlers", list(handlers))
    server.build_app(cli.build_parser().parse_args(base))
    said = [line for line in capsys.readouterr().err.splitlines() if "--precision auto" in line]
    assert said == ["ldm-serve: INFO: --precision auto took fp32 on the openvino engine: this CPU has no native bf16 "
                    "(OpenVINO reports WINOGRAD, FP32, INT8, BIN, EXPORT_IMPORT)"]


def test_the_compile_cache_limit_lies_between_the_graphs_the_cache_measured_faster_and_slower_than_compiling():
    rows = [row for name in ("cpu-openvino-cold-start-demo.json", "cpu-openvino-cold-start-sd15.json")
            for probe in json.loads((REPO / "benchmarks/results" / name).read_text())["cache_probe"].values()
            for row in probe["table"]]
    faster = [row["weights_mb"] for row in rows if row["read_check_import_s"] < row["compile_s"]]
    slower = [row["weights_mb"] for row in rows if row["read_check_import_s"] >= row["compile_s"]]
    assert faster and slower
    limit_mb = openvino_engine.CACHE_UP_TO_BYTES / 2**20
    assert max(faster) <= limit_mb < min(slower), (sorted(faster), sorted(slower))
