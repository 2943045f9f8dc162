"""The errors the runtime raises for input a user can fix (torch-free).

Every one of them is a `RuntimeInputError`: the CLI prints its message as one line on stderr and exits 2, and the
Python API lets it through unchanged. Errors from the shared core modules that mean the same thing (a bad image, a bad
prompt, a bad tokenizer file, a bad config) are listed in `INPUT_ERRORS` so callers can catch them all at once.
"""

from __future__ import annotations

from core.config import ConfigError
from core.image import ImageError
from core.prompts import PromptError
from core.tokenizer import TokenizerError


class RuntimeInputError(ValueError):
    """Input a user can fix: the message says what was wrong, with the numbers, and what to do."""


class ManifestError(RuntimeInputError):
    """A missing, unreadable, unsupported or tampered export folder."""


class BudgetError(RuntimeInputError):
    """The planned memory is over the budget; the message gives the plan and what would fit."""


class ProviderError(RuntimeInputError):
    """An execution provider that this onnxruntime build does not have."""


class ContextError(RuntimeInputError):
    """Prompt + image tokens + new tokens longer than the context the cache was planned for."""


INPUT_ERRORS = (RuntimeInputError, ImageError, PromptError, TokenizerError, ConfigError)
