"""The memory plan: what loading and running an export will take, worked out from the manifest before loading anything.

    plan = plan_memory(manifest, context=512, batch_size=1, budget="8GB")
    print(plan.describe())        # the table `python -m runtime --plan` prints
    plan.check()                  # BudgetError with the numbers and what would fit, if over budget

Terms (bytes):
- weights: the graph files and their external data as they lie on disk (ONNX Runtime holds them once in memory);
- prepacked: onnxruntime repacks int4 MatMulNBits weights at load for its int8-activation kernel (accuracy level 4),
  and the packed copy is bigger than the file's blocks, by about PREPACK_BYTES_PER_BLOCK bytes per block of weights:
  measured on real-size int4 Phi-2 decoders once the load buffers are trimmed (runtime.session), 2,226 MiB resident
  for a 1,583 MiB file at block 32 (8.1 bytes a block) and 1,516 MiB for 1,346 MiB at block 128 (8.6), so 0.42 x an
  int4 decoder's bytes at block 32 and 0.12 x at block 128 (`prepack_fraction`, from the manifest's block size);
- load transient: while a graph loads, ONNX Runtime holds its protobuf and the initializers made from it at once,
  so the largest graph file counts a second time until loading ends; a graph with external data (`<file>.data`,
  written for graphs over 64 MiB since 2026-12-02, export.graphs.EXTERNAL_DATA_FROM) counts only its protobuf file:
  its initializers are built from the data file, not from a second copy (measured at real size: the int8 vision's
  load peak went from 1.66x its bytes to 1.03x, the int4 decoder's from 1.18x to 1.03x of its resident size);
- KV cache: 2 (key, value) x layers x heads x head size x context x 4 bytes x batch, twice: the contract's decoder
  writes `present` (past + new) to a different buffer than `past`, so the runtime keeps two fixed buffers and swaps
  them each step instead of allocating; once for a GQA decoder (manifest `decoder.attention: "gqa"`), whose past and
  present are one buffer (runtime.kv_cache);
- activations: the largest step (prefill of a full context, or the vision encoder), summed over the three sessions
  because each session keeps its own arena. The prompt is prefilled in chunks of PREFILL_CHUNK tokens (runtime.generate),
  so a step holds one chunk's logits ([B, 1, V], or [B, C, V] in folders from before export.last_logits), attention
  scores [B, H, C, context] and hidden states, not the whole prompt's: at context 2,048 of Phi-2 the scores alone
  would be 1 GiB [1, 32, 2048, 2048] instead of 128 MiB. A GQA decoder prefills a batch of several rows in one run
  (runtime.generate), so there the step is the whole context;
- arena: ONNX Runtime's allocator overhead on the activations (chunk rounding, fragmentation);
- runtime: the Python interpreter, numpy, onnxruntime and its thread pools, the tokenizer; measured, not derived;
- embedding table: a folder with `embedding.safetensors` (export.embedding_table) is embedded by gathering rows from
  the memory-mapped table (runtime.embedding) instead of through the embedding graph's session, so neither the graph
  nor the table counts in `weights`; only the pages of one gather's rows are resident, and only during it (`table`:
  context x batch rows, each rounded up to whole pages), and they are counted with the run;
- vision "release": the vision session is loaded for each request's images and released right after encoding them,
  and the KV cache of the previous request is released before it loads (runtime.pipeline), so the vision graph and
  the KV cache are never resident together. Its weights are then not in `weights` but in `vision phase`: its file
  bytes, plus the larger of its load transient (its file again) and its activations with their arena. The decoder's
  activations no longer add the vision's, and `load transient` counts only the graphs loaded at start.
  "keep" loads the three graphs at start and keeps them (no reload per request). "auto" keeps when that plan fits
  the budget and releases when only the release plan fits (the reload costs seconds per image: see runtime.pipeline).
- prefill graph: a folder exported with `--prefill-graph int8` (export.quantize) holds the decoder twice, int4 for
  decode steps and int8 for prompts (~4x faster prefill). "graph" loads the int8 one too: its file bytes stay resident
  (measured at 8 Phi-2 layers: 1.02x its bytes after load; onnxruntime packs the int8 weights and drops the file's
  copy), and while it loads a transient of PREFILL_LOAD_FRACTION of them. Its arena holds the prompt's activations,
  the decoder's then only a step's, so activations do not change. "decoder" runs prompts through the int4 decoder
  and leaves the int8 graph on disk; "auto" (the default) loads it when that plan fits the budget, before keeping
  the vision graph: a prompt is prefilled on every request, an image loaded once per request.
Peak = runtime + weights + prepacked + prefill graph
       + max(load transient, KV cache + activations + arena + table, vision phase).
"""

from __future__ import annotations

import mmap
import re
from dataclasses import asdict, dataclass, replace

from runtime.errors import BudgetError, RuntimeInputError
from runtime.manifest import PREFILL_GRAPH, Manifest

FLOAT_BYTES = 4  # the KV cache and activations are float32 in every export this kit writes
# Measured: python + numpy + onnxruntime + tokenizers + Pillow + three sessions and their thread pools
# (about 75 MiB on CPU); CUDA adds its libraries and context.
RUNTIME_OVERHEAD = {"cpu": 96 << 20, "cuda": 1536 << 20}
# Prompt tokens per decoder run during prefill: bounds the prefill's activations (above) whatever the context, and
# large enough that a chunk's MatMuls still run at full speed (llama.cpp's micro-batch is 512).
PREFILL_CHUNK = 256
ARENA_FRACTION = 0.5  # arena overhead as a fraction of activations (power-of-two chunk growth, at most 2x)
PREPACK_BYTES_PER_BLOCK = 8.4  # int4 decoder: resident bytes beyond the file per block of weights (docstring)
VISION_MODES = ("auto", "keep", "release")
PREFILL_MODES = ("auto", "graph", "decoder")
PREFILL_LOAD_FRACTION = 0.2  # the int8 prefill graph's load peak beyond its bytes; measured 0.17 at 8 Phi-2 layers
EMBEDDING_MODES = ("auto", "table", "graph")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def prepack_fraction(block_size: int) -> float:
    """Resident bytes beyond the file per byte of an int4 decoder: PREPACK_BYTES_PER_BLOCK per block, over the file's
    0.5 + 4 / block_size bytes per weight (4 bits and a float scale per block)."""
    return PREPACK_BYTES_PER_BLOCK / block_size / (0.5 + 4 / block_size)


def parse_bytes(text: str | int | float) -> int:
    """'8GB', '8G', '8GiB', '512MB', '1.5g', 2_000_000 -> bytes. Units are binary (8GB = 8 x 2**30), as Docker and Java."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise RuntimeInputError(f"memory budget must be positive, got {text}")
        return int(text)
    match = _SIZE.match(str(text))
    if not match:
        raise RuntimeInputError(f"memory budget {text!r} is not a size; write it like 8GB, 512MB or 1.5GB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise RuntimeInputError(f"memory budget must be positive, got {text!r}")
    return value


def format_bytes(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '1.50 GiB', '12.0 MiB', '512 B'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    provider: str
    context: int
    batch_size: int
    weights: int
    load_transient: int
    kv_cache: int
    activations: int
    arena: int
    runtime: int
    kv_bytes_per_token: int  # per token of context, every buffer (two, or one for GQA), the whole batch
    weights_int4: int  # what the weights would take as an int4 export (estimate), for the suggestion
    largest_context: int = 0  # the largest context (a multiple of 64, or of 16 below 64) that fits; 0 if none
    prepacked: int = 0  # int4 weights repacked by onnxruntime at load, beyond the file's bytes
    kv_layout: str = "two swapped buffers"  # or "one shared buffer" (GQA)
    vision: str = "keep"  # "keep": the vision session stays loaded; "release": loaded per request, then released
    embedding: str = "graph"  # "graph": the embedding graph's session; "table": rows gathered from the mapped table
    vision_phase: int = 0  # "release": vision weights + max(their load transient, vision activations + arena)
    table: int = 0  # "table": the table's pages one gather makes resident (context x batch rows)
    prefill: str = "decoder"  # "graph": prompts run through the folder's int8 prefill graph; "decoder": the decoder
    prefill_graph: int = 0  # "graph": the prefill graph's bytes, resident beside the decoder

    @property
    def run(self) -> int:
        return self.kv_cache + self.activations + self.arena + self.table

    @property
    def peak(self) -> int:
        base = self.runtime + self.weights + self.prepacked + self.prefill_graph
        return base + max(self.load_transient, self.run, self.vision_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak, "fits": self.fits}

    def describe(self) -> str:
        where = "GPU memory" if self.provider == "cuda" else "memory (RSS)"
        kept = "graph files resident throughout" + (
            ", vision released after each request's images" if self.vision == "release" else ""
        )
        rows = [
            ("weights", self.weights, kept),
            ("prepacked", self.prepacked, "int4 weights repacked at load (MatMulNBits)"),
            ("prefill graph", self.prefill_graph, "int8 decoder for prompts, beside the int4 one"),
            ("load transient", self.load_transient, "largest graph's protobuf, held while it loads"),
            ("KV cache", self.kv_cache, f"context {self.context:,} x batch {self.batch_size}, {self.kv_layout}"),
            (
                "activations",
                self.activations,
                "largest step: chunked prefill" + (" or vision" if self.vision == "keep" else ""),
            ),
            ("arena", self.arena, "allocator overhead on activations"),
            ("table", self.table, "embedding table pages of one gather (memory-mapped)"),
            ("vision phase", self.vision_phase, "vision loaded per request: weights + load or activations"),
            ("runtime", self.runtime, f"Python + onnxruntime ({self.provider})"),
        ]
        if self.embedding == "graph":
            rows = [r for r in rows if r[0] != "table"]
        if self.vision == "keep":
            rows = [r for r in rows if r[0] != "vision phase"]
        if self.prefill != "graph":
            rows = [r for r in rows if r[0] != "prefill graph"]
        lines = [f"memory plan ({where}):"]
        lines += [f"  {name:<15}{format_bytes(value):>12}  {why}" for name, value, why in rows]
        verdict = "fits" if self.fits else "OVER BUDGET"
        lines.append(f"  {'peak':<15}{format_bytes(self.peak):>12}  of budget {format_bytes(self.budget)}: {verdict}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise BudgetError with the numbers and what would fit when the peak is over the budget."""
        if self.fits:
            return
        hints = []
        if 0 < self.largest_context < self.context:
            hints.append(f"--context {self.largest_context}")
        if self.batch_size > 1:
            hints.append("a smaller --batch-size")
        if self.prefill == "graph" and self.peak - self.prefill_graph <= self.budget:
            hints.append("--prefill decoder (prompts through the int4 decoder, slower)")
        ratio = self.weights_int4 / max(self.weights, 1)
        int4_peak = (
            self.runtime
            + self.weights_int4
            + self.prepacked
            + max(int(self.load_transient * ratio), self.run, self.vision_phase)
        )
        if self.weights_int4 < self.weights and int4_peak <= self.budget:
            hints.append(f"an int4 export (about {format_bytes(self.weights_int4)} of weights)")
        hint = "; would fit: " + " or ".join(hints) if hints else "; nothing smaller fits, raise --memory-budget"
        raise BudgetError(
            f"planned peak {format_bytes(self.peak)} > budget {format_bytes(self.budget)} "
            f"(weights {format_bytes(self.weights)} + KV cache {format_bytes(self.kv_cache)} for context "
            f"{self.context:,} x batch {self.batch_size} + activations {format_bytes(self.activations + self.arena)} "
            f"+ runtime {format_bytes(self.runtime)}){hint}"
        )


def _vision_activations(manifest: Manifest, batch_size: int) -> int:
    """Vision encoder's largest step from the source config if the manifest carries it, else from the image size."""
    cfg = manifest.source.get("config") if isinstance(manifest.source.get("config"), dict) else {}
    vision = cfg.get("vision", {}) if isinstance(cfg, dict) else {}
    size = manifest.image.size
    patch = int(vision.get("patch_size", 14))
    width = int(vision.get("hidden_size", 1408))
    heads = int(vision.get("num_heads", 16))
    inner = int(vision.get("intermediate_size", 4 * width))
    tokens = (size // patch) ** 2 + 1
    per_image = 2 * heads * tokens * tokens + tokens * (6 * width + 2 * inner)  # scores + softmax, hidden states
    return batch_size * per_image * FLOAT_BYTES


def _decoder_activations(manifest: Manifest, context: int, batch_size: int, chunk: int = PREFILL_CHUNK) -> int:
    """Prefill of a full context in chunks: one chunk's logits, attention scores against the whole context and hidden
    states, and the embeddings of the whole prompt (the embedding graph's output, then its last logits)."""
    d = manifest.decoder
    cfg = manifest.source.get("config") if isinstance(manifest.source.get("config"), dict) else {}
    lm = cfg.get("language_model", {}) if isinstance(cfg, dict) else {}
    inner = int(lm.get("intermediate_size", 4 * d.hidden_size))
    several_gqa_rows = d.attention == "gqa" and batch_size > 1  # one prefill run, not chunks (runtime.generate)
    step = context if several_gqa_rows else min(context, chunk)
    logits = (1 if d.logits_positions == "last" else step) * d.vocab_size
    scores = 2 * d.num_heads * step * context
    hidden = step * (8 * d.hidden_size + 2 * inner)
    embeds = 2 * context * d.hidden_size  # the embedding graph's output, then the decoder's copy
    return batch_size * (logits + scores + hidden + embeds) * FLOAT_BYTES


def graph_bytes(manifest: Manifest, name: str, sizes: dict[str, int]) -> int:
    """A graph's file and its external data (`<file>.data`, or any file named `<file>.` something)."""
    file = manifest.graphs[name].file
    return sum(size for n, size in sizes.items() if n == file or n.startswith(file + "."))


def uses_table(manifest: Manifest, embedding: str = "auto") -> bool:
    """Whether the runtime embeds from the memory-mapped table: "auto" when the manifest names one."""
    if embedding not in EMBEDDING_MODES:
        raise RuntimeInputError(f"embedding {embedding!r}; choose one of {', '.join(EMBEDDING_MODES)}")
    has = bool(manifest.raw.get("embedding_table"))
    if embedding == "table" and not has:
        raise RuntimeInputError(
            f"{manifest.folder}: no embedding table in this folder (exported before it); use --embedding graph, "
            "or add one with python -m export.embedding_table"
        )
    return has and embedding != "graph"


def plan_memory(
    manifest: Manifest,
    context: int | None = None,
    batch_size: int = 1,
    budget: str | int = "8GB",
    provider: str = "cpu",
    search: bool = True,
    vision: str = "keep",
    embedding: str = "auto",
    prefill: str = "auto",
) -> MemoryPlan:
    """Plan memory for running `manifest`'s export with a KV cache of `context` tokens for `batch_size` rows.

    vision "keep" | "release" | "auto" (keep if that fits `budget`, else release); embedding "auto" | "table" |
    "graph"; prefill "auto" | "graph" | "decoder" (see the module docstring). With an "auto", the first choice that
    fits, in this order: prefill graph before vision kept; if none fits, the smallest (whose check() says why).
    """
    if vision not in VISION_MODES:
        raise RuntimeInputError(f"vision {vision!r}; choose one of {', '.join(VISION_MODES)}")
    if prefill not in PREFILL_MODES:
        raise RuntimeInputError(f"prefill {prefill!r}; choose one of {', '.join(PREFILL_MODES)}")
    has_graph = PREFILL_GRAPH in manifest.graphs
    if prefill == "graph" and not has_graph:
        raise RuntimeInputError(
            f"{manifest.folder}: no prefill graph in this folder; export with --prefill-graph int8, or use "
            "--prefill decoder"
        )
    if prefill == "auto" and not has_graph:
        prefill = "decoder"
    if "auto" in (vision, prefill):
        choices = [(v, p) for p in (("graph", "decoder") if prefill == "auto" else (prefill,))
                   for v in (("keep", "release") if vision == "auto" else (vision,))]  # fmt: skip
        for v, p in choices:
            plan = plan_memory(manifest, context, batch_size, budget, provider, False, v, embedding, p)
            if plan.fits:
                break
        return (
            replace(plan, largest_context=_largest_context(plan, manifest, vision, embedding, prefill))
            if search
            else plan
        )
    d = manifest.decoder
    context = d.context_length if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise RuntimeInputError(f"context must be a positive number of tokens, got {context!r}")
    if context > d.context_length:
        raise RuntimeInputError(
            f"context {context:,} is longer than the model's {d.context_length:,} positions; "
            f"use --context {d.context_length} or less"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise RuntimeInputError(f"batch size must be a positive integer, got {batch_size!r}")
    sizes = manifest.weight_sizes()
    table = uses_table(manifest, embedding)
    table_file = manifest.raw["embedding_table"]["file"] if manifest.raw.get("embedding_table") else None
    sizes_all = dict(sizes)
    prefill_bytes = graph_bytes(manifest, PREFILL_GRAPH, sizes) if has_graph else 0
    for name in [n for n in sizes if has_graph and graph_bytes(manifest, PREFILL_GRAPH, {n: sizes[n]})]:
        sizes.pop(name)  # counted apart (prefill_graph), and only when loaded
    if table_file is not None:  # the table file is never loaded whole; the embedding graph only without it
        sizes.pop(table_file, None)
    if table:
        for name in list(sizes):
            if graph_bytes(manifest, "embedding", {name: sizes[name]}):
                sizes.pop(name)
    vision_bytes = graph_bytes(manifest, "vision", sizes)
    loaded = [
        g
        for g in manifest.graphs
        if g != PREFILL_GRAPH and not (g == "embedding" and table) and not (g == "vision" and vision == "release")
    ]
    weights = sum(sizes.values()) - (vision_bytes if vision == "release" else 0)
    load_transient = max((sizes.get(manifest.graphs[g].file, 0) for g in loaded), default=0)
    if prefill == "graph":
        load_transient = max(load_transient, int(prefill_bytes * PREFILL_LOAD_FRACTION))
    buffers = 1 if d.attention == "gqa" else 2  # GQA: past and present share one buffer (runtime.kv_cache)
    kv_per_token = buffers * 2 * d.num_layers * d.num_heads * d.head_size * FLOAT_BYTES * batch_size
    vision_acts = _vision_activations(manifest, batch_size)
    activations = _decoder_activations(manifest, context, batch_size) + (vision_acts if vision == "keep" else 0)
    vision_phase = 0
    if vision == "release":
        vision_phase = vision_bytes + max(sizes.get(manifest.graphs["vision"].file, 0),
                                          vision_acts + int(vision_acts * ARENA_FRACTION))  # fmt: skip
    table_pages = 0
    if table:  # each row read touches the pages it spans (and its int8 scale's page)
        entry = manifest.raw["embedding_table"]
        row = d.hidden_size * {"float32": 4, "float16": 2, "int8": 1}.get(entry.get("dtype", "float32"), 4)
        pages = -(-row // mmap.PAGESIZE) + 1 + (1 if entry.get("scales") else 0)
        table_pages = min(context * batch_size, d.vocab_size) * pages * mmap.PAGESIZE
    q = manifest.quantization if isinstance(manifest.quantization, dict) else {}
    dec_q = q.get("decoder") if isinstance(q.get("decoder"), dict) else {}
    already_int4 = q.get("precision") == "int4" or q.get("bits") == 4 or dec_q.get("bits") == 4
    # export.onnx's int4 quantizes the decoder's MatMuls: ~4.5 bits with a float scale per 32 weights; norms and
    # biases stay float (about 1/8 of the decoder); the vision and embedding graphs keep their precision
    decoder_bytes = graph_bytes(manifest, "decoder", sizes_all)  # with its external data, if it has one
    weights_int4 = weights if already_int4 else int(weights - decoder_bytes * 0.875 * (1 - 4.5 / 32))
    plan = MemoryPlan(
        budget=parse_bytes(budget),
        provider=provider,
        context=context,
        batch_size=batch_size,
        weights=weights,
        load_transient=load_transient,
        kv_cache=kv_per_token * context,
        activations=activations,
        arena=int(activations * ARENA_FRACTION),
        runtime=RUNTIME_OVERHEAD.get(provider, RUNTIME_OVERHEAD["cpu"]),
        kv_bytes_per_token=kv_per_token,
        weights_int4=weights_int4,
        prepacked=int(decoder_bytes * prepack_fraction(int(dec_q.get("block_size") or 32))) if already_int4 else 0,
        kv_layout="one shared buffer" if buffers == 1 else "two swapped buffers",
        vision=vision,
        embedding="table" if table else "graph",
        vision_phase=vision_phase,
        table=table_pages,
        prefill=prefill,
        prefill_graph=prefill_bytes if prefill == "graph" else 0,
    )
    return (
        replace(plan, largest_context=_largest_context(plan, manifest, vision, embedding, prefill)) if search else plan
    )


def _largest_context(
    plan: MemoryPlan, manifest: Manifest, vision: str = "keep", embedding: str = "auto", prefill: str = "auto"
) -> int:
    """Binary search over contexts (multiples of 64, or 16 for small models) for the largest whose plan fits."""
    if plan.fits:
        return plan.context
    step = 64 if plan.context >= 128 else 16
    low, high = 0, -(-plan.context // step)  # low fits (0 = nothing), high does not (high * step >= context)
    while high - low > 1:
        mid = (low + high) // 2
        trial = plan_memory(
            manifest, mid * step, plan.batch_size, plan.budget, plan.provider, False, vision, embedding, prefill
        )
        low, high = (mid, high) if trial.fits else (low, mid)
    return low * step
