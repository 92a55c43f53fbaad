"""Faults during a run: a reward that returns NaN or raises, a loss that turns NaN, a full
disk while checkpointing, and checkpoints that are damaged or carry code. Each either
costs one update (with a counted warning) or ends the run with one line and exit code 1,
leaving the previous epoch's checkpoint on disk. NaN scores at evaluation are left out of
the cell's mean, counted and reported."""

import errno
import math
import os
import re
from pathlib import Path

import pytest
import torch

import benchmarks.train
from benchmarks.checkpoint import CorruptCheckpoint, load_state, save_state
from benchmarks.run import main
from rewards.base import Reward


def fault_args(model: str, out: Path, epochs: int) -> list[str]:
    """DDPO alone on the random tiny pipeline, one update per epoch, evaluated at the end only."""
    return [
        "--model", model,
        "--algos", "ddpo",
        "--reward", "jpeg_compressibility",
        "--eval-rewards", "",
        "--epochs", str(epochs),
        "--eval-every", str(epochs),
        "--trajectories-per-epoch", "8",
        "--eval-samples-per-prompt", "1",
        "--eval-steps", "1",
        "--train-steps", "2",
        "--out", str(out),
    ]


class FaultyReward(Reward):
    """The wrapped reward, except that its `fault` strikes on the training calls listed
    (1-based; DDPO scores once per epoch, so call n is epoch n)."""

    def __init__(self, inner: Reward, fault: str, on_calls: set[int]):
        super().__init__(inner.device, inner.dtype)
        self.inner, self.fault, self.on_calls = inner, fault, on_calls
        self.name = inner.name
        self.attempts = 0

    def _score(self, images, prompts):
        self.attempts += 1
        scores = self.inner.score(images, prompts)
        if self.attempts in self.on_calls:
            if self.fault == "raise":
                raise RuntimeError("reward server unreachable")
            scores = scores.clone()
            scores[1] = math.nan
        return scores


@pytest.fixture
def faulty_training_reward(monkeypatch):
    """Install a FaultyReward as the training reward only: evaluation keeps the real one."""

    def install(fault: str, on_calls: set[int]) -> None:
        real_run = benchmarks.train.run_algorithm

        def run_algorithm(algo, config, seed, settings, train_reward, eval_rewards, accelerator):
            faulty = FaultyReward(train_reward, fault, on_calls)
            return real_run(algo, config, seed, settings, faulty, eval_rewards, accelerator)

        monkeypatch.setattr(benchmarks.train, "run_algorithm", run_algorithm)

    return install


@pytest.fixture
def saved_states(monkeypatch) -> dict[int, dict]:
    """epoch -> the DDPO state each checkpoint write received, as written."""
    states: dict[int, dict] = {}
    real_save = benchmarks.train.save_state

    def save(path, state):
        real_save(path, state)
        if Path(path).name == "ddpo_seed0.pt":
            states[state["epoch"]] = load_state(path)

    monkeypatch.setattr(benchmarks.train, "save_state", save)
    return states


def _errors(stderr: str) -> list[str]:
    """The `error:` lines (tqdm redraws its bars with carriage returns on the same stream)."""
    return re.findall(r"error: [^\n\r]*", stderr)


def _same_lora(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_reward_skips_that_update_and_never_reaches_the_tracker(
    tiny_pipeline_dir, tmp_path, faulty_training_reward, saved_states, capsys
):
    faulty_training_reward("nan", on_calls={2})
    out = tmp_path / "run"
    assert main(fault_args(tiny_pipeline_dir, out, epochs=3)) == 0

    err = capsys.readouterr().err
    warnings = re.findall(r"warning: [^\n\r]*", err)
    assert len(warnings) == 1
    assert "epoch 2" in warnings[0] and "NaN or inf for 1 of 8 scores" in warnings[0]
    assert "1 of at most 3" in warnings[0]
    assert _same_lora(saved_states[2]["lora"], saved_states[1]["lora"])  # the update was skipped
    assert not _same_lora(saved_states[3]["lora"], saved_states[2]["lora"])  # training went on
    buffers = saved_states[3]["tracker"]["buffers"]
    values = torch.tensor([v for buffer in buffers.values() for v in buffer])
    assert values.numel() == 2 * 8 and torch.isfinite(values).all()  # epochs 1 and 3 only
    assert saved_states[3]["counters"]["bad_reward_batches"] == 1
    assert saved_states[3]["counters"]["samples_seen"] == 3 * 8


def test_raising_reward_stops_after_the_limit_and_resumes_with_a_higher_one(
    tiny_pipeline_dir, tmp_path, faulty_training_reward, saved_states, capsys, monkeypatch
):
    real_run = benchmarks.train.run_algorithm
    faulty_training_reward("raise", on_calls={1, 2})
    out = tmp_path / "run"
    args = fault_args(tiny_pipeline_dir, out, epochs=3)
    assert main(args + ["--max-bad-reward-batches", "1"]) == 1

    err = capsys.readouterr().err
    assert len(re.findall(r"warning: [^\n\r]*reward server unreachable", err)) == 1  # epoch 1, skipped
    [error] = _errors(err)
    assert "ddpo seed 0, epoch 2" in error and "RuntimeError: reward server unreachable" in error
    assert "--max-bad-reward-batches 1" in error and "holds epoch 1" in error
    assert "Traceback" not in err
    assert load_state(out / "checkpoints" / "ddpo_seed0.pt")["epoch"] == 1
    assert not (out / "lora").exists()

    # The limit decides when a run stops, not what it computes, so a resume may raise it.
    monkeypatch.setattr(benchmarks.train, "run_algorithm", real_run)
    assert main(args + ["--max-bad-reward-batches", "5", "--resume"]) == 0
    assert saved_states[3]["counters"]["bad_reward_batches"] == 1
    assert (out / "lora" / "ddpo_seed0" / "pytorch_lora_weights.safetensors").is_file()


def test_nan_loss_stops_with_the_previous_checkpoint_intact(
    tiny_pipeline_dir, tmp_path, saved_states, capsys, monkeypatch
):
    real_train_epoch = benchmarks.train._train_epoch
    epochs_trained = []

    def nan_loss_from_epoch_2(algorithm, *args):
        epochs_trained.append(1)
        if len(epochs_trained) == 2:
            real_loss = algorithm.loss

            def nan_loss(inputs):
                loss, metrics = real_loss(inputs)
                return loss * math.nan, metrics

            monkeypatch.setattr(algorithm, "loss", nan_loss)
        return real_train_epoch(algorithm, *args)

    monkeypatch.setattr(benchmarks.train, "_train_epoch", nan_loss_from_epoch_2)
    out = tmp_path / "run"
    args = fault_args(tiny_pipeline_dir, out, epochs=3)
    assert main(args) == 1

    err = capsys.readouterr().err
    [error] = _errors(err)
    assert "ddpo seed 0, epoch 2: the loss became nan" in error and "holds epoch 1" in error
    assert "Traceback" not in err
    on_disk = load_state(out / "checkpoints" / "ddpo_seed0.pt")
    assert on_disk["epoch"] == 1 and not on_disk["done"]
    assert _same_lora(on_disk["lora"], saved_states[1]["lora"])
    assert all(torch.isfinite(v).all() for v in on_disk["lora"].values())

    # A checkpoint damaged after writing is reported, never mistaken for a fresh start.
    checkpoint = out / "checkpoints" / "ddpo_seed0.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert main(args + ["--resume"]) == 1
    [error] = _errors(capsys.readouterr().err)
    assert f"checkpoint {checkpoint} cannot be read" in error


class DiskFull:
    """A file handle that writes part of the first chunk, then fails as a full disk does."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def write(self, data):
        self.handle.write(data[: len(data) // 3])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_full_disk_while_checkpointing_names_the_path_and_keeps_the_previous_checkpoint(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch
):
    real_fdopen = os.fdopen
    writes = []

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".ddpo_seed0.pt."):
            writes.append(1)
            if len(writes) == 2:
                return DiskFull(handle)
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    out = tmp_path / "run"
    assert main(fault_args(tiny_pipeline_dir, out, epochs=2)) == 1

    err = capsys.readouterr().err
    [error] = _errors(err)
    checkpoint = out / "checkpoints" / "ddpo_seed0.pt"
    assert f"cannot write {checkpoint}: No space left on device" in error and "Traceback" not in err
    assert load_state(checkpoint)["epoch"] == 1
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["base_seed0.pt", "ddpo_seed0.pt"]


def test_a_leftover_temporary_file_is_never_read_and_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "ddpo_seed0.pt"
    save_state(path, {"epoch": 1, "lora": {"w": torch.ones(3)}})
    buffer_path = tmp_path / ".ddpo_seed0.pt.k1ll3d.tmp"
    save_state(buffer_path, {"epoch": 2, "lora": {"w": torch.zeros(3)}})
    buffer_path.write_bytes(buffer_path.read_bytes()[:200])  # what a kill mid-write leaves

    assert load_state(path)["epoch"] == 1
    save_state(path, {"epoch": 2, "lora": {"w": torch.zeros(3)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpo_seed0.pt"]
    assert load_state(path)["epoch"] == 2


class Payload:
    """Stands for any object whose unpickling could run code."""


@pytest.mark.parametrize("content", ["truncated", "code"])
def test_a_checkpoint_that_is_not_plain_tensors_is_refused_naming_its_path(content, tmp_path):
    path = tmp_path / "ddpo_seed0.pt"
    if content == "truncated":
        save_state(path, {"epoch": 1, "lora": {"w": torch.ones(1000)}})
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save({"epoch": 1, "payload": Payload()}, path)
    with pytest.raises(CorruptCheckpoint, match=re.escape(str(path))):
        load_state(path)


def test_nan_evaluation_scores_are_left_out_counted_and_reported(tiny_pipeline_dir, capsys):
    """A reward model that returns NaN for one image of a batch: the cell's mean is the
    other images', the record counts the NaN, and a warning names the reward."""
    from accelerate import Accelerator
    from test_train_loop import Brightness

    from benchmarks.evaluate import EvalSettings, evaluate
    from zoo.policy import Policy

    class NaNOnFirstImage(Reward):
        name = "nan-first"

        def _score(self, images, prompts):
            scores = images.mean(dim=(1, 2, 3))
            scores[0] = math.nan
            return scores

    settings = EvalSettings(prompts=("a cat", "a dog"), step_counts=(1,), samples_per_prompt=2, batch_size=4,
                            sampler="ddim", guidance_scale=2.0, eta=1.0, seed=0)
    policy = Policy.from_pretrained(tiny_pipeline_dir)
    stats, _ = evaluate(policy, {"nan-first": NaNOnFirstImage(), "clean": Brightness()}, settings,
                        Accelerator(cpu=True))
    faulty, clean = stats[(1, "nan-first")], stats[(1, "clean")]
    assert (faulty["count"], faulty["nonfinite"]) == (3, 1) and (clean["count"], clean["nonfinite"]) == (4, 0)
    assert math.isfinite(faulty["mean"]) and faulty["mean"] != clean["mean"]
    assert "the reward nan-first returned NaN or inf for 1 of 4 images" in capsys.readouterr().err
