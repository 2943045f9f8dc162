"""Validation after every export, in the manner of optimum's: signatures first, then numbers against PyTorch.

    report = validate_folder(folder, model, tokenizer, precision="fp32")
    report["passed"]  # False for fp32 outside FP32_TOLERANCE: the exporter then refuses the folder

1. Signatures: each graph's input and output names in the declared order, every declared dynamic axis symbolic (by its
   name) and every other axis a fixed number.
   The decoder's logits are the last position's ([B, 1, V], export.last_logits): compared with PyTorch's last row.
2. Random inputs, batch 2 with the first row left-padded: vision, embedding, then the decoder at past length 0 (prefill)
   and 3 decode steps, each side feeding back its own KV cache (a GQA decoder, export.gqa: one buffer per layer bound
   as both past and present, as the runtime runs it).
   A folder with a prefill graph (export.quantize: decoder_prefill.onnx) runs the prefill through it and the decode
   steps through the decoder, against the same cache, as the runtime does.
3. A real input, batch 1: a drawn image and a templated question through vision -> embedding -> decoder, prefill and
   3 greedy steps. Both sides are fed PyTorch's greedy token so the comparison stays on one sequence; whether the
   ONNX argmax agreed is reported per step.
Per output, the largest absolute difference and the relative one (largest absolute difference / largest |PyTorch value|),
maximised over steps; `present.*` outputs of all layers are folded into `present`.

fp32 tolerance: |onnx - torch| <= FP32_ATOL + FP32_RTOL * max|torch| on every output. Quantized exports are measured
against the fp32 PyTorch model and reported, not failed (their error is the quantization's, shown in the quality table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw

from core.image import preprocess_for
from core.model import TinyGPTV
from core.phi import position_ids_from_mask
from core.prompts import build_prompt
from core.tokenizer import TextTokenizer
from export.graphs import GraphSpec, graph_specs
from export.manifest import PREFILL_FILE
from export.manifest import PREFILL_GRAPH as PREFILL

logger = logging.getLogger(__name__)

FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
DECODE_STEPS = 3


def open_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_signature(session: ort.InferenceSession, spec: GraphSpec) -> list[str]:
    """Problems with a session's I/O against the spec: names, order, dynamic and fixed axes. Empty when all is right."""
    problems = []
    for kind, values, names in (
        ("input", session.get_inputs(), spec.inputs),
        ("output", session.get_outputs(), spec.outputs),
    ):
        found = [v.name for v in values]
        if found != list(names):
            problems.append(f"{spec.name} {kind}s are {found}, expected {list(names)}")
            continue
        for value in values:
            axes = spec.dynamic_axes.get(value.name, {})
            for axis, dim in enumerate(value.shape):
                if axis in axes and dim != axes[axis]:
                    problems.append(f"{spec.name} {value.name} axis {axis} is {dim!r}, expected dynamic {axes[axis]!r}")
                if axis not in axes and not isinstance(dim, int):
                    problems.append(f"{spec.name} {value.name} axis {axis} is {dim!r}, expected a fixed size")
    return problems


def _diff(found: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    ref_np = ref.detach().float().numpy()
    if found.shape != ref_np.shape:
        raise AssertionError(f"shape {found.shape} differs from PyTorch's {ref_np.shape}")
    worst = float(np.abs(found.astype(np.float32) - ref_np).max()) if found.size else 0.0
    scale = float(np.abs(ref_np).max()) if found.size else 0.0
    return worst, worst / scale if scale > 0 else worst


class _Tracker:
    """Largest differences per output over every step; an output name folds `present.3.key` into `present`."""

    def __init__(self) -> None:
        self.outputs: dict[str, dict[str, float]] = {}

    def add(self, name: str, found: np.ndarray, ref: torch.Tensor) -> None:
        key = "present" if name.startswith("present.") else name
        worst, rel = _diff(found, ref)
        scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
        entry = self.outputs.setdefault(key, {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "max_abs_ref": 0.0})
        if not np.isfinite(found).all():
            worst = rel = float("inf")
        entry["max_abs_diff"] = max(entry["max_abs_diff"], worst)
        entry["max_rel_diff"] = max(entry["max_rel_diff"], rel)
        entry["max_abs_ref"] = max(entry["max_abs_ref"], scale)


def _decoder_feed(names, embeds, mask, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    positions = position_ids_from_mask(torch.from_numpy(mask), embeds.shape[1]).numpy()
    return dict(zip(names, [embeds, mask, positions, *past]))


def _is_gqa(spec: GraphSpec) -> bool:
    return spec.dynamic_axes.get(spec.inputs[3], {}).get(2) == "max_sequence_length"


def run_shared_buffer(session: ort.InferenceSession, spec: GraphSpec, feed: dict, buffers: list[np.ndarray]):
    """One run of a GQA decoder (export.gqa) as the runtime does it: each past and its present bound to one buffer
    [B, H, slots, hs]; returns [logits, *present] with present cut to the P+T slots in use (copies)."""
    binding = session.io_binding()
    for name in spec.inputs[:3]:
        binding.bind_cpu_input(name, np.ascontiguousarray(feed[name]))
    binding.bind_output(spec.outputs[0], "cpu")
    for past, present, buffer in zip(spec.inputs[3:], spec.outputs[1:], buffers):
        binding.bind_input(past, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        binding.bind_output(present, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    session.run_with_iobinding(binding)
    used = feed["attention_mask"].shape[1]  # P+T
    return [binding.get_outputs()[0].numpy(), *[b[:, :, :used].copy() for b in buffers]]


def _run_decoder_chain(model, sessions, specs, tracker, embeds, mask, step_embeds_fn) -> list[dict[str, Any]]:
    """Prefill (past 0) then DECODE_STEPS steps on both sides; step_embeds_fn(step, pt_logits) gives the next inputs.

    A GQA decoder runs against shared buffers (run_shared_buffer). Its cached keys of a left-padded row may be rotated
    by the padding (export.gqa: rotary by slot), so its `present` is compared on rows without left padding.
    """
    lm = model.config.language_model
    spec = specs["decoder"]
    B = embeds.shape[0]
    gqa = _is_gqa(spec)
    slots = mask.shape[1] + DECODE_STEPS if gqa else 0
    buffers = [np.zeros((B, lm.num_heads, slots, lm.head_size), np.float32) for _ in range(2 * lm.num_layers)]
    ort_past = buffers
    pt_past = None
    steps = []
    for step in range(DECODE_STEPS + 1):
        session = sessions.get(PREFILL, sessions["decoder"]) if step == 0 else sessions["decoder"]
        feed = _decoder_feed(spec.inputs, embeds, mask, ort_past)
        found = run_shared_buffer(session, spec, feed, buffers) if gqa else session.run(None, feed)
        with torch.no_grad():
            pt_logits, present = model.decode(
                torch.from_numpy(embeds), torch.from_numpy(mask), torch.from_numpy(feed["position_ids"]), pt_past
            )
        refs = [pt_logits[:, -found[0].shape[1] :], *[t for kv in present for t in kv]]  # logits: the graph's positions
        rows = mask.all(axis=1) if gqa else np.ones(B, bool)  # present: rows it is comparable on
        for name, out, ref in zip(spec.outputs, found, refs):
            if name.startswith("present.") and not rows.all():
                out, ref = out[rows], ref[torch.from_numpy(rows)]
            tracker.add(name, out, ref)
        past_length = mask.shape[1] - embeds.shape[1]
        steps.append({"step": step, "past_length": int(past_length), "query_length": int(embeds.shape[1]),
                      "argmax_equal": bool((found[0][:, -1].argmax(-1) == pt_logits[:, -1].argmax(-1).numpy()).all())})  # fmt: skip
        ort_past, pt_past = (buffers if gqa else found[1:]), present
        embeds = step_embeds_fn(step, pt_logits)  # [B, 1, D]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)  # [B, P+1]
    return steps


def validate_random(model: TinyGPTV, sessions, specs, seed: int = 0) -> dict[str, Any]:
    cfg = model.config
    lm = cfg.language_model
    gen = torch.Generator().manual_seed(seed)
    tracker = _Tracker()
    B, T = 2, 7
    pixels = torch.randn(B, 3, cfg.image.size, cfg.image.size, generator=gen)  # [B, 3, S, S]
    with torch.no_grad():
        pt_features = model.encode_image(pixels)  # [B, N, D]
    (features,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    tracker.add("image_features", features, pt_features)

    ids = torch.randint(1, cfg.prompt.image_token_id, (B, T + cfg.num_image_tokens), generator=gen)  # [B, T+N]
    ids[:, 1 : 1 + cfg.num_image_tokens] = cfg.prompt.image_token_id
    with torch.no_grad():
        pt_embeds = model.embed(ids, pt_features)  # [B, T+N, D]
    (embeds,) = sessions["embedding"].run(None, {"input_ids": ids.numpy(), "image_features": pt_features.numpy()})
    tracker.add("inputs_embeds", embeds, pt_embeds)

    mask = np.ones(ids.shape, np.int64)
    mask[0, :2] = 0  # row 0 left-padded by two
    inputs = torch.randn(DECODE_STEPS, B, 1, lm.hidden_size, generator=gen).numpy()
    steps = _run_decoder_chain(model, sessions, specs, tracker, pt_embeds.numpy(), mask, lambda s, _: inputs[s - 1])
    return {"batch_size": B, "outputs": tracker.outputs, "decoder_steps": steps}


def demo_image(size: int) -> Image.Image:
    """A red circle and a blue square on white: the same picture every time, no file needed."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.5, size * 0.5), fill=(220, 30, 30))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.85), fill=(30, 60, 220))
    return image


def validate_real(model: TinyGPTV, tokenizer: TextTokenizer, sessions, specs, question: str) -> dict[str, Any]:
    cfg = model.config
    tracker = _Tracker()
    pixels = torch.from_numpy(preprocess_for(demo_image(cfg.image.size), cfg.image))[None]  # [1, 3, S, S]
    with torch.no_grad():
        pt_features = model.encode_image(pixels)  # [1, N, D]
    (features,) = sessions["vision"].run(None, {"pixel_values": pixels.numpy()})
    tracker.add("image_features", features, pt_features)
    prompt = build_prompt(question, cfg.prompt.template)
    ids = torch.tensor([tokenizer.encode_prompt(prompt, 1, cfg.num_image_tokens)])  # [1, T]
    with torch.no_grad():
        pt_embeds = model.embed(ids, pt_features)  # [1, T, D]
    (embeds,) = sessions["embedding"].run(None, {"input_ids": ids.numpy(), "image_features": features})
    tracker.add("inputs_embeds", embeds, pt_embeds)
    tokens: list[int] = []

    def next_embeds(step: int, pt_logits: torch.Tensor) -> np.ndarray:
        logits = pt_logits[:, -1].clone()  # [1, V]
        logits[:, cfg.prompt.image_token_id] = float("-inf")
        tokens.append(int(logits.argmax(-1)))
        step_ids = np.array([[tokens[-1]]], np.int64)
        return sessions["embedding"].run(None, {"input_ids": step_ids, "image_features": features})[0]

    mask = np.ones(ids.shape, np.int64)
    steps = _run_decoder_chain(model, sessions, specs, tracker, embeds, mask, next_embeds)
    return {"batch_size": 1, "prompt": prompt, "prompt_tokens": int(ids.shape[1]), "pytorch_tokens": tokens,
            "outputs": tracker.outputs, "decoder_steps": steps}  # fmt: skip


def within(entry: dict[str, float], atol: float, rtol: float) -> bool:
    return entry["max_abs_diff"] <= atol + rtol * entry["max_abs_ref"]


def validate_folder(
    folder: str | Path,
    model: TinyGPTV,
    tokenizer: TextTokenizer | None,
    precision: str = "fp32",
    question: str = "[vqa] What color is the circle?",
    seed: int = 0,
    attention: str = "plain",
) -> dict[str, Any]:
    """Run every check on `folder`'s graphs against `model`; returns the report that goes into the manifest.

    `attention`: the decoder's kind ("plain" or "gqa", export.gqa), which sets the signature it is checked against.
    """
    folder = Path(folder)
    model = model.eval()
    specs = graph_specs(model, attention)
    sessions = {name: open_session(folder / spec.file) for name, spec in specs.items()}
    problems = [p for name in specs for p in check_signature(sessions[name], specs[name])]
    if (folder / PREFILL_FILE).is_file():  # the decoder's twin for prompts: the same signature
        sessions[PREFILL] = open_session(folder / PREFILL_FILE)
        problems += check_signature(sessions[PREFILL], specs["decoder"])
    report: dict[str, Any] = {"precision": precision, "signature_problems": problems}
    if PREFILL in sessions:
        report["prefill_graph"] = f"{PREFILL_FILE} ran each prefill (step 0), the decoder the steps after"
    report["random"] = validate_random(model, sessions, specs, seed)
    if tokenizer is not None:
        report["real"] = validate_real(model, tokenizer, sessions, specs, question)
    strict = precision == "fp32"
    report["tolerance"] = {"atol": FP32_ATOL, "rtol": FP32_RTOL, "enforced": strict,
                           "rule": "max|onnx - torch| <= atol + rtol * max|torch| per output (fp32 only)"}  # fmt: skip
    failures = []
    for case in ("random", "real"):
        for output, entry in report.get(case, {}).get("outputs", {}).items():
            entry["passed"] = (
                within(entry, FP32_ATOL, FP32_RTOL) if strict else bool(np.isfinite(entry["max_abs_diff"]))
            )
            if not entry["passed"]:
                failures.append(f"{case} {output}: max abs diff {entry['max_abs_diff']:.3g} "
                                f"(max |torch| {entry['max_abs_ref']:.3g})")  # fmt: skip
    report["failures"] = problems + failures
    report["passed"] = not report["failures"]
    return report


def smoke_validate(folder: str | Path, model: TinyGPTV, seed: int = 0, attention: str = "plain") -> dict[str, Any]:
    """For random-init exports (no PyTorch model to hold beside the sessions): signatures, then random inputs through
    vision -> embedding -> decoder (prefill at past 0 + DECODE_STEPS steps), every output finite and of the right shape."""
    folder = Path(folder)
    cfg = model.config
    lm = cfg.language_model
    specs = graph_specs(model, attention)
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"precision": "random-init", "pytorch_comparison": "skipped: random weights, no reference"}
    problems = []
    session = open_session(folder / specs["vision"].file)
    problems += check_signature(session, specs["vision"])
    pixels = rng.standard_normal((1, 3, cfg.image.size, cfg.image.size)).astype(np.float32)
    (features,) = session.run(None, {"pixel_values": pixels})
    del session
    session = open_session(folder / specs["embedding"].file)
    problems += check_signature(session, specs["embedding"])
    ids = rng.integers(1, cfg.prompt.image_token_id, (1, cfg.num_image_tokens + 8))
    ids[0, 1 : 1 + cfg.num_image_tokens] = cfg.prompt.image_token_id
    (embeds,) = session.run(None, {"input_ids": ids, "image_features": features})
    decoder = open_session(folder / specs["decoder"].file)
    problems += check_signature(decoder, specs["decoder"])
    prefill = decoder
    if (folder / PREFILL_FILE).is_file():  # runs the prefill (step 0), as in the runtime
        prefill = open_session(folder / PREFILL_FILE)
        problems += check_signature(prefill, specs["decoder"])
        report["prefill_graph"] = f"{PREFILL_FILE} ran the prefill (step 0), the decoder the steps after"
    mask = np.ones(ids.shape, np.int64)
    gqa = attention == "gqa"
    slots = mask.shape[1] + DECODE_STEPS if gqa else 0
    buffers = [np.zeros((1, lm.num_heads, slots, lm.head_size), np.float32) for _ in range(2 * lm.num_layers)]
    past = buffers
    finite = bool(np.isfinite(features).all() and np.isfinite(embeds).all())
    for step in range(DECODE_STEPS + 1):
        session = prefill if step == 0 else decoder
        feed = _decoder_feed(specs["decoder"].inputs, embeds, mask, past)
        if gqa:
            logits, *past = run_shared_buffer(session, specs["decoder"], feed, buffers)
        else:
            logits, *past = session.run(None, feed)
        finite &= bool(np.isfinite(logits).all())
        if logits.shape != (1, 1, lm.vocab_size) or past[0].shape[2] != mask.shape[1]:  # last position only
            problems.append(f"decoder output shapes {logits.shape} / {past[0].shape} do not fit the inputs")
        embeds = rng.standard_normal((1, 1, lm.hidden_size)).astype(np.float32)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        past = buffers if gqa else past
    report["signature_problems"] = problems
    report["finite"] = finite
    report["failures"] = problems + ([] if finite else ["non-finite outputs"])
    report["passed"] = not report["failures"]
    return report
