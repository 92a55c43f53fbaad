"""The runner's micro run: every code path of `benchmarks.run` in seconds; and the settings
of one micro job for `benchmarks.train.run_algorithm` called directly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from benchmarks.evaluate import EvalSettings
from benchmarks.train import JobSettings, ignore

ALGOS = ["ddpo", "rebel", "d3po", "sdpo", "grpo", "nft"]
"""Every registered algorithm that trains on JPEG sizes (DRaFT needs a gradient)."""
EVAL_STEPS = [1, 2]
"""The step counts a micro run evaluates at."""


def cpu_launch(*flags: str) -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo) on this machine, before the script and
    its arguments; `flags` are added last, so they override (a multi-node test passes its
    own rendezvous port). Each launch takes a free port (`--main_process_port 0`): under
    `pytest -n` (pytest-xdist) launches of different test files run at the same time, and
    accelerate's one default port would let only one of them start."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *flags,
    ]


def micro_args(model: str, out: Path, preset: str = "tiny") -> list[str]:
    """Two epochs of 8 trajectories at K=2 on the random tiny pipeline, JPEG reward: every
    code path of the runner in seconds. Batch sizes make one update per epoch each."""
    return [
        # By default the base model's preset (CFG at guidance 4, test prompts only), whose
        # settings these micro runs were written for, not the default preset.
        "--preset", preset,
        "--model", model,
        "--reward", "jpeg_compressibility",
        "--eval-rewards", "",
        "--epochs", "2",
        "--eval-every", "1",
        "--trajectories-per-epoch", "8",
        "--eval-samples-per-prompt", "1",
        "--eval-steps", ",".join(map(str, EVAL_STEPS)),
        "--train-steps", "2",
        "--d3po.gradient-accumulation-steps", "1",
        "--sdpo.gradient-accumulation-steps", "2",
        "--out", str(out),
    ]


def micro_job(model: str, out: Path, epochs: int, train_prompts: tuple[str, ...] = ("a cat", "a dog"),
              log: Callable[[dict], None] = ignore) -> JobSettings:
    """One (algorithm, seed) job of 4 trajectories per epoch, trained with the Brightness
    reward and evaluated once after the last epoch on one prompt at 1 step (DDIM)."""
    return JobSettings(
        model=model, epochs=epochs, trajectories_per_epoch=4, train_prompts=train_prompts, eval_every=epochs + 1,
        eval=EvalSettings(prompts=("a fox",), step_counts=(1,), samples_per_prompt=1, batch_size=1,
                          sampler="ddim", guidance_scale=1.0, eta=1.0, seed=0),
        mixed_precision="no", train_reward="brightness", out_dir=out, log=log,
    )
