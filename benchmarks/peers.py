"""The peers comparison on stock Phi-2 shapes: our exporter + runtime against onnxruntime-genai's builder, llama.cpp
and transformers, all on the same random weights (made here: no download).

    python -m benchmarks.peers --out reports/peers                         # real sizes: 32 layers, needs ~35 GB free
    python -m benchmarks.peers --out reports/peers-l4 --layers 4 --threads 2 --prompt-tokens 128 --reps 5

Steps (each model is kept under --out/models and reused by later runs unless --rebuild):
1. stock Phi-2 weights: our PhiDecoder with TinyGPT-V's changes switched off (no q/k LayerNorm, no RMSNorm), random
   (std 0.02), written as a Hugging Face Phi folder with a stand-in byte-level tokenizer (<|endoftext|> = 50256);
2. ours: the same weights through our exporter (`export.onnx`, --precision int4 --quant rtn --symmetric by default,
   like the builder's default RTN: symmetric, block 32, accuracy level 4; the default --attention, GroupQueryAttention
   with a shared KV buffer; --prefill-graph int8), with a small vision part in front (the decoder is what is compared);
3. the builder: `python -m onnxruntime_genai.models.builder -i PHI -o DIR -p int4 -e cpu` (fused attention, rotary,
   SkipLayerNorm);
4. llama.cpp: convert_hf_to_gguf.py + llama-quantize Q4_0 (skipped with a note if llama.cpp is not built:
   `python -m benchmarks.runners.llama_cpp --build`);
5. the sweep: ours (our runtime, prompts through the int4 decoder: the same weights in memory as the peers), ours with
   the int8 prefill graph (ours-prefill8: prompts through it, steps through the int4 decoder; both in memory), ours
   through onnxruntime-genai, the builder's graph through onnxruntime-genai,
   llama-bench, transformers bf16 (and, named in --runtimes, ours-plain / ours-plain-genai: our export with
   --attention plain, past in and past + new out); text prompts of exactly --prompt-tokens synthetic ids, exactly
   --new-tokens.
Each build step runs in its own process, so its memory is returned before the next one.

On a machine shared with other work, prefer --threads 1 for comparisons: with 2 threads on 2 oversubscribed cores,
llama.cpp's spinning thread barrier collapses (llama-bench tg16 at load average 8: 1.6 tok/s with -t 2, 27 with -t 1),
and onnxruntime's pools suffer less but unevenly, so the ratios stop meaning anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.sweep import Target, int_list, sweep
from benchmarks.workload import synthetic_ids

logger = logging.getLogger("benchmarks.peers")

EOS = 50256  # Phi-2's <|endoftext|>
RUNTIMES = ("ours", "ours-prefill8", "ours-genai", "builder", "llama-cpp", "transformers")
PLAIN_RUNTIMES = ("ours-plain", "ours-plain-genai")  # the same, exported with --attention plain; on request


def stand_in_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with Phi-2's vocabulary size and <|endoftext|> at 50256.

    The 256 byte symbols, a few merges (llama.cpp refuses a BPE vocabulary without merges), then placeholders.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("Ġt", "he"), ("a", "n"), ("o", "n"), ("r", "e")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for i in range(len(vocab), EOS):
        vocab[f"tok{i}"] = i
    vocab["<|endoftext|>"] = EOS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 2048}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def make_stock_phi(path: Path, layers: int, seed: int = 0) -> Path:
    """Random stock Phi-2 weights (real widths, `layers` layers) as a Hugging Face folder."""
    import torch

    from core.config import LanguageModelConfig
    from core.phi import PhiDecoder
    from core.weights import write_phi_folder

    torch.manual_seed(seed)
    cfg = LanguageModelConfig(num_layers=layers, qk_layernorm=False, post_attention_rmsnorm=False, resid_pdrop=0.0)
    write_phi_folder(PhiDecoder(cfg).eval(), path)
    stand_in_tokenizer(path)
    return path


def export_ours(
    phi: Path, out: Path, precision: str, quant: str, attention: str = "auto", block_size: int = 32
) -> None:
    """Our exporter on the stock weights: a TinyGPT-V with the demo's small vision part and Phi-2 as the LM."""
    from core.config import LanguageModelConfig, ModelConfig, PromptConfig
    from core.model import TinyGPTV
    from core.weights import lm_config_from_phi, load_phi_folder
    from export.onnx import ExportOptions, export_folder

    hf = json.loads((phi / "config.json").read_text())
    base = LanguageModelConfig(qk_layernorm=False, post_attention_rmsnorm=False, resid_pdrop=0.0)
    demo = ModelConfig.preset("demo")
    cfg = ModelConfig(vision=demo.vision, qformer=demo.qformer, projector=demo.projector, image=demo.image,
                      language_model=lm_config_from_phi(hf, base),
                      prompt=PromptConfig(image_token_id=hf["vocab_size"] - 1))  # fmt: skip
    model = TinyGPTV(cfg).eval()
    load_phi_folder(model.language_model, phi)
    symmetric = (precision, quant) == ("int4", "rtn")  # as the builder quantizes
    prefill = "int8" if precision == "int4" and attention == "gqa" else None  # the runtime chooses whether to use it
    options = ExportOptions(precision=precision, quant=quant, symmetric=symmetric, attention=attention,
                            prefill_graph=prefill, block_size=block_size)  # fmt: skip
    export_folder(out, options=options, tokenizer_dir=phi, model=model)


def build_builder(phi: Path, out: Path, precision: str, block_size: int = 32) -> None:
    cache = out.parent / "builder_cache"
    extra = ["--extra_options", f"block_size={block_size}"] if block_size != 32 else []  # 32: the builder's default
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(phi), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(cache), *extra], check=True)  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)


def build_gguf(phi: Path, out: Path) -> None:
    from benchmarks.runners.llama_cpp import convert

    convert(phi, out, "Q4_0")


def in_child(fn, *args) -> str | None:
    """Run fn(*args) in a fresh process (its memory goes back when it ends); None, or why it failed."""
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_call, args=(fn, *args))
    proc.start()
    proc.join()
    return None if proc.exitcode == 0 else f"{fn.__name__} failed (exit {proc.exitcode}); see the log above"


def _call(fn, *args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fn(*args)


def prepare(
    models: Path, layers: int, precision: str, quant: str, wanted: set[str], rebuild: bool, block_size: int = 32
) -> dict:
    """Build (or reuse) every model; returns {name: path or None} and {name: why skipped}."""
    if rebuild:
        shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True, exist_ok=True)
    phi = models / f"phi2-l{layers}"
    twin = "-p8" if precision == "int4" else ""  # int4: with the int8 prefill graph
    block = f"-b{block_size}" if block_size != 32 else ""
    paths = {"phi": phi, "ours": models / f"ours-gqa-{precision}{twin}{block}-l{layers}",  # int4, fp32: GQA by default
             "ours-plain": models / f"ours-{precision}{block}-l{layers}",
             "builder": models / f"builder-{precision}{block}-l{layers}",
             "gguf": models / f"phi2-l{layers}-q4_0.gguf"}  # fmt: skip
    skips: dict[str, str] = {}
    if not (phi / "model.safetensors").is_file():
        logger.info("making random stock Phi-2 weights (%d layers) in %s", layers, phi)
        why = in_child(make_stock_phi, phi, layers)
        if why:
            raise RuntimeError(why)
    steps = [("ours", export_ours, (phi, paths["ours"], precision, quant, "gqa", block_size),
              {"ours", "ours-prefill8", "ours-genai"}),
             ("ours-plain", export_ours, (phi, paths["ours-plain"], precision, quant, "plain", block_size),
              set(PLAIN_RUNTIMES)),
             ("builder", build_builder, (phi, paths["builder"], precision, block_size), {"builder"}),
             ("gguf", build_gguf, (phi, paths["gguf"]), {"llama-cpp"})]  # fmt: skip
    for name, fn, args, users in steps:
        done = paths[name].exists()
        if done or not (users & wanted):
            continue
        if name == "gguf":
            from benchmarks.runners.llama_cpp import LlamaCppMissing, source_dir, tool

            try:
                source_dir(), tool("llama-quantize"), tool("llama-bench")
            except LlamaCppMissing as err:
                skips[name] = str(err)
                continue
        logger.info("building %s -> %s", name, paths[name])
        why = in_child(fn, *args)
        if why:
            skips[name] = why
    return {"paths": paths, "skips": skips}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="report folder; models are kept in OUT/models")
    p.add_argument("--layers", type=int, default=32, help="Phi-2 layers (32 = real size; 2-4 for a quick look)")
    p.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help=f"comma-separated, from {', '.join(RUNTIMES + PLAIN_RUNTIMES)}"
    )
    p.add_argument("--precision", default="int4", choices=("int4", "fp32"), help="ours and the builder's")
    p.add_argument("--quant", default="rtn", choices=("rtn", "hqq", "gptq"), help="our int4 method")
    p.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128),
                   help="int4 block size, ours and the builder's alike (default 32, the builder's default)")  # fmt: skip
    p.add_argument("--threads", type=int_list, default=[2])
    p.add_argument("--prompt-tokens", type=int_list, default=[128])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--transformers-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rebuild", action="store_true", help="remake every model")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = [r for r in args.runtimes if r not in RUNTIMES + PLAIN_RUNTIMES]
    if unknown:
        p.error(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    if args.layers < 1 or args.layers > 32:
        p.error(f"--layers must be within 1..32 (Phi-2 has 32), got {args.layers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    try:
        built = prepare(out / "models", args.layers, args.precision, args.quant, set(args.runtimes), args.rebuild,
                        args.block_size)  # fmt: skip
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths, skips = built["paths"], built["skips"]
    p = args.precision
    options = {
        "ours": Target("ours", str(paths["ours"]), f"ours {p}", p, context=2048, options={"prefill": "decoder"},
                       skip=skips.get("ours")),
        "ours-prefill8": Target("ours", str(paths["ours"]), f"ours {p} + int8 prefill", p, context=2048,
                                options={"prefill": "graph"},
                                skip=skips.get("ours") or (None if p == "int4" else "a prefill graph is for int4")),
        "ours-genai": Target("ort-genai", str(paths["ours"]), f"ours {p} via ort-genai", p, context=2048,
                             skip=skips.get("ours")),
        "ours-plain": Target("ours", str(paths["ours-plain"]), f"ours plain {p}", p, context=2048,
                             skip=skips.get("ours-plain")),
        "ours-plain-genai": Target("ort-genai", str(paths["ours-plain"]), f"ours plain {p} via ort-genai", p,
                                   context=2048, skip=skips.get("ours-plain")),
        "builder": Target("ort-genai", str(paths["builder"]), f"builder {p} via ort-genai", p, context=2048,
                          skip=skips.get("builder")),
        "llama-cpp": Target("llama-cpp", str(paths["gguf"]), "llama.cpp q4_0", "q4_0", context=2048,
                            skip=skips.get("gguf")),
        "transformers": Target("transformers", str(paths["phi"]), f"transformers {args.transformers_dtype}",
                               args.transformers_dtype, context=2048),
    }  # fmt: skip
    targets = [options[name] for name in args.runtimes]

    def make_ids(n: int) -> tuple[list[int], list[int]]:
        ids = synthetic_ids(n, EOS, 51200)
        return ids, ids

    records = sweep(targets, args.threads, args.prompt_tokens, args.new_tokens, args.reps, args.warmup, make_ids,
                    None, out, passes=args.passes, timeout=args.timeout)  # fmt: skip
    preamble = (
        f"Random-weight stock Phi-2 shapes, {args.layers} of 32 layers, int4 block {args.block_size}; synthetic prompt "
        "ids; greedy, exactly "
        f"{args.new_tokens} new tokens. Only ratios within this run mean anything on a shared machine."
    )
    report = write_report(records, out, "Peers: stock Phi-2 weights", preamble)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
