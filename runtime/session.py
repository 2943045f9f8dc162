"""ONNX Runtime sessions for the graphs of an export folder: provider, threads, I/O check, warm-up.

    sessions = Sessions.create(manifest, provider="cpu", threads=2)
    sessions.warm_up()            # one small run of each graph, so the first answer is not the slow one

Threads: `threads` sets each session's intra-op pool (None = onnxruntime's default, one per physical core). The three
graphs run one after another, never at once, so inter-op parallelism stays off. The CPU arena is off: the runtime
keeps its big buffers (KV cache, decode logits) itself, and without the arena the memory of a prefill goes back to the
system after it, which keeps the measured peak inside the memory plan. Pool threads spin between ops by default
(onnxruntime's, genai's and llama.cpp's default): on a quiet 2-core box the real-size int4 decode step is 89.5 ms with
spinning against 98.5 ms without (10 % faster). On a machine shared with other work, spinning workers steal the cores
the main thread and the other processes need (the demo step went from 3-4 ms to 6-8 ms on 2 busy cores): `spin=False`
(CLI `--no-spin`) lets them sleep instead. Only the decoder's pool spins: the vision and embedding graphs run once per
request, and their spinning pools (onnxruntime keeps spinning a while after a run) took the cores from the prefill that
follows (demo time to first token 19-27 ms -> 38-50 ms with every pool spinning). The prefill graph (export.quantize:
an int8 decoder for prompts, when the plan loads it) runs once per request too, and its ops are milliseconds long: it
does not spin either.
After each graph loads, the C heap is trimmed (glibc's malloc_trim): loading parses the graph's protobuf and prepacks
its weights, and the freed buffers would otherwise stay resident for the life of the process (measured on the real-size
int4 Phi-2 decoder: 2.98 GB resident after loading a 1.70 GB file, 2.34 GB after the trim).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from runtime.errors import ManifestError, ProviderError, RuntimeInputError
from runtime.manifest import Manifest

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(provider: str) -> list[str]:
    """'cpu' | 'cuda' -> the onnxruntime provider list; ProviderError naming the available ones if missing."""
    available = ort.get_available_providers()
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted not in available:
        have = ", ".join(p for p in available if p != "AzureExecutionProvider")
        extra = " (install onnxruntime-gpu instead of onnxruntime for CUDA)" if provider == "cuda" else ""
        raise ProviderError(
            f"provider {provider!r} ({wanted}) is not available in this onnxruntime; have: {have}{extra}"
        )
    return [wanted, "CPUExecutionProvider"] if provider != "cpu" else [wanted]


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")  # module docstring
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings about unused initializers are not the user's
    return opts


@functools.cache
def _libc_function(name: str):
    """A C library function by name, looked up once (find_library runs a subprocess); None where there is none."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): no such function this way
        return None


def release_freed_memory() -> int:
    """Give the C heap's free pages back to the system (glibc malloc_trim); the bytes of RSS that went, 0 elsewhere."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return 0
    before = _resident_bytes()
    trim(0)
    return max(before - _resident_bytes(), 0)


def release_pages(array: np.ndarray) -> int:
    """Hand the whole pages of `array`'s buffer back to the system (madvise MADV_DONTNEED; Linux): they read as zeros
    afterwards and take no memory until written again. For buffers whose content is no longer needed but whose
    allocation stays (a KV cache between requests). Returns the bytes advised (0 where madvise is not available)."""
    madvise = _libc_function("madvise")
    if madvise is None or not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        return 0
    page = mmap.PAGESIZE
    first = -(-array.ctypes.data // page) * page  # whole pages inside the buffer only
    last = (array.ctypes.data + array.nbytes) // page * page
    if last <= first:
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return last - first if madvise(first, last - first, 4) == 0 else 0  # 4 = MADV_DONTNEED


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * 4096  # pages of 4 KiB (Linux, where glibc is)
    except OSError:
        return 0


def _check_io(session: ort.InferenceSession, manifest: Manifest, name: str) -> None:
    """The graph's inputs and outputs must be the ones the manifest names; a mismatch means a broken export."""
    spec = manifest.graphs[name]
    have_in = [i.name for i in session.get_inputs()]
    have_out = [o.name for o in session.get_outputs()]
    want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    if sorted(have_in) != sorted(want_in) or sorted(have_out) != sorted(want_out):
        raise ManifestError(
            f"{manifest.path(spec.file)}: inputs {have_in} / outputs {have_out} differ from the manifest's "
            f"{want_in} / {want_out}; export the model again"
        )


@dataclass
class Sessions:
    """The graphs' sessions. `vision` is None while released (vision "release"), `embedding` None when the runtime
    embeds from the memory-mapped table (runtime.embedding), `decoder_prefill` None unless the plan runs prompts
    through the folder's prefill graph (runtime.budget); `load` and `release` (re)load and drop one graph."""

    vision: ort.InferenceSession | None
    embedding: ort.InferenceSession | None
    decoder: ort.InferenceSession
    manifest: Manifest
    provider: str
    threads: int | None
    spin: bool = True  # pool threads spin between ops (module docstring)
    load_seconds: float = 0.0
    trimmed_bytes: int = 0  # heap memory handed back to the system after loading (release_freed_memory)
    decoder_prefill: ort.InferenceSession | None = None  # the decoder's twin for prompts (export.quantize), if loaded

    @property
    def device_type(self) -> str:
        return "cuda" if self.provider == "cuda" else "cpu"

    @classmethod
    def create(
        cls,
        manifest: Manifest,
        provider: str = "cpu",
        threads: int | None = None,
        graphs: tuple[str, ...] = ("vision", "embedding", "decoder"),
        spin: bool = True,
    ) -> Sessions:
        """Load `graphs` (the decoder always), in order; the others stay None until `load`."""
        sessions = cls(None, None, None, manifest, provider, threads, spin)  # type: ignore[arg-type]
        start = time.perf_counter()
        for name in graphs:
            sessions.load(name)
        if sessions.decoder is None:
            sessions.load("decoder")
        sessions.load_seconds = time.perf_counter() - start
        logger.info("loaded %s from %s in %.2f s (%s, threads=%s); %.0f MiB of load buffers released",
                    ", ".join(graphs), manifest.folder, sessions.load_seconds, provider, threads,
                    sessions.trimmed_bytes / 2**20)  # fmt: skip
        return sessions

    def load(self, name: str) -> float:
        """Create the session of graph `name` (vision, embedding, decoder, decoder_prefill); returns the seconds."""
        start = time.perf_counter()
        path = self.manifest.path(self.manifest.graphs[name].file)
        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=session_options(self.threads, self.spin and name == "decoder"),
                providers=resolve_provider(self.provider),
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ManifestError(f"{path}: onnxruntime cannot load this graph ({first})") from None
        _check_io(session, self.manifest, name)
        setattr(self, name, session)
        self.trimmed_bytes += release_freed_memory()  # before the next graph loads: lowers the peak of loading too
        return time.perf_counter() - start

    def release(self, name: str) -> int:
        """Drop graph `name`'s session (its weights, prepacked buffers and arena); returns the RSS bytes that went."""
        if getattr(self, name) is None:
            return 0
        before = _resident_bytes()
        setattr(self, name, None)  # the only reference: onnxruntime frees the session now
        release_freed_memory()
        return max(before - _resident_bytes(), 0)

    def warm_up(self) -> float:
        """Run each loaded graph once on the smallest inputs (batch 1, 2 tokens); returns the seconds it took."""
        m, d = self.manifest, self.manifest.decoder
        start = time.perf_counter()
        features = np.zeros((1, m.num_image_tokens, d.hidden_size), dtype=np.float32)  # [1, N, D]
        if self.vision is not None:
            pixels = np.zeros((1, 3, m.image.size, m.image.size), dtype=np.float32)  # [1, 3, S, S]
            (features,) = self.vision.run(None, {"pixel_values": pixels})  # [1, N, D]
        embeds = np.zeros((1, 2, d.hidden_size), dtype=np.float32)  # [1, 2, D]
        if self.embedding is not None:
            ids = np.full((1, 2), m.bos_token_id, dtype=np.int64)  # [1, 2]
            (embeds,) = self.embedding.run(None, {"input_ids": ids, "image_features": features})  # [1, 2, D]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, 2), dtype=np.int64),
            "position_ids": np.arange(2, dtype=np.int64)[None],
        }
        slots = 2 if d.attention == "gqa" else 0  # GQA: a buffer with room for the 2 tokens (export.gqa)
        empty = np.zeros((1, d.num_heads, slots, d.head_size), dtype=np.float32)  # [1, H, 0 or 2, hs]
        for layer in range(d.num_layers):
            feeds[d.past_key(layer)] = empty
            feeds[d.past_value(layer)] = empty
        for decoder in (self.decoder, self.decoder_prefill):
            if decoder is not None:
                decoder.run(["logits"], feeds)
        seconds = time.perf_counter() - start
        logger.info("warm-up: %.3f s", seconds)
        return seconds
