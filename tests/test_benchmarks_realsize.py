"""benchmarks.realsize on the tiny export: the context is filled exactly, and the memory table carries the runtime's own
plan, the measured peak (VmHWM of the fresh worker) and the verdicts against budget and goal. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.bandwidth import onnx_decode_bytes
from benchmarks.realsize import main, memory_table, plan_for
from runtime.budget import parse_bytes


def test_full_context_run_reports_peak_within_the_plan(tiny_export_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--model", str(tiny_export_dir), "--out", str(out), "--context", "256", "--new-tokens", "8",
                 "--threads", "1", "--budget", "1GB", "--goal", "1MB"])  # fmt: skip
    assert code == 0
    (row,) = json.loads((out / "memory.json").read_text())
    assert row["status"] == "ok" and (row["prompt_tokens"], row["new_tokens"], row["context"]) == (248, 8, 256)
    plan = plan_for(str(tiny_export_dir), 256, "1GB")
    assert row["plan"]["peak"] == plan["peak"] and row["plan"]["kv_cache"] == plan["kv_cache"]
    # one shared GQA buffer: (key, value) x layers x heads x hs x fp32
    assert plan["kv_cache"] == 2 * 2 * 4 * 16 * 4 * 256
    assert 0 < row["peak_rss_after_load_bytes"] <= row["peak_rss_bytes"] <= plan["peak"]
    assert row["peak_within_plan"] and row["within_budget"] and not row["within_goal"]
    assert row["sizes"]["folder"] > row["sizes"]["decoder"] > 0
    report = (out / "report.md").read_text()
    assert "img+pp248+tg8 (context 256)" in report and "vs budget 1.00 GiB" in report
    assert f"within ({row['peak_rss_bytes'] / parse_bytes('1GB'):.0%})" in report and "| OVER (" in report
    record = json.loads((out / "results.json").read_text())[0]
    assert record["config"]["context"] == 256 and record["metrics"]["new_tokens"]["median"] == 8
    # the decoder's bytes per step were read in a child, not by parsing the graph in the measured worker
    assert (
        record["info"]["decode_weights_bytes"] == onnx_decode_bytes(tiny_export_dir / "decoder.onnx")["weights_bytes"]
    )


def test_a_plan_over_the_budget_is_the_result(tiny_export_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["--model", str(tiny_export_dir), "--out", str(out), "--context", "256", "--new-tokens", "8",
                 "--threads", "1", "--budget", "1MB"]) == 0  # fmt: skip
    (row,) = json.loads((out / "memory.json").read_text())
    assert row["status"] == "failed" and "BudgetError: planned peak" in row["note"]
    assert row["plan"]["peak"] == plan_for(str(tiny_export_dir), 256, "1MB")["peak"] and row["peak_rss_bytes"] is None
    assert "Not measured" in memory_table([row])


def test_bad_input_is_one_line_and_exit_2(tiny_export_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not an export folder" in capsys.readouterr().err
    assert main(["--model", str(tiny_export_dir), "--out", str(tmp_path / "r"), "--context", "4096"]) == 2
    assert "--context 4096 >" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_export_dir), "--out", str(tmp_path / "r"), "--budget", "lots"])
    assert exit_info.value.code == 2
