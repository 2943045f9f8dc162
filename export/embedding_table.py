"""The token embedding table beside the embedding graph, for a runtime that gathers rows from a memory-mapped file.

    python -m export.embedding_table --model exports/demo-int4 --out exports/demo-int4-table              # float32
    python -m export.embedding_table --model /work/big/tinygptv-int4-rtn-v8 --out DIR --dtype float16 --force

The embedding graph keeps the whole table in its session (Phi-2: 0.52 GB float32), though a prompt reads a few thousand
rows of it. `embedding.safetensors` holds the same table (`embed_tokens.weight`, and `embed_tokens.scales` for int8)
and the manifest names it under `embedding_table`; runtime.embedding maps it and reads only the rows it gathers.
The folder keeps `embedding.onnx`, so the three-graph contract (and onnxruntime-genai, and runtimes from before the
table) still work; a manifest without `embedding_table` is run through the graph as before.

export.onnx writes the table in every new folder (float32: the graph's own values). This command adds it to a folder
exported before, without tracing anything: every other file is hard-linked from --model (copied where links cannot
be made), the table is read from the embedding graph, and a new manifest is written; --model is not changed.

dtypes: float32 is exact; float16 halves the file (rounding error about 2**-11 of each value); int8 quarters it,
with one float32 scale per row (max |value| / 127, error up to half a step). Measured on logits: see tests and
/work/notes/lowmem.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from export.folder import ExportError, staging_folder
from export.manifest import MANIFEST_FILE, ManifestError, read_manifest, sha256_file, write_manifest

logger = logging.getLogger(__name__)

TABLE_FILE = "embedding.safetensors"
WEIGHT, SCALES = "embed_tokens.weight", "embed_tokens.scales"
DTYPES = ("float32", "float16", "int8")


def table_from_graph(path: str | Path) -> np.ndarray:
    """The [V, D] table the embedding graph's token Gather reads (its first input, an initializer)."""
    model = onnx.load(str(path))  # external data too, if any
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers:
            table = numpy_helper.to_array(initializers[node.input[0]])
            if table.ndim == 2:
                return np.ascontiguousarray(table, dtype=np.float32)
    raise ExportError(f"{path}: no Gather over a 2-D initializer; is this an embedding graph of export.onnx?")


def encode_table(table: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The tensors of the table file: the table in `dtype`, and per-row float32 scales for int8."""
    if dtype == "float32":
        return {WEIGHT: table.astype(np.float32)}
    if dtype == "float16":
        return {WEIGHT: table.astype(np.float16)}
    if dtype == "int8":
        scales = np.abs(table).max(axis=1) / 127.0  # [V]
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        q = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)  # [V, D]
        return {WEIGHT: q, SCALES: scales}
    raise ExportError(f"embedding table dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def write_table(folder: str | Path, table: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    """Write `folder`/embedding.safetensors; returns the manifest's `embedding_table` entry."""
    from safetensors.numpy import save_file

    tensors = encode_table(table, dtype)
    save_file(tensors, str(Path(folder) / TABLE_FILE))
    entry = {"file": TABLE_FILE, "weight": WEIGHT, "dtype": dtype, "shape": list(table.shape)}
    if SCALES in tensors:
        entry["scales"] = SCALES
    return entry


def add_table_to_manifest(folder: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["files"] = {**manifest.get("files", {}), entry["file"]: sha256_file(folder / entry["file"])}
    manifest["embedding_table"] = entry
    sizes = dict(manifest.get("sizes") or {})
    if sizes:
        sizes["embedding_table_bytes"] = (folder / entry["file"]).stat().st_size
        sizes["folder_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        manifest["sizes"] = sizes
    return manifest


def derive_folder(src: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """A copy of export folder `src` (files hard-linked) with the embedding table in `dtype`; returns its manifest."""
    src = Path(src)
    manifest = read_manifest(src)
    with staging_folder(out, force) as tmp:
        for path in src.iterdir():
            if path.is_file() and path.name not in (MANIFEST_FILE, TABLE_FILE):
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(path, tmp / path.name)
        table = table_from_graph(src / manifest["graphs"]["embedding"]["file"])
        files = {k: v for k, v in manifest.get("files", {}).items() if k != TABLE_FILE}
        entry = write_table(tmp, table, dtype)
        manifest = add_table_to_manifest(tmp, {**manifest, "files": files}, entry)
        write_manifest(tmp, manifest)
    logger.info("wrote %s: %s embedding table %s", out, dtype, "x".join(map(str, table.shape)))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.embedding_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an export folder (it is not changed)")
    p.add_argument("--out", required=True, help="the new folder: --model's files hard-linked, plus the table")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="table precision (float32: exact)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if Path(args.out).absolute() == Path(args.model).absolute():
            raise ExportError("--out must differ from --model (the source folder is never changed)")
        derive_folder(args.model, args.out, args.dtype, args.force)
    except (ExportError, ManifestError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
