"""Lower-precision graphs: int4 decoder (MatMulNBits: RTN, HQQ, GPTQ), fp16 and int8 for the vision and decoder graphs.

    entry = quantize_graphs(folder, model, tokenizer, options)   # rewrites folder/*.onnx in place; returns the manifest entry

int4 (decoder only): every MatMul with a constant weight, lm_head included, becomes onnxruntime's MatMulNBits with
blocks of `block_size` input channels, each block with its own scale and zero point (asymmetric), through
`onnxruntime.quantization.matmul_nbits_quantizer`:
  - rtn   round to nearest per block (DefaultWeightOnlyQuantConfig, onnxruntime's C++ blockwise quantizer);
  - hqq   half-quadratic quantization: scales and zero points fitted to the weight without data;
  - gptq  export.gptq's GPTQ (block after block on the PyTorch decoder, Hessians of each Linear's input measured on
          image + prompt + answer inputs_embeds; asymmetric, or symmetric with --symmetric; MSE-searched fp16
          scales: export.gptq_solver's measured defaults), its integers packed into MatMulNBits as they
          are: the same weights as the standard checkpoint `python -m export.gptq` writes (`--gptq-checkpoint` packs
          a kept one);
  - gptq-ort  onnxruntime's GPTQ with a CalibrationDataReader of the same multimodal sequences. It takes every
          Hessian from the unquantized model and re-derives scales from the compensated weights when packing, so it
          shares no integers with a checkpoint; kept for comparison.
Symmetric int4 (rtn with --symmetric, and GPTQ's symmetric integers) stores no zero points: MatMulNBits then uses 8.
After quantization, export.fuse merges the MatMulNBits that read one input (q/k/v and fc1 of a layer) into one node
and the traced tanh-GELU into FastGelu.
`accuracy_level` 4 lets MatMulNBits compute with int8 activations (onnxruntime-genai's CPU default; faster, a little
less exact); 0 computes in fp32 on the dequantized weights.
fp16: weights and arithmetic in fp16, inputs and outputs kept fp32 (onnxruntime.transformers.float16).
int8: dynamic quantization of the MatMul weights (per-channel int8, activations quantized per call).
prefill graph (int4 only, `--prefill-graph int8`): the fp32 decoder is also written as `decoder_prefill.onnx` at int8,
before the int4 pass rewrites it: same inputs, outputs and KV layout, so the runtime can run a prompt through it and
decode through the int4 graph against the same cache. A prompt is compute-bound, and onnxruntime's int8 GEMM
(DynamicQuantizeMatMul / MatMulIntegerToFloat; AVX-512 VNNI or AMX where the CPU has them) runs it much faster than
MatMulNBits does: measured on 8 Phi-2 layers, 128 tokens, 2 threads of an AMX Xeon, 162 ms against 712 ms. A decode
step is bandwidth-bound, and the int4 graph reads half the bytes. The price is the int8 weights in memory beside the
int4 ones (runtime.budget plans it).
The embedding graph (a table lookup) always stays fp32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from core.model import TinyGPTV
from core.tokenizer import TextTokenizer
from export import graphs
from export.fuse import fuse_fast_gelu, fuse_shared_input_matmuls
from export.graphs import TWO_GB, quiet_loggers
from export.last_logits import set_logits_positions
from export.manifest import PREFILL_FILE

logger = logging.getLogger(__name__)

INT4_ACCURACY_LEVEL = 4
QUANTIZER_LOGGERS = ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer")


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """Save over `path`, with one external data file beside it from export.graphs.EXTERNAL_DATA_FROM bytes on."""
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    # the initializers' bytes, not proto.ByteSize(), which protobuf refuses to compute past 2 GB (an int8 decoder)
    large = _has_external(proto) or sum(len(t.raw_data) for t in proto.graph.initializer) > graphs.EXTERNAL_DATA_FROM
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)  # fmt: skip


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _graph_bytes(path: Path) -> int:
    """A graph file's bytes with its external data file's, if it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def to_fp16(path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    save_model(convert_float_to_float16(_load(path), keep_io_types=True, disable_shape_infer=True), path)


def to_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=_graph_bytes(path) > TWO_GB * 0.9)  # fmt: skip
    proto = _load(tmp)
    for f in path.parent.glob(tmp.name + "*"):
        f.unlink()
    save_model(proto, path)


def _tensor(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """An initializer's values; external data is memory-mapped, not read, so a 10 GB file costs no RAM until used."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(
        base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=tuple(t.dims)
    )


def save_rewritten(proto: onnx.ModelProto, nodes: list[onnx.NodeProto] | None, path: Path) -> None:
    """Save `proto` (with `nodes` as its graph, unless None) over `path`, whose external data its untouched
    initializers still point to: those (the fp32 norms and biases) come into memory first, then the file is replaced."""
    if nodes is not None:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(np.array(_tensor(t, path.parent)), t.name))
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_model(proto, path)


def to_int4_rtn(
    path: Path, block_size: int, accuracy_level: int = INT4_ACCURACY_LEVEL, symmetric: bool = False
) -> dict[str, Any]:
    """RTN int4 one weight at a time (onnxruntime's C++ block quantizer), streaming from external data.

    Asymmetric: a scale and a zero point per block. Symmetric: a scale per block and no zero points (MatMulNBits then
    takes 8, the middle of 0..15), which saves the kernel a load and a subtraction per block.

    The same arithmetic as MatMulNBitsQuantizer's DefaultWeightOnlyQuantConfig, but never more than one fp32 weight in
    memory: a Phi-2-size decoder (11 GB of fp32 weights) quantizes in about 0.5 GB of RAM plus its int4 result.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits

    proto = onnx.load(str(path), load_external_data=False)
    base = path.parent
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, count = [], 0
    for node in proto.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        K, N = weight.dims
        blocks = -(-K // block_size)
        fp32 = np.zeros((blocks * block_size, N), np.float32)
        fp32[:K] = _tensor(weight, base)  # [K, N], zero-padded to whole blocks
        packed = np.zeros((N, blocks, block_size // 2), np.uint8)
        scales = np.zeros((N, blocks), np.float32)
        zeros = np.zeros((N, -(-blocks // 2)), np.uint8)
        quantize_matmul_4bits(packed, fp32, scales, zeros, block_size, N, K, symmetric)
        stem = weight.name.removesuffix(".weight")
        new = [
            numpy_helper.from_array(packed, f"{stem}.qweight"),
            numpy_helper.from_array(scales.reshape(-1), f"{stem}.scales"),
        ]
        if not symmetric:
            new.append(numpy_helper.from_array(zeros.reshape(-1), f"{stem}.qzeros"))
        proto.graph.initializer.extend(new)
        proto.graph.initializer.remove(weight)
        nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in new)], list(node.output), name=node.name + "_Q4",
            domain="com.microsoft", K=K, N=N, bits=4, block_size=block_size, accuracy_level=accuracy_level))  # fmt: skip
        count += 1
    save_rewritten(proto, nodes, path)
    return {"matmulnbits": count, "matmul_left_fp32": []}


def fuse_decoder(path: Path) -> dict[str, int]:
    """export.fuse's passes on the int4 decoder at `path`; returns what they did, for the manifest."""
    proto = _load(path)
    done = {"fused_away": fuse_shared_input_matmuls(proto), "fast_gelu": fuse_fast_gelu(proto)}
    save_model(proto, path)
    return done


def int4_config(method: str, block_size: int, reader=None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if method == "rtn":
        return mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                accuracy_level=INT4_ACCURACY_LEVEL)  # fmt: skip
    if method == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    if method == "gptq":
        if reader is None:
            raise ValueError("gptq needs a calibration data reader")
        return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01, block_size=128)
    raise ValueError(f"unknown int4 method {method!r}; choose rtn, hqq or gptq")


def to_int4(path: Path, method: str, block_size: int, reader=None) -> dict[str, Any]:
    """Rewrite `path`'s MatMuls as MatMulNBits (4 bits, `block_size`); returns what was quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = _load(path)
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=False,
                                     accuracy_level=INT4_ACCURACY_LEVEL,
                                     algo_config=int4_config(method, block_size, reader))  # fmt: skip
    chatter = io.StringIO()  # the GPTQ path draws a progress bar on stdout; the quantizer logs every node at INFO
    with contextlib.redirect_stdout(chatter), quiet_loggers(*QUANTIZER_LOGGERS):
        quantizer.process()
    out = quantizer.model.model
    if method in ("gptq", "hqq"):  # these paths leave accuracy_level unset; set it so every method computes alike
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", INT4_ACCURACY_LEVEL))
    left = [n.name for n in out.graph.node if n.op_type == "MatMul" and _const_weight(out, n)]
    save_model(out, path)
    return {"matmulnbits": sum(n.op_type == "MatMulNBits" for n in out.graph.node), "matmul_left_fp32": left}


def _const_weight(proto: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    return node.input[1] in {t.name for t in proto.graph.initializer}


def quantize_graphs(folder: Path, model: TinyGPTV, tokenizer: TextTokenizer | None, options) -> dict[str, Any]:
    """Apply `options` (export.onnx.ExportOptions) to the fp32 graphs in `folder`; the manifest's quantization entry."""
    entry: dict[str, Any] = {"precision": options.precision, "vision": options.vision(), "embedding": "fp32"}
    start = time.monotonic()
    vision = folder / "vision.onnx"
    if options.vision() == "fp16":
        to_fp16(vision)
    elif options.vision() == "int8":
        to_int8(vision)
    decoder = folder / "decoder.onnx"
    if options.prefill_graph == "int8":  # from the fp32 decoder, before the int4 pass below rewrites it
        entry["prefill"] = int8_prefill_graph(decoder, folder / PREFILL_FILE)
    if options.precision == "fp16":
        to_fp16(decoder)
        entry["decoder"] = {"method": "fp16", "bits": 16}
    elif options.precision == "int8":
        to_int8(decoder)
        entry["decoder"] = {"method": "dynamic int8 (per-channel weights)", "bits": 8}
    elif options.precision == "int4":
        entry["decoder"] = int4_decoder(decoder, model, tokenizer, options)
        entry["decoder"].update(fuse_decoder(decoder))  # q/k/v/fc1 share one MatMulNBits per layer; FastGelu
    else:
        entry["decoder"] = {"method": None, "bits": 32}
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def int8_prefill_graph(decoder: Path, out: Path) -> dict[str, Any]:
    """Write `out`, the fp32 `decoder` with int8 MatMuls (see the module docstring)."""
    shutil.copy(decoder, out)  # its external data, if any, is still read from the decoder's data file
    set_logits_positions(out, "last")  # a prompt needs its last position's logits only (gptq-ort's decoder has all)
    count, fused = to_int8_matmuls(out)  # writes out's own data file
    method = (
        "int8 weights (symmetric, a scale per output column), activations quantized per run (DynamicQuantizeMatMul)"
    )
    return {"fast_gelu": fused, "file": out.name, "method": method, "bits": 8, "matmuls": count, "used_for": "prompts"}


def to_int8_matmuls(path: Path) -> tuple[int, int]:
    """Every MatMul of `path` with a constant 2-D fp32 weight becomes onnxruntime's DynamicQuantizeMatMul: int8
    weights with a symmetric scale per output column, the activations quantized to uint8 at each run (what
    quantize_dynamic's per-channel int8 becomes once onnxruntime fuses it), and the bias Add that follows it, if any,
    folded in. Streams from external data like to_int4_rtn: one fp32 weight in memory at a time, where quantize_dynamic
    holds the whole fp32 model and more (killed at 24 GB on the real-size decoder). The traced tanh-GELU becomes
    FastGelu in the same pass, before the one save (export.fuse, as in the int4 decoder). Returns how many MatMuls
    it rewrote and how many FastGelu it made.
    """
    proto = onnx.load(str(path), load_external_data=False)
    base = path.parent
    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}
    nodes, count, folded = [], 0, set()
    for node in proto.graph.node:
        if id(node) in folded:
            continue
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        bias, output = "", node.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "Add" and output not in graph_outputs:
            other = [i for i in users[0].input if i != output]
            b = inits.get(other[0]) if len(other) == 1 else None
            if b is not None and list(b.dims) == [weight.dims[1]] and b.data_type == onnx.TensorProto.FLOAT:
                bias, output = b.name, users[0].output[0]
                folded.add(id(users[0]))
        w = np.asarray(_tensor(weight, base), dtype=np.float32)  # [K, N]
        scale = np.abs(w).max(axis=0) / 127.0  # [N]
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)  # [K, N]
        stem = weight.name.removesuffix(".weight")
        new = [numpy_helper.from_array(q, f"{stem}.int8"), numpy_helper.from_array(scale, f"{stem}.int8_scale")]
        proto.graph.initializer.extend(new)
        proto.graph.initializer.remove(weight)
        inputs = [node.input[0], *(t.name for t in new)] + (["", bias] if bias else [])  # "": no zero point
        nodes.append(onnx.helper.make_node("DynamicQuantizeMatMul", inputs, [output], name=node.name + "_Q8",
                                           domain="com.microsoft"))  # fmt: skip
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    fused = fuse_fast_gelu(proto)  # nodes and the small inline constants only: the weights need not be loaded
    save_rewritten(proto, None, path)
    return count, fused


def int4_decoder(path: Path, model: TinyGPTV, tokenizer: TextTokenizer | None, options) -> dict[str, Any]:
    info: dict[str, Any] = {"bits": 4, "block_size": options.block_size, "symmetric": options.symmetric,
                            "accuracy_level": INT4_ACCURACY_LEVEL, "format": "MatMulNBits"}  # fmt: skip
    if options.gptq_checkpoint:
        from export.gptq import pack_checkpoint_into

        info.update(pack_checkpoint_into(path, options.gptq_checkpoint, INT4_ACCURACY_LEVEL))
        return info
    if options.quant == "gptq":  # ours: a temporary standard checkpoint, its integers packed as they are
        from export.gptq import gptq_export, pack_checkpoint_into

        with tempfile.TemporaryDirectory(prefix="gptq-", dir=path.parent.parent) as tmp:
            gptq_export(model, tokenizer, Path(tmp) / "ckpt", group_size=options.block_size, sym=options.symmetric,
                        calib_data=options.calib_data, calib_samples=options.calib_samples)  # fmt: skip
            info.update(pack_checkpoint_into(path, Path(tmp) / "ckpt", INT4_ACCURACY_LEVEL))
        info["source"] = "export.gptq (sequential GPTQ, not kept; python -m export.gptq writes it)"
        info.pop("checkpoint", None)
        return info
    reader = None
    if options.quant == "gptq-ort":
        from export.calibration import DecoderCalibrationReader, describe, multimodal_sequences

        logger.info("calibrating onnxruntime's GPTQ on %d multimodal sequences", options.calib_samples)
        sequences = multimodal_sequences(model, tokenizer, options.calib_data, options.calib_samples)
        reader = DecoderCalibrationReader(sequences, model.config)
        info["calibration"] = describe(sequences, options.calib_data)
    info["method"] = options.quant
    if options.quant == "rtn":
        info.update(to_int4_rtn(path, options.block_size, symmetric=options.symmetric))
    else:
        info.update(to_int4(path, options.quant.removesuffix("-ort"), options.block_size, reader))
    return info
