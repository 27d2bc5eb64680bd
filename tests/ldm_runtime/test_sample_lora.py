"""``ldm-sample --lora FILE[:SCALE]``: each file loaded as an adapter named by its stem and applied to every prompt,
giving the image the pipeline gives a request naming the same adapters (``GenerationRequest.lora``, as ldm-serve's
requests do); and its mistakes, one line and exit status 2."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import base_seed
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint, shared_tiny_engine
from tests.ldm_runtime.test_adapters_per_request import write_kohya_adapter

PROMPTS = ("a red square", "a blue circle")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:sample-lora:{name}".encode()).digest()[:4], "little")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter_files(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample-adapters")
    return {"ink": write_kohya_adapter(checkpoint, root / "ink.safetensors", _seed("ink"), rank=4),
            "fog": write_kohya_adapter(checkpoint, root / "fog.safetensors", _seed("fog"), rank=2, locon=False)}


def _sampled(checkpoint, out, seed, *flags) -> list[np.ndarray]:
    code = sample.main([*PROMPTS, "--model", str(checkpoint), "--out", str(out), "--seed", str(seed), "--steps", "3",
                        "--engine", "torch", "--device", "cpu", *flags])
    assert code == 0
    return [np.asarray(Image.open(path)) for path in sorted(out.glob(sample.IMAGE_NAME_GLOB))]


def test_ldm_sample_lora_gives_the_pipelines_image_for_a_request_naming_the_adapters(checkpoint, adapter_files,
                                                                                     tmp_path, seed):
    from ldm_runtime.engines.torch_engine import TorchEngine

    images = _sampled(checkpoint, tmp_path / "lora", seed, "--lora", f"{adapter_files['ink']}:0.7",
                      "--lora", str(adapter_files["fog"]))
    pipeline = Pipeline(TorchEngine(checkpoint, device="cpu", adapters=adapter_files))
    requests = [pipeline.resolve(GenerationRequest(prompt=prompt, seed=seed + index, steps=3,
                                                   lora=(("ink", 0.7), ("fog", 1.0))))
                for index, prompt in enumerate(PROMPTS)]
    for image, request in zip(images, requests):
        (expected,) = pipeline.generate([request])
        assert np.array_equal(image, expected), request.prompt
    plain = _sampled(checkpoint, tmp_path / "plain", seed)
    assert max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(images, plain)) > 16


@pytest.mark.parametrize("flags, message", [
    (["--lora", "{ink}:strong"], "argument --lora: '{ink}:strong' is not FILE[:SCALE]"),
    (["--lora", "{ink}:11"], "argument --lora: the scale of '{ink}:11' is 11; expected a number from -10 to 10"),
    (["--lora", "{ink}", "--lora", "{other_ink}"], "are both named 'ink'"),
    (["--lora", "{spaced}"], "its file name 'my style' names the adapter"),
    (["--lora", "{missing}"], "--lora: cannot read {missing}"),
    (["--lora", "{ink}"] * 5, "--lora is given 5 times; expected at most 4 adapters"),
])
def test_bad_lora_flags_exit_2_with_one_line(checkpoint, adapter_files, tmp_path, capsys, flags, message):
    other = tmp_path / "other"
    other.mkdir()
    values = {"ink": adapter_files["ink"], "other_ink": other / "ink.safetensors",
              "spaced": tmp_path / "my style.safetensors", "missing": tmp_path / "missing.safetensors"}
    for name in ("other_ink", "spaced"):
        values[name].write_bytes(adapter_files["ink"].read_bytes())
    flags = [flag.format(**values) for flag in flags]
    code = sample.main(["a red square", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--engine",
                        "torch", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ldm-sample: error: ") and err.count("\n") == 1, err
    assert message.format(**values) in err, err
    assert not (tmp_path / "out").exists()


def test_lora_on_an_engine_without_per_request_adapters_says_to_fuse_it(adapter_files, tmp_path, capsys,
                                                                         tmp_path_factory):
    _, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    code = sample.main(["a red square", "--model", str(engine_dir), "--out", str(tmp_path / "out"), "--engine",
                        "onnxruntime", "--lora", str(adapter_files["fog"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ldm-sample: error: --lora: adapters fog cannot be served: the onnxruntime engine"), err
    assert "no LoRA slots" in err and "fused with ldm-import --lora" in err, err
