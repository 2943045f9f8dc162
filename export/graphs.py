"""The three ONNX graphs of the export folder, traced with `torch.onnx.export(dynamo=True)` from the model's own methods.

    vision.onnx     pixel_values [B, 3, S, S]                      -> image_features [B, N, D]  (TinyGPTV.encode_image)
    embedding.onnx  input_ids [B, T], image_features [B, N, D]      -> inputs_embeds [B, T, D]   (TinyGPTV.embed)
    decoder.onnx    inputs_embeds [B, T, D], attention_mask [B, P+T], position_ids [B, T],
                    past_key_values.%d.key/value [B, H, P, hs]      -> logits [B, 1, V], present.%d.key/value [B, H, P+T, hs]

The wrappers below only flatten the KV list into named tensors; the arithmetic is the PyTorch model's, so the graphs
cannot drift from it. The decoder is traced with logits for every position; export.last_logits then cuts lm_head
to the last position, the only one a generator reads. Sample inputs use distinct sizes >= 2 for every dynamic axis: torch.export specialises axes of
size 0 or 1 and merges axes whose sample sizes are equal, and either would freeze an axis the runtime needs free.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim

from core.model import TinyGPTV
from export.gqa import TRANSLATIONS as GQA_TRANSLATIONS
from export.gqa import GQADecoderGraph

logger = logging.getLogger(__name__)

OPSET = 18
# onnxruntime-genai's decoder contract: the same names its genai_config.json templates use.
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
GRAPH_FILES = {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "decoder.onnx"}
TWO_GB = 2**31
# A graph whose weights pass this keeps them in one external data file beside it (`<file>.data`), not in its protobuf:
# ONNX Runtime then builds the initializers from that file without holding the protobuf's copy at the same time, so
# loading does not need the weights twice (real-size folder, measured 2026-12-02: int8 vision, 1.04 GiB, peaks at
# 1.14 GiB RSS while loading instead of 1.79; int4 decoder, 1.58 GiB, at 2.35 instead of 2.79). The demo's and the
# tests' graphs stay single files. runtime.budget's load transient is the protobuf file, so it follows by itself.
EXTERNAL_DATA_FROM = 64 << 20


@dataclass(frozen=True)
class GraphSpec:
    """What a graph must look like: its I/O names and, per name, which axes are dynamic (axis -> symbolic name)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return GRAPH_FILES[self.name]


def kv_names(num_layers: int, past: bool) -> list[str]:
    key, value = (PAST_KEY, PAST_VALUE) if past else (PRESENT_KEY, PRESENT_VALUE)
    return [name % i for i in range(num_layers) for name in (key, value)]


def graph_specs(model: TinyGPTV, attention: str = "plain") -> dict[str, GraphSpec]:
    """The graphs' I/O; `attention` "gqa" (export.gqa): KV in and out are one buffer of max_sequence_length slots."""
    layers = model.config.language_model.num_layers
    past_axis, present_axis = ("max_sequence_length",) * 2 if attention == "gqa" else ("past_sequence_length",
                                                                                      "total_sequence_length")  # fmt: skip
    kv_in = {n: {0: "batch_size", 2: past_axis} for n in kv_names(layers, past=True)}
    kv_out = {n: {0: "batch_size", 2: present_axis} for n in kv_names(layers, past=False)}
    return {
        "vision": GraphSpec(
            "vision",
            ("pixel_values",),
            ("image_features",),
            {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}},
        ),
        "embedding": GraphSpec(
            "embedding",
            ("input_ids", "image_features"),
            ("inputs_embeds",),
            {
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                # Any number of image vectors >= 1: text-only callers pass one row of zeros.
                "image_features": {0: "batch_size", 1: "num_image_tokens"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            },
        ),
        "decoder": GraphSpec(
            "decoder",
            ("inputs_embeds", "attention_mask", "position_ids", *kv_names(layers, past=True)),
            ("logits", *kv_names(layers, past=False)),
            {
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"},
                "logits": {0: "batch_size"},  # [B, 1, V] once export.last_logits has run
                **kv_in,
                **kv_out,
            },
        ),
    }


class VisionGraph(nn.Module):
    def __init__(self, model: TinyGPTV) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)  # [B, N, D]


class EmbeddingGraph(nn.Module):
    def __init__(self, model: TinyGPTV) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids, image_features)  # [B, T, D]


class DecoderGraph(nn.Module):
    """decode() with the KV list flattened into 2L named tensors (key, value per layer), in and out."""

    def __init__(self, model: TinyGPTV) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.language_model.num_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.num_layers)]
        logits, present = self.model.decode(inputs_embeds, attention_mask, position_ids, past)  # [B, T, V]
        return (logits, *[t for kv in present for t in kv])


def sample_inputs(
    model: TinyGPTV, name: str, generator: torch.Generator, attention: str = "plain"
) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: batch 2, sequence 3, past 5 (distinct sizes >= 2, see the module docstring); a GQA decoder's KV
    buffers hold 16 slots."""
    cfg = model.config
    lm = cfg.language_model
    B, T, P = 2, 3, 5
    if name == "vision":
        return (torch.randn(B, 3, cfg.image.size, cfg.image.size, generator=generator),)
    if name == "embedding":
        n = cfg.num_image_tokens if cfg.num_image_tokens not in (B, T) else cfg.num_image_tokens + 1
        ids = torch.randint(0, lm.vocab_size, (B, T + 4), generator=generator)  # [B, T']
        ids[:, 1:3] = cfg.prompt.image_token_id
        return ids, torch.randn(B, n, lm.hidden_size, generator=generator)
    embeds = torch.randn(B, T, lm.hidden_size, generator=generator)  # [B, T, D]
    mask = torch.ones(B, P + T, dtype=torch.long)  # [B, P+T]
    positions = torch.arange(P, P + T)[None].expand(B, -1).contiguous()  # [B, T]
    slots = 16 if attention == "gqa" else P
    past = [torch.randn(B, lm.num_heads, slots, lm.head_size, generator=generator) for _ in range(2 * lm.num_layers)]
    return (embeds, mask, positions, *past)


def _dims(spec: GraphSpec) -> dict[str, Dim]:
    names = {axis for axes in spec.dynamic_axes.values() for axis in axes.values()}
    return {n: Dim(n) for n in sorted(names)}


def _dynamic_shapes(spec: GraphSpec):
    dims = _dims(spec)
    shapes = {n: {a: dims[s] for a, s in spec.dynamic_axes.get(n, {}).items()} for n in spec.inputs}
    if spec.name != "decoder":
        return shapes
    past = tuple(shapes[n] for n in spec.inputs[3:])
    return {"inputs_embeds": shapes["inputs_embeds"], "attention_mask": shapes["attention_mask"],
            "position_ids": shapes["position_ids"], "past_flat": past}  # fmt: skip


def name_axes(graph: ir.Graph, spec: GraphSpec) -> None:
    """torch writes derived axes as expressions ('past_sequence_length + sequence_length'); give them the spec's names."""
    for value in [*graph.inputs, *graph.outputs]:
        axes = spec.dynamic_axes.get(value.name, {})
        if axes and value.shape is not None:
            dims = [ir.SymbolicDim(axes[i]) if i in axes else d for i, d in enumerate(value.shape.dims)]
            value.shape = ir.Shape(dims)


def _module_path(node: ir.Node) -> str | None:
    """The PyTorch module a node came from ('language_model.model.layers.0.self_attn.q_proj'), from torch's metadata."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    modules = ast.literal_eval(scopes)[:-1]  # the last scope is the aten op
    path = modules[-1] if modules and modules[-1] else ""
    if path.startswith("_"):  # torch's placeholder for ops outside any module
        return ""
    return path.removeprefix("model.").removeprefix("model") if path.startswith("model") else path


def name_nodes(graph: ir.Graph) -> None:
    """Hierarchical node names ('/language_model/model/layers.0/self_attn/q_proj/MatMul'), as onnxruntime-genai writes
    them; initializers get TinyGPTV's state-dict names, MatMul weights the parameter they hold transposed
    ('language_model.model.layers.0.self_attn.q_proj.weight', stored [in, out])."""
    for value in list(graph.initializers.values()):
        new = value.name.removeprefix("model.")
        if value.name.startswith("model.") and new not in graph.initializers:
            value.name = new
    used: dict[str, int] = {}
    for node in graph:
        path = _module_path(node)
        if path is None:
            continue
        parts = re.sub(r"\.(\d+)(?=\.|$)", r"%\1", path).split(".") if path else []
        base = "/" + "/".join(p.replace("%", ".") for p in parts) + "/" + node.op_type if parts else "/" + node.op_type
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        if node.op_type == "MatMul" and path and len(node.inputs) == 2:
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer() and weight.name.startswith("val_"):
                new = f"{path}.weight"
                if new not in graph.initializers:
                    weight.name = new


def _matmul_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ self.weight  # weight held [in, out] while tracing
    return out + self.bias if self.bias is not None else out


@contextlib.contextmanager
def transposed_linears(module: nn.Module | None):
    """Hold each nn.Linear's weight as its transpose (a view, no copy) while tracing.

    Traced as is, a Linear becomes MatMul(x, Transpose(W)) and the ONNX optimizer folds the Transpose into a second,
    transposed copy of every weight: +11 GB at Phi-2's size. With the weight already [in, out] the MatMul reads the
    parameter directly, and its initializer keeps the state-dict name. Restored on exit.
    """
    swapped = []
    for linear in module.modules() if module is not None else ():
        if isinstance(linear, nn.Linear):
            swapped.append((linear, linear.weight))
            linear.weight = nn.Parameter(linear.weight.detach().t(), requires_grad=False)  # [in, out] view
            linear.forward = types.MethodType(_matmul_forward, linear)
    try:
        yield
    finally:
        for linear, weight in swapped:
            linear.weight = weight
            del linear.forward  # back to the class's forward


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Raise these loggers to WARNING for the duration (onnx_ir logs every deduplicated initializer at INFO)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(model: TinyGPTV, name: str, path: str | Path, seed: int = 0, attention: str = "plain") -> GraphSpec:
    """Trace one boundary of `model` (eval mode, fp32) into `path`; external data beside it from EXTERNAL_DATA_FROM.

    `attention` "gqa": the decoder with com.microsoft.GroupQueryAttention and a shared KV buffer (export.gqa).
    """
    model = model.eval()
    spec = graph_specs(model, attention)[name]
    gqa = name == "decoder" and attention == "gqa"
    wrapper = GQADecoderGraph(model) if gqa else {"vision": VisionGraph, "embedding": EmbeddingGraph,
                                                  "decoder": DecoderGraph}[name](model)  # fmt: skip
    wrapper = wrapper.eval()
    args = sample_inputs(model, name, torch.Generator().manual_seed(seed), attention)
    chatter = io.StringIO()  # torch.onnx prints its progress to stdout; keep it for the debug log
    with (
        warnings.catch_warnings(),
        torch.no_grad(),
        transposed_linears(model.language_model if name == "decoder" else None),
        contextlib.redirect_stdout(chatter),
        quiet_loggers("onnx_ir", "onnxscript"),
    ):
        warnings.simplefilter("ignore")  # torch.onnx's FutureWarnings and axis-renaming chatter, none actionable
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=True,
            verbose=False,
            custom_translation_table=GQA_TRANSLATIONS if gqa else None,
        )
    logger.debug(chatter.getvalue())
    name_axes(program.model.graph, spec)
    name_nodes(program.model.graph)
    path = Path(path)
    size = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)  # the traced part only
    large = size > EXTERNAL_DATA_FROM
    program.save(path, external_data=large)  # torch names the data file `<file>.data`
    logger.info("wrote %s (%s)", path, "external data" if large else "one file")
    return spec
