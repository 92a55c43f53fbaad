"""Two gloo processes see the global batch: the same advantages as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks.train import global_advantages
from zoo.registry import ALGORITHMS

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from advantages import NUM_STEPS, global_batch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_two_processes_give_the_advantages_of_one(tmp_path):
    out = tmp_path / "two.pt"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "distributed" / "advantages.py"), str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert int(two["world_size"]) == 2

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    for algo, config_cls in ALGORITHMS.items():
        algorithm = config_cls(num_steps=NUM_STEPS).build()
        tracker = algorithm.new_tracker()
        for epoch in range(2):
            prompts, returns = global_batch(algo, epoch)
            one = global_advantages(algorithm, prompts, returns, tracker, accelerator)
            assert one.shape[:2] == returns.shape[:2]
            torch.testing.assert_close(two[f"{algo}/{epoch}"], one, rtol=0, atol=0)
