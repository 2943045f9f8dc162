"""The prefill graph: an int4 export's decoder also written at int8 (export --prefill-graph int8), which the runtime
runs prompts through while decode steps stay on the int4 decoder, against one KV cache; the memory plan decides."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from export.folder import ExportError
from export.manifest import check_manifest
from export.onnx import ExportOptions, export_folder
from export.onnx import main as export_main
from export.validate import run_shared_buffer
from runtime import Pipeline
from runtime.budget import plan_memory
from runtime.cli import main as runtime_main
from runtime.errors import BudgetError, ManifestError, RuntimeInputError
from runtime.manifest import read_manifest

QUESTION = "[vqa] What color is the circle?"


@pytest.fixture(scope="module")
def prefill_dir(tiny_model_dir, tiny_export_dir, tiny_eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill") / "int4-p8"
    options = ExportOptions(precision="int4", quant="rtn", prefill_graph="int8", eval_data=str(tiny_eval_data),
                            quality_samples=4)  # fmt: skip
    export_folder(out, tiny_model_dir, options, graphs_from=tiny_export_dir)
    return out


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_the_prefill_graph_is_the_decoder_at_int8_with_its_signature(prefill_dir):
    manifest = check_manifest(prefill_dir)  # every file listed and hashed, signatures as written
    graphs = manifest["graphs"]
    assert graphs["decoder_prefill"]["file"] == "decoder_prefill.onnx"
    assert (graphs["decoder_prefill"]["inputs"], graphs["decoder_prefill"]["outputs"]) == (
        graphs["decoder"]["inputs"], graphs["decoder"]["outputs"])  # fmt: skip
    assert "MatMulNBits" in _ops(prefill_dir / "decoder.onnx")
    prefill_ops = _ops(prefill_dir / "decoder_prefill.onnx")
    assert "DynamicQuantizeMatMul" in prefill_ops and not prefill_ops & {"MatMulNBits", "MatMul"}
    assert "GroupQueryAttention" in prefill_ops  # the same shared KV buffer as the int4 decoder
    assert manifest["quantization"]["prefill"]["bits"] == 8
    assert manifest["quantization"]["prefill"]["matmuls"] == 13  # 2 layers x 6 Linear + lm_head
    assert manifest["sizes"]["decoder_prefill_bytes"] == (prefill_dir / "decoder_prefill.onnx").stat().st_size
    validation = manifest["validation"]
    assert validation["passed"] and "decoder_prefill.onnx ran each prefill" in validation["prefill_graph"]
    logits = validation["real"]["outputs"]["logits"]
    assert 1e-5 < logits["max_abs_diff"] < 0.5 * logits["max_abs_ref"]  # quantized, yet close to fp32
    quality = manifest["quality"]  # greedy answers as the runtime makes them: the prompt through the prefill graph
    assert quality["prompts_through"] == "decoder_prefill.onnx" and quality["samples"]["sequences"] == 4


def test_a_prefill_graph_needs_an_int4_decoder(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ExportError, match="--prefill-graph is for --precision int4"):
        export_folder(tmp_path / "x", tiny_model_dir, ExportOptions(precision="fp32", prefill_graph="int8"))
    assert not (tmp_path / "x").exists()
    code = export_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "y"), "--precision", "int8",
                        "--prefill-graph", "int8"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--prefill-graph is for --precision int4" in err


class _CountingSession:
    """An InferenceSession that counts run_with_iobinding calls."""

    def __init__(self, session) -> None:
        self._session, self.runs = session, 0

    def run_with_iobinding(self, binding, *args):
        self.runs += 1
        return self._session.run_with_iobinding(binding, *args)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_the_prompt_runs_through_the_prefill_graph_and_the_steps_through_the_decoder(prefill_dir):
    pipe = Pipeline.load(prefill_dir, threads=1, prefill="graph", context=128)
    assert pipe.plan.prefill == "graph" and pipe.loop.prompt.session is pipe.sessions.decoder_prefill
    loop, cache, d = pipe.loop, pipe.cache, pipe.manifest.decoder
    ids = np.array([pipe.prompt_ids(QUESTION, image=False)], dtype=np.int64)  # [1, T]
    embeds = loop.embed(ids, None)  # [1, T, D]
    cache.start(1)
    logits = loop.prefill(embeds, np.ones(ids.shape, np.int64)).copy()  # [1, V]

    def direct(session):  # the graph run by hand on its own buffers, as export.validate does
        buffers = [np.zeros((1, d.num_heads, 128, d.head_size), np.float32) for _ in range(2 * d.num_layers)]
        spec = pipe.manifest.graphs["decoder"]
        names = SimpleNamespace(inputs=[t.name for t in spec.inputs], outputs=[t.name for t in spec.outputs])
        feed = dict(zip(names.inputs, [embeds, np.ones(ids.shape, np.int64), np.arange(ids.shape[1])[None]]))
        out, *present = run_shared_buffer(session, names, feed, buffers)
        return out[:, -1], present

    int8_logits, int8_present = direct(pipe.sessions.decoder_prefill)
    int4_logits, _ = direct(pipe.sessions.decoder)
    np.testing.assert_array_equal(logits, int8_logits)
    assert np.abs(logits - int4_logits).max() > 1e-4  # the int4 decoder would have given other logits
    key, value = cache.layer(0)
    np.testing.assert_array_equal(key, int8_present[0])
    np.testing.assert_array_equal(value, int8_present[1])

    loop.prompt.session, loop.decode.session = (
        _CountingSession(loop.prompt.session),
        _CountingSession(loop.decode.session),
    )
    result = pipe.generate(None, QUESTION, max_new_tokens=6, min_new_tokens=6)
    assert len(result.tokens) == 6 and (loop.prompt.session.runs, loop.decode.session.runs) == (1, 5)


def test_without_the_prefill_graph_the_decoder_runs_the_prompt(prefill_dir):
    pipe = Pipeline.load(prefill_dir, threads=1, prefill="decoder", context=128)
    assert pipe.plan.prefill == "decoder" and pipe.sessions.decoder_prefill is None
    assert pipe.loop.prompt is pipe.loop.decode
    assert len(pipe.generate(None, QUESTION, max_new_tokens=4, min_new_tokens=4).tokens) == 4


def test_the_plan_counts_the_prefill_graph_and_auto_drops_it_when_it_does_not_fit(prefill_dir, tiny_export_dir):
    manifest = read_manifest(prefill_dir)
    twin = sum(p.stat().st_size for p in prefill_dir.glob("decoder_prefill.onnx*"))
    graph, decoder = (plan_memory(manifest, 128, prefill=mode) for mode in ("graph", "decoder"))
    assert (graph.prefill, graph.prefill_graph, decoder.prefill, decoder.prefill_graph) == ("graph", twin, "decoder", 0)
    assert graph.weights == decoder.weights  # the twin is counted on its own row, never in weights
    assert graph.peak - decoder.peak == twin  # its load transient (0.2 x) is below the run's KV + activations
    assert "prefill graph" in graph.describe() and "prefill graph" not in decoder.describe()
    assert plan_memory(manifest, 128).prefill == "graph"  # auto, 8 GB
    assert plan_memory(manifest, 128, budget=decoder.peak).prefill == "decoder"  # auto: only without it fits
    with pytest.raises(BudgetError, match=r"--prefill decoder"):
        plan_memory(manifest, 128, budget=decoder.peak, prefill="graph").check()
    with pytest.raises(RuntimeInputError, match="no prefill graph in this folder; export with --prefill-graph int8"):
        plan_memory(read_manifest(tiny_export_dir), 128, prefill="graph")
    assert plan_memory(read_manifest(tiny_export_dir), 128).prefill == "decoder"  # auto without one


def test_cli_prefill_graph_without_one_is_exit_2(tiny_export_dir, capsys):
    code = runtime_main(["--model", str(tiny_export_dir), "--prompt", "hi", "--prefill", "graph"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no prefill graph in this folder" in err


def test_a_prefill_graph_with_another_signature_is_refused(prefill_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(prefill_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["decoder_prefill"]["outputs"] = manifest["graphs"]["decoder_prefill"]["outputs"][:1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="graphs.decoder_prefill .* has other inputs or outputs than the decoder"):
        read_manifest(folder)
