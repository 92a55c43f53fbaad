"""The runner's micro run: every code path of `benchmarks.run` in seconds."""

from __future__ import annotations

from pathlib import Path

ALGOS = ["ddpo", "rebel", "d3po", "sdpo", "grpo", "nft"]
"""Every registered algorithm that trains on JPEG sizes (DRaFT needs a gradient)."""
EVAL_STEPS = [1, 2]
"""The step counts a micro run evaluates at."""


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
