"""Read an export folder's `manifest.json` and check every file it names against its sha256 (torch-free).

The manifest is the contract between `export/` and `runtime/` (DESIGN.md, "The export folder"): schema version 1,
the three graphs with their files, hashes and I/O names, the decoder's KV name templates and sizes, the image
preprocessing constants, prompt template and stop strings, special token ids. The runtime reads every constant it
needs from here and hard-codes none.

    manifest = read_manifest("exports/demo-int4")          # raises ManifestError naming what is wrong
    manifest.verify()                                       # sha256 of every file; a tampered file is refused by name
    manifest.decoder.past_key(3)                            # 'past_key_values.3.key'
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ImageConfig
from runtime.errors import ManifestError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
GRAPHS = ("vision", "embedding", "decoder")
# graphs a folder may have: "decoder_prefill", the decoder at another precision (int8) with the decoder's inputs and
# outputs, which the runtime runs prompts through (export.quantize, runtime.budget decides whether it is loaded)
PREFILL_GRAPH = "decoder_prefill"
OPTIONAL_GRAPHS = (PREFILL_GRAPH,)
_CHUNK = 1 << 20
# files that are not weights: everything the plan must not count as model memory
_NOT_WEIGHTS = (".json", ".txt", ".md", ".model", ".png", ".jpg")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class DecoderSpec:
    past_key_template: str  # 'past_key_values.%d.key'
    past_value_template: str
    present_key_template: str
    present_value_template: str
    num_layers: int
    num_heads: int
    head_size: int
    hidden_size: int
    context_length: int
    vocab_size: int
    logits_positions: str = "all"  # "last": logits [B, 1, V]; "all": [B, T, V] (folders exported before the cut)
    # "plain": past [B, H, P, hs] in, present [B, H, P+T, hs] out; "gqa": GroupQueryAttention, past and present one
    # buffer [B, H, context, hs] (export.gqa). Folders exported before the field are "plain".
    attention: str = "plain"

    def past_key(self, layer: int) -> str:
        return self.past_key_template % layer

    def past_value(self, layer: int) -> str:
        return self.past_value_template % layer

    def present_key(self, layer: int) -> str:
        return self.present_key_template % layer

    def present_value(self, layer: int) -> str:
        return self.present_value_template % layer


@dataclass(frozen=True)
class PromptSpec:
    template: str
    image_text: str
    placeholder: str
    task_tags: tuple[str, ...]
    stop_strings: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """One export folder, as its manifest describes it. `folder` is where the files are."""

    folder: Path
    schema_version: int
    graphs: dict[str, GraphSpec]
    files: dict[str, str]  # every other file -> sha256
    decoder: DecoderSpec
    image: ImageConfig
    num_image_tokens: int
    image_token_id: int
    prompt: PromptSpec
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    quantization: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.folder / name

    def all_files(self) -> dict[str, str]:
        """Every file the manifest names -> its sha256 (graphs first)."""
        out = {g.file: g.sha256 for g in self.graphs.values()}
        out.update(self.files)
        return out

    def file_sizes(self) -> dict[str, int]:
        """Bytes on disk of every file the manifest names (0 for a missing one; `verify` reports those)."""
        sizes = {}
        for name in self.all_files():
            try:
                sizes[name] = self.path(name).stat().st_size
            except OSError:
                sizes[name] = 0
        return sizes

    def weight_sizes(self) -> dict[str, int]:
        """Bytes of the files that hold weights: the graphs and their external data."""
        return {n: s for n, s in self.file_sizes().items() if not n.lower().endswith(_NOT_WEIGHTS)}

    def verify(self) -> None:
        """Check every file against its sha256; raise ManifestError naming the first that is missing or differs."""
        for name, expected in self.all_files().items():
            path = self.path(name)
            if not path.is_file():
                raise ManifestError(f"{path}: missing; the manifest lists it, so the export folder is incomplete")
            actual = sha256_file(path)
            if actual != expected.lower():
                size = path.stat().st_size
                what = "empty (0 bytes)" if size == 0 else f"{size:,} bytes"
                raise ManifestError(
                    f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}... ({what}); "
                    "the file was changed or truncated after export, export the model again"
                )
        logger.info("verified sha256 of %d files in %s", len(self.all_files()), self.folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        while chunk := fp.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _get(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise ManifestError(f"{where}: no '{key}'; the manifest is incomplete, export the model again")
    value = data[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}.{key}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def _tensors(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list):
        raise ManifestError(f"{where}: expected a list of tensors")
    out = []
    for i, item in enumerate(items):
        w = f"{where}[{i}]"
        out.append(
            TensorSpec(
                _get(item, "name", str, w),
                _get(item, "dtype", str, w),
                tuple(_get(item, "shape", list, w)),
            )
        )
    return tuple(out)


def _file_hashes(files: Any, where: str) -> dict[str, str]:
    """`files` as {name: sha256} or {name: {"sha256": ...}} or [{"file"/"name": ..., "sha256": ...}]."""
    out: dict[str, str] = {}
    items = files.items() if isinstance(files, dict) else ((None, f) for f in files or [])
    for name, value in items:
        if isinstance(value, str) and name is not None:
            out[name] = value
        elif isinstance(value, dict):
            key = name if name is not None else value.get("file", value.get("name"))
            if not isinstance(key, str):
                raise ManifestError(f"{where}: an entry has no file name: {value!r}")
            out[key] = _get(value, "sha256", str, f"{where}.{key}")
        else:
            raise ManifestError(f"{where}: cannot read entry {name!r}: {value!r}")
    return out


def parse_manifest(data: dict[str, Any], folder: Path) -> Manifest:
    where = str(folder / MANIFEST_FILE)
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version!r} is not supported; this runtime reads version {SCHEMA_VERSION}. "
            "Export the model again with this kit, or use the runtime that matches the exporter"
        )
    graphs_data = _get(data, "graphs", dict, where)
    graphs = {}
    for name in GRAPHS + tuple(n for n in OPTIONAL_GRAPHS if n in graphs_data):
        g = _get(graphs_data, name, dict, f"{where}: graphs")
        w = f"{where}: graphs.{name}"
        graphs[name] = GraphSpec(
            name,
            _get(g, "file", str, w),
            _get(g, "sha256", str, w),
            _tensors(_get(g, "inputs", list, w), f"{w}.inputs"),
            _tensors(_get(g, "outputs", list, w), f"{w}.outputs"),
        )
    twin = graphs.get(PREFILL_GRAPH)
    if twin is not None and (twin.inputs, twin.outputs) != (graphs["decoder"].inputs, graphs["decoder"].outputs):
        raise ManifestError(
            f"{where}: graphs.decoder_prefill ({twin.file}) has other inputs or outputs than the decoder; it must be "
            "the same graph at another precision (export the model again)"
        )
    dec = _get(data, "decoder", dict, where)
    w = f"{where}: decoder"
    kv = _get(dec, "kv_templates", dict, w)
    decoder = DecoderSpec(
        *(_get(kv, k, str, f"{w}.kv_templates") for k in ("past_key", "past_value", "present_key", "present_value")),
        *(
            _get(dec, k, int, w)
            for k in ("num_layers", "num_heads", "head_size", "hidden_size", "context_length", "vocab_size")
        ),
        logits_positions=_get(dec, "logits_positions", str, w) if "logits_positions" in dec else "all",
        attention=_get(dec, "attention", str, w) if "attention" in dec else "plain",
    )
    if decoder.logits_positions not in ("last", "all"):
        raise ManifestError(f"{w}.logits_positions: {decoder.logits_positions!r}, expected 'last' or 'all'")
    if decoder.attention not in ("plain", "gqa"):
        raise ManifestError(f"{w}.attention: {decoder.attention!r}, expected 'plain' or 'gqa' (a newer export?)")
    img = _get(data, "image", dict, where)
    w = f"{where}: image"
    image = ImageConfig(
        size=_get(img, "size", int, w),
        resample=_get(img, "resample", str, w),
        mean=tuple(float(v) for v in _get(img, "mean", list, w)),
        std=tuple(float(v) for v in _get(img, "std", list, w)),
        max_pixels=int(img.get("max_pixels", ImageConfig.max_pixels)),
    )
    pr = _get(data, "prompt", dict, where)
    w = f"{where}: prompt"
    prompt = PromptSpec(
        template=_get(pr, "template", str, w),
        image_text=_get(pr, "image_text", str, w),
        placeholder=_get(pr, "placeholder", str, w),
        task_tags=tuple(pr.get("task_tags", ())),
        stop_strings=tuple(_get(pr, "stop_strings", list, w)),
    )
    special = _get(data, "special_tokens", dict, where)
    w = f"{where}: special_tokens"
    eos = _get(special, "eos", int, w)
    return Manifest(
        folder=folder,
        schema_version=version,
        graphs=graphs,
        files=_file_hashes(data.get("files", {}), f"{where}: files"),
        decoder=decoder,
        image=image,
        num_image_tokens=_get(data, "num_image_tokens", int, where),
        image_token_id=_get(data, "image_token_id", int, where),
        prompt=prompt,
        bos_token_id=_get(special, "bos", int, w),
        eos_token_id=eos,
        pad_token_id=special.get("pad", eos) if isinstance(special.get("pad", eos), int) else eos,
        quantization=data.get("quantization") or {},
        validation=data.get("validation") or {},
        source=data.get("source") or {},
        raw=data,
    )


def read_manifest(model_dir: str | Path, verify: bool = False) -> Manifest:
    """Read `model_dir/manifest.json`; with verify=True also check every file's sha256."""
    folder = Path(model_dir)
    if not folder.exists():
        raise ManifestError(f"{folder}: no such folder; pass the export folder written by python -m export.onnx")
    if not folder.is_dir():
        raise ManifestError(f"{folder}: is a file, not an export folder")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{folder}: no {MANIFEST_FILE}; this is not an export folder, or its export did not finish "
            "(write one with python -m export.onnx --model CHECKPOINT --out DIR)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); export the model again") from None
    manifest = parse_manifest(data, folder)
    if verify:
        manifest.verify()
    return manifest
