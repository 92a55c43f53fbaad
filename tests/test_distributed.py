"""Two gloo processes see the global batch: the same advantages as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks.rollout import global_advantages

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
sys.path.insert(0, str(Path(__file__).parent))
from advantages import LOG_PROB_ALGORITHMS, NUM_STEPS, global_batch  # noqa: E402

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
    for algo, config_cls in LOG_PROB_ALGORITHMS.items():
        algorithm = config_cls(num_steps=NUM_STEPS).build()
        tracker = algorithm.new_tracker()
        for epoch in range(2):
            prompts, returns = global_batch(algo, epoch)
            one = global_advantages(algorithm, prompts, returns, tracker, accelerator)
            assert one.shape[:2] == returns.shape[:2]
            torch.testing.assert_close(two[f"{algo}/{epoch}"], one, rtol=0, atol=0)


def test_two_process_benchmark_run(tiny_pipeline_dir, tmp_path):
    """The whole runner under DDP with gloo: every process samples and trains, only the
    main process writes, and the budget counts both processes' trajectories."""
    import json

    from helpers.runs import micro_args

    out = tmp_path / "run"
    args = micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo,sdpo", "--epochs", "1"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "benchmarks.run", *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["algo"] != "base"]
    assert {r["algo"] for r in trained} == {"ddpo", "sdpo"}
    assert all(r["samples_seen"] == 2 * 8 for r in trained)  # 8 per process per epoch
    assert all(r["count"] == 4 for r in records)  # the 4 test prompts split across processes
    # Updates happen once on every process (DDP); backward passes are counted on both.
    sdpo = [r for r in trained if r["algo"] == "sdpo"]
    assert all(r["optimizer_updates"] == 1 and r["backward_passes"] == 2 * 2 for r in sdpo)
    assert (out / "table.md").is_file() and (out / "lora" / "sdpo_seed0").is_dir()


def _run_with_fault(mode: str, model: str, out: Path) -> subprocess.CompletedProcess:
    from helpers.runs import micro_args

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "distributed" / "fault_on_one_process.py"), mode,
        *micro_args(model, out), "--algos", "ddpo",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)


def test_nan_loss_on_one_process_stops_every_process(tiny_pipeline_dir, tmp_path):
    """A loss that turns NaN on one process only: both processes stop at the end of that
    epoch with the run's own error, and the checkpoint keeps the epoch before. Were the
    diverged process to stop alone, the other would fail in its next collective (gloo
    notices the dead peer; NCCL on GPUs waits out its timeout)."""
    out = tmp_path / "run"
    result = _run_with_fault("nan-loss", tiny_pipeline_dir, out)
    assert result.returncode != 0
    assert result.stderr.count("ddpo seed 0, epoch 2: the loss became nan") == 2, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "ddpo_seed0.pt", weights_only=True)["epoch"] == 1


def test_checkpoint_write_failure_on_the_main_process_stops_every_process(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    result = _run_with_fault("write-fails", tiny_pipeline_dir, out)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr, result.stderr[-3000:]
    assert "the main process could not write" in result.stderr, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "ddpo_seed0.pt", weights_only=True)["epoch"] == 1
