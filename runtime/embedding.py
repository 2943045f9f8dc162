"""Token embeddings without an ONNX session: the table memory-mapped from the export folder, gathered in numpy.

    table = EmbeddingTable.open(manifest)          # None when the folder has no table (older exports): use the graph
    embeds = table.embed(ids, features)            # ids [B, T] int64, features [B, N, D] or None -> [B, T, D] float32
    table.embed(ids[:, None], None, out=buffer)    # a decode step, written into a fixed [B, 1, D] buffer

Why: the embedding graph holds the whole table as an initializer, so its session keeps it resident (Phi-2: 51,200 x
2,560 float32 = 0.52 GB), although a prompt reads at most a few thousand of its rows. Mapped from the file, only the
pages of the rows a gather reads become resident, and those pages are handed back right after it (madvise
MADV_DONTNEED over just those rows of the read-only mapping: the pages stay in the kernel's page cache but leave this
process's RSS), so the resident cost is one gather's rows, bounded by the context. The file is safetensors (`embedding.safetensors`, written by
export.embedding_table) and is read here with numpy alone: an 8-byte header length, a JSON header, the raw tensors.

Semantics are the embedding graph's (`core.model.TinyGPTV.embed`): image ids take the row's image vectors in order,
every other id its table row. The table is float32 (exact), float16, or int8 with one float32 scale per row; the last
two are converted to float32 row by row as they are gathered.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from pathlib import Path

import numpy as np

from runtime.errors import ManifestError
from runtime.manifest import Manifest

logger = logging.getLogger(__name__)

_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8}
PAGE = mmap.PAGESIZE


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header {name: {dtype, shape, data_offsets}}, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as fp:
        (length,) = struct.unpack("<Q", fp.read(8))
        if length > 100 << 20:
            raise ManifestError(f"{path}: safetensors header of {length:,} bytes; the file is not safetensors")
        header = json.loads(fp.read(length))
    return header, 8 + length


class EmbeddingTable:
    """The token embedding table of an export folder, memory-mapped; see the module docstring."""

    def __init__(self, path: Path, weight: str, scales: str | None, image_token_id: int) -> None:
        self.path = path
        header, start = read_safetensors_header(path)
        self._file = open(path, "rb")  # noqa: SIM115 - lives as long as the mapping
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.weight = self._view(header, weight, start)  # [V, D]
        self.scales = None if scales is None else self._view(header, scales, start).reshape(-1, 1)  # [V, 1]
        # (byte offset in the mapping, bytes per row) of each tensor the gather reads, for releasing just its rows
        self._spans = [(start + header[name]["data_offsets"][0], array.strides[0])
                       for name, array in ((weight, self.weight), (scales, self.scales)) if array is not None]  # fmt: skip
        self.vocab_size, self.hidden_size = self.weight.shape
        self.dtype = self.weight.dtype
        self.image_token_id = image_token_id
        self.row_bytes = self.hidden_size * self.dtype.itemsize + (4 if scales else 0)

    def _view(self, header: dict, name: str, start: int) -> np.ndarray:
        if name not in header:
            raise ManifestError(f"{self.path}: no tensor {name!r}; it has {sorted(k for k in header if k[:2] != '__')}")
        info = header[name]
        if info.get("dtype") not in _DTYPES:
            raise ManifestError(f"{self.path}: {name} is {info.get('dtype')}; the runtime reads F32, F16 or I8")
        first, last = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        count = (last - first) // dtype.itemsize
        if count != int(np.prod(info["shape"])):
            raise ManifestError(f"{self.path}: {name} holds {count} values for shape {info['shape']}")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=start + first).reshape(info["shape"])

    @classmethod
    def open(cls, manifest: Manifest) -> EmbeddingTable | None:
        """The folder's table if its manifest names one (`embedding_table`), else None (the embedding graph is used)."""
        entry = manifest.raw.get("embedding_table")
        if not entry:
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ManifestError(f"{manifest.folder}: embedding_table {entry!r} has no file")
        table = cls(manifest.path(entry["file"]), entry.get("weight", "embed_tokens.weight"), entry.get("scales"),
                    manifest.image_token_id)  # fmt: skip
        d = manifest.decoder
        if (table.vocab_size, table.hidden_size) != (d.vocab_size, d.hidden_size):
            raise ManifestError(
                f"{table.path}: table {table.vocab_size} x {table.hidden_size}, the decoder's is "
                f"{d.vocab_size} x {d.hidden_size}; export the model again"
            )
        return table

    def rows(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Table rows of `ids` (any shape) as float32 [..., D], written into `out` when given."""
        flat = ids.reshape(-1)
        shape = (*ids.shape, self.hidden_size)
        out = np.empty(shape, dtype=np.float32) if out is None else out
        target = out.reshape(-1, self.hidden_size)
        if self.dtype == np.float32:
            np.take(self.weight, flat, axis=0, out=target)
        else:
            target[:] = self.weight[flat]  # float16 / int8 -> float32
        if self.scales is not None:
            target *= self.scales[flat]
        self._release_rows(flat)
        return out

    def embed(self, ids: np.ndarray, features: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """ids [B, T] int64 (image ids where the image goes), features [B, N, D] or None -> inputs_embeds [B, T, D]."""
        is_image = ids == self.image_token_id  # [B, T]
        embeds = self.rows(np.where(is_image, 0, ids), out)  # [B, T, D]
        if is_image.any():
            rows, cols = np.nonzero(is_image)
            if features is None:  # as the graph given no image: image ids embed to zeros
                embeds[rows, cols] = 0.0
            else:
                index = np.clip(np.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)  # [B, T]
                embeds[rows, cols] = features[rows, index[rows, cols]]
        return embeds

    def _release_rows(self, ids: np.ndarray) -> None:
        """Hand back the pages of the rows `ids` only: one madvise per run of consecutive ids, so a decode step (one
        row per sequence) costs a few system calls instead of a walk over the whole mapping."""
        if not (hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED")) or ids.size == 0:
            return
        if ids.size == 1:  # a decode step of one sequence: no sorting and splitting into runs
            runs = [(int(ids[0]),) * 2]
        else:
            ids = np.unique(ids)  # sorted
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            runs = zip(ids[np.r_[0, breaks]].tolist(), ids[np.r_[breaks - 1, ids.size - 1]].tolist())
        for first, last in runs:
            for offset, row in self._spans:
                begin, end = offset + first * row, offset + (last + 1) * row
                begin -= begin % PAGE  # madvise wants a page-aligned start; neighbouring rows just fault in again
                self._map.madvise(mmap.MADV_DONTNEED, begin, min(end, len(self._map)) - begin)

    def release(self) -> None:
        """Hand the mapped pages read so far back (they leave RSS; the page cache keeps them for the next read)."""
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.weight = self.scales = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        self._file.close()
