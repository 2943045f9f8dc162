"""Read a pickle that may hold plain data only: the RefCOCO `refs(unc).p` / `refs(umd).p` files.

A pickle can name any importable callable (`os.system`, a class with a malicious `__reduce__`) and the standard
unpickler calls it while loading. The refer files are lists of dicts of strings and numbers, so this reader admits
exactly that: dict, list, tuple, str, int, float, bool and None. Any global reference (a class, a function) is refused
before it is imported, and any other value the pickle opcodes can build without a global (set, frozenset, bytes,
bytearray, complex...) is refused after loading, each with an error naming what was found and where.

Usage:
    refs = load_plain_pickle("refcoco/refs(unc).p")   # -> list[dict]
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class PickleRefused(pickle.UnpicklingError):
    """The pickle holds something other than plain containers and scalars."""


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        # Python-2 pickles (the refer files) store text as byte strings; they are UTF-8 (ASCII in practice).
        super().__init__(file, encoding="utf-8")
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: ANN201 - signature fixed by pickle
        raise PickleRefused(
            f"{self._source}: refusing to load global '{module}.{name}': only plain data "
            f"(dict, list, tuple, str, int, float, bool, None) is allowed in this file"
        )

    def persistent_load(self, pid):  # noqa: ANN001, ANN201
        raise PickleRefused(f"{self._source}: refusing persistent id {pid!r}: only plain data is allowed")


def _check_plain(obj: object, source: str) -> None:
    """Walk the loaded value (iteratively: deep lists must not hit the recursion limit) and refuse non-plain types."""
    stack: list[tuple[object, str]] = [(obj, "<root>")]
    while stack:
        value, where = stack.pop()
        kind = type(value)
        if kind not in PLAIN_TYPES:
            raise PickleRefused(
                f"{source}: refusing value of type '{kind.__module__}.{kind.__qualname__}' at {where}: "
                f"only dict, list, tuple, str, int, float, bool and None are allowed"
            )
        if kind is dict:
            for key, item in value.items():  # type: ignore[union-attr]
                stack.append((key, f"{where} key {key!r}"))
                stack.append((item, f"{where}[{key!r}]"))
        elif kind in (list, tuple):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))  # type: ignore[arg-type]


def loads_plain_pickle(data: bytes, source: str = "<bytes>") -> object:
    """Unpickle `data`, admitting plain containers and scalars only (else `PickleRefused`)."""
    try:
        obj = _PlainUnpickler(io.BytesIO(data), source).load()
    except PickleRefused:
        raise
    except Exception as exc:  # a malformed stream fails in many ways (EOFError, KeyError on the memo, TypeError...)
        raise PickleRefused(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    _check_plain(obj, source)
    return obj


def load_plain_pickle(path: str | Path) -> object:
    """Read a pickle file that may hold plain data only (see the module docstring)."""
    path = Path(path)
    return loads_plain_pickle(path.read_bytes(), source=str(path))
