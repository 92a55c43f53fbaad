"""Store finished run folders' JSON lines gzipped: `python -m benchmarks.pack FOLDER ...`.

records.jsonl and metrics.jsonl hold most of a committed run folder's bytes (the ten-seed
UNet verdict's records: 4.8 MB, under a tenth of that packed), and the working tree must
stay under the GPU machine's 64 MiB transfer limit. Every reader takes either form
(`benchmarks.checkpoint.read_jsonl`); a run that writes into a packed folder again
(`--resume`, `--extend`) writes the plain file, which replaces the packed one, so pack the
folder again before committing it. The gzip header holds no time or file name: the same rows
pack to the same bytes.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from benchmarks.checkpoint import packed, write_bytes

NAMES = ("records.jsonl", "metrics.jsonl")


def pack(path: Path) -> tuple[int, int]:
    """Replace `path` by its packed copy; (bytes before, bytes after)."""
    data = path.read_bytes()
    blob = gzip.compress(data, compresslevel=9, mtime=0)
    write_bytes(packed(path), blob)
    path.unlink()
    return len(data), len(blob)


def main(argv: list[str] | None = None) -> int:
    folders = [Path(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    if not folders:
        print("usage: python -m benchmarks.pack FOLDER ... (run folders, or folders holding them)", file=sys.stderr)
        return 2
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    before = after = 0
    for folder in folders:
        for path in sorted(p for name in NAMES for p in folder.rglob(name) if "checkpoints" not in p.parts):
            size, packed_size = pack(path)
            before, after = before + size, after + packed_size
            print(f"{path}: {size} -> {packed_size} bytes")
    print(f"packed: {before} -> {after} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
