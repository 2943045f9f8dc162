"""The quality row: on the fp32 folder it must reproduce PyTorch's own perplexity and greedy answers."""

from __future__ import annotations

import math

import torch

from core.metrics import answer_matches
from core.model import TinyGPTV
from export.calibration import encode_examples, read_examples
from export.quality import format_table, measure_folder


def test_fp32_quality_row_matches_pytorch(tiny_model_dir, tiny_export_dir, tiny_eval_data):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    tokenizer = model.load_tokenizer(tiny_model_dir)
    row = measure_folder(tiny_export_dir, model, tokenizer, tiny_eval_data, n=3)
    nll, count = 0.0, 0
    examples = read_examples(tiny_eval_data, 3)
    for seq in encode_examples(model, tokenizer, examples):
        labels = torch.from_numpy(seq.labels)
        with torch.no_grad():
            out = model(
                torch.from_numpy(seq.input_ids), torch.ones_like(labels), labels, torch.from_numpy(seq.pixel_values)
            )
        n = int((labels[:, 1:] != -100).sum())
        nll, count = nll + float(out["loss"]) * n, count + n
    assert row["samples"]["answer_tokens"] == count
    assert math.isclose(row["answer_perplexity"], math.exp(nll / count), rel_tol=1e-4)
    assert row["max_logit_diff"] < 1e-5 and row["greedy_equal_pytorch"] == 1.0
    assert row["samples"]["scored"] == 3 and set(row["accuracy_by_task"]) == {"vqa", "refer"}
    answers = []
    for example in examples:  # the accuracy is PyTorch's own greedy answers scored by core.metrics
        prompt = encode_examples(model, tokenizer, [example])[0]
        ids = prompt.input_ids[0, : prompt.prompt_length].tolist()
        budget = prompt.input_ids.shape[1] - prompt.prompt_length + 4
        tokens = model.generate([ids], pixel_values=torch.from_numpy(prompt.pixel_values), max_new_tokens=budget)
        answers.append(answer_matches(tokenizer.decode(tokens.tokens[0]), example.answer))
    assert row["accuracy"] == sum(answers) / 3
    assert row["decoder_bytes"] == (tiny_export_dir / "decoder.onnx").stat().st_size
    table = format_table({"fp32": row, "copy": row})
    assert table.splitlines()[3].startswith("| copy |") and "| 1.000 |" in table.splitlines()[3]
