"""Logits of the last position only: the decoder graph computes lm_head for one row per sequence, not T.

    set_logits_positions(folder / "decoder.onnx", "last")     # in place; True if it changed the graph

A generator needs the next-token logits only, which are the last position's (the runtime and onnxruntime-genai left-pad
batches, so the last position is a real token in every row). lm_head is the largest MatMul of the decoder (51,200 x
2,560 for Phi-2): computing it for every prompt position costs prefill as much as 1.6 of Phi-2's 32 layers, and far
more in the 2-layer graphs the benchmarks use. onnxruntime-genai's builder offers the same cut (`prune_lm_head`), so
genai accepts logits of shape [B, 1, V] at prefill.

The pass inserts Slice(axis 1, last) between the final LayerNorm and lm_head's MatMul (or MatMulNBits):
hidden [B, T, D] -> [B, 1, D], logits [B, 1, V]. The row it keeps is computed from the same numbers (an int4 lm_head may
take MatMulNBits' one-row kernel, equal within float rounding). The manifest records the logits' shape
(decoder.logits_positions), so the runtime knows which graph it has; older folders with [B, T, V] logits keep working.
Whoever needs every position's logits (teacher-forced perplexity in export.quality) feeds the sequence one token at a
time against the KV cache instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

LOGITS = "logits"
SLICE_NAME = "/language_model/lm_head/last_position/Slice"
# lm_head's bias Add (and any cast) may sit between its MatMul and the graph output
_PASS_THROUGH = ("Add", "Cast", "Identity")


def _lm_head_matmul(graph: onnx.GraphProto) -> onnx.NodeProto:
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(LOGITS)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        raise ValueError(f"no MatMul (lm_head) feeds the graph output {LOGITS!r}; is this a decoder graph?")
    return node


def set_logits_positions(path: str | Path, positions: str) -> bool:
    """Make the decoder graph at `path` compute logits for the "last" position or for "all"; False if it already did.

    Idempotent both ways, fp32 or quantized lm_head alike: the exporter traces "all", lets the quantizers calibrate on
    every position, then cuts to "last" (graphs copied from an earlier export are set back to "all" first).
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)  # weights stay where they are; only nodes change
    graph = proto.graph
    cut = next((node for node in graph.node if node.name == SLICE_NAME), None)
    if (cut is not None) == (positions == "last"):
        return False
    matmul = _lm_head_matmul(graph)
    logits_dim = next(o for o in graph.output if o.name == LOGITS).type.tensor_type.shape.dim[1]  # [B, ?, V]
    logits_dim.Clear()
    nodes = list(graph.node)
    names = [f"{SLICE_NAME}/{key}" for key in ("starts", "ends", "axes")]
    if positions == "last":
        hidden = matmul.input[0]  # [B, T, D]
        values = (-1, np.iinfo(np.int64).max, 1)
        graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(names, values))
        matmul.input[0] = f"{SLICE_NAME}/output_0"  # [B, 1, D]
        nodes.insert(nodes.index(matmul), onnx.helper.make_node("Slice", [hidden, *names], [matmul.input[0]],
                                                                name=SLICE_NAME))  # fmt: skip
        logits_dim.dim_value = 1
    else:
        matmul.input[0] = cut.input[0]
        nodes.remove(cut)
        for tensor in [t for t in graph.initializer if t.name in names]:
            graph.initializer.remove(tensor)
        logits_dim.dim_param = "sequence_length"
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save_model(proto, str(path))  # external data, if any, is referenced by location and stays valid
    logger.info("%s: logits of %s", path.name, "the last position only ([B, 1, V])" if positions == "last" else
                "every position ([B, T, V])")  # fmt: skip
    return True


def last_position_only(logits_shape: list | tuple) -> bool:
    """True when a decoder's logits shape ([B, T, V] as the manifest lists it) has one position per sequence."""
    return len(logits_shape) == 3 and logits_shape[1] == 1
