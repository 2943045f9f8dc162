"""The KV cache: fixed buffers allocated once for the planned context, bound to the decoder by pointer every step.

The contract's decoder takes `past_key_values.%d.key` [B, H, P, hs] and returns `present.%d.key` [B, H, P+T, hs]
(past and new together). A tensor handed to ONNX Runtime must be contiguous, and the layout of [B, H, P, hs] changes
with P, so one buffer cannot be both past and present. Each layer's key and value therefore get two flat buffers of
B x H x context x hs floats (sides 0 and 1): a step reads `past` from one side and has ONNX Runtime write `present`
straight into the other through IO binding (the first elements of the flat buffer, viewed as [B, H, P+T, hs]); then
the sides swap. No buffer is allocated, concatenated or copied by the runtime after load, and an interrupted step
leaves the cache as it was (the side it read is untouched).

A GQA decoder (manifest `decoder.attention: "gqa"`, export.gqa) takes and returns the whole buffer [B, H, context, hs]
and writes the T new slots in place, so each layer's key and value get one buffer, bound as both past and present
(side 0 only): half the memory, and nothing moves but the new slots. An interrupted step may have written slots past
P, which the next step overwrites; the P cached ones are untouched.

    cache = KVCache(manifest.decoder, batch_size=1, context=512)
    cache.start(rows=1)
    cache.bind(binding, new_tokens=T)    # past from the current side, present into the other
    session.run_with_iobinding(binding)
    cache.advance(T)                     # swap sides, P += T
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from runtime.errors import ContextError
from runtime.manifest import DecoderSpec

logger = logging.getLogger(__name__)


class KVCache:
    allocations_total = 0  # every KV buffer any cache in this process has allocated (tests count these)

    def __init__(self, spec: DecoderSpec, batch_size: int, context: int, device: str = "cpu") -> None:
        self.spec = spec
        self.batch_size = batch_size
        self.context = context
        self.device = device
        self.capacity = batch_size * spec.num_heads * context * spec.head_size  # floats per buffer
        self.allocations = 0
        self.shared = spec.attention == "gqa"  # past and present are one buffer (export.gqa)
        # buffers[side][layer] = (key, value), flat float32 of `capacity` elements; one side when shared
        sides = 1 if self.shared else 2
        self.buffers = [[(self._allocate(), self._allocate()) for _ in range(spec.num_layers)] for _ in range(sides)]
        self._pointers = [[(self.pointer(k), self.pointer(v)) for k, v in side] for side in self.buffers]
        self._names = [
            ((spec.past_key(i), spec.present_key(i)), (spec.past_value(i), spec.present_value(i)))
            for i in range(spec.num_layers)
        ]
        # the attention mask of every slot so far: 1 = a real token, 0 = left padding
        self.mask = np.zeros((batch_size, context), dtype=np.int64)  # [B, C]
        self.counts = np.zeros(batch_size, dtype=np.int64)  # real tokens per row so far
        self._next_counts = self.counts[:0]
        self.side = 0  # the side holding `past`
        self.length = 0  # P: tokens in the cache
        self.rows = batch_size  # rows in use (<= batch_size)
        self.owner: object | None = None  # who filled it (a chat keeps its cache only while it is the owner)
        self._bound: tuple[ort.IOBinding, int] | None = None  # (binding, rows) this shared cache is bound to
        logger.info(
            "KV cache: %d buffers of %d floats (%.1f MiB), context %d, batch %d",
            self.allocations,
            self.capacity,
            self.nbytes / 2**20,
            context,
            batch_size,
        )

    def _allocate(self) -> np.ndarray | ort.OrtValue:
        self.allocations += 1
        KVCache.allocations_total += 1
        if self.device == "cpu":
            # numpy advises huge pages for arrays this size. The first prompt into a fresh cache then pays for the
            # kernel compacting memory into 2 MiB pages (real-size int4, 128 tokens: 2.6 s instead of 0.98 s with
            # MADV_NOHUGEPAGE, 0.47 s warm), but every decode step at context 2,048 runs 8 % faster on them (6.68-6.78
            # against 6.12-6.26 tokens/s, alternating, 2026-12-02): the huge pages stay.
            return np.zeros(self.capacity, dtype=np.float32)
        return ort.OrtValue.ortvalue_from_shape_and_type([self.capacity], np.float32, self.device, 0)

    @property
    def nbytes(self) -> int:
        return self.allocations * self.capacity * 4

    @staticmethod
    def pointer(buffer: np.ndarray | ort.OrtValue) -> int:
        return buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()

    def pointers(self) -> set[int]:
        return {self.pointer(b) for side in self.buffers for kv in side for b in kv}

    def room(self) -> int:
        return self.context - self.length

    def start(self, rows: int, owner: object | None = None) -> None:
        """Empty the cache for a new generation of `rows` rows."""
        if rows > self.batch_size:
            raise ContextError(f"{rows} rows do not fit a cache planned for batch {self.batch_size}")
        self.rows, self.length, self.side, self.owner = rows, 0, 0, owner
        self._bound = None
        self.mask.fill(0)
        self.counts.fill(0)

    def extend_mask(self, row_masks: np.ndarray) -> np.ndarray:
        """Append T mask columns [rows, T] for the next step; returns the step's attention_mask [rows, P+T]."""
        new = row_masks.shape[1]
        if self.length + new > self.context:
            raise ContextError(
                f"{self.length:,} cached + {new:,} new tokens > context {self.context:,} that the cache was planned for"
            )
        self.mask[: self.rows, self.length : self.length + new] = row_masks
        return np.ascontiguousarray(self.mask[: self.rows, : self.length + new])  # [rows, P+T]

    def positions(self, row_masks: np.ndarray) -> np.ndarray:
        """position_ids [rows, T] for the next T slots: real tokens counted from 0, left padding at 0 (as core).

        The new counts take effect in `advance`, so a step that never ran leaves the cache as it was.
        """
        counted = self.counts[: self.rows, None] + np.cumsum(row_masks, axis=1)  # [rows, T]
        self._next_counts = counted[:, -1]
        return np.maximum(counted - 1, 0).astype(np.int64)  # [rows, T]

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        """Bind every layer's past (current side, P tokens) and present (other side, P+T tokens) by pointer; shared
        (GQA): both to the one buffer, [rows, H, context, hs].

        A shared cache's bindings are the same at every step of a generation (same buffers, same shape), so they are
        made once per `binding` and row count and kept: re-binding 2 x layers tensors each step added 0.08 ms to the
        demo int4 model's 0.25 ms decoder run. `forget_binding` drops that memory (after the binding's outputs were
        cleared).
        """
        spec, rows = self.spec, self.rows
        if self.shared and self._bound == (binding, rows):
            return
        if self.shared:
            past_shape = present_shape = [rows, spec.num_heads, self.context, spec.head_size]
            src = dst = self._pointers[0]
        else:
            past_shape = [rows, spec.num_heads, self.length, spec.head_size]
            present_shape = [rows, spec.num_heads, self.length + new_tokens, spec.head_size]
            src, dst = self._pointers[self.side], self._pointers[1 - self.side]
        for layer, names in enumerate(self._names):
            for i, (past_name, present_name) in enumerate(names):
                binding.bind_input(past_name, self.device, 0, np.float32, past_shape, src[layer][i])
                binding.bind_output(present_name, self.device, 0, np.float32, present_shape, dst[layer][i])
        self._bound = (binding, rows) if self.shared else None

    def forget_binding(self) -> None:
        """The next `bind` binds every tensor again."""
        self._bound = None

    def advance(self, new_tokens: int) -> None:
        """After a step ran: the present side becomes the past side (shared: the buffer holds P+T now)."""
        self.side = self.side if self.shared else 1 - self.side
        self.length += new_tokens
        self.counts[: self.rows] = self._next_counts

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(key, value) of `layer` as [rows, H, P, hs] numpy views (CPU only; for tests and debugging)."""
        if self.device != "cpu":
            raise RuntimeError("layer() reads CPU buffers only")
        slots = self.context if self.shared else self.length
        shape = (self.rows, self.spec.num_heads, slots, self.spec.head_size)
        n = int(np.prod(shape))
        key, value = self.buffers[self.side][layer]
        return key[:n].reshape(shape)[:, :, : self.length], value[:n].reshape(shape)[:, :, : self.length]
