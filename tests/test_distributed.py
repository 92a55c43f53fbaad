"""Two gloo processes see the global batch: the same advantages as one process."""

import json
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
from helpers.runs import cpu_launch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_two_processes_give_the_advantages_of_one(tmp_path):
    out = tmp_path / "two.pt"
    command = [*cpu_launch(), str(REPO / "tests" / "distributed" / "advantages.py"), str(out)]
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


# Minibatches smaller than the epoch, so that the processes hold unequal shares of them (DDPO
# 2 of 8 groups: 2-0, 1-1 or 0-2; the others one group: all on one process, a backward pass
# at weight 0 on the other); DRaFT's minibatch is split equally by rule.
SMALL_MINIBATCHES = [
    "--ddpo.train-batch-size", "2", "--ddpo.gradient-accumulation-steps", "2",
    *(flag for algo in ("rebel", "d3po", "sdpo", "grpo", "nft", "awm", "mixgrpo")
      for flag in (f"--{algo}.train-batch-size", "1", f"--{algo}.gradient-accumulation-steps", "1")),
]


def _run_args(model: str, out: Path) -> list[str]:
    """One epoch of the micro run (helpers.runs) of every algorithm, on the tiny judge's
    cosine (differentiable, for DRaFT): every kind of epoch (replay per step and whole
    trajectories, pairs, forward process, reward back-propagation; drawn steps and noise
    levels), in `SMALL_MINIBATCHES`."""
    from helpers.runs import micro_args

    return [*micro_args(model, out), "--algos", "all", "--reward", "tiny-clip", "--epochs", "1", *SMALL_MINIBATCHES]


SGD_RUN = str(REPO / "tests" / "distributed" / "sgd_run.py")
"""`benchmarks.run` training with SGD, whose weights compare as closely as the gradients."""


def _launch(model: str, out: Path, *launch_flags: str) -> list[str]:
    """`accelerate launch` of `_run_args` on 2 CPU processes (gloo) a machine, trained with SGD."""
    return [*cpu_launch(*launch_flags), SGD_RUN, *_run_args(model, out)]


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
    result = subprocess.run(_launch(tiny_pipeline_dir, out), env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The same command as `two_process_run`, in one process."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = subprocess.run([sys.executable, SGD_RUN, *_run_args(tiny_pipeline_dir, out)], env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _lora(out: Path, algo: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = (out / "lora" / f"{algo}_seed0").glob("*.safetensors")
    return load_file(path)


def test_two_processes_share_the_budget_of_one_and_train_to_the_same_numbers(two_process_run, one_process_run):
    """The budget is the run's (issue 30): the same command on 2 processes samples the same
    8 trajectories per epoch (4 on each, from the same global noise), trains the same global
    minibatches (each process the groups it holds, its loss weighted by its share, a
    backward pass at weight 0 where it holds none of an update) and takes the same optimizer
    updates as on 1 process; the LoRA weights (trained with SGD, `SGD_RUN`), the training
    losses and the evaluation records are equal up to the order of float sums (measured:
    LoRA within 3e-4 of its largest entry, records within 5e-5; with the share weights
    left out, 0.5 and more). Backward passes are counted on every process, so 2 make more
    (a process's share of a call is its own)."""
    one, two = _records(one_process_run), _records(two_process_run)
    key = lambda r: (r["algo"], r["seed"], r["epoch"], r["split"], r["eval_steps"], r["reward"])  # noqa: E731
    one, two = sorted(one, key=key), sorted(two, key=key)
    assert [key(r) for r in one] == [key(r) for r in two]
    trained = {r["algo"] for r in one} - {"base"}
    assert trained == {"ddpo", "rebel", "d3po", "sdpo", "grpo", "draft", "nft", "awm", "mixgrpo"}
    for a, b in zip(one, two):
        assert (a["samples_seen"], a["optimizer_updates"], a["reward_calls"]) == (
            b["samples_seen"], b["optimizer_updates"], b["reward_calls"]), key(a)
        assert b["backward_passes"] >= a["backward_passes"]
        assert a["count"] == b["count"] == 4  # the 4 test prompts, split across the processes
        torch.testing.assert_close(b["mean"], a["mean"], rtol=0, atol=2e-4, msg=str(key(a)))
    assert all(r["samples_seen"] == 8 for r in one if r["algo"] != "base")
    for algo in sorted(trained):
        lora_one, lora_two = _lora(one_process_run, algo), _lora(two_process_run, algo)
        scale = max(float(weights.abs().max()) for weights in lora_one.values())
        for name, weights in lora_one.items():
            torch.testing.assert_close(lora_two[name], weights, rtol=0, atol=2e-3 * scale, msg=f"{algo} {name}")
    metrics = {}
    for out in (one_process_run, two_process_run):
        for line in (out / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            metrics.setdefault((row["algo"], row["epoch"]), []).append(row)
    for (algo, epoch), (a, b) in metrics.items():
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-3, atol=1e-5, msg=algo)
        # SDPO scores x̂0 at anchor steps chosen by an argmax, which float noise can move.
        torch.testing.assert_close(b["train_reward"], a["train_reward"], rtol=0, atol=2e-3, msg=algo)


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
            _launch(tiny_pipeline_dir, out, "--num_machines", "2", "--machine_rank", str(rank),
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

    command = [*cpu_launch(), str(REPO / "tests" / "distributed" / "fault_on_one_process.py"),
               mode, *micro_args(model, out), "--algos", "ddpo"]
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
    """The processes share the budget, but a run's numbers equal another number of
    processes' only up to the order of float sums: config.json records them, and a resume
    or extension on another number is refused before anything runs, so that one run's rows
    come from one world size."""
    import shutil

    from benchmarks.run import main

    assert json.loads((two_process_run / "config.json").read_text())["num_processes"] == 2
    out = tmp_path / "run"
    shutil.copytree(two_process_run, out)
    args = _run_args(tiny_pipeline_dir, out)
    for extra in (["--resume"], ["--extend", "--seeds", "0,1"]):
        assert main([*args, *extra]) == 2
        assert "accelerate launch --num_processes 2 there, 1 here" in capsys.readouterr().err
    assert _records(out) == _records(two_process_run)
