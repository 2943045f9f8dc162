"""Graph passes on the int4 decoder that change its speed, never its numbers.

    count = fuse_shared_input_matmuls(proto)      # in place; returns how many MatMulNBits nodes were merged away
    count = fuse_fast_gelu(proto)                 # in place; returns how many FastGelu nodes it made

Phi-2 runs attention and MLP in parallel from one LayerNorm, so q_proj, k_proj, v_proj and fc1 all read the same
[B, T, 2560] tensor: four MatMulNBits per layer, each streaming the activations and starting its own thread-pool work.
MatMulNBits stores its weight column-major ([N, blocks, block_size/2] bytes, scales [N, blocks], zero points
[N, ceil(blocks/2)]), so weights that share K, bits and block size concatenate along N into one node with the same
integers, scales and zero points; a Split on the last axis gives back each original output, and the bias Adds that
followed them stay as they were. Each output column is computed exactly as before (same blocks, same accuracy level),
so the fused graph's outputs equal the unfused graph's.

Phi-2's MLP uses the tanh approximation of GELU, which the trace writes as eight elementwise nodes (Mul, Pow, Add,
Tanh, ...); onnxruntime's transformer optimizer recognises the pattern and replaces it with one FastGelu kernel of the
same formula (equal within float rounding).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _group_key(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple | None:
    """What must match for two MatMulNBits to share one node (input, K, bits, block, accuracy level, zero points or not,
    scale type); None for a node this pass leaves alone."""
    inputs = list(node.input)
    # A, B, scales [, zero_points]: no g_idx or bias inputs, every weight tensor a constant
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or not 3 <= len(inputs) <= 4:
        return None
    if not all(name in inits for name in inputs[1:] if name):
        return None
    has_zero_points = len(inputs) == 4 and bool(inputs[3])
    return (inputs[0], _attr(node, "K"), _attr(node, "bits"), _attr(node, "block_size"),
            _attr(node, "accuracy_level"), has_zero_points, inits[inputs[2]].data_type)  # fmt: skip


def _concat(tensors: list[np.ndarray], rows: list[int]) -> np.ndarray:
    """Flat per-column tensors ([N * per_column]) of several nodes, concatenated along N."""
    return np.concatenate([t.reshape(n, -1) for t, n in zip(tensors, rows)], axis=0)


def fuse_shared_input_matmuls(proto: onnx.ModelProto) -> int:
    """Merge MatMulNBits nodes that read the same input into one MatMulNBits + Split; returns the nodes removed."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        key = _group_key(node, inits)
        if key is not None:
            groups[key].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(first node of a group) -> its replacement nodes
    dropped: set[int] = set()
    names: set[str] = set()
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        rows = [_attr(n, "N") for n in nodes]
        arrays = [[numpy_helper.to_array(inits[name]) for name in list(n.input)[1:]] for n in nodes]
        weight = _concat([a[0] for a in arrays], rows)  # [sum N, blocks, block_size * bits / 8]
        fused = [numpy_helper.from_array(weight.reshape(sum(rows), *arrays[0][0].shape[1:]))]
        for i in range(1, len(arrays[0])):  # scales, then zero points: flat [N * per_column] in the fused node too
            fused.append(numpy_helper.from_array(_concat([a[i] for a in arrays], rows).reshape(-1)))
        base = _common_name(nodes)
        base = base if base not in names else f"{base}_{len(names)}"
        names.add(base)
        for tensor, suffix in zip(fused, (".qweight", ".scales", ".qzeros")):
            tensor.name = base + suffix
        graph.initializer.extend(fused)
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute} | {"N": sum(rows)}
        out = f"{base}/fused_output_0"
        matmul = helper.make_node("MatMulNBits", [key[0], *(t.name for t in fused)], [out], name=f"{base}/MatMulNBits",
                                  domain="com.microsoft", **attrs)  # fmt: skip
        split_sizes = numpy_helper.from_array(np.array(rows, np.int64), f"{base}/split_sizes")
        graph.initializer.append(split_sizes)
        split = helper.make_node("Split", [out, split_sizes.name], [n.output[0] for n in nodes], name=f"{base}/Split",
                                 axis=-1)  # fmt: skip
        replaced[id(nodes[0])] = [matmul, split]
        dropped.update(id(n) for n in nodes[1:])
        for name in {name for n in nodes for name in list(n.input)[1:] if name}:
            graph.initializer.remove(inits[name])
        logger.debug("fused %d MatMulNBits into %s (N = %s)", len(nodes), base, "+".join(map(str, rows)))
    if not replaced:
        return 0
    new_nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        new_nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return len(dropped)


def _common_name(nodes: list[onnx.NodeProto]) -> str:
    """The node names' common '/'-separated prefix plus 'fused' ('/language_model/layers.0/fused')."""
    parts = [n.name.split("/") for n in nodes]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return "/".join(common) + "/fused" if common and any(common) else nodes[0].name + "/fused"


def fuse_fast_gelu(proto: onnx.ModelProto) -> int:
    """Replace the traced tanh-GELU subgraphs with com.microsoft FastGelu; returns how many it made."""
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(proto)  # edits `proto` in place
    FusionFastGelu(model).apply()
    model.prune_graph(allow_remove_graph_inputs=False)  # the replaced elementwise nodes; the I/O is the contract
    return sum(node.op_type == "FastGelu" for node in proto.graph.node)
