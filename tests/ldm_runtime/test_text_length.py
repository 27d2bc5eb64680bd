"""A model that masks padding is exported with its text encoder's length free (the ``text_length`` axis), and the
onnxruntime engine encodes each prompt at its token count rounded up to ``TEXT_LENGTH_STEP``: the rows the UNet
attends to are those of an encoding at ``max_length`` (and eager PyTorch's), a prompt's row does not depend on
the prompts beside it, and an engine dir whose text encoder takes ``max_length`` only still works."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest

from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.files import sha256_file
from ldm_runtime.manifest import TEXT_LENGTH, TEXT_LENGTH_STEP, EngineDirError, load_manifest
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG

MAX_LENGTH = 24
# token counts, special tokens included: with MiniLM's tokenizer 2, 5, 15 and over 24 (truncated); with the tiny
# CLIP's, whose words are few and the rest spelt letter by letter, 2, 5, 36 and over 77
PROMPTS = ["", "a red circle",
           "a small red circle at the top left of a big blue square",
           "two blue squares on a green background in the top left corner of the image, and a yellow star beside them "
           "with a purple triangle under the red circle at the bottom right of a big blue square"]


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module", params=["scratch", "clip"])
def exported(request, tmp_path_factory):
    """(checkpoint, engine dir, ldm-export's output) of a tiny model that masks padding, exported at fp32 with
    validation on: the tiny preset with a BERT-like text encoder of ``MAX_LENGTH`` tokens trained from scratch, or
    the SD 1.x-like tiny Stable Diffusion brought in by ldm-import (CLIP, 77 tokens) with its padding masked."""
    from ldm_export.cli import main

    folder = tmp_path_factory.mktemp(f"text-length-{request.param}")
    checkpoint, engine_dir = folder / "checkpoint", folder / "engine"
    if request.param == "scratch":
        from ldm_train.checkpoint import write_random_checkpoint

        text = dataclasses.replace(TINY_CONFIG.text_encoder, max_length=MAX_LENGTH)
        write_random_checkpoint(checkpoint, dataclasses.replace(TINY_CONFIG, text_encoder=text), seed=0)
    else:
        from ldm_export.sd_import import import_source
        from tests.ldm_export.tiny_sd import SD1_LIKE, write_diffusers_folder

        import_source(write_diffusers_folder(SD1_LIKE, folder / "diffusers", seed=0), checkpoint)
        description = json.loads((checkpoint / "model.json").read_text())
        description["text_encoder"]["mask_padding"] = True
        (checkpoint / "model.json").write_text(json.dumps(description))
        state = json.loads((checkpoint / "train_state.json").read_text())
        state["files"]["model.json"] = sha256_file(checkpoint / "model.json")
        (checkpoint / "train_state.json").write_text(json.dumps(state))
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main([str(checkpoint), "--out", str(engine_dir), "--engine", "fp32"])
    assert code == 0, output.getvalue()
    return checkpoint, engine_dir, output.getvalue()


@pytest.fixture(scope="module")
def engine(exported):
    return OnnxRuntimeEngine(exported[1], intra_op_threads=1)


def recorded_lengths(engine, monkeypatch) -> list[tuple[int, int]]:
    """(rows, length) of every text encoder call ``engine`` makes from now on."""
    calls, run = [], engine.run

    def recording(graph, feeds):
        if graph == "text_encoder":
            calls.append(feeds["input_ids"].shape)
        return run(graph, feeds)

    monkeypatch.setattr(engine, "run", recording)
    return calls


def full_length(engine, prompts):
    """The prompts encoded in one call at ``max_length``, as an engine dir without the axis would."""
    input_ids, attention_mask = engine.tokenize(prompts)
    return engine.run("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})[0], attention_mask


def test_the_text_encoder_takes_any_length_and_the_unet_max_length(exported):
    manifest = load_manifest(exported[1])
    allowed, longest = manifest.dims[TEXT_LENGTH], manifest.model.text_max_length
    assert (allowed.min, allowed.max) == (TEXT_LENGTH_STEP, longest)
    text = manifest.graphs["text_encoder"]
    assert [spec.shape[:2] for spec in (*text.inputs, *text.outputs)] == [("batch", TEXT_LENGTH)] * 3
    context = {spec.name: spec.shape for spec in manifest.graphs["unet"].inputs}
    assert context["context"][1] == context["context_mask"][1] == longest
    # validation ran the graph at the shortest length too
    assert f"L{TEXT_LENGTH_STEP}" in exported[2] and f"L{longest}" in exported[2], exported[2]
    assert [manifest.text_length(tokens) for tokens in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert manifest.text_length(longest - 1) == manifest.text_length(longest) == longest


def test_each_prompt_is_encoded_at_its_own_length(engine, monkeypatch):
    calls = recorded_lengths(engine, monkeypatch)
    context, mask = engine.encode_text(PROMPTS)
    tokens = mask.sum(axis=1)
    lengths = [engine.manifest.text_length(int(count)) for count in tokens]
    assert len(set(lengths)) >= 3 and lengths[-1] == engine.manifest.model.text_max_length, (tokens, lengths)
    assert sorted(length for _, length in calls) == sorted(set(lengths))
    expected, full_mask = full_length(engine, PROMPTS)
    assert np.array_equal(mask, full_mask.astype(bool))
    assert relative_error(context[mask], expected[mask]) < 1e-6
    for row, count in enumerate(tokens):  # past its own length a row is zeros, which the UNet never attends to
        assert not context[row, engine.manifest.text_length(int(count)):].any()


def test_a_prompt_s_row_does_not_depend_on_the_prompts_beside_it(engine):
    together = engine.encode_text(PROMPTS)[0]
    alone = np.concatenate([engine.encode_text([prompt])[0] for prompt in PROMPTS])
    assert np.array_equal(together, alone)
    assert np.array_equal(engine.encode_text(PROMPTS[::-1])[0], together[::-1])


def test_the_attended_rows_are_eager_pytorch_s(exported, engine):
    from ldm_runtime.engines.torch_engine import TorchEngine

    eager = TorchEngine(exported[0], device="cpu")
    expected, expected_mask = (np.asarray(value) for value in eager.encode_text(PROMPTS))
    context, mask = engine.encode_text(PROMPTS)
    assert np.array_equal(mask, expected_mask)
    assert relative_error(context[mask], expected[mask]) < 1e-5


def test_openvino_encodes_at_max_length_with_the_same_rows(exported, engine, monkeypatch):
    pytest.importorskip("openvino")  # the dev extra installs it
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine

    openvino = OpenVinoEngine(exported[1], intra_op_threads=1, cache_dir=None)
    calls = recorded_lengths(openvino, monkeypatch)
    context, mask = openvino.encode_text(PROMPTS)
    assert calls == [(len(PROMPTS), engine.manifest.model.text_max_length)]
    expected, expected_mask = engine.encode_text(PROMPTS)
    assert np.array_equal(mask, expected_mask)
    assert relative_error(context[mask], expected[mask]) < 1e-5


def test_an_engine_dir_whose_text_encoder_takes_max_length_only_encodes_at_it(exported, engine, tmp_path,
                                                                               monkeypatch):
    fixed = tmp_path / "fixed"
    shutil.copytree(exported[1], fixed)
    manifest = json.loads((fixed / "manifest.json").read_text())
    del manifest["dims"][TEXT_LENGTH]
    for spec in (*manifest["graphs"]["text_encoder"]["inputs"], *manifest["graphs"]["text_encoder"]["outputs"]):
        spec["shape"][1] = manifest["model"]["text_max_length"]
    (fixed / "manifest.json").write_text(json.dumps(manifest))
    old = OnnxRuntimeEngine(fixed, intra_op_threads=1)
    longest = old.manifest.model.text_max_length
    assert old.manifest.text_length(3) == longest
    calls = recorded_lengths(old, monkeypatch)
    context, mask = old.encode_text(PROMPTS)
    assert calls == [(len(PROMPTS), longest)]
    expected, expected_mask = engine.encode_text(PROMPTS)
    assert np.array_equal(mask, expected_mask)
    assert relative_error(context[mask], expected[mask]) < 1e-6


def test_a_text_length_axis_without_masked_padding_is_refused(exported, tmp_path):
    damaged = tmp_path / "unmasked"
    shutil.copytree(exported[1], damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["model"]["mask_padding"] = False
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineDirError, match=rf"dims.text_length is 8..{manifest['model']['text_max_length']} with "
                                             r"model.mask_padding false; expected it only where padding is masked"):
        load_manifest(damaged)
