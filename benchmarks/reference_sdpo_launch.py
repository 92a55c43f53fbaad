"""Runs the SDPO reference's `scripts/train_sdpo.py` (ZiyiZhang27/sdpo) offline and timed,
inside the reference's own packages. `python -m benchmarks.reference_sdpo` prepares the
scratch copy, the packages and the model folder and starts this; run it through that.

    python -m benchmarks.reference_sdpo_launch TIMINGS.jsonl [the reference's absl flags]

Run from the root of the reference's copy, with that copy and its packages first on
PYTHONPATH and this repository after them. It imports only the standard library before
the reference's script, and changes no file of the reference. What it changes in memory
(the run-time patches, all of which `benchmarks.reference_sdpo.PATCHES` states):
- `imp`, which `config/config_sdpo.py` imports and Python 3.12 removed, is provided
  (`imp.load_source` only) where it is missing; `distutils`, which the reference's
  accelerate imports and Python 3.12 removed, comes from setuptools' copy;
- `wandb` is a stub whose `Image` builds nothing, and the script's `Accelerator` is built
  without `log_with`: no tracker, no account, no network (the reference still writes its
  JPEG thumbnails each epoch);
- `sdpo_pytorch.rewards.jpeg_compressibility` is added: stepzoo's JPEG reward
  (`rewards.jpeg.JpegSize`, DDPO's compressibility task) with the reference's reward
  signature, since the reference ships only model rewards, whose weights a machine without
  the hub cannot load;
- the script's `tqdm` records, as JSON lines in TIMINGS.jsonl, when each epoch's sampling,
  reward wait and training loops start and end (after a CUDA synchronisation), and when
  `main` starts and ends.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

SCRIPT = Path("scripts/train_sdpo.py")
TIMED_PHASES = ("Epoch", "Waiting for rewards")
"""Progress-bar descriptions of the loops that are timed: "Epoch N: sampling", "Waiting
for rewards", "Epoch N.I: training"; the per-batch and per-step bars are not."""


class Timings:
    """Appends {"phase", "event", "time"} lines, flushed at once so that a run stopped by
    a time limit keeps every phase it finished."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def record(self, phase: str, event: str) -> None:
        self.file.write(json.dumps({"phase": phase, "event": event, "time": time.perf_counter()}) + "\n")
        self.file.flush()


def _load_source(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def provide_removed_modules() -> None:
    """`imp.load_source` and `distutils` where this Python (3.12+) lacks them."""
    if importlib.util.find_spec("imp") is None:
        imp = types.ModuleType("imp")
        imp.load_source = _load_source
        sys.modules["imp"] = imp
    if importlib.util.find_spec("distutils") is None:
        import setuptools  # noqa: F401  (installs its `distutils` for the imports that follow)


def stub_wandb() -> None:
    wandb = types.ModuleType("wandb")
    # accelerate asks `importlib.util.find_spec("wandb")`, which needs a spec.
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.Image = lambda *args, **kwargs: None
    sys.modules["wandb"] = wandb


def jpeg_reward_factory():
    """The reference's reward interface, `reward_fn(dtype, device)` returning
    `_fn(images, prompts, metadata) -> (scores, info)`, around stepzoo's JPEG reward."""
    from rewards.jpeg import JpegSize

    def jpeg_compressibility(dtype, device):
        reward = JpegSize("jpeg_compressibility", -1.0, device=device)

        def _fn(images, prompts, metadata=None):
            return reward.score(images, list(prompts)), {}

        return _fn

    return jpeg_compressibility


def without_tracker(accelerator_class):
    def build(*args, log_with=None, **kwargs):
        return accelerator_class(*args, **kwargs)

    return build


def timed_progress(real_tqdm, timings: Timings):
    """The script's `tqdm`, recording the timed loops' start and end."""
    import torch

    def loop(bar, phase: str):
        timings.record(phase, "start")
        yield from bar
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings.record(phase, "end")

    def tqdm(*args, desc: str = "", **kwargs):
        bar = real_tqdm(*args, desc=desc, **kwargs)
        return loop(bar, desc) if desc.startswith(TIMED_PHASES) else bar

    return tqdm


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m benchmarks.reference_sdpo_launch TIMINGS.jsonl [reference flags]")
    if not SCRIPT.is_file():
        raise SystemExit(f"{SCRIPT} not found: run from the root of the reference's copy")
    timings = Timings(argv[1])
    provide_removed_modules()
    stub_wandb()
    script = _load_source("train_sdpo", str(SCRIPT))
    import sdpo_pytorch.rewards
    from absl import app

    sdpo_pytorch.rewards.jpeg_compressibility = jpeg_reward_factory()
    script.Accelerator = without_tracker(script.Accelerator)
    script.tqdm = timed_progress(script.tqdm, timings)

    def timed_main(args):
        timings.record("main", "start")
        script.main(args)
        timings.record("main", "end")

    app.run(timed_main, argv=[str(SCRIPT), *argv[2:]])


if __name__ == "__main__":
    main(sys.argv)
