"""Lower precisions of the export folder: int4 decoder (RTN, GPTQ on multimodal calibration), int8 vision, fp16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from core.config import ModelConfig
from export.calibration import decoder_feed
from export.fuse import fuse_shared_input_matmuls
from export.onnx import ExportOptions, export_folder
from export.quantize import to_int4_rtn
from export.validate import open_session


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int4_rtn_quantizes_every_decoder_matmul(tiny_model_dir, tmp_path, reuse_tiny_graphs):
    manifest = export_folder(tmp_path / "int4", tiny_model_dir, ExportOptions(precision="int4", quant="rtn"))
    assert manifest["decoder"]["attention"] == "gqa"  # --attention auto: int4 RTN takes the GQA decoder
    decoder = manifest["quantization"]["decoder"]
    assert decoder["matmulnbits"] == 13 and decoder["matmul_left_fp32"] == []  # 2 x 6 Linear + lm_head
    assert (decoder["method"], decoder["bits"], decoder["block_size"], decoder["accuracy_level"]) == ("rtn", 4, 32, 4)
    nodes = [n for n in onnx.load(str(tmp_path / "int4" / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in nodes[0].attribute if a.name in ("bits", "block_size", "K", "N")} == {
        "bits": 4, "block_size": 32, "K": 64, "N": 3 * 64 + 128}  # fmt: skip
    assert nodes[0].name.endswith("/model/layers.0/fused/MatMulNBits")  # q/k/v/fc1 (export.fuse)
    assert decoder["fused_away"] == 6 and len(nodes) == 7 and len(nodes[0].input) == 4  # asymmetric: zero points
    assert decoder["fast_gelu"] == 2 and _ops(tmp_path / "int4" / "decoder.onnx").get("Tanh", 0) == 0
    validation = manifest["validation"]
    logits = validation["real"]["outputs"]["logits"]
    assert validation["passed"] and not validation["tolerance"]["enforced"]
    assert 1e-4 < logits["max_abs_diff"] < 0.5 * logits["max_abs_ref"]  # quantized, yet close to fp32
    assert validation["real"]["outputs"]["image_features"]["max_abs_diff"] < 1e-5  # vision untouched (fp32)


@pytest.mark.parametrize("quant", ["gptq", "gptq-ort"])
def test_int4_gptq_is_calibrated_on_multimodal_sequences(
    tiny_model_dir, tmp_path, reuse_tiny_graphs, quant, tiny_calib_data
):
    options = ExportOptions(
        precision="int4", quant=quant, calib_data=str(tiny_calib_data), calib_samples=4, vision_precision="int8"
    )
    manifest = export_folder(tmp_path / "gptq", tiny_model_dir, options)
    # --attention auto: gptq-ort's calibration feeds a growing past, so it keeps the plain decoder
    assert manifest["decoder"]["attention"] == ("plain" if quant == "gptq-ort" else "gqa")
    quant = manifest["quantization"]
    calibration = quant["decoder"]["calibration"]
    assert calibration["sequences"] == 4 and calibration["tasks"] == {"vqa": 3, "refer": 1}
    assert calibration["source"] == str(tiny_calib_data)
    assert calibration["tokens"] > 4 * 8  # every sequence holds the 8 image vectors and more
    assert quant["vision"] == "int8" and quant["decoder"]["matmulnbits"] == 13
    assert _ops(tmp_path / "gptq" / "vision.onnx").get("MatMulInteger", 0) > 0
    assert manifest["validation"]["real"]["outputs"]["image_features"]["max_abs_diff"] > 1e-4  # int8 vision differs


@pytest.mark.parametrize("precision", ["fp16"])
def test_fp16_keeps_float32_io_and_stays_close(tiny_model_dir, tmp_path, reuse_tiny_graphs, precision):
    manifest = export_folder(tmp_path / precision, tiny_model_dir, ExportOptions(precision=precision))
    assert manifest["decoder"]["attention"] == "plain"  # --attention auto: the fp16 converter takes the plain decoder
    decoder = manifest["graphs"]["decoder"]
    assert {i["dtype"] for i in decoder["inputs"] if i["name"] != "attention_mask" and i["name"] != "position_ids"} == {
        "float32"}  # fmt: skip
    weights = onnx.load(str(tmp_path / precision / "decoder.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    outputs = manifest["validation"]["real"]["outputs"]
    assert outputs["logits"]["max_abs_diff"] < 5e-3 and outputs["image_features"]["max_abs_diff"] < 5e-3


def test_int8_quantizes_the_decoder_and_vision_and_cuts_lm_head_to_the_last_position(
    tiny_model_dir, tmp_path, reuse_tiny_graphs
):
    manifest = export_folder(tmp_path / "int8", tiny_model_dir, ExportOptions(precision="int8"))
    assert manifest["decoder"]["attention"] == "plain" and manifest["decoder"]["logits_positions"] == "last"
    assert manifest["graphs"]["decoder"]["outputs"][0]["shape"] == ["batch_size", 1, 128]
    assert manifest["quantization"]["decoder"] == {"method": "dynamic int8 (per-channel weights)", "bits": 8}
    for graph in ("decoder", "vision"):
        assert _ops(tmp_path / "int8" / f"{graph}.onnx").get("MatMulInteger", 0) > 0
    validation = manifest["validation"]
    logits = validation["real"]["outputs"]["logits"]
    assert validation["passed"] and 1e-5 < logits["max_abs_diff"] < 0.25 * logits["max_abs_ref"]


def test_gptq_without_calibration_data_fails_before_any_work(tiny_model_dir, tmp_path, tiny_calib_data):
    from export.folder import ExportError

    with pytest.raises(ExportError, match="pass --calib-data FILE.jsonl"):
        export_folder(tmp_path / "gptq", tiny_model_dir, ExportOptions(precision="int4", quant="gptq"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.jpg", "prompt": "[vqa] what color", "expected": "red"}\n')
    with pytest.raises(ExportError, match=r"bad.jsonl:1: image .*missing.jpg does not exist"):
        export_folder(tmp_path / "gptq", tiny_model_dir, ExportOptions(precision="int4", calib_data=str(bad)))
    assert list(tmp_path.iterdir()) == [bad]


def test_fused_matmuls_give_the_unfused_outputs(tiny_export_dir, tmp_path):
    """export.fuse: q/k/v/fc1 of each layer in one MatMulNBits + Split, every output exactly as before."""
    path = tmp_path / "decoder.onnx"
    path.write_bytes((tiny_export_dir / "decoder.onnx").read_bytes())
    to_int4_rtn(path, 32, symmetric=True)
    proto = onnx.load(str(path))
    assert all(len(n.input) == 3 for n in proto.graph.node if n.op_type == "MatMulNBits")  # symmetric: no zero points
    embeds = np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32)
    feed = decoder_feed(embeds, ModelConfig.preset("tiny"))
    before = open_session(path).run(None, feed)
    assert fuse_shared_input_matmuls(proto) == 6  # 3 of 4 per layer merged away
    onnx.save(proto, str(path))
    fused = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(fused) == 7 and fused[0].name == "/language_model/model/layers.0/fused/MatMulNBits"
    assert {a.name: a.i for a in fused[0].attribute if a.name in ("K", "N")} == {
        "K": 64,
        "N": 3 * 64 + 128,
    }  # q, k, v, fc1
    after = open_session(path).run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_symmetric_is_refused_where_it_does_not_apply(tmp_path):
    from export.folder import ExportError

    with pytest.raises(ExportError, match="--symmetric applies to --precision int4 --quant rtn"):
        export_folder(tmp_path / "x", tmp_path, ExportOptions(precision="int4", quant="hqq", symmetric=True))


def test_large_graphs_keep_their_weights_in_external_data(tiny_model_dir, tmp_path, reuse_tiny_graphs, monkeypatch):
    """From export.graphs.EXTERNAL_DATA_FROM bytes on, a quantized graph keeps its weights in `<file>.data` (ONNX
    Runtime then loads them without the protobuf's second copy); the manifest lists and hashes that file, and the
    folder answers exactly as the single-file export of the same options."""
    from export import graphs
    from runtime import Pipeline
    from tests.test_runtime import images

    options = ExportOptions(precision="int4", quant="rtn", vision_precision="int8")
    single = export_folder(tmp_path / "single", tiny_model_dir, options)
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_FROM", 0)
    split = export_folder(tmp_path / "split", tiny_model_dir, options)
    for name in ("vision", "decoder"):
        data = tmp_path / "split" / f"{name}.onnx.data"
        assert data.is_file() and f"{name}.onnx.data" in split["files"]
        assert not (tmp_path / "single" / f"{name}.onnx.data").exists()
        proto = onnx.load(str(tmp_path / "split" / f"{name}.onnx"), load_external_data=False)
        assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer) > 0
    assert split["validation"]["passed"] and split["validation"]["real"] == single["validation"]["real"]
    image = images(1)[0]
    answers = [Pipeline.load(tmp_path / f, threads=1).generate(image, "[vqa] what colour is the shape?",
                                                               max_new_tokens=6).tokens for f in ("single", "split")]  # fmt: skip
    assert answers[0] == answers[1] and len(answers[0]) > 0
