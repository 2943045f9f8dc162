"""One runner per runtime; each loads a model once and answers one request per `run_once(clock) -> Sample`.

    ours          runtime.Pipeline on an export folder (our ONNX graphs, our decode loop)
    ort-genai     onnxruntime-genai on a folder with genai_config.json (our export's graphs, or its builder's)
    torch         the PyTorch reference (core.TinyGPTV, KV cache), fp32 or bf16: what a user of the original runs
    transformers  transformers' PhiForCausalLM on a stock Phi-2 folder (the peers comparison), fp32 or bf16
    llama-cpp     llama.cpp's llama-bench on a GGUF file (runs its own repetitions: `run_all` instead of `run_once`)

The parent process builds the prompt token ids once and passes them in the RunConfig, so every runtime prefills the
same tokens (`prompt_ids` with the image ids, `text_ids` with text in their place for runtimes fed token ids only).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

RUNNERS = {
    "ours": "benchmarks.runners.ours:OursRunner",
    "ort-genai": "benchmarks.runners.ort_genai:GenaiRunner",
    "torch": "benchmarks.runners.torch_ref:TorchRunner",
    "transformers": "benchmarks.runners.hf_phi:TransformersRunner",
    "llama-cpp": "benchmarks.runners.llama_cpp:LlamaBenchRunner",
}


@dataclass
class RunConfig:
    """One configuration, run in a fresh process (benchmarks.worker)."""

    runtime: str
    model: str  # export folder, genai folder, model folder or GGUF file
    label: str  # what the report calls it, e.g. "ours int4"
    precision: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    reps: int = 10
    warmup: int = 2
    image: str | None = None  # image path for runs with an image; None = text only
    prompt_ids: list[int] = field(default_factory=list)  # exactly prompt_tokens ids, image ids in place
    text_ids: list[int] = field(default_factory=list)  # the same length, text where the image ids were
    context: int | None = None
    memory_budget: str = "8GB"
    options: dict[str, Any] = field(default_factory=dict)  # runner-specific (torch source, llama-bench path, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(**data)

    def public(self) -> dict[str, Any]:
        """The config as the report records it (token ids left out: they are in the workload, not the result)."""
        out = self.to_dict()
        out.pop("prompt_ids")
        out.pop("text_ids")
        return out


def make_runner(config: RunConfig):
    """The runner object for `config.runtime` (imported only when used: torch is heavy, llama.cpp optional)."""
    if config.runtime not in RUNNERS:
        raise ValueError(f"unknown runtime {config.runtime!r}; choose one of {', '.join(RUNNERS)}")
    module, name = RUNNERS[config.runtime].split(":")
    return getattr(importlib.import_module(module), name)(config)
