"""Atomic output folders: everything is written under a temporary name beside the target and renamed at the end.

    with staging_folder(out, force=False) as tmp:
        ...write into tmp...
    # only now does `out` exist; on any error tmp is removed and `out` (if it existed) is untouched

A half-written export can never be mistaken for a good one, and an existing folder is refused unless `force`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """An export that cannot go on; the message says what was wrong and what to do."""


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2, as every CLI of the kit."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def refuse_existing(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(
            f"{out} already exists; pass --force to replace it (it is only replaced once the new export passes)"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")


@contextlib.contextmanager
def staging_folder(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes `out` (replacing it if `force`), on error it is removed."""
    out = Path(out).absolute()
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        logger.info("wrote %s", out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_size(path: str | Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
