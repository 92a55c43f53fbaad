"""Atomic files: a kill at any instant leaves either the previous file or the new one.

Each write goes to a temporary file in the same folder, is flushed to disk, then renamed
over the target (`os.replace` is atomic on POSIX within a file system). A reader never
sees a half-written checkpoint; a leftover temporary file is ignored and overwritten.
Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`, which executes no code from the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_state(path: str | Path, state: dict) -> None:
    """Write `state` (tensors and plain values) atomically with torch.save."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_state(path: str | Path) -> dict | None:
    """The state at `path`, or None when no complete checkpoint exists."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
