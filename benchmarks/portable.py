"""Model locations as `config.json` records them, so that a run folder made in one checkout
can be read, resumed and extended in another clone.

A hub id is recorded as given, a folder inside the repository relative to the repository
root (`zoo/tiny/assets/pipeline`), any other folder as an absolute path. Reading resolves a
relative path against the repository root, never the current directory.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parents[1]


def portable_model(model: str) -> str:
    """`model` (a `--model` value: a folder, relative to the current directory, or a hub
    id) as `config.json` records it."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    folder = folder.resolve()
    if folder.is_relative_to(REPO_ROOT):
        return folder.relative_to(REPO_ROOT).as_posix()
    return str(folder)


def recorded_model(recorded: str) -> str:
    """The folder (absolute) or hub id that a `config.json` "model" names in this checkout.

    Runs recorded before paths were portable hold the absolute path of the checkout that
    made them (`/work/wt-f/zoo/tiny/assets/pipeline`); when that path does not exist here,
    the longest tail of it that is a pipeline folder (with `unet/`) under the repository
    root stands for it; only a pipeline counts, so that `/data/x/results` is not taken for
    `results/`. A relative "model" that is no folder here is a hub id (or a folder this
    clone lacks, which loading then names).
    """
    path = PurePosixPath(recorded)
    if not path.is_absolute():
        inside = REPO_ROOT / path
        return str(inside.resolve()) if inside.is_dir() else recorded
    if Path(recorded).is_dir():
        return str(Path(recorded).resolve())
    for start in range(1, len(path.parts)):
        tail = REPO_ROOT.joinpath(*path.parts[start:])
        if (tail / "unet").is_dir():
            return str(tail.resolve())
    return recorded
