"""The decoder as a standard GPTQ checkpoint, calibrated on multimodal sequences; loading it back; packing it into ONNX.

    python -m export.gptq --model runs/demo/final --out exports/demo-gptq --calib-data runs/demo/calib/requests.jsonl \
        [--group-size 32] [--calib-samples 32] [--sym] [--no-mse] [--act-order] [--damp 0.01]
    python -m export.onnx --model runs/demo/final --out exports/demo-int4 --precision int4 --gptq-checkpoint exports/demo-gptq

The folder (written atomically; an existing --out is refused without --force):
  config.json            Hugging Face Phi config of the decoder + `quantization_config` (transformers' GPTQ entry)
  quantize_config.json   bits, group_size, sym, desc_act false, lm_head true, checkpoint_format "gptq" (v1 zero points);
                         with --act-order, static_groups true and meta.act_order true: the columns were solved in
                         act-order but every group's scale/zero was fixed beforehand, so g_idx is i // group_size and
                         the layout is the desc_act-false one every loader (and MatMulNBits) reads
  model.safetensors      the decoder with HF Phi-2 names; each Linear as qweight / qzeros / scales / g_idx / bias
  vision.safetensors, tinygptv_config.json, tokenizer.json   the rest of TinyGPT-V, so the folder loads on its own
`load_gptq_model(dir)` gives the TinyGPTV with every quantized Linear at its exact dequantized value (CPU, or CUDA with
device="cuda"); `pack_checkpoint_into(decoder.onnx, dir)` writes the same integers as MatMulNBits, so PyTorch and ONNX
hold identical weights.

Why not gptqmodel: installing gptqmodel 7.6 here would downgrade the environment's numpy (2.4 -> 2.2) and builds native
extensions; its calibration takes token ids, not inputs_embeds with image vectors in place; and it quantizes registered
Hugging Face architectures, which TinyGPT-V's decoder (post-attention RMSNorm) is not. The algorithm and the packed format
are the ones it implements (export/gptq_solver.py); gptqmodel can still load this folder's format on CUDA.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from core.config import ConfigError, ModelConfig
from core.model import TinyGPTV
from core.tokenizer import TOKENIZER_FILE
from core.weights import WEIGHTS_FILE, load_safetensors, load_strict, phi_config_dict, save_safetensors
from export.folder import CliParser, ExportError, refuse_existing, staging_folder
from export.gptq_solver import ACT_ORDER, DAMP, MSE, SYM, QuantizedLinear, pack_gptq, quantize_decoder, unpack_gptq

logger = logging.getLogger("export.gptq")

QUANTIZE_CONFIG = "quantize_config.json"
TINYGPTV_CONFIG = "tinygptv_config.json"
VISION_WEIGHTS = "vision.safetensors"
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def quantize_config(
    bits: int, group_size: int, sym: bool, damp: float, calibration: dict, mse: bool = MSE, act_order: bool = ACT_ORDER
) -> dict[str, Any]:
    """quantize_config.json. desc_act stays false even after act-order: with static groups the stored layout (g_idx
    i // group_size) is the in-order one, and desc_act true would send loaders to their g_idx-reordering kernels."""
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": False, "static_groups": act_order, "true_sequential": False, "lm_head": True,
            "damp_percent": damp, "mse": 2.4 if mse else 0.0,
            "meta": {"quantizer": ["tinygptv-edge export.gptq"], "calibration": calibration, "act_order": act_order,
                     "mse_search": mse}}  # fmt: skip


def write_gptq_folder(folder: Path, model: TinyGPTV, quantized: dict[str, QuantizedLinear], qcfg: dict) -> None:
    decoder_state = {}
    for name, tensor in model.language_model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            continue
        decoder_state[name] = tensor
    for module, q in quantized.items():
        decoder_state.update({f"{module}.{k}": v for k, v in pack_gptq(q).items()})
    save_safetensors(decoder_state, folder / WEIGHTS_FILE, metadata={"format": "pt", "quant_method": "gptq"})
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    save_safetensors(rest, folder / VISION_WEIGHTS, metadata={"format": "pt"})
    hf = phi_config_dict(model.config.language_model) | {"torch_dtype": "float32", "quantization_config": qcfg}
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (folder / QUANTIZE_CONFIG).write_text(json.dumps(qcfg, indent=2) + "\n")
    model.config.to_json(folder / TINYGPTV_CONFIG)


def read_gptq_decoder(folder: str | Path) -> tuple[dict[str, Any], dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """(quantize_config, {module: QuantizedLinear}, the decoder's other tensors) of a GPTQ folder."""
    folder = Path(folder)
    if not (folder / QUANTIZE_CONFIG).is_file():
        raise ExportError(
            f"{folder}: not a GPTQ checkpoint (no {QUANTIZE_CONFIG}); make one with python -m export.gptq"
        )
    qcfg = json.loads((folder / QUANTIZE_CONFIG).read_text())
    if qcfg.get("desc_act") or qcfg.get("checkpoint_format", "gptq") != "gptq":
        raise ExportError(f"{folder}: only desc_act false, checkpoint_format 'gptq' checkpoints are read; got {qcfg}")
    state = load_safetensors(folder / WEIGHTS_FILE)
    modules = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")})
    quantized = {}
    for module in modules:
        tensors = {k: state.pop(f"{module}.{k}") for k in (*GPTQ_TENSORS, "bias") if f"{module}.{k}" in state}
        quantized[module] = unpack_gptq(tensors, qcfg["bits"], qcfg["group_size"])
    return qcfg, quantized, state


def load_gptq_model(folder: str | Path, device: str = "cpu") -> TinyGPTV:
    """The TinyGPTV of a GPTQ folder, every quantized Linear holding exactly scales * (codes - zeros)."""
    folder = Path(folder)
    _, quantized, rest = read_gptq_decoder(folder)
    model = TinyGPTV(ModelConfig.from_json(folder / TINYGPTV_CONFIG))
    state = {f"language_model.{k}": v for k, v in rest.items()}
    for module, q in quantized.items():
        state[f"language_model.{module}.weight"] = q.dequantize()
        if q.bias is not None:
            state[f"language_model.{module}.bias"] = q.bias.float()
    state.update(load_safetensors(folder / VISION_WEIGHTS))
    load_strict(model, state, source=str(folder))
    return model.to(device).eval()


def gptq_export(
    model: TinyGPTV, tokenizer, out: str | Path, bits: int = 4, group_size: int = 32, sym: bool = SYM,
    calib_data: str | Path | None = None, calib_samples: int = 32, force: bool = False,
    tokenizer_file: Path | None = None, damp: float = DAMP, mse: bool = MSE, act_order: bool = ACT_ORDER,
) -> dict[str, Any]:  # fmt: skip
    """Quantize a copy of `model`'s decoder with GPTQ on the multimodal sequences of `calib_data` and write `out`.
    sym, damp, mse, act_order: export.gptq_solver's options (its defaults are the measured best)."""
    from export.calibration import describe, multimodal_sequences

    refuse_existing(out, force)
    start = time.monotonic()
    sequences = multimodal_sequences(model, tokenizer, calib_data, calib_samples)
    work = TinyGPTV(model.config)
    work.load_state_dict(model.state_dict())
    quantized = quantize_decoder(work.language_model, [torch.from_numpy(s.inputs_embeds) for s in sequences],
                                 bits=bits, group_size=group_size, sym=sym, damp=damp, mse=mse,
                                 act_order=act_order)  # fmt: skip
    qcfg = quantize_config(bits, group_size, sym, damp, describe(sequences, calib_data), mse, act_order)
    qcfg["meta"]["seconds"] = round(time.monotonic() - start, 1)
    with staging_folder(out, force) as tmp:
        write_gptq_folder(tmp, work, quantized, qcfg)
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, tmp / TOKENIZER_FILE)
    return qcfg


# ------------------------------------------------------------------------------------------ the same integers in ONNX
def matmulnbits_tensors(q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B uint8 [N, blocks, bs*bits/8], scales float32 [N*blocks], zero_points uint8 [N*ceil(blocks/2)] (4 bits)."""
    if q.bits != 4:
        raise ValueError("MatMulNBits packing is written for 4 bits")
    N, K = q.codes.shape
    bs = q.group_size
    blocks = -(-K // bs)
    codes = np.zeros((N, blocks * bs), np.uint8)
    codes[:, :K] = q.codes.numpy()
    codes = codes.reshape(N, blocks, bs // 2, 2)
    B = codes[..., 0] | (codes[..., 1] << 4)  # [N, blocks, bs/2], low nibble first
    scales = q.scales.float().numpy().T.reshape(-1)  # [N*blocks]
    zeros = np.zeros((N, blocks + blocks % 2), np.uint8)
    zeros[:, :blocks] = q.zeros.numpy().T
    zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1)  # [N*ceil(blocks/2)]
    return B, scales, zp


def pack_checkpoint_into(decoder_path: str | Path, folder: str | Path, accuracy_level: int = 4) -> dict[str, Any]:
    """Replace each MatMul of decoder.onnx whose weight is a GPTQ module of `folder` by MatMulNBits of its integers."""
    decoder_path = Path(decoder_path)
    qcfg, quantized, _ = read_gptq_decoder(folder)
    proto = onnx.load(str(decoder_path))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, done = [], []
    for node in proto.graph.node:
        module = (
            node.input[1].removeprefix("language_model.").removesuffix(".weight") if node.op_type == "MatMul" else ""
        )
        if module not in quantized:
            nodes.append(node)
            continue
        q = quantized.pop(module)
        N, K = q.codes.shape
        B, scales, zp = matmulnbits_tensors(q)
        base = node.input[1].removesuffix(".weight")
        new = [numpy_helper.from_array(B, f"{base}.qweight"), numpy_helper.from_array(scales, f"{base}.scales")]
        if not (zp == 0x88).all():  # symmetric GPTQ's zero points are all 8, MatMulNBits' default: leave them out
            new.append(numpy_helper.from_array(zp, f"{base}.qzeros"))
        proto.graph.initializer.extend(new)
        proto.graph.initializer.remove(inits[node.input[1]])
        bias = inits.get(f"{base}.bias")
        if bias is not None and q.bias is not None:  # the checkpoint's fp16 bias, so both sides add the same numbers
            bias.CopyFrom(numpy_helper.from_array(q.bias.float().numpy(), bias.name))
        nodes.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in new)], list(node.output), name=node.name + "NBits",
            domain="com.microsoft", K=K, N=N, bits=4, block_size=q.group_size, accuracy_level=accuracy_level))  # fmt: skip
        done.append(module)
    if quantized:
        raise ExportError(f"{folder}: GPTQ modules with no MatMul in {decoder_path.name}: {sorted(quantized)}")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    from export.quantize import save_model

    save_model(proto, decoder_path)
    return {"method": "gptq", "source": "checkpoint", "checkpoint": str(folder), "matmulnbits": len(done),
            "symmetric": qcfg["sym"], "block_size": qcfg["group_size"], "calibration": qcfg["meta"].get("calibration")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m export.gptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder: config.json + model.safetensors + tokenizer.json")
    parser.add_argument("--out", required=True, help="the GPTQ folder to write")
    parser.add_argument("--bits", type=int, default=4, choices=(4,))
    parser.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--calib-data", required=True, help="calibration examples: image + prompt + answer, JSON lines")
    parser.add_argument("--calib-samples", type=int, default=32, help="multimodal calibration sequences (first N)")
    parser.add_argument(
        "--sym",
        action="store_true",
        help="symmetric: zero point 8, none stored (default asymmetric: own zero point per group)",
    )
    parser.add_argument(
        "--no-mse",
        dest="mse",
        action="store_false",
        help="group scale/zero from min-max (default: the MSE shrink search of the min-max range)",
    )
    parser.add_argument(
        "--act-order",
        action="store_true",
        help="solve columns by decreasing Hessian diagonal, static groups (g_idx stays i // group)",
    )
    parser.add_argument("--damp", type=float, default=DAMP, help="dampening, a fraction of the mean Hessian diagonal")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from export.onnx import load_model, load_tokenizer

    try:
        refuse_existing(args.out, args.force)
        model, model_dir = load_model(args.model)
        tokenizer = load_tokenizer(model, model_dir, None)
        qcfg = gptq_export(model, tokenizer, args.out, args.bits, args.group_size, args.sym, args.calib_data,
                           args.calib_samples, args.force, model_dir / TOKENIZER_FILE, damp=args.damp, mse=args.mse,
                           act_order=args.act_order)  # fmt: skip
    except (ExportError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: GPTQ {qcfg['bits']}-bit, group {qcfg['group_size']}, {'sym' if args.sym else 'asym'}, "
          f"{'mse' if args.mse else 'min-max'} scales{', act-order' if args.act_order else ''}, damp {args.damp}, "
          f"{qcfg['meta']['calibration']['sequences']} multimodal sequences, {qcfg['meta']['seconds']} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
