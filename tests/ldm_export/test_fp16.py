"""The fp16 conversion keeps fp32 where half precision breaks, and the decoder's fp32 fallback is measured."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16

from ldm_export.fp16 import (
    DECODER_FP16_PEAK_LIMIT,
    convert_to_fp16,
    decoder_activation_peak,
    decoder_needs_fp32,
    sinusoid_argument_nodes,
)


def timestep_embedding_graph(dim: int = 64) -> onnx.ModelProto:
    """timesteps (B,) int64 -> [cos(t f), sin(t f)] (B, dim), beside an unrelated Relu branch."""
    half = dim // 2
    frequencies = np.exp(-math.log(10000.0) * np.arange(half) / half).astype(np.float32)[None, :]
    nodes = [
        helper.make_node("Cast", ["timesteps"], ["t_float"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["t_float", "axis"], ["t_column"], name="unsqueeze"),
        helper.make_node("Mul", ["t_column", "frequencies"], ["angles"], name="angles"),
        helper.make_node("Cos", ["angles"], ["cosines"], name="cos"),
        helper.make_node("Sin", ["angles"], ["sines"], name="sin"),
        helper.make_node("Concat", ["cosines", "sines"], ["embedding"], axis=1, name="concat"),
        helper.make_node("Relu", ["other"], ["other_out"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "timestep_embedding",
        [helper.make_tensor_value_info("timesteps", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", dim]),
         helper.make_tensor_value_info("other_out", TensorProto.FLOAT, ["B", 3])],
        initializer=[numpy_helper.from_array(frequencies, "frequencies"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def embedding_error(model: onnx.ModelProto) -> float:
    timesteps = np.arange(1000, dtype=np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    other = np.random.standard_normal((1000, 3)).astype(np.float16)
    feeds = {"timesteps": timesteps, "other": other if model.graph.input[1].type.tensor_type.elem_type == 10
             else other.astype(np.float32)}
    embedding = session.run(["embedding"], feeds)[0].astype(np.float64)
    half = embedding.shape[1] // 2
    angles = timesteps[:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)[None, :]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    return float(np.linalg.norm(embedding - expected) / np.linalg.norm(expected))


def test_sinusoid_argument_nodes_are_sin_cos_and_everything_feeding_them():
    assert sinusoid_argument_nodes(timestep_embedding_graph()) == ["angles", "cast", "cos", "sin", "unsqueeze"]


def test_fp32_island_keeps_the_timestep_embedding_accurate_where_plain_fp16_does_not():
    plain = convert_float_to_float16(timestep_embedding_graph(), keep_io_types=False)
    islanded = convert_to_fp16(timestep_embedding_graph(), keep_io_types=False)
    assert embedding_error(plain) > 1e-2  # t * f rounded to fp16: up to 0.5 rad off at t ~ 1000
    assert embedding_error(islanded) < 1e-3  # only the fp16 rounding of the result remains
    types = {v.name: v.type.tensor_type.elem_type for v in islanded.graph.output}
    assert types == {"embedding": TensorProto.FLOAT16, "other_out": TensorProto.FLOAT16}


def test_fp32_io_keeps_float_inputs_and_outputs_in_float32():
    converted = convert_to_fp16(timestep_embedding_graph(), keep_io_types=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*converted.graph.input, *converted.graph.output]}
    assert types == {"timesteps": TensorProto.INT64, "other": TensorProto.FLOAT, "embedding": TensorProto.FLOAT,
                     "other_out": TensorProto.FLOAT}
    onnx.checker.check_model(converted)


def test_decoder_activation_peak_sees_every_submodule():
    scale = float(np.random.uniform(100, 1000))
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    with torch.no_grad():
        decoder[0].weight.copy_(torch.eye(4) * scale)
        decoder[0].bias.zero_()
    latents = torch.tensor([[1.0, -2.0, 0.5, 0.25]])
    # the Linear's output peaks at 2 * scale, though the decoder's own output (tanh) stays within 1
    assert math.isclose(decoder_activation_peak(decoder, latents), 2 * scale, rel_tol=1e-6)


def test_decoder_stays_fp32_once_activations_near_the_fp16_range():
    assert not decoder_needs_fp32(DECODER_FP16_PEAK_LIMIT / 2)
    assert decoder_needs_fp32(DECODER_FP16_PEAK_LIMIT * 2)
    assert decoder_needs_fp32(math.inf) and decoder_needs_fp32(math.nan)


def test_a_graph_too_large_to_serialise_converts_to_a_type_consistent_fp16_graph(monkeypatch, rng):
    """Over 2 GB (SD 1.5's fp32 UNet) the types are inferred without the weights' bytes: the fp16 graph must load
    and compute what the graph converted the ordinary way computes, where an fp32 island (the timestep
    sinusoids) feeds fp16 weights."""
    import ldm_export.fp16

    model = timestep_embedding_graph()
    weight = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: past the bytes inference is given
    model.graph.node.append(helper.make_node("MatMul", ["embedding", "weight"], ["projected"], name="project"))
    model.graph.initializer.append(numpy_helper.from_array(weight, "weight"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("projected", TensorProto.FLOAT, ["B", 32]))
    ordinary = convert_to_fp16(model, keep_io_types=True)
    monkeypatch.setattr(ldm_export.fp16, "SERIALISABLE_WEIGHT_BYTES", 0)
    large = convert_to_fp16(model, keep_io_types=True)
    assert len(model.graph.initializer[-1].raw_data) == weight.nbytes  # the bytes are put back
    feeds = {"timesteps": rng.integers(0, 1000, 5), "other": rng.standard_normal((5, 3)).astype(np.float32)}
    outputs = [ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
               .run(["projected"], feeds)[0] for converted in (ordinary, large)]
    np.testing.assert_array_equal(outputs[1], outputs[0])
    half = 32
    angles = feeds["timesteps"][:, None] * np.exp(-math.log(10000.0) * np.arange(half) / half)[None, :]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1) @ weight
    assert np.abs(outputs[1] - expected).max() <= 2e-2 * np.abs(expected).max()
