"""Atomic files: a kill at any instant leaves either the previous file or the new one.

Each write serialises in memory, writes to a temporary file in the same folder, flushes
it to disk, then renames it over the target (`os.replace` is atomic on POSIX within a
file system) and flushes the folder so that the rename survives a power cut. A reader
never sees a half-written checkpoint; a temporary file left by a kill is never read and
is removed by the next successful write of the same target. A write that fails (a full
disk) raises `WriteFailed` naming the path and leaves the previous file untouched.

Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`, which executes no code from the file.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import tempfile
from pathlib import Path

import torch

from zoo import strict_json

KILL_AT_ENV = "STEPZOO_KILL_AT"
"""Crash-test hook: the process SIGKILLs itself at the kill point of this name (see
`kill_point`). Only tests set it (test_reliability_kill, test_cluster); unset, it costs one lookup."""
KILL_ONCE_ENV = "STEPZOO_KILL_ONCE"
"""With `KILL_AT_ENV`: a file whose creation marks the kill as done (`kill_point`)."""


class WriteFailed(RuntimeError):
    """A file could not be written (full disk, no permission); the previous version is intact."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint exists but cannot be read; it is reported, never silently replaced."""


def kill_point(name: str) -> None:
    """SIGKILL this process if $STEPZOO_KILL_AT is `name`. Names: `train:ALGO:EPOCH` and
    `evaluate:ALGO:EPOCH` (benchmarks.train, EPOCH counted from 1), and `write:FILENAME`
    (here: halfway through the temporary file of FILENAME's next write). With
    $STEPZOO_KILL_ONCE naming a file, only the first process to get there dies (it creates
    the file): the retried job of a cluster engine then goes on."""
    if os.environ.get(KILL_AT_ENV) != name:
        return
    once = os.environ.get(KILL_ONCE_ENV)
    if once:
        try:
            Path(once).touch(exist_ok=False)
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteFailed(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            # In two halves so that the crash test can die leaving a truncated temporary file.
            half = len(data) // 2
            handle.write(data[:half])
            handle.flush()
            kill_point(f"write:{path.name}")
            handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteFailed(
                f"cannot write {path}: {error.strerror or error}; its previous version is left as it was"
            ) from None
        raise
    _fsync_folder(path.parent)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | Path, state: dict) -> None:
    """Write `state` (tensors and plain values) atomically with torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_write(Path(path), buffer.getvalue())


def load_state(path: str | Path) -> dict | None:
    """The state at `path`, or None when no checkpoint exists there. Raises
    CorruptCheckpoint for a file that does not load (it was not written by save_state)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise CorruptCheckpoint(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {reason}); stepzoo writes checkpoints "
            "atomically, so it was damaged or replaced after writing: delete it to redo that run from its start"
        ) from None


def write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), data)


def write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), text.encode("utf-8"))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines; a packed copy (`packed`) is removed: the new file
    supersedes it."""
    write_text(path, "".join(strict_json.dumps(row, sort_keys=True) + "\n" for row in rows))
    packed(path).unlink(missing_ok=True)


def packed(path: str | Path) -> Path:
    """The gzipped copy of a JSON-lines file, as committed results store it (`benchmarks.pack`)."""
    return Path(f"{path}.gz")


def jsonl_exists(path: str | Path) -> bool:
    return Path(path).is_file() or packed(path).is_file()


def read_jsonl(path: str | Path) -> list[str]:
    """The non-empty lines of the JSON-lines file `path`, or of its packed copy when only
    that exists; none when neither does."""
    path = Path(path)
    if path.is_file():
        text = path.read_text()
    elif packed(path).is_file():
        text = gzip.decompress(packed(path).read_bytes()).decode("utf-8")
    else:
        return []
    return [line for line in text.splitlines() if line.strip()]
