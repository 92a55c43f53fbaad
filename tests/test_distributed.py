"""Two gloo processes see the global batch: the same advantages as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


def _launch(model: str, out: Path, *launch_flags: str) -> list[str]:
    """`accelerate launch` of one epoch of DDPO and SDPO's micro run (helpers.runs) on CPU
    processes (gloo)."""
    from helpers.runs import micro_args

    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", *launch_flags,
        "-m", "benchmarks.run", *micro_args(model, out), "--algos", "ddpo,sdpo", "--epochs", "1",
    ]


LAUNCH_ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def _records(out: Path) -> list[dict]:
    """The run's records, wall times removed."""
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
            for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The micro run under DDP: 2 processes on one machine."""
    cwd = tmp_path_factory.mktemp("ddp")
    out = cwd / "run"
    result = subprocess.run(_launch(tiny_pipeline_dir, out, "--num_processes", "2"), env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_process_benchmark_run(two_process_run):
    """The whole runner under DDP with gloo: every process samples and trains, only the
    main process writes, and the budget counts both processes' trajectories."""
    out = two_process_run
    records = _records(out)
    trained = [r for r in records if r["algo"] != "base"]
    assert {r["algo"] for r in trained} == {"ddpo", "sdpo"}
    assert all(r["samples_seen"] == 2 * 8 for r in trained)  # 8 per process per epoch
    assert all(r["count"] == 4 for r in records)  # the 4 test prompts split across processes
    # Updates happen once on every process (DDP); backward passes are counted on both.
    sdpo = [r for r in trained if r["algo"] == "sdpo"]
    assert all(r["optimizer_updates"] == 1 and r["backward_passes"] == 2 * 2 for r in sdpo)
    assert (out / "table.md").is_file() and (out / "lora" / "sdpo_seed0").is_dir()


@pytest.mark.slow  # two more launches (about 20 s); the two-process run above covers DDP in the default suite
def test_two_machines_give_the_records_of_two_processes_on_one(two_process_run, tiny_pipeline_dir, tmp_path):
    """A multi-node launch (README, "Beyond one machine"): two accelerate launches of one
    process each, machine ranks 0 and 1, meeting at 127.0.0.1 as two nodes meet at the
    main node's address. The world is the same two processes, so the records are those of
    two processes on one machine; only global rank 0 writes the run folder (shared here,
    as it must be on a cluster)."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    out = tmp_path / "run"
    nodes = [
        subprocess.Popen(
            _launch(tiny_pipeline_dir, out, "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", port),
            env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert _records(out) == _records(two_process_run)


def _run_with_fault(mode: str, model: str, out: Path) -> subprocess.CompletedProcess:
    from helpers.runs import micro_args

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "tests" / "distributed" / "fault_on_one_process.py"), mode,
        *micro_args(model, out), "--algos", "ddpo",
    ]
    return subprocess.run(command, env=LAUNCH_ENV, capture_output=True, text=True, timeout=600, cwd=out.parent)


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


def test_a_run_resumes_or_extends_only_on_its_own_number_of_processes(two_process_run, tiny_pipeline_dir, tmp_path,
                                                                       capsys):
    """Every process samples --trajectories-per-epoch, so the budget of a run's remaining
    epochs depends on the processes: config.json records them, and a resume or extension on
    another number is refused before anything runs."""
    import json
    import shutil

    from benchmarks.run import main
    from helpers.runs import micro_args

    assert json.loads((two_process_run / "config.json").read_text())["num_processes"] == 2
    out = tmp_path / "run"
    shutil.copytree(two_process_run, out)
    args = [*micro_args(tiny_pipeline_dir, out), "--epochs", "1"]
    for extra in (["--algos", "ddpo,sdpo", "--resume"], ["--algos", "d3po", "--extend"]):
        assert main([*args, *extra]) == 2
        assert "accelerate launch --num_processes 2 there, 1 here" in capsys.readouterr().err
    assert _records(out) == _records(two_process_run)
