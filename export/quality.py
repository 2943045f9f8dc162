"""What a precision costs: size, logit error, answer perplexity and accuracy of an export folder on held-out data.

    row = measure_folder(folder, model, tokenizer, "runs/demo/eval/requests.jsonl", n=64)   # manifest["quality"]
    python -m export.quality --model runs/demo/final --out exports/demo-quality \
        --calib-data runs/demo/calib/requests.jsonl --eval-data runs/demo/eval/requests.jsonl [--samples 64] [--force]
        exports fp32, fp16, int8, int4-rtn, int4-hqq, int4-gptq (export.gptq's integers; int4-gptq-sym without zero
        points) and int4-gptq-ort
        (onnxruntime's GPTQ), and int4-gptq with an fp16 or int8 vision graph (what the vision precision costs) side by
        side (fp32 graphs traced once) and writes quality.md + quality.json.

Held-out data: a file of image + prompt + expected answer examples (export.calibration's format, the runtime's
requests; the demo's is the synthetic world's "test" split, never seen in training or calibration). Per folder, run
with its own vision, embedding and decoder graphs, on the first n examples:
  - max_logit_diff: largest |logit - PyTorch fp32 logit| over the teacher-forced sequences;
  - answer_perplexity: exp(mean NLL of the answer tokens and their EOS), teacher-forced;
  - accuracy: greedy answers (stage-4 template, EOS stop; the prompt through the folder's prefill graph when it has
    one, the steps through the decoder, as the runtime runs them) of every example but captions, scored by
    core.metrics.answer_matches (VQA exact match after the official normalisation; a box by IoU >= 0.5), as
    training.eval scores the PyTorch model; accuracy_by_task splits it by the examples' "task";
  - greedy_equal_pytorch: share of those prompts whose greedy tokens equal the PyTorch fp32 model's.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.metrics import answer_matches
from core.model import TinyGPTV
from core.phi import position_ids_from_mask
from core.tokenizer import TextTokenizer
from export.calibration import check_data, decoder_feed, encode_examples, read_examples
from export.folder import CliParser, folder_size
from export.manifest import PREFILL_FILE
from export.validate import open_session

logger = logging.getLogger("export.quality")

UNSCORED_TASKS = ("caption",)  # free text: in the perplexity, not in the accuracy


class FolderModel:
    """The three graphs of an export folder, run with onnxruntime: enough for teacher forcing and greedy decoding."""

    def __init__(self, folder: str | Path, cfg) -> None:
        folder = Path(folder)
        self.cfg = cfg
        self.vision = open_session(folder / "vision.onnx")
        self.embedding = open_session(folder / "embedding.onnx")
        self.decoder = open_session(folder / "decoder.onnx")
        prefill = folder / PREFILL_FILE  # the runtime's prompts go through it (export.quantize)
        self.prompt_decoder = open_session(prefill) if prefill.is_file() else self.decoder

    def embeds(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.vision.run(None, {"pixel_values": pixel_values})  # [1, N, D]
        self.features = features
        return self.embedding.run(None, {"input_ids": input_ids, "image_features": features})[0]  # [1, T, D]

    def logits(self, embeds: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of every position [1, T, V].

        A decoder with last-position logits (export.last_logits) is fed one token at a time against its KV cache, as
        generation feeds it; one with logits for every position runs once.
        """
        feed = decoder_feed(embeds, self.cfg)
        if self.decoder.get_outputs()[0].shape[1] != 1:
            return self.decoder.run(["logits"], feed)[0]  # [1, T, V]
        names = [i.name for i in self.decoder.get_inputs()]
        past = [feed[n] for n in names[3:]]
        rows = []
        for t in range(embeds.shape[1]):
            step = [embeds[:, t : t + 1], np.ones((1, t + 1), np.int64), np.array([[t]], np.int64)]
            logits, *past = self.decoder.run(None, dict(zip(names, [*step, *past])))  # [1, 1, V]
            rows.append(logits[:, -1])
        return np.stack(rows, axis=1)  # [1, T, V]

    def greedy(self, prompt: list[int], pixel_values: np.ndarray, max_new_tokens: int) -> list[int]:
        ids = np.array([prompt], np.int64)
        embeds = self.embeds(ids, pixel_values)
        feed = decoder_feed(embeds, self.cfg)
        names = [i.name for i in self.decoder.get_inputs()]
        tokens: list[int] = []
        decoder = self.prompt_decoder
        for _ in range(max_new_tokens):
            logits, *present = decoder.run(None, feed)
            decoder = self.decoder
            step = logits[0, -1].copy()
            step[self.cfg.prompt.image_token_id] = -np.inf  # an image id never stands for text
            token = int(step.argmax())
            if token == self.cfg.language_model.eos_token_id:
                break
            tokens.append(token)
            mask = np.concatenate([feed["attention_mask"], np.ones((1, 1), np.int64)], axis=1)
            step_embeds = self.embedding.run(None, {"input_ids": np.array([[token]]), "image_features": self.features})[
                0
            ]
            positions = position_ids_from_mask(torch.from_numpy(mask), 1).numpy()
            feed = dict(zip(names, [step_embeds, mask, positions, *present]))
        return tokens


@torch.no_grad()
def pytorch_reference(model: TinyGPTV, tokenizer: TextTokenizer, data: str | Path, n: int) -> dict[str, Any]:
    """The held-out sequences, PyTorch's teacher-forced logits and greedy answers: the same for every variant, so
    computed once per (model, data, n) and kept on the model object."""
    cache = model.__dict__.setdefault("_quality_reference", {})
    key = (str(data), n)
    if key in cache:
        return cache[key]
    cfg = model.config
    sequences = encode_examples(model, tokenizer, read_examples(data, n))
    logits, greedy = [], []
    for seq in sequences:
        feed = decoder_feed(seq.inputs_embeds, cfg)
        names = ("inputs_embeds", "attention_mask", "position_ids")
        logits.append(model.decode(*(torch.from_numpy(feed[k]) for k in names))[0].numpy())  # [1, T, V]
        if seq.meta["task"] in UNSCORED_TASKS:
            continue
        prompt = seq.input_ids[0, : seq.prompt_length].tolist()
        budget = seq.input_ids.shape[1] - seq.prompt_length + 4  # the answer, its EOS and some slack
        pixels = torch.from_numpy(seq.pixel_values)
        tokens = model.generate([prompt], pixel_values=pixels, max_new_tokens=budget).tokens[0]
        greedy.append((seq, prompt, budget, tokens))
    cache[key] = {"sequences": sequences, "logits": logits, "greedy": greedy}
    return cache[key]


def measure_folder(
    folder: str | Path, model: TinyGPTV, tokenizer: TextTokenizer, data: str | Path, n: int = 64
) -> dict[str, Any]:
    """One row of the quality table for `folder`, against the fp32 PyTorch `model` on the first n examples of `data`."""
    start = time.monotonic()
    folder = Path(folder)
    onnx_model = FolderModel(folder, model.config)
    reference = pytorch_reference(model, tokenizer, data, n)
    sequences = reference["sequences"]
    nll, count, worst = 0.0, 0, 0.0
    for seq, ref in zip(sequences, reference["logits"]):
        logits = onnx_model.logits(onnx_model.embeds(seq.input_ids, seq.pixel_values))  # [1, T, V]
        worst = max(worst, float(np.abs(logits - ref).max()))
        targets = seq.labels[0, 1:]  # the logit at t predicts token t+1
        keep = targets != -100
        log_probs = torch.log_softmax(torch.from_numpy(logits[0, :-1]).double(), -1).numpy()
        nll -= float(log_probs[np.arange(len(targets))[keep], targets[keep]].sum())
        count += int(keep.sum())
    equal = 0
    by_task: dict[str, list[bool]] = {}
    for seq, prompt, budget, expected_tokens in reference["greedy"]:
        tokens = onnx_model.greedy(prompt, seq.pixel_values, budget)
        equal += tokens == expected_tokens
        hit = answer_matches(tokenizer.decode(tokens), seq.meta["answer"])
        by_task.setdefault(seq.meta["task"] or "untagged", []).append(hit)
    scored = [hit for hits in by_task.values() for hit in hits]
    return {
        "folder_bytes": folder_size(folder),
        "decoder_bytes": sum(p.stat().st_size for p in folder.glob("decoder.onnx*")),
        "max_logit_diff": worst,
        "answer_perplexity": float(np.exp(nll / max(count, 1))),
        "accuracy": sum(scored) / max(len(scored), 1),
        "accuracy_by_task": {task: sum(hits) / len(hits) for task, hits in sorted(by_task.items())},
        "greedy_equal_pytorch": equal / max(len(scored), 1),
        "prompts_through": "decoder_prefill.onnx"
        if onnx_model.prompt_decoder is not onnx_model.decoder
        else "decoder.onnx",
        "samples": {"sequences": len(sequences), "answer_tokens": count, "scored": len(scored), "data": str(data)},
        "seconds": round(time.monotonic() - start, 1),
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of quality rows keyed by variant name; ratios against the fp32 row when there is one."""
    base = rows.get("fp32")
    lines = ["| variant | folder MB | decoder MB | decoder / fp32 | max logit diff | answer ppl | accuracy | "
             "acc / fp32 | greedy = PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in rows.items():
        size_ratio = row["decoder_bytes"] / base["decoder_bytes"] if base else float("nan")
        acc_ratio = row["accuracy"] / base["accuracy"] if base and base["accuracy"] else float("nan")
        lines.append(f"| {name} | {row['folder_bytes'] / 1e6:.2f} | {row['decoder_bytes'] / 1e6:.2f} | {size_ratio:.3f} | "
                     f"{row['max_logit_diff']:.2e} | {row['answer_perplexity']:.4f} | {row['accuracy']:.3f} | "
                     f"{acc_ratio:.3f} | {row['greedy_equal_pytorch']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


VARIANTS = {  # name -> export.onnx options
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8": {"precision": "int8"},
    "int4-rtn": {"precision": "int4", "quant": "rtn"},
    "int4-hqq": {"precision": "int4", "quant": "hqq"},
    "int4-gptq": {"precision": "int4", "quant": "gptq"},
    "int4-gptq-sym": {"precision": "int4", "quant": "gptq", "symmetric": True},
    "int4-gptq-ort": {"precision": "int4", "quant": "gptq-ort"},
    "int4-gptq+vision-fp16": {"precision": "int4", "quant": "gptq", "vision_precision": "fp16"},
    "int4-gptq+vision-int8": {"precision": "int4", "quant": "gptq", "vision_precision": "int8"},
}


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="python -m export.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="model folder (config.json + model.safetensors + tokenizer.json)"
    )
    parser.add_argument("--out", required=True, help="folder for one export per variant, quality.md and quality.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--eval-data", required=True, help="held-out image + prompt + answer examples (JSON lines)")
    parser.add_argument("--samples", type=int, default=64, help="held-out examples to measure (the file's first N)")
    parser.add_argument("--calib-data", help="GPTQ calibration examples (JSON lines; needed by the gptq variants)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from export.folder import ExportError, refuse_existing
    from export.onnx import ExportOptions, export_folder, load_model, load_tokenizer

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    out = Path(args.out)
    try:
        if unknown:
            raise ExportError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        refuse_existing(out, args.force)
        check_data(args.eval_data, "--eval-data")  # a bad file fails now, not after the fp32 export
        if any("gptq" in VARIANTS[v].get("quant", "") for v in variants):
            check_data(args.calib_data, "--calib-data")
        model, model_dir = load_model(args.model)
        load_tokenizer(model, model_dir, None)  # fail now, not after the fp32 export, when tokenizer.json is missing
        out.mkdir(parents=True, exist_ok=True)
        rows, graphs = {}, None
        for name in ["fp32", *[v for v in variants if v != "fp32"]]:
            options = dict(VARIANTS[name])
            opts = ExportOptions(block_size=args.block_size, calib_data=args.calib_data, calib_samples=args.calib_samples,
                                 eval_data=args.eval_data, quality_samples=args.samples, **options)  # fmt: skip
            manifest = export_folder(out / name, model_dir, opts, force=True, model=model, graphs_from=graphs)
            graphs = graphs or out / "fp32"
            if name in variants:
                rows[name] = manifest["quality"]
                logger.info("%s: %s", name, json.dumps(rows[name]))
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = format_table(rows)
    (out / "quality.md").write_text(table)
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
