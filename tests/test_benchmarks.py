"""benchmarks/: the harness's arithmetic with a fake clock, and the report's schema. No timing is asserted.

A scripted runner moves a fake clock by known amounts (preprocess 2 ms, vision 10 ms, prefill 30 ms, first sample
1 ms, 20 ms per decode step), so every number the harness derives is known exactly.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.bandwidth import decode_limit, kv_bytes
from benchmarks.harness import Sample, aggregate, measure, percentile, rep_metrics, summarize
from benchmarks.report import (
    SCHEMA_VERSION,
    bandwidth_metrics,
    build_record,
    markdown_table,
    skipped_record,
    validate_record,
    write_report,
)
from benchmarks.runners.llama_cpp import samples_from_llama_bench
from benchmarks.workload import WorkloadError, lengthen, synthetic_ids, text_only

MS = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += int(ms * MS)


def scripted_run(clock: FakeClock, new_tokens: int = 5, slow_first: bool = False):
    """A runner's run_once whose phases take known times; the first call can be made slower (the cold request)."""
    calls = {"n": 0}

    def run_once(read) -> Sample:
        calls["n"] += 1
        cold_extra = 100 if slow_first and calls["n"] == 1 else 0
        start = read()
        clock.advance(2 + cold_extra)  # preprocess
        clock.advance(10)  # vision
        clock.advance(30)  # prefill
        clock.advance(1)  # first sample
        tokens = [read()]
        for _ in range(new_tokens - 1):
            clock.advance(20)
            tokens.append(read())
        clock.advance(0.5)
        phases = {"preprocess": (2 + cold_extra) * MS, "vision": 10 * MS, "prefill": 30 * MS}
        return Sample(start, read(), tokens, phases)

    return run_once


def test_percentile_and_summary_match_numpy_linear_interpolation():
    values = list(range(1, 11))
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile([7.0], 90) == 7.0
    stats = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert stats["mean"] == 5.0 and stats["median"] == 4.5 and stats["min"] == 2.0 and stats["max"] == 9.0
    assert stats["stdev"] == pytest.approx(2.138089935)  # sample standard deviation (n - 1)
    assert summarize([3.0])["stdev"] == 0.0
    assert summarize([])["median"] is None
    with pytest.raises(ValueError, match="0..100"):
        percentile(values, 101)


def test_rep_metrics_from_a_fake_clock():
    clock = FakeClock()
    m = rep_metrics(scripted_run(clock)(clock), prompt_tokens=128)
    assert m["preprocess_ms"] == 2 and m["vision_ms"] == 10 and m["prefill_ms"] == 30
    assert m["ttft_ms"] == pytest.approx(43.0)
    assert m["first_sample_ms"] == pytest.approx(1.0)
    assert m["decode_ms_per_token"] == pytest.approx(20.0)
    assert m["decode_tok_s"] == pytest.approx(50.0)  # 4 decode steps of 20 ms: tokens 2..5
    assert m["e2e_ms"] == pytest.approx(43 + 80 + 0.5)
    assert m["prefill_tok_s"] == pytest.approx(128 / 0.030)
    assert m["new_tokens"] == 5


def test_one_token_has_no_decode_speed():
    m = rep_metrics(Sample(0, 10 * MS, [5 * MS], {}), prompt_tokens=8)
    assert m["decode_tok_s"] is None and m["decode_ms_per_token"] is None and m["ttft_ms"] == 5.0
    with pytest.raises(ValueError, match="at least one"):
        rep_metrics(Sample(0, 1, [], {}), prompt_tokens=8)


def test_measure_keeps_the_first_warmup_as_cold_and_discards_the_rest():
    clock = FakeClock()
    samples, cold = measure(scripted_run(clock, slow_first=True), warmup=2, reps=3, clock=clock)
    assert len(samples) == 3
    assert rep_metrics(cold, 16)["ttft_ms"] == pytest.approx(143.0)
    assert [rep_metrics(s, 16)["ttft_ms"] for s in samples] == pytest.approx([43.0] * 3)
    no_warmup, none = measure(scripted_run(clock), warmup=0, reps=1, clock=clock)
    assert none is None and len(no_warmup) == 1
    with pytest.raises(ValueError, match="reps >= 1"):
        measure(scripted_run(clock), warmup=1, reps=0, clock=clock)


def test_aggregate_statistics_and_pooled_inter_token_latency():
    samples = [Sample(0, 100 * MS, [10 * MS, 20 * MS, 40 * MS], {"prefill": 8 * MS}),
               Sample(0, 100 * MS, [30 * MS, 40 * MS, 50 * MS], {"prefill": 28 * MS})]  # fmt: skip
    m = aggregate(samples, prompt_tokens=64, cold=samples[0])
    assert m["ttft_ms"]["values"] == [10.0, 30.0] and m["ttft_ms"]["median"] == 20.0
    assert m["decode_tok_s"]["values"] == pytest.approx([2 / 0.030, 2 / 0.020])
    assert m["inter_token_ms"]["n"] == 4 and m["inter_token_ms"]["median"] == 10.0  # gaps 10, 20, 10, 10
    assert m["inter_token_ms"]["p90"] == pytest.approx(17.0)
    assert m["cold"]["ttft_ms"] == 10.0
    assert m["samples"][1]["token_ns"] == [30 * MS, 40 * MS, 50 * MS]


def test_llama_bench_totals_become_samples_with_its_own_rates():
    samples = samples_from_llama_bench([100 * MS, 120 * MS], [640 * MS, 320 * MS], new_tokens=64)
    m = aggregate(samples, prompt_tokens=128)
    assert m["ttft_ms"]["values"] == [100.0, 120.0]
    assert m["decode_tok_s"]["values"] == pytest.approx([100.0, 200.0])  # 64 tokens / tg time
    assert m["prefill_tok_s"]["values"] == pytest.approx([1280.0, 128 / 0.120])


def test_llama_cpp_is_built_without_amx_where_the_cpu_has_it():
    """llama.cpp's AMX backend segfaults on AMX Xeons (upstream #20824): there the build drops the AMX ISA only."""
    from benchmarks.runners.llama_cpp import CMAKE_FLAGS, cmake_flags, cpu_has_amx

    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
    assert cpu_has_amx(amx) and not cpu_has_amx("flags\t\t: fpu avx2 avx512f\n") and not cpu_has_amx("")
    assert cmake_flags(False) == CMAKE_FLAGS and "-DGGML_NATIVE=ON" in CMAKE_FLAGS
    assert cmake_flags(True)[len(CMAKE_FLAGS) :] == [
        "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    ]


def test_bandwidth_limit_arithmetic():
    assert kv_bytes(layers=32, kv_heads=32, head_size=80, tokens=160, element_bytes=4) == 2 * 32 * 32 * 80 * 160 * 4
    limit = decode_limit(weights_bytes=1_500_000_000, kv_bytes_mid=500_000_000, bandwidth_gb_s=40.0)
    assert limit["bytes_per_step"] == 2_000_000_000 and limit["limit_tok_s"] == pytest.approx(20.0)
    metrics = {"decode_tok_s": {"median": 10.0}}
    info = {"decode_weights_bytes": 1_500_000_000, "kv_bytes_mid": 500_000_000}
    bw = bandwidth_metrics(metrics, info, {"best_gb_s": 40.0})
    assert bw["limit_tok_s"] == pytest.approx(20.0) and bw["fraction_of_limit"] == pytest.approx(0.5)
    assert bandwidth_metrics(metrics, {}, {"best_gb_s": 40.0}) is None
    cached = bandwidth_metrics(metrics, info, {"best_gb_s": 40.0}, cache_bytes=4 * 10**9)  # the step fits in cache
    assert cached["in_cache"] and cached["fraction_of_limit"] is None


def test_workload_prompts_have_exactly_the_asked_length():
    assert lengthen([0, 9, 9, 5], [7, 8], target=9, at=3) == [0, 9, 9, 7, 8, 7, 8, 7, 5]
    assert lengthen([0, 1], [7], target=2, at=1) == [0, 1]
    with pytest.raises(WorkloadError, match="3 tokens, more than --prompt-tokens 2"):
        lengthen([0, 1, 2], [7], target=2, at=1)
    assert text_only([0, 99, 99, 99, 4], image_token_id=99, filler_ids=[5, 6]) == [0, 5, 6, 5, 4]
    ids = synthetic_ids(50, bos=50256, vocab_size=51200)
    assert len(ids) == 50 and ids[0] == 50256 and all(0 < t < 51199 for t in ids[1:])
    assert ids == synthetic_ids(50, bos=50256, vocab_size=51200)


MACHINE = {"git_sha": "abc", "git_dirty": False, "packages": {"onnxruntime": "1.32.0"}, "cpu_model": "test cpu",
           "cpu_count": 2, "os": "linux", "python": "3.11", "load_average": [1.0, 1.0, 1.0], "time": "now"}  # fmt: skip


def worker_result(label: str = "ours int4", decode_gap_ms: int = 20) -> dict:
    clock = FakeClock()
    samples, cold = measure(scripted_run(clock), warmup=1, reps=3, clock=clock)
    metrics = aggregate(samples, 128, cold)
    metrics.update(load_ms=250.0, peak_rss_after_load_bytes=2**30, peak_rss_bytes=3 * 2**30, peak_gpu_bytes=None)
    config = {"runtime": "ours", "model": "x", "label": label, "precision": "int4", "threads": 2, "prompt_tokens": 128,
              "new_tokens": 5, "reps": 3, "warmup": 1, "image": "a.png"}  # fmt: skip
    plan = {"peak": int(2.5 * 2**30), "budget": 8 * 2**30}
    info = {"precision": "int4", "disk_bytes": 2**30, "decode_weights_bytes": 10**9, "kv_bytes_mid": 0,
            "memory_plan": plan, "provider": "cpu"}  # fmt: skip
    return {"status": "ok", "config": config, "info": info, "metrics": metrics, "tokens": [1, 2, 3, 4, 5]}


def test_record_follows_the_schema_and_the_table_shows_its_numbers():
    record = build_record(worker_result(), MACHINE, {"best_gb_s": 40.0})
    assert validate_record(record) == []
    assert record["schema_version"] == SCHEMA_VERSION and record["metadata"]["threads"] == 2
    assert record["metrics"]["bandwidth"]["fraction_of_limit"] == pytest.approx(50.0 / 40.0)
    assert record["metrics"]["memory_plan"]["budget"] == 8 * 2**30
    json.dumps(record)  # plain JSON all the way down
    table = markdown_table([record])
    assert "| ours int4 | int4 | 1.00 GiB | 2 | img+pp128+tg5 | 43.0 ± 0.0 |" in table
    assert "| 50.00 ± 0.00 | 20.00 / 20.00 | 3.00 GiB | 2.50 GiB | 1.25 |" in table
    assert "| ours int4 | 2 | img+pp128+tg5 | 2.0 | 10.0 | 30.0 | 1.0 | 43.0 | 43.0 |" in table


def test_schema_problems_are_named():
    record = build_record(worker_result(), MACHINE, None)
    del record["metrics"]["ttft_ms"]["p90"]
    del record["metadata"]["git_sha"]
    assert validate_record(record) == ["metadata.git_sha missing", "metrics.ttft_ms lacks statistics"]
    assert validate_record({"status": "ok"})[0] == "missing schema_version"
    skipped = skipped_record(worker_result()["config"], dict(MACHINE, provider="cpu"), "needs stock Phi-2 weights")
    assert validate_record(skipped) == []
    assert "**skipped** (needs stock Phi-2 weights)" in markdown_table([skipped])
    failed = build_record({"status": "failed", "config": worker_result()["config"], "error": "boom"}, MACHINE, None)
    assert validate_record(failed) == [] and failed["note"] == "boom"


def test_write_report_writes_records_table_and_plots(tmp_path):
    records = [build_record(worker_result("ours int4"), MACHINE, {"best_gb_s": 40.0}),
               build_record(worker_result("torch bf16"), MACHINE, {"best_gb_s": 40.0})]  # fmt: skip
    path = write_report(records, tmp_path, "Test report")
    assert path.read_text().startswith("# Test report")
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2
    assert sorted(p.name for p in (tmp_path / "records").iterdir())[0] == "000_ours-int4_t2_p128.json"
    for name in ("ttft_breakdown.png", "decode_vs_context.png", "memory_vs_budget.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
