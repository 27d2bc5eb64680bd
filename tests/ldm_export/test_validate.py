"""The validation's measures: relative error, PSNR, the shape cases, and the report's verdict."""

import math

import numpy as np

from ldm_export.validate import GraphCheck, SampleCheck, ValidationReport, psnr_db, relative_error, shape_cases
from ldm_runtime.manifest import DimRange


def test_relative_error_is_the_l2_norm_of_the_difference_over_the_l2_norm_of_the_reference(rng):
    expected = rng.standard_normal((3, 4, 5))
    direction = rng.standard_normal(expected.shape)
    actual = expected + 1e-3 * np.linalg.norm(expected) * direction / np.linalg.norm(direction)
    assert math.isclose(relative_error(actual, expected), 1e-3, rel_tol=1e-9)


def test_psnr_of_images_one_level_apart_everywhere_is_48_db(rng):
    expected = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    actual = [image + 1 for image in expected]
    assert math.isclose(psnr_db(actual, expected), 20 * math.log10(255), rel_tol=1e-12)
    assert psnr_db(expected, expected) == 100.0


def test_shape_cases_are_the_opt_sizes_and_the_ranges_edges():
    latent = DimRange(8, 8, 16, 2)
    image = DimRange(32, 32, 64, 8)
    dims = {"batch": DimRange(1, 2, 8), "image_height": image, "image_width": image,
            "latent_height": latent, "latent_width": latent}
    opt, edge = shape_cases(dims)
    assert opt == {"batch": 2, "image_height": 32, "image_width": 32, "latent_height": 8, "latent_width": 8}
    assert edge == {"batch": 1, "image_height": 64, "image_width": 32, "latent_height": 16, "latent_width": 8}


def test_report_fails_on_any_check_over_its_limit_and_names_it():
    sample = SampleCheck(psnr_db=52.0, limit_db=40.0, steps=25, seeds=[1], prompts=["a"], guidance_scale=5.0,
                         image_size=32)
    good = GraphCheck("unet", "fp32", 2e-6, 1e-4)
    report = ValidationReport(seed=1, graphs=[good, GraphCheck("vae_decoder", "fp32", 3e-4, 1e-4)], sample=sample)
    assert not report.passed and report.failures() == ["vae_decoder relative error 3.0e-04 > 1.0e-04"]
    assert ValidationReport(seed=1, graphs=[good], sample=sample).passed
    assert not ValidationReport(seed=1, graphs=[GraphCheck("unet", "fp32", math.nan, 1e-4)], sample=None).passed
    assert "FAIL" in report.table() and "52.0 dB" in report.table()


def test_the_sample_check_runs_eager_on_the_networks_the_export_loaded(fp32_export, tiny_checkpoint, monkeypatch):
    # At SD 1.5's size a second copy of the weights beside the export's and the new graphs' sessions does not fit
    # in 24 GiB, so the eager reference must be built from the networks already in memory, not read again.
    import ldm_runtime.engines.torch_engine as torch_engine
    from ldm_export.validate import check_sample
    from ldm_runtime.checkpoint import load_checkpoint
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    modules = load_checkpoint(tiny_checkpoint)

    def read_again(folder):
        raise AssertionError(f"the sample check read {folder} again")

    monkeypatch.setattr(torch_engine, "load_checkpoint", read_again)
    engine = OnnxRuntimeEngine(fp32_export[1], device="cpu")
    check = check_sample(engine, modules, "fp32", seed=3)
    assert check.passed and check.psnr_db >= 40 and check.steps == 25
