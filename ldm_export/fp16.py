"""fp16 graphs from the fp32 ones, with fp32 islands where half precision breaks.

The conversion is onnxruntime's float16 converter (``onnxruntime.transformers.float16``) run on the exported
fp32 graph: every float tensor becomes fp16 except the inputs and outputs of the ops and nodes below, which
keep fp32 behind Cast nodes.

- GroupNorm (exported as InstanceNormalization on a (B, G, -1) view), LayerNormalization and
  GroupNormalization: their mean and variance sum up to h*w*C/G squares; in fp16 that sum overflows 65504
  once activations reach a few hundred, and its rounding error grows with the count.
- Softmax: exp of the attention logits overflows fp16 past 11, and the row sums lose the small weights.
- With ``upcast_attention`` (Stable Diffusion 2.1), every attention from the scaled q and k to the product with
  v: its fp16 scores overflow on those weights and give black images.
- The timestep embedding's sinusoid arguments (the ancestors of every Sin and Cos: t * frequency): fp16
  holds 999 * 0.75 only to 0.5, so the high-frequency sines would be noise (tests/ldm_export/test_fp16.py).

The converter rounds every island's output to fp16 even where the next node is fp32 too (t * f -> Sin);
those round trips are removed, or the island would be fp32 in name only.

The VAE decoder may stay entirely fp32 (``decoder_needs_fp32``): SD-style decoders reach activations past the
fp16 range on real images; the decision is measured on each checkpoint and recorded in the manifest.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")
SINUSOID_OPS = ("Sin", "Cos")
# Activations above this keep the decoder in fp32: a 4x margin below fp16's largest finite value (65504),
# since a convolution's fp16 accumulation can exceed its output.
DECODER_FP16_PEAK_LIMIT = 16384.0
# Weights past this do not serialise in one protobuf message (2 GiB), with room left for the graph itself
SERIALISABLE_WEIGHT_BYTES = 2**31 - 2**26


def sinusoid_argument_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of every Sin / Cos node and all the nodes that feed them (the timestep embedding's arguments)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    kept: dict[str, onnx.NodeProto] = {}
    pending = [node for node in model.graph.node if node.op_type in SINUSOID_OPS]
    while pending:
        node = pending.pop()
        if node.name in kept:
            continue
        kept[node.name] = node
        pending.extend(producers[name] for name in node.input if name in producers)
    return sorted(kept)


def attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of every attention, from the scaling of q and k to the product with v: the score
    MatMul and what lies between it and its Softmax (mask bias), the Muls that scale its inputs, and the NaN
    guard and MatMul after the Softmax. Kept fp32 for models that need fp32 attention (``upcast_attention``)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept: set[str] = set()
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        kept.add(softmax.name)
        node = producers.get(softmax.input[0])
        while node is not None and node.op_type in ("Add", "Where", "Mul", "Div", "MatMul"):
            kept.add(node.name)
            if node.op_type == "MatMul":
                kept.update(producers[name].name for name in node.input
                            if name in producers and producers[name].op_type in ("Mul", "Div"))
                break
            node = producers.get(node.input[1] if node.op_type == "Where" else node.input[0])
        pending = list(consumers.get(softmax.output[0], []))
        while pending:
            node = pending.pop()
            if node.op_type not in ("IsNaN", "Where", "MatMul") or node.name in kept:
                continue
            kept.add(node.name)
            if node.op_type != "MatMul":
                pending.extend(consumers.get(node.output[0], []))
    return sorted(kept)


def _name_every_node(model: onnx.ModelProto) -> None:
    """The converter blocks nodes by name: give unnamed nodes unique ones."""
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def convert_to_fp16(model: onnx.ModelProto, keep_io_types: bool, fp32_attention: bool = False) -> onnx.ModelProto:
    """An fp16 copy of fp32 ``model`` with the fp32 islands above. ``keep_io_types``: float inputs and
    outputs stay fp32 (a Cast at each edge) instead of becoming fp16. ``fp32_attention``: every attention
    (``attention_nodes``) computes in fp32 too, as Stable Diffusion 2.1 needs (``upcast_attention``)."""
    # The converter edits in place. CopyFrom, not a round trip through bytes: protobuf cannot serialise a graph
    # over 2 GB (SD 1.5's fp32 UNet is 3.4 GB), and the copy need not be serialised at all.
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    model = copied
    _name_every_node(model)
    # The exporter's fp32 value_info would contradict the converted types; the converter infers them anew.
    del model.graph.value_info[:]
    # onnx's shape inference serialises the model, which a graph over the protobuf limit cannot be: such a graph's
    # types are inferred here without its weights' bytes, and the converter reads them from value_info
    too_large = sum(len(t.raw_data) for t in model.graph.initializer) > SERIALISABLE_WEIGHT_BYTES
    if too_large:
        _infer_types_without_weight_bytes(model)
    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
        node_block_list=sinusoid_argument_nodes(model) + (attention_nodes(model) if fp32_attention else []),
        disable_shape_infer=too_large,
    )
    _drop_fp16_round_trips(converted.graph)
    _sort_nodes_topologically(converted.graph)
    return converted


def _infer_types_without_weight_bytes(model: onnx.ModelProto, keep_bytes: int = 1024) -> None:
    """Fill ``model.graph.value_info`` by onnx's shape inference, run while every initializer over ``keep_bytes``
    holds no bytes (inference reads an initializer's type and shape; only small ones, such as Reshape targets,
    are read as values), so that a model over 2 GB serialises for it; the bytes are put back after."""
    moved = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > keep_bytes:
            moved[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in moved:
                tensor.raw_data = moved.pop(tensor.name)
    model.graph.value_info.extend(inferred.graph.value_info)


def _drop_fp16_round_trips(graph: onnx.GraphProto) -> None:
    """The converter casts every fp32 island's output to fp16, and back to fp32 for the next fp32 node; between
    two kept nodes (t * f -> Sin) that round trip would throw the island's precision away. Consumers of such a
    Cast(fp16 -> fp32) read the original fp32 tensor instead; Casts left without consumers go."""
    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.value_info]}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    casts_to = {node.output[0]: _cast_target(node) for node in graph.node if node.op_type == "Cast"}
    types.update(casts_to)
    producers = {output: node for node in graph.node for output in node.output}
    graph_outputs = {value.name for value in graph.output}
    original = {}
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if (source is not None and source.op_type == "Cast" and _cast_target(node) == float32
                and _cast_target(source) == float16 and types.get(source.input[0]) == float32
                and node.output[0] not in graph_outputs):
            original[node.output[0]] = source.input[0]
    for node in graph.node:
        node.input[:] = [original.get(name, name) for name in node.input]
    kept = [node for node in graph.node if node.output[0] not in original]
    while True:  # Casts whose output nobody reads any more
        consumed = {name for node in kept for name in node.input} | graph_outputs
        unused = {id(node) for node in kept if node.op_type == "Cast" and node.output[0] not in consumed}
        if not unused:
            break
        kept = [node for node in kept if id(node) not in unused]
    produced = {output for node in kept for output in node.output}
    value_info = [value for value in graph.value_info if value.name in produced]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _cast_target(node: onnx.NodeProto) -> int:
    return next(attribute.i for attribute in node.attribute if attribute.name == "to")


def _sort_nodes_topologically(graph: onnx.GraphProto) -> None:
    """The converter appends its Cast nodes after their consumers; ONNX (and TensorRT's parser) want every
    node after the producers of its inputs."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        assert ready, f"the graph has a cycle or an input nobody produces: {pending[0].name}"
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
    del graph.node[:]
    graph.node.extend(ordered)


@torch.no_grad()
def decoder_activation_peak(decoder: torch.nn.Module, latents: torch.Tensor) -> float:
    """The largest |value| any submodule of ``decoder`` outputs on ``latents`` (eager fp32)."""
    peak = 0.0

    def record(_module, _inputs, output) -> None:
        nonlocal peak
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            peak = max(peak, float(output.detach().abs().max()))

    handles = [module.register_forward_hook(record) for module in decoder.modules()]
    try:
        decoder(latents)
    finally:
        for handle in handles:
            handle.remove()
    return peak


def decoder_needs_fp32(peak: float) -> bool:
    """Whether a decoder whose activations reach ``peak`` must stay fp32 in an fp16 engine."""
    return not peak < DECODER_FP16_PEAK_LIMIT
