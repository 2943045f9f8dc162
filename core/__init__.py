"""TinyGPT-V in PyTorch, plus the torch-free pieces the runtime shares (config, prompts, boxes, image preprocessing).

`import core` never imports torch: the model lives in `core.model` and is imported from there.
"""

from core.config import ModelConfig

__all__ = ["ModelConfig"]
