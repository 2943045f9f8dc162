"""Export a model folder to one self-describing ONNX folder: vision, embedding and decoder graphs, tokenizer, manifest.

    python -m export.onnx --model runs/demo/final --out exports/demo-fp32
    python -m export.onnx --model runs/demo/final --out exports/demo-int4 --precision int4 --quant gptq --block-size 32
    python -m export.onnx --preset tinygptv --random-init --out exports/real-int4 --precision int4 --quant rtn

--precision   fp32 (default) | fp16 | int8 | int4. int4 quantizes the decoder's MatMuls to MatMulNBits; fp16 and int8
              apply to the vision and decoder graphs alike (the embedding graph is a table lookup and stays fp32).
--quant       int4 algorithm: gptq (default; calibrated on image+prompt+answer sequences fed as inputs_embeds) | rtn | hqq
              | gptq-ort (onnxruntime's GPTQ on the same sequences, for comparison). See export/quantize.py.
--attention   auto (default) | gqa | plain. gqa: each layer's attention is onnxruntime's GroupQueryAttention, past and
              present KV one buffer per layer that the runtime binds to both (nothing concatenated or copied per step),
              rotary inside GQA where its kernel takes the shape (Phi-2: yes). See export/gqa.py. fp32 and int4 (not
              gptq-ort) only; auto picks gqa there and plain (past in, past + new out) for fp16, int8 and gptq-ort.
--symmetric   with --quant rtn or gptq: a scale per block and no zero points (onnxruntime-genai's default; faster
              MatMulNBits, a little less exact). Default asymmetric: a zero point per block.
--vision-precision  fp32 | fp16 | int8 for the vision graph when --precision is int4 (default fp32).
--gptq-checkpoint   with --precision int4: pack the integers of a `python -m export.gptq` folder into MatMulNBits.
--prefill-graph int8  with --precision int4: also write decoder_prefill.onnx, the decoder at int8, which the runtime
              runs prompts through (onnxruntime's int8 GEMM: ~4x faster than MatMulNBits on a 128-token prompt on an
              AVX-512/AMX CPU; an earlier AVX2 box measured ~18 %) while decode steps stay on the int4 graph, against
              the same KV cache. Costs the int8 weights on disk and, when the runtime uses it (runtime.budget decides
              under the memory budget), in memory. See export/quantize.py.
--calib-data  GPTQ's calibration examples, --eval-data the held-out examples of the manifest's quality row: JSON lines
              of image + prompt + expected answer (export/calibration.py; the demo writes them from the synthetic world).
--image-size  with --random-init: the size the vision graph runs at (default: the preset's, 224 for tinygptv). The
              vision graph takes one fixed size, the one its model was trained at (stage 4 of TinyGPT-V: 448; the ViT's
              224-px position embeddings are interpolated bicubically inside the graph, as in PyTorch), and the
              manifest carries it; a model folder's own config.json sets it, so a stage-4 checkpoint exports at 448.
--graphs-from DIR   copy the fp32 graphs found in DIR (an earlier export of the same model before quantization, e.g. the
              partial folder an export killed while quantizing leaves behind) instead of tracing them; graphs DIR lacks
              are traced, and so is a decoder of the other --attention. The 448-px folder of a random-init model reuses the 224-px decoder and embedding this way.
The folder also gets genai_config.json (export/genai.py): onnxruntime-genai runs embedding + decoder from it.
The folder is written under a temporary name and renamed only after validation passes; an existing --out is refused
without --force. One CPU is enough; the real-size model needs about 3x its fp32 size in RAM while tracing.
Exit status 2 with one line on stderr on bad input (missing folder, existing --out, failed validation).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from core.config import ConfigError, ModelConfig
from core.model import TinyGPTV
from core.tokenizer import TOKENIZER_FILE, TextTokenizer, TokenizerError
from core.weights import WEIGHTS_FILE, WeightsError
from export.calibration import check_data
from export.embedding_table import table_from_graph, write_table
from export.folder import CliParser, ExportError, folder_size, refuse_existing, staging_folder
from export.genai import write_genai_config
from export.gqa import ATTENTIONS, gqa_supported, resolve_attention
from export.graphs import GRAPH_FILES, OPSET, PAST_KEY, export_graph
from export.last_logits import set_logits_positions
from export.manifest import (
    GQA_KV_AXIS,
    OPTIONAL_GRAPH_FILES,
    build_manifest,
    graph_signature,
    sha256_file,
    write_manifest,
)
from export.random_init import is_lazy, lazy_random_model, materialized, stand_in_tokenizer
from export.validate import smoke_validate, validate_folder

logger = logging.getLogger("export.onnx")

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PREFILL_GRAPHS = ("int8",)
QUANT_METHODS = ("gptq", "rtn", "hqq", "gptq-ort")
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    quant: str = "gptq"
    block_size: int = 32
    symmetric: bool = False  # rtn and gptq: no zero points (faster kernels, a little less exact)
    calib_data: str | None = None  # image + prompt + answer examples for GPTQ (export.calibration)
    calib_samples: int = 32
    vision_precision: str | None = None  # None: fp32 for int4, else the same as `precision`
    gptq_checkpoint: str | None = None  # a `python -m export.gptq` folder: pack its integers instead of quantizing
    eval_data: str | None = None  # held-out examples: the quality row (export.quality) is measured on them
    quality_samples: int = 32  # how many of them
    validate: bool = True
    seed: int = 0
    image_size: int | None = None  # with --random-init: the vision graph's input size (None: the preset's)
    attention: str = "auto"  # "gqa": GroupQueryAttention and a shared KV buffer (export.gqa); auto: gqa where supported
    prefill_graph: str | None = None  # "int8": also write the decoder at int8 for prompts (int4 only, export.quantize)

    def vision(self) -> str:
        if self.vision_precision:
            return self.vision_precision
        return "fp32" if self.precision == "int4" else self.precision


def load_model(
    model_dir: str | Path | None, preset: str | None = None, seed: int = 0, image_size: int | None = None
) -> tuple[TinyGPTV, Path | None]:
    """The model of a folder (config.json + model.safetensors), or random weights of a preset's shapes.

    `image_size` (random weights only) sets the size the model runs images at, as a stage-4 config does (448).
    """
    if model_dir is None:
        if preset is None:
            raise ExportError("give --model DIR, or --preset NAME --random-init")
        cfg = ModelConfig.preset(preset)
        if image_size is not None:
            patch = cfg.vision.patch_size
            if image_size <= 0 or image_size % patch:
                raise ExportError(f"--image-size {image_size}: must be a positive multiple of the patch size {patch}")
            cfg = cfg.replace(image=cfg.image.replace(size=image_size))
        return lazy_random_model(cfg), None  # parts get weights per graph (export.random_init)
    if image_size is not None:
        raise ExportError(
            "--image-size is for --random-init; a model folder runs at the size its config.json gives (image.size)"
        )
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(
            f"{model_dir}: no such model folder (expected config.json + {WEIGHTS_FILE} + {TOKENIZER_FILE})"
        )
    try:
        return TinyGPTV.from_pretrained(model_dir), model_dir
    except (FileNotFoundError, ConfigError, WeightsError) as err:
        raise ExportError(f"cannot load the model: {err}") from None


def load_tokenizer(model: TinyGPTV, model_dir: Path | None, tokenizer_dir: str | Path | None) -> TextTokenizer | None:
    source = Path(tokenizer_dir) if tokenizer_dir else model_dir
    if source is None:
        return None
    try:
        return model.load_tokenizer(source)
    except TokenizerError as err:
        raise ExportError(f"cannot load the tokenizer: {err}") from None


def _source(model: TinyGPTV, model_dir: Path | None, random_init: bool) -> dict[str, Any]:
    checkpoint = model_dir / WEIGHTS_FILE if model_dir else None
    return {
        "model_dir": str(model_dir) if model_dir else None,
        "random_init": random_init,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and checkpoint.is_file() else None,
        "config": model.config.to_dict(),
    }


def _exporter(seconds: float) -> dict[str, Any]:
    return {"name": "tinygptv-edge export.onnx", "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": OPSET, "seconds": round(seconds, 1)}  # fmt: skip


def quantize_folder(folder: Path, model: TinyGPTV, tokenizer: TextTokenizer | None, options: ExportOptions):
    """Rewrite the fp32 graphs in `folder` to the requested precision; returns the manifest's quantization entry."""
    if options.precision == "fp32" and options.vision() == "fp32":
        return {"precision": "fp32", "vision": "fp32", "embedding": "fp32", "decoder": {"method": None, "bits": 32}}
    from export.quantize import quantize_graphs  # onnxruntime.quantization is slow to import; only when needed

    return quantize_graphs(folder, model, tokenizer, options)


def export_folder(
    out: str | Path,
    model_dir: str | Path | None = None,
    options: ExportOptions | None = None,
    force: bool = False,
    preset: str | None = None,
    tokenizer_dir: str | Path | None = None,
    model: TinyGPTV | None = None,
    graphs_from: str | Path | None = None,
) -> dict[str, Any]:
    """Write the export folder `out`; returns its manifest. Raises ExportError, leaving nothing behind, on failure.

    `model` skips loading `model_dir` (which still names the source); `graphs_from` copies the fp32 graphs of an
    earlier export of the same model instead of tracing them again (each graph it holds; the others are traced).
    """
    options = options or ExportOptions()
    if options.precision not in PRECISIONS:
        raise ExportError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if options.quant not in QUANT_METHODS or options.block_size not in BLOCK_SIZES:
        raise ExportError(f"--quant must be one of {QUANT_METHODS} and --block-size one of {BLOCK_SIZES}")
    if options.symmetric and (options.precision not in ("int4",) or options.quant not in ("rtn", "gptq")):
        raise ExportError("--symmetric applies to --precision int4 --quant rtn or gptq")
    if options.attention not in ATTENTIONS:
        raise ExportError(f"--attention {options.attention!r}: choose one of {', '.join(ATTENTIONS)}")
    options = replace(options, attention=resolve_attention(options.attention, options.precision, options.quant))
    if options.attention == "gqa" and not gqa_supported(options.precision, options.quant):
        raise ExportError(
            "--attention gqa is for --precision fp32 or int4 (rtn, hqq, gptq): the fp16/int8 converters and gptq-ort's "
            "calibration feeds are not made for its shared KV buffer yet; use --attention plain"
        )
    if options.gptq_checkpoint and options.precision != "int4":
        raise ExportError(f"--gptq-checkpoint gives int4 weights; pass --precision int4 (not {options.precision})")
    if options.prefill_graph is not None and options.prefill_graph not in PREFILL_GRAPHS:
        raise ExportError(f"--prefill-graph {options.prefill_graph!r}: choose one of {', '.join(PREFILL_GRAPHS)}")
    if options.prefill_graph and options.precision != "int4":
        raise ExportError(
            f"--prefill-graph is for --precision int4 (an int8 graph for prompts beside the int4 one for decode "
            f"steps); with --precision {options.precision} the decoder itself runs the prompt"
        )
    refuse_existing(out, force)  # before the (slow) model load; staging_folder checks again
    start = time.monotonic()
    model_path = Path(model_dir) if model_dir else None
    if model is None:
        model, model_path = load_model(model_dir, preset, options.seed, options.image_size)
    calibrated = options.precision == "int4" and "gptq" in options.quant and not options.gptq_checkpoint
    if is_lazy(model) and calibrated:
        raise ExportError("GPTQ needs trained weights and calibration data; with --random-init use --quant rtn or hqq")
    try:  # a missing or bad data file fails now, not after tracing
        if calibrated:
            check_data(options.calib_data, "--calib-data")
        if options.eval_data:
            check_data(options.eval_data, "--eval-data")
    except ValueError as err:
        raise ExportError(str(err)) from None
    tokenizer = load_tokenizer(model, model_path, tokenizer_dir)
    with staging_folder(out, force) as tmp:
        for name, file in GRAPH_FILES.items():
            found = Path(graphs_from) / file if graphs_from else None
            mismatch = found and found.is_file() and copy_mismatch(name, found, options.attention, model.config)
            if mismatch:
                logger.info("%s: %s; tracing it again", found, mismatch)
            elif found and found.is_file():
                logger.info("copying the fp32 %s graph from %s", name, graphs_from)
                for part in Path(graphs_from).glob(file + "*"):
                    shutil.copy(part, tmp / part.name)
                continue
            logger.info("exporting %s graph", name)
            with materialized(model, name, options.seed):
                export_graph(model, name, tmp / file, seed=options.seed, attention=options.attention)
        # gptq-ort calibrates on every position; for the others lm_head is cut to the last position before quantizing
        # (int8 replaces the MatMul that the cut looks for)
        gptq_ort = options.precision == "int4" and options.quant == "gptq-ort"
        set_logits_positions(tmp / GRAPH_FILES["decoder"], "all" if gptq_ort else "last")
        quantization = quantize_folder(tmp, model, tokenizer, options)
        set_logits_positions(tmp / GRAPH_FILES["decoder"], "last")  # prefill runs lm_head for the last position only
        write_genai_config(tmp, model.config, options.attention)
        if tokenizer is not None:
            shutil.copy(Path(tokenizer_dir or model_path) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        elif is_lazy(model):
            stand_in_tokenizer(model.config).save(tmp)
        # the embedding table beside its graph, memory-mapped by the runtime (export.embedding_table)
        table = write_table(tmp, table_from_graph(tmp / GRAPH_FILES["embedding"]))
        validation: dict[str, Any] = {"skipped": True}
        if options.validate and is_lazy(model):
            logger.info("checking signatures and running random inputs (random weights: no PyTorch comparison)")
            validation = smoke_validate(tmp, model, options.seed, options.attention)
            if not validation["passed"]:
                raise ExportError("validation failed: " + "; ".join(validation["failures"]))
        elif options.validate:
            logger.info("validating against PyTorch")
            reference, precision = model, options.precision
            if options.gptq_checkpoint:  # the checkpoint's own weights are the reference: the same integers
                from export.gptq import load_gptq_model

                reference, precision = load_gptq_model(options.gptq_checkpoint), "int4-gptq-checkpoint"
            validation = validate_folder(tmp, reference, tokenizer, precision=precision, seed=options.seed,
                                         attention=options.attention)  # fmt: skip
            if not validation["passed"]:
                raise ExportError("validation failed: " + "; ".join(validation["failures"]))
        quality = None
        if options.eval_data and options.quality_samples > 0 and tokenizer is not None and not is_lazy(model):
            from export.quality import measure_folder

            logger.info("measuring quality on %d held-out examples of %s", options.quality_samples, options.eval_data)
            quality = measure_folder(tmp, model, tokenizer, options.eval_data, options.quality_samples)
        source = _source(model, model_path, random_init=model_path is None)
        if tokenizer is None and is_lazy(model):
            source["tokenizer"] = "stand-in byte-level BPE (export.random_init), not the preset's"
        manifest = build_manifest(
            tmp, model.config, quantization, validation, source, _exporter(time.monotonic() - start)
        )
        manifest["embedding_table"] = table
        manifest["sizes"] = (
            {"folder_bytes": folder_size(tmp)}
            | {f"{n}_bytes": folder_size_of_graph(tmp, f) for n, f in GRAPH_FILES.items()}
            | {
                f"{n}_bytes": folder_size_of_graph(tmp, f)
                for n, f in OPTIONAL_GRAPH_FILES.items()
                if (tmp / f).is_file()
            }
            | {"embedding_table_bytes": (tmp / table["file"]).stat().st_size}
        )
        if quality is not None:
            manifest["quality"] = quality | {"folder_bytes": manifest["sizes"]["folder_bytes"]}
        write_manifest(tmp, manifest)
    return manifest


def decoder_attention(path: Path) -> str:
    """ "gqa" or "plain": which decoder a graph file holds (the name of its KV buffers' axis, as the manifest reads it)."""
    signature = graph_signature(path)
    past = next(i["shape"] for i in signature["inputs"] if i["name"] == PAST_KEY % 0)
    return "gqa" if past[2] == GQA_KV_AXIS else "plain"


def copy_mismatch(name: str, path: Path, attention: str, cfg: ModelConfig) -> str | None:
    """Why the fp32 graph file of graph `name` cannot be copied into this export (None: it can)."""
    if name == "decoder" and (held := decoder_attention(path)) != attention:
        return f"it holds a {held} decoder, this export a {attention} one"
    if name == "vision" and (held := vision_size(path)) != cfg.image.size:
        return f"it holds a {held} px vision graph, this export a {cfg.image.size} px one"
    return None


def vision_size(path: Path) -> int | str:
    """The image size a vision graph file takes (its pixel_values' last axis; a name where that axis is dynamic)."""
    pixels = next(i["shape"] for i in graph_signature(path)["inputs"] if i["name"] == "pixel_values")
    return pixels[-1]


def folder_size_of_graph(folder: Path, file: str) -> int:
    """A graph's bytes including its external data file, if any."""
    return sum(p.stat().st_size for p in folder.glob(file + "*") if p.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    required = parser.add_argument_group("what to export")
    required.add_argument("--model", help="model folder: config.json + model.safetensors + tokenizer.json")
    required.add_argument("--out", required=True, help="the export folder to write (refused if it exists, see --force)")
    required.add_argument("--preset", help="with --random-init: export random weights of this preset's shapes")
    required.add_argument("--random-init", action="store_true", help="no checkpoint: random weights (for sizes/memory)")
    required.add_argument("--tokenizer", help="folder holding tokenizer.json (default: the --model folder)")
    required.add_argument(
        "--image-size", type=int, help="with --random-init: vision graph input size in px (default: the preset's)"
    )
    quant = parser.add_argument_group("precision")
    quant.add_argument("--precision", default="fp32", choices=PRECISIONS)
    quant.add_argument("--attention", default="auto", choices=ATTENTIONS,
                       help="decoder attention: gqa (GroupQueryAttention, shared KV buffer), plain, or auto (gqa where "
                            "the precision takes it)")  # fmt: skip
    quant.add_argument("--quant", default="gptq", choices=QUANT_METHODS, help="int4 algorithm")
    quant.add_argument("--block-size", type=int, default=32, choices=BLOCK_SIZES, help="int4 block (group) size")
    quant.add_argument(
        "--symmetric", action="store_true", help="rtn, gptq: no zero points (onnxruntime-genai's default)"
    )
    quant.add_argument("--calib-data", help="GPTQ calibration examples: image + prompt + answer, JSON lines")
    quant.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration sequences (the file's first N)")
    quant.add_argument("--gptq-checkpoint", help="int4 from this python -m export.gptq folder (same integers)")
    quant.add_argument("--vision-precision", choices=("fp32", "fp16", "int8"), help="vision graph (default: see above)")
    quant.add_argument("--prefill-graph", choices=PREFILL_GRAPHS, help="int4: an int8 copy of the decoder for prompts")
    other = parser.add_argument_group("other")
    other.add_argument("--graphs-from", help="copy the fp32 graphs this folder holds instead of tracing them")
    other.add_argument("--force", action="store_true", help="replace an existing --out")
    other.add_argument("--no-validate", action="store_true", help="skip the PyTorch comparison (not recommended)")
    other.add_argument("--eval-data", help="held-out examples (JSON lines): the manifest gets a quality row on them")
    other.add_argument("--quality-samples", type=int, default=32, help="how many --eval-data examples to measure")
    other.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.random_init != (args.model is None) or (args.random_init and not args.preset):
        parser.error("give either --model DIR, or --preset NAME --random-init")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = ExportOptions(precision=args.precision, quant=args.quant, block_size=args.block_size,
                            symmetric=args.symmetric, calib_data=args.calib_data, calib_samples=args.calib_samples,
                            vision_precision=args.vision_precision, gptq_checkpoint=args.gptq_checkpoint,
                            eval_data=args.eval_data, quality_samples=args.quality_samples,
                            validate=not args.no_validate, seed=args.seed, image_size=args.image_size,
                            attention=args.attention, prefill_graph=args.prefill_graph)  # fmt: skip
    try:
        if args.graphs_from and not Path(args.graphs_from).is_dir():
            raise ExportError(f"--graphs-from {args.graphs_from}: no such folder")
        manifest = export_folder(args.out, args.model, options, args.force, args.preset, args.tokenizer,
                                 graphs_from=args.graphs_from)  # fmt: skip
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = manifest["sizes"]
    print(f"wrote {args.out}: {sizes['folder_bytes'] / 1e6:.1f} MB (decoder {sizes['decoder_bytes'] / 1e6:.1f} MB), "
          f"{manifest['exporter']['seconds']} s")  # fmt: skip
    for case in ("random", "real"):
        for output, entry in manifest["validation"].get(case, {}).get("outputs", {}).items():
            print(f"  {case:6s} {output:15s} max abs diff {entry['max_abs_diff']:.2e}  rel {entry['max_rel_diff']:.2e}")
    if "quality" in manifest:
        from export.quality import format_table

        print(format_table({args.precision: manifest["quality"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
