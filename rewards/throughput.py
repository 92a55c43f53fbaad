"""`python -m rewards.throughput`: images per second of every reward on this machine.

Scores random images with the tiny random-weight checkpoints of `rewards.tiny_checkpoints`
(the real preprocessing and code path, tiny networks), and the shipped tiny-clip folder
when it exists. The figures measure the harness's overhead and the tiny world's judge,
not the cost of the full-size models.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rewards.catalog import REWARDS
from rewards.errors import RewardUnavailable
from rewards.registry import load_reward
from rewards.tiny_checkpoints import build_all, tiny_architectures
from rewards.weights import check_reward

PROMPTS = ["a red circle", "a blue square on a green background", "a photo of a cat", "the dog"]


def images_per_second(reward, images: torch.Tensor, repeats: int) -> float:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images.shape[0])]
    reward.score(images, prompts)  # first call pays one-off allocation and tokenizer setup
    start = time.perf_counter()
    for _ in range(repeats):
        reward.score(images, prompts)
    return repeats * images.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per score call")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (the tiny world samples 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed score calls per reward")
    args = parser.parse_args(argv)

    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.size}x{args.size} px")
    with tempfile.TemporaryDirectory() as root, tiny_architectures():
        paths = build_all(root)
        for name in REWARDS:
            rate = images_per_second(load_reward(name, paths=paths), images, args.repeats)
            note = "  (tiny random-weight checkpoint)" if REWARDS[name].artifacts else ""
            print(f"{name:<26} {rate:9.1f} images/s{note}")
    try:
        check_reward("tiny-clip")
    except RewardUnavailable:
        print(f"{'tiny-clip (shipped folder)':<26} not found at its default location; skipped")
    else:
        rate = images_per_second(load_reward("tiny-clip"), images, args.repeats)
        print(f"{'tiny-clip (shipped folder)':<26} {rate:9.1f} images/s")


if __name__ == "__main__":
    main()
