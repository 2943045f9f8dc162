"""Benchmarks: latency by phase, decode speed, memory and the bandwidth limit of the runtime against its baselines.

    python -m benchmarks --model exports/demo-int4 --out reports/demo      # this export vs PyTorch and onnxruntime-genai
    python -m benchmarks.peers --out reports/peers --layers 4               # stock Phi-2: builder, llama.cpp, transformers
    python -m benchmarks.bandwidth                                          # this machine's read bandwidth

The only place where the runtime and the PyTorch reference meet (DESIGN.md); imports nothing heavy at package level.
"""
