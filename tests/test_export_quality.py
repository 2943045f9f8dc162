"""The quality row: on the fp32 folder it must reproduce PyTorch's own perplexity and greedy answers."""

from __future__ import annotations

import math

import torch

from core.model import TinyGPTV
from export.calibration import encode_samples, synthetic_samples
from export.quality import PERPLEXITY_TASKS, format_table, measure_folder


def test_fp32_quality_row_matches_pytorch(tiny_model_dir, tiny_export_dir):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    tokenizer = model.load_tokenizer(tiny_model_dir)
    row = measure_folder(tiny_export_dir, model, tokenizer, n=2)
    nll, count = 0.0, 0
    for seq in encode_samples(model, tokenizer, synthetic_samples("test", 2, PERPLEXITY_TASKS)):
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
    assert row["decoder_bytes"] == (tiny_export_dir / "decoder.onnx").stat().st_size
    table = format_table({"fp32": row, "copy": row})
    assert table.splitlines()[3].startswith("| copy |") and "| 1.000 |" in table.splitlines()[3]
