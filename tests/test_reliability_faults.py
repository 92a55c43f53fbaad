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

from helpers.rewards import Brightness
from helpers.servers import serving


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
    real_train_epoch = benchmarks.train.train_on_batch
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

    monkeypatch.setattr(benchmarks.train, "train_on_batch", nan_loss_from_epoch_2)
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

    from benchmarks.evaluate import EvalSettings, evaluate
    from zoo.loading import load_policy

    class NaNOnFirstImage(Brightness):
        name = "nan-first"

        def _score(self, images, prompts):
            scores = super()._score(images, prompts)
            scores[0] = math.nan
            return scores

    settings = EvalSettings(prompts=("a cat", "a dog"), step_counts=(1,), samples_per_prompt=2, batch_size=4,
                            sampler="ddim", guidance_scale=2.0, eta=1.0, seed=0)
    policy = load_policy(tiny_pipeline_dir)
    stats, _ = evaluate(policy, {"nan-first": NaNOnFirstImage(), "clean": Brightness()}, settings,
                        Accelerator(cpu=True))
    faulty, clean = stats[(1, "nan-first")], stats[(1, "clean")]
    assert (faulty["count"], faulty["nonfinite"]) == (3, 1) and (clean["count"], clean["nonfinite"]) == (4, 0)
    assert math.isfinite(faulty["mean"]) and faulty["mean"] != clean["mean"]
    assert "the reward nan-first returned NaN or inf for 1 of 4 images" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["raise", "wrong shape", "list"])
def test_a_reward_that_fails_at_evaluation_costs_its_batch_not_the_run(fault, tiny_pipeline_dir, capsys):
    """A plugin that raises, returns the wrong number of scores or a list on one batch of
    an evaluation: that batch's images are scored as missing (left out of the mean,
    counted in `nonfinite`, one warning naming the reward and the error); its other
    batches and the other rewards are scored as if nothing had happened."""
    from accelerate import Accelerator

    from benchmarks.evaluate import EvalSettings, evaluate
    from zoo.loading import load_policy

    class FailsOnSecondBatch(Brightness):
        name = "flaky"
        batches = 0

        def _score(self, images, prompts):
            self.batches += 1
            scores = super()._score(images, prompts)
            if self.batches != 2:
                return scores
            if fault == "raise":
                raise RuntimeError("the scorer's GPU fell off the bus")
            return scores[:1] if fault == "wrong shape" else scores.tolist()

    settings = EvalSettings(prompts=("a cat", "a dog"), step_counts=(1,), samples_per_prompt=3, batch_size=2,
                            sampler="ddim", guidance_scale=2.0, eta=1.0, seed=0)
    policy = load_policy(tiny_pipeline_dir)
    stats, _ = evaluate(policy, {"flaky": FailsOnSecondBatch(), "clean": Brightness()}, settings,
                        Accelerator(cpu=True), where="ddpo seed 0, epoch 3")
    flaky, clean = stats[(1, "flaky")], stats[(1, "clean")]
    assert (flaky["count"], flaky["nonfinite"]) == (4, 2) and (clean["count"], clean["nonfinite"]) == (6, 0)
    assert math.isfinite(flaky["mean"])
    warnings = re.findall(r"warning: [^\n\r]*", capsys.readouterr().err)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: ddpo seed 0, epoch 3 at 1 steps: the reward flaky raised ")
    assert "(2 of 6 images); they are scored as missing" in warnings[0]


class ScoringServer:
    """A reward server on 127.0.0.1 (the wire format of rewards/http.py) scoring the mean
    pixel, that answers HTTP 500 where the test says: `fail(kind, n)` gets "evaluation"
    (the request's prompts are all held-out ones) or "training", and how many requests of
    that kind it answered before. `posts` counts every scoring request it received."""

    def __init__(self, eval_prompts: tuple[str, ...]):
        self.eval_prompts = set(eval_prompts)
        self.fail = lambda kind, answered: False
        self.answered = {"evaluation": 0, "training": 0}
        self.posts = 0

    def handler(self):
        import json as json_module
        from http.server import BaseHTTPRequestHandler

        from rewards.http import decode_images

        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: dict) -> None:
                data = json_module.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"name": "mean-pixel"})

            def do_POST(self):
                request = json_module.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.posts += 1
                kind = "evaluation" if set(request["prompts"]) <= server.eval_prompts else "training"
                if server.fail(kind, server.answered[kind]):
                    self._send(500, {"error": "the scorer ran out of memory"})
                    return
                server.answered[kind] += 1
                self._send(200, {"scores": decode_images(request).mean(dim=(1, 2, 3)).tolist()})

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def scoring_server():
    from http.server import ThreadingHTTPServer

    from benchmarks.presets import PRESETS

    server = ScoringServer(PRESETS["tiny"]().eval_prompts)
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), server.handler())) as base:
        server.url = base + "/x"
        yield server


def server_args(model: str, url: str, out: Path, epochs: int) -> list[str]:
    """The issue's reproduction on the random tiny pipeline: DDPO on a reward server, one
    evaluation sample for each of the 4 held-out prompts (one request per evaluation)."""
    return ["--preset", "tiny", "--model", model, "--algos", "ddpo", "--reward", url, "--eval-rewards", "", "--epochs", str(epochs),
            "--eval-every", "1", "--trajectories-per-epoch", "8", "--eval-samples-per-prompt", "1",
            "--eval-steps", "1", "--train-steps", "2", "--out", str(out)]


def strict_records(out: Path) -> list[dict]:
    """records.jsonl, read by a strict JSON parser (one that refuses NaN and Infinity)."""
    import json as json_module

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return [json_module.loads(line, parse_constant=refuse) for line in (out / "records.jsonl").read_text().splitlines()]


def test_the_issues_http_500_from_the_second_request_completes_with_the_cells_missing(
    tiny_pipeline_dir, tmp_path, scoring_server, capsys, monkeypatch
):
    """Issue 29's reproduction: a server that answers its health check, then 500 to every
    scoring request, retried once. Training skips the epoch's update (as before); both
    evaluations score their images as missing instead of ending the run with a
    traceback: the run completes, its records (strict JSON) count every image as
    missing, and the table shows the cells empty."""
    scoring_server.fail = lambda kind, answered: True
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "1")
    out = tmp_path / "run"
    assert main(server_args(tiny_pipeline_dir, scoring_server.url, out, epochs=1)) == 0

    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not _errors(captured.err)
    warnings = re.findall(r"warning: [^\n\r]*", captured.err)
    assert [w for w in warnings if "epoch 1: the reward" in w and "skipping this epoch's update" in w]
    missing = [w for w in warnings if "scored as missing" in w]
    assert len(missing) == 2 and "base seed 0, epoch 0 at 1 steps" in missing[0]
    assert "answered HTTP 500" in missing[0] and "after 2 attempts" in missing[0]
    assert scoring_server.posts == 3 * 2  # base evaluation, epoch 1, final evaluation; each retried once
    records = strict_records(out)
    assert [(r["algo"], r["mean"], r["count"], r["nonfinite"]) for r in records] == [
        ("base", None, 0, 4), ("ddpo", None, 0, 4)]
    assert load_state(out / "checkpoints" / "ddpo_seed0.pt")["done"]
    assert "–" in captured.out


def test_evaluation_faults_leave_the_rest_of_the_run_as_it_would_be_and_a_stop_resumes_to_the_same_records(
    tiny_pipeline_dir, tmp_path, scoring_server, capsys, monkeypatch
):
    """The base evaluation fails on the server (its cell missing), then the training
    reward fails at epoch 2 past --max-bad-reward-batches 0: the run stops with one line,
    exit code 1 and epoch 1's checkpoint and records. `--resume` with the server back
    gives the records of an uninterrupted run with the same base-evaluation fault."""
    monkeypatch.setenv("STEPZOO_REWARD_HTTP_RETRIES", "0")
    base_down = lambda kind, answered: kind == "evaluation" and scoring_server.answered["training"] == 0
    scoring_server.fail = lambda kind, answered: base_down(kind, answered) or (kind == "training" and answered >= 1)
    out = tmp_path / "run"
    args = server_args(tiny_pipeline_dir, scoring_server.url, out, epochs=2) + ["--max-bad-reward-batches", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    [error] = _errors(err)
    assert "ddpo seed 0, epoch 2" in error and "HTTP 500" in error and "holds epoch 1" in error
    assert "Traceback" not in err
    stopped = load_state(out / "checkpoints" / "ddpo_seed0.pt")
    assert stopped["epoch"] == 1 and [r["epoch"] for r in stopped["records"]] == [1]
    assert load_state(out / "checkpoints" / "base_seed0.pt")["records"][0]["nonfinite"] == 4

    scoring_server.fail = lambda kind, answered: False
    assert main(args + ["--resume"]) == 0

    scoring_server.answered = {"evaluation": 0, "training": 0}
    scoring_server.fail = base_down
    uninterrupted = tmp_path / "uninterrupted"
    assert main(server_args(tiny_pipeline_dir, scoring_server.url, uninterrupted, epochs=2)
                + ["--max-bad-reward-batches", "0"]) == 0

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]

    resumed = strict_records(out)
    assert without_time(resumed) == without_time(strict_records(uninterrupted))
    assert [(r["algo"], r["epoch"], r["count"]) for r in resumed] == [("base", 0, 0), ("ddpo", 1, 4), ("ddpo", 2, 4)]


def test_strict_json_writes_non_finite_numbers_as_null_and_refuses_nothing_else():
    from zoo import strict_json

    value = {"mean": math.nan, "high": math.inf, "rows": [1.5, -math.inf, (2, math.nan)], "name": "NaN", "n": None}
    assert strict_json.dumps(value, sort_keys=True) == (
        '{"high": null, "mean": null, "n": null, "name": "NaN", "rows": [1.5, null, [2, null]]}')


def test_every_json_the_project_writes_goes_through_strict_json():
    """json.dumps writes a bare NaN that strict parsers reject; the package sources call
    zoo.strict_json.dumps instead (the reference SDPO launcher, which runs inside the
    reference's own environment and writes only names and clock readings, aside)."""
    repo = Path(__file__).resolve().parent.parent
    sources = [path for package in ("benchmarks", "rewards", "zoo") for path in (repo / package).rglob("*.py")]
    offenders = [
        str(path.relative_to(repo)) for path in sources
        if re.search(r"(?<![\w.])json\.dump", path.read_text())
        and path.relative_to(repo).as_posix() not in {"zoo/strict_json.py", "benchmarks/reference_sdpo_launch.py"}
    ]
    assert not offenders
