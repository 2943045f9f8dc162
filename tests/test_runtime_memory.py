"""Memory of the runtime, measured in a fresh process on the tiny export: the peak stays inside the plan, and 200
generations (single, streamed, sampled, batched, text-only and with images, short and long prompts) do not leak."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAK_BOUND = 2 << 20  # 200 generations; the largest per-generation array (prefill logits, long prompt) is ~66 KiB


@pytest.fixture(scope="module")
def measured(tiny_export_dir):
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np
        from runtime import Pipeline
        from runtime.generate import peak_rss_bytes

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()

        pipe = Pipeline.load({str(tiny_export_dir)!r}, threads=1, batch_size=2, memory_budget="1GB")
        img = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
        long_q = "[vqa] " + "What color is the circle? " * 20

        def one(i):
            q = "[vqa] What color is the circle?" if i % 3 else long_q
            if i % 5 == 0:
                pipe.generate_batch([(img, q), (None, "hi")], max_new_tokens=16)
            elif i % 5 == 1:
                list(pipe.stream(img, q, max_new_tokens=16, temperature=0.7, seed=i))
            else:
                pipe.generate(img if i % 2 else None, q, max_new_tokens=16)

        # the largest step the plan allows: a prompt that fills the context with the answer
        n = 60
        while len(pipe.prompt_ids("[vqa] " + "What color is the circle? " * n, True)) + 20 > 256:
            n -= 1
        pipe.generate(img, "[vqa] " + "What color is the circle? " * n, max_new_tokens=20)
        for i in range(100):
            one(i)
        before = rss()
        for i in range(200):
            one(i)
        after = rss()
        peak = peak_rss_bytes()  # VmHWM: ru_maxrss would count the pytest parent's memory too
        print(json.dumps({{"before": before, "after": after, "peak": peak, "plan": pipe.plan.to_dict()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_measured_peak_rss_is_within_the_plan(measured):
    plan = measured["plan"]
    assert plan["fits"] and plan["context"] == 256 and plan["batch_size"] == 2
    assert measured["peak"] <= plan["peak"], f"peak RSS {measured['peak']:,} > plan {plan['peak']:,}"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_200_generations_do_not_leak(measured):
    growth = measured["after"] - measured["before"]
    assert growth < LEAK_BOUND, f"RSS grew {growth:,} bytes over 200 generations"
