"""manifest.json: what the export folder holds and how to drive it, so the runtime never hard-codes a model constant.

    manifest = build_manifest(folder, cfg, quantization=..., validation=..., source=...)
    write_manifest(folder, manifest)
    check_manifest(folder)      # every sha256 and graph signature still true; raises ManifestError naming what is not

Graph signatures (input/output names, dtypes, shapes with symbolic axes) are read back from the ONNX files themselves,
never restated by hand, so the manifest cannot disagree with the graphs it describes. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import onnx

from core.config import ModelConfig
from core.prompts import IMAGE_PLACEHOLDER, IMAGE_TEXT, TASK_TAGS
from export.last_logits import last_position_only

GQA_KV_AXIS = "max_sequence_length"  # export.graphs names the shared buffer's axis so

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
FORMAT = "tinygptv-export"
GRAPH_FILES = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
# optional: the decoder again at another precision, for prompts only (export.prefill_graph); same inputs and outputs
PREFILL_GRAPH = "decoder_prefill"
OPTIONAL_GRAPH_FILES = {PREFILL_GRAPH: "decoder_prefill.onnx"}
PREFILL_FILE = OPTIONAL_GRAPH_FILES[PREFILL_GRAPH]
KV_TEMPLATES = {
    "past_key": "past_key_values.%d.key",
    "past_value": "past_key_values.%d.value",
    "present_key": "present.%d.key",
    "present_value": "present.%d.value",
}
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
           onnx.TensorProto.INT32: "int32", onnx.TensorProto.BFLOAT16: "bfloat16"}  # fmt: skip


class ManifestError(ValueError):
    """A folder whose files or graphs do not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": _DTYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": shape}


def graph_signature(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX file as [{name, dtype, shape}], reading the graph only (not external data)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def folder_files(folder: Path) -> list[str]:
    """Every file of the folder other than the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def build_manifest(
    folder: str | Path,
    cfg: ModelConfig,
    quantization: dict[str, Any],
    validation: dict[str, Any],
    source: dict[str, Any],
    exporter: dict[str, Any] | None = None,
) -> dict[str, Any]:
    folder = Path(folder)
    lm = cfg.language_model
    graphs = {}
    present = {n: f for n, f in OPTIONAL_GRAPH_FILES.items() if (folder / f).is_file()}
    for name, file in {**GRAPH_FILES, **present}.items():
        graphs[name] = {"file": file, "sha256": sha256_file(folder / file), **graph_signature(folder / file)}
    graph_files = set(GRAPH_FILES.values()) | set(present.values())
    files = {f: sha256_file(folder / f) for f in folder_files(folder) if f not in graph_files}
    logits_shape = next(o["shape"] for o in graphs["decoder"]["outputs"] if o["name"] == "logits")
    past_shape = next(i["shape"] for i in graphs["decoder"]["inputs"] if i["name"] == KV_TEMPLATES["past_key"] % 0)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "exporter": exporter or {},
        "graphs": graphs,
        "files": files,
        "decoder": {
            "kv_templates": dict(KV_TEMPLATES),
            "num_layers": lm.num_layers,
            "num_heads": lm.num_heads,
            "num_kv_heads": lm.num_heads,
            "head_size": lm.head_size,
            "hidden_size": lm.hidden_size,
            "context_length": lm.max_position_embeddings,
            "vocab_size": lm.vocab_size,
            # "last": logits [B, 1, V] (export.last_logits); "all": [B, T, V], as folders written before it
            "logits_positions": "last" if last_position_only(logits_shape) else "all",
            # "gqa": GroupQueryAttention, past and present one buffer of max_sequence_length slots (export.gqa);
            # "plain": past [B, H, P, hs] in, present [B, H, P+T, hs] out. Folders without the field are "plain".
            "attention": "gqa" if past_shape[2] == GQA_KV_AXIS else "plain",
        },
        "image": cfg.image.to_dict(),
        "num_image_tokens": cfg.num_image_tokens,
        "image_token_id": cfg.prompt.image_token_id,
        "prompt": {
            "template": cfg.prompt.template,
            "image_text": cfg.prompt.image_text or IMAGE_TEXT,
            "placeholder": cfg.prompt.placeholder or IMAGE_PLACEHOLDER,
            "task_tags": list(TASK_TAGS),
            "stop_strings": list(cfg.prompt.stop_strings),
        },
        # The tokenizer has no pad token of its own: left padding uses EOS under a zero attention mask.
        "special_tokens": {"bos": lm.bos_token_id, "eos": lm.eos_token_id, "pad": lm.eos_token_id},
        "quantization": quantization,
        "validation": validation,
        "source": source,
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; this is not an export folder (run python -m export.onnx)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r}, this kit reads {SCHEMA_VERSION}")
    return manifest


def check_manifest(folder: str | Path, hashes: bool = True) -> dict[str, Any]:
    """Raise ManifestError listing every file whose sha256, or graph whose signature, differs from the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    expected = {g["file"]: g["sha256"] for g in manifest["graphs"].values()} | manifest["files"]
    for file, digest in sorted(expected.items()):
        if not (folder / file).is_file():
            problems.append(f"{file}: missing")
        elif hashes and sha256_file(folder / file) != digest:
            problems.append(f"{file}: sha256 differs from the manifest")
    unlisted = sorted(set(folder_files(folder)) - set(expected))
    problems += [f"{file}: not listed in the manifest" for file in unlisted]
    for name, graph in manifest["graphs"].items():
        if (folder / graph["file"]).is_file():
            found = graph_signature(folder / graph["file"])
            if found != {"inputs": graph["inputs"], "outputs": graph["outputs"]}:
                problems.append(f"{graph['file']}: inputs/outputs differ from the manifest's {name} entry")
    if problems:
        raise ManifestError(f"{folder}: " + "; ".join(problems))
    return manifest
