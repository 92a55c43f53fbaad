"""Run under 2 processes: each holds half of a fixed global batch and computes its slice
of the advantages through the runner's gathering code; rank 0 saves all slices."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from benchmarks.rollout import global_advantages
from zoo.algorithm import Algorithm
from zoo.registry import ALGORITHMS

NUM_STEPS = 3
LOG_PROB_ALGORITHMS = {name: config for name, config in ALGORITHMS.items() if isinstance(config().build(), Algorithm)}
"""The algorithms with advantages (reward back-propagation, DRaFT, has none)."""


def global_batch(algo: str, epoch: int) -> tuple[list[str], torch.Tensor]:
    """A fixed batch of 8 groups: prompts repeat so the per-prompt trackers have history."""
    config = ALGORITHMS[algo](num_steps=NUM_STEPS)
    group_size = config.build().needs.group_size
    prompts = [f"prompt {i % 3}" for i in range(8)]
    generator = torch.Generator().manual_seed(100 * epoch + len(algo))
    shape = (8, group_size, NUM_STEPS) if algo == "sdpo" else (8, group_size)
    return prompts, torch.randn(shape, generator=generator)


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for algo, config_cls in LOG_PROB_ALGORITHMS.items():
        algorithm = config_cls(num_steps=NUM_STEPS).build()
        tracker = algorithm.new_tracker()
        for epoch in range(2):
            prompts, returns = global_batch(algo, epoch)
            share = len(prompts) // world
            mine = slice(rank * share, (rank + 1) * share)
            local = global_advantages(algorithm, prompts[mine], returns[mine], tracker, accelerator)
            results[(algo, epoch)] = torch.cat(gather_object([local]))
    if accelerator.is_main_process:
        saved = {f"{a}/{e}": v for (a, e), v in results.items()}
        torch.save({**saved, "world_size": torch.tensor(world)}, out_path)
    accelerator.wait_for_everyone()
    # Gloo's threads are joined here, not torn down at interpreter exit, where under load
    # they aborted a process ("terminate called without an active exception").
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
