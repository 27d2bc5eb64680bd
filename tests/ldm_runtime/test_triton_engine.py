"""The triton engine: the same images as the torch engine with every GroupNorm and attention in the Triton
kernels, batch buckets that make an image independent of its batch, and a one-line refusal on a machine
without a CUDA GPU. On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, as
scripts/test.sh sets), without CUDA graphs; on a GPU the same tests run compiled, with CUDA graphs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm_kernels.dispatch
from ldm_runtime.engines import load_engine
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from tests.ldm_export.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available() and not ldm_kernels.dispatch.kernels_interpreted()
RUNNABLE = ldm_kernels.dispatch.triton_available() and (CUDA or ldm_kernels.dispatch.kernels_interpreted())
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="needs a CUDA GPU, or TRITON_INTERPRET=1 before kernels "
                                                       "is imported")
# Whole sampling runs take minutes under Triton's interpreter (it re-patches triton.language on every
# kernel call); on the CPU the engine is checked call by call instead.
needs_compiled_triton = pytest.mark.skipif(not CUDA, reason="whole sampling runs need the compiled kernels (a CUDA GPU)")
REQUESTS = [GenerationRequest(prompt=prompt, seed=seed, steps=2, guidance_scale=4.0)
            for prompt, seed in (("a red circle", 1), ("a blue square on the left", 2))]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_triton"))


@pytest.fixture(scope="module")
def triton_engine(checkpoint_dir):
    from ldm_runtime.engines.triton_engine import TritonEngine

    return TritonEngine(checkpoint_dir, device=DEVICE, dtype=torch.float32, batch_buckets=(1, 2, 4))


@pytest.fixture(scope="module")
def torch_engine(checkpoint_dir):
    return TorchEngine(checkpoint_dir, device=DEVICE, kernels="reference", unet_chunk_size=None)


def _psnr_db(first: np.ndarray, second: np.ndarray) -> float:
    mse = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@needs_triton
def test_triton_engine_runs_every_group_norm_and_attention_in_triton_and_matches_torch(triton_engine, torch_engine,
                                                                                      monkeypatch):
    calls = {"group_norm": 0, "attention": 0}
    real_group_norm, real_attention = ldm_kernels.dispatch.group_norm_op, ldm_kernels.dispatch.attention_op

    def counting_group_norm(*args, **kwargs):
        calls["group_norm"] += 1
        return real_group_norm(*args, **kwargs)

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(ldm_kernels.dispatch, "group_norm_op", counting_group_norm)
    monkeypatch.setattr(ldm_kernels.dispatch, "attention_op", counting_attention)
    monkeypatch.setenv("LDM_KERNELS", "reference")  # the engine's own pin wins over the environment
    triton_engine.cuda_graphs, saved = False, triton_engine.cuda_graphs  # count eager calls, not replays
    try:
        latents = torch.randn(1, 4, 8, 8, device=triton_engine.device)
        context, mask = triton_engine.encode_text(["a red circle"])
        prediction = triton_engine.unet(latents, np.array([500]), context, mask)
        images = triton_engine.decode(latents)
    finally:
        triton_engine.cuda_graphs = saved
    unet_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in triton_engine.unet_model.modules())
    decoder_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in triton_engine.autoencoder.decoder.modules())
    assert calls["group_norm"] == unet_norms + decoder_norms
    assert calls["attention"] > 0
    expected_context, expected_mask = torch_engine.encode_text(["a red circle"])
    torch.testing.assert_close(context, expected_context)
    torch.testing.assert_close(prediction, torch_engine.unet(latents, np.array([500]), expected_context, expected_mask),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images, torch_engine.decode(latents), rtol=1e-4, atol=1e-4)


@needs_compiled_triton
def test_triton_engine_images_match_the_torch_engine(triton_engine, torch_engine):
    expected = Pipeline(torch_engine).generate(REQUESTS)
    produced = Pipeline(triton_engine).generate(REQUESTS)
    for want, got in zip(expected, produced):
        assert got.shape == want.shape and got.dtype == np.uint8
        assert _psnr_db(want, got) >= 40.0


@needs_compiled_triton
def test_triton_engine_image_does_not_depend_on_its_bucket_mates(triton_engine):
    pipeline = Pipeline(triton_engine)
    together = pipeline.generate(REQUESTS, batch_size=2)  # guided: 4 UNet rows, the bucket of 4
    alone = [pipeline.generate([request], batch_size=1)[0] for request in REQUESTS]  # the bucket of 2
    for a, b in zip(together, alone):
        assert _psnr_db(a, b) >= 40.0
    # within one bucket the padding rows are copies, so the same request twice in a batch gives equal images
    twice = pipeline.generate([REQUESTS[0], REQUESTS[0]], batch_size=2)
    assert np.array_equal(twice[0], twice[1])


@needs_triton
def test_triton_engine_splits_batches_larger_than_the_largest_bucket(triton_engine, monkeypatch):
    monkeypatch.setattr(triton_engine, "batch_buckets", (1, 2))  # 3 rows: a full bucket of 2, then 1 row
    latents = torch.randn(3, 4, 8, 8, device=triton_engine.device)
    context, mask = triton_engine.encode_text(["a red circle", "a blue square", "two stars"])
    timesteps = np.array([100, 500, 900])
    whole = triton_engine.unet(latents, timesteps, context, mask)
    rows = torch.cat([triton_engine.unet(latents[i:i + 1], timesteps[i:i + 1], context[i:i + 1], mask[i:i + 1])
                      for i in range(3)])
    assert whole.shape == latents.shape
    torch.testing.assert_close(whole, rows, rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_engine_refuses_bfloat16_under_the_interpreter_in_one_sentence(checkpoint_dir):
    if CUDA:
        pytest.skip("the compiled kernels take bfloat16")
    from ldm_runtime.engines.triton_engine import TritonEngine

    with pytest.raises(ValueError, match="bfloat16 needs the compiled kernels on a CUDA GPU"):
        TritonEngine(checkpoint_dir, device="cpu", dtype=torch.bfloat16)


def test_triton_engine_bucket_is_the_smallest_that_holds_the_rows():
    from ldm_runtime.engines.triton_engine import TritonEngine

    engine = TritonEngine.__new__(TritonEngine)
    engine.batch_buckets = (1, 2, 4, 8)
    assert [engine.bucket_for(rows) for rows in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_triton_engine_refuses_a_machine_without_a_gpu_in_one_line(checkpoint_dir, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LDM_KERNELS")}
    result = subprocess.run(
        [sys.executable, "-m", "ldm_runtime.sample", "--model", str(checkpoint_dir), "--engine", "triton",
         "--out", str(tmp_path / "out"), "a red circle"],
        capture_output=True, text=True, cwd=REPO, env=environment, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "the triton engine needs a CUDA GPU and none is visible" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_triton_engine_captures_one_graph_per_bucket_and_latent_shape(triton_engine):
    latents = torch.randn(3, 4, 8, 8, device="cuda")
    context, mask = triton_engine.encode_text(["a red circle"] * 3)
    first = triton_engine.unet(latents, np.array([10, 20, 30]), context, mask)
    second = triton_engine.unet(latents, np.array([10, 20, 30]), context, mask)
    assert torch.equal(first, second)
    assert [shape[0] for shape in triton_engine.captured_shapes] == [4]


def test_load_engine_names_the_triton_engine_for_an_engine_dir(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    from ldm_runtime.engines import EngineLoadError

    with pytest.raises(EngineLoadError, match="the triton engine runs a checkpoint dir written by ldm-train"):
        load_engine(tmp_path, engine="triton")
