"""Every bad input is refused before any model loads: exit code 2 and one line naming
the flag or the file, never a traceback or one of tyro's multi-line boxes."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmarks.run
from benchmarks.cli import parse_args
from benchmarks.plan import make_plan
from benchmarks.run import main
from zoo.registry import ALGORITHMS

REPO = Path(__file__).resolve().parent.parent
QUICK_SECONDS = 5.0
"""Refusals read flags, folders and small JSON files only; model loading takes longer."""


def base_args(model: str, out: Path) -> list[str]:
    return [
        "--model", model,
        "--reward", "jpeg_compressibility",
        "--eval-rewards", "",
        "--epochs", "2",
        "--trajectories-per-epoch", "8",
        "--eval-steps", "1,2",
        "--train-steps", "2",
        "--d3po.gradient-accumulation-steps", "1",
        "--sdpo.gradient-accumulation-steps", "2",
        "--out", str(out),
    ]


def _existing_run(model: str, out: Path, monkeypatch) -> None:
    """A folder holding a run started with the base arguments (its config.json)."""
    plan = make_plan(parse_args(base_args(model, out)))
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(plan.config_json()))


def _run_recorded_before_finetune(model: str, out: Path, monkeypatch) -> None:
    """The same, recorded before config.json had "finetune" and "fsdp": a LoRA run."""
    _existing_run(model, out, monkeypatch)
    config = json.loads((out / "config.json").read_text())
    del config["finetune"], config["fsdp"]
    (out / "config.json").write_text(json.dumps(config))


def _foreign_folder(model: str, out: Path, monkeypatch) -> None:
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("not a run")


def _file_at_out(model: str, out: Path, monkeypatch) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("not a folder")


def _file_above_out(model: str, out: Path, monkeypatch) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "notes.txt").write_text("a file where --out wants a folder")


def _corrupt_clip_folder(model: str, out: Path, monkeypatch) -> None:
    """A tiny-clip folder with every file it needs, its config.json cut short."""
    folder = out.parent / "clip"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "preprocessor_config.json", "vocab.json"):
        (folder / name).write_text("{}")
    (folder / "config.json").write_text('{"architectures": ["CLIPMod')


def _no_imagereward_package(model: str, out: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ImageReward" else real(name, *a))


# (id, extra flags, text the one line must contain, setup of the output folder or environment)
CASES = [
    ("unknown algorithm", ["--algos", "sdpo,ppo"], ["--algos", "ppo", ", ".join(ALGORITHMS)], None),
    ("algorithm listed twice", ["--algos", "sdpo,ddpo,sdpo"], ["--algos", "sdpo listed more than once"], None),
    ("unknown eval split", ["--eval-split", "train"], ["--eval-split", "'train'"], None),
    ("train steps below a trained window", ["--preset", "sd3.5-medium", "--algos", "grpo", "--train-steps", "4"],
     ["--train-steps 4", "window_size"], None),
    ("unknown preset", ["--preset", "sdxl"], ["--preset", "sdxl", "tiny, tiny-flow, tiny-turbo, tiny-flow-turbo, sd-turbo"], None),
    ("unknown reward", ["--reward", "aesthetics"], ["--reward", "aesthetics", "pickscore"], None),
    ("missing model folder", ["--model", "/nonexistent/folder"], ["--model", "/nonexistent/folder"], None),
    ("hub model not cached", ["--model", "stabilityai/sd-turbo"], ["--model stabilityai/sd-turbo", "cache"], None),
    ("missing reward weights", ["--reward", "pickscore"], ["Reward 'pickscore'", "hf download yuvalkirstain/PickScore_v1"],
     None),
    ("reward path to nothing", ["--reward", "tiny-clip", "--reward-path", "tiny-clip=/nonexistent/clip"],
     ["--reward-path tiny-clip", "/nonexistent/clip"], None),
    ("missing optional package", ["--reward", "imagereward"], ["ImageReward", ".[real-rewards]"],
     _no_imagereward_package),
    ("malformed reward path", ["--reward-path", "pickscore"], ["--reward-path", "NAME=PATH"], None),
    ("reward path for no reward", ["--reward-path", "pickscor=/models/x"], ["--reward-path", "'pickscor'"], None),
    ("eta 0 with log-probs", ["--sdpo.eta", "0"], ["--sdpo.eta", "log-density"], None),
    ("reward without a gradient for draft", ["--algos", "draft"],
     ["--reward jpeg_compressibility", "not differentiable", "leave draft out of --algos"], None),
    ("trajectories vs group size", ["--trajectories-per-epoch", "7"], ["--trajectories-per-epoch 7", "group size"],
     None),
    ("train batch vs groups", ["--sdpo.train-batch-size", "3"], ["--sdpo.train-batch-size 3"], None),
    ("groups per prompt vs groups", ["--groups-per-prompt", "8"],
     ["--groups-per-prompt 8", "rebel's 4 groups per epoch"], None),
    ("groups per prompt 0", ["--groups-per-prompt", "0"], ["--groups-per-prompt", "at least 1"], None),
    ("accumulation vs epoch", ["--ddpo.gradient-accumulation-steps", "3"], ["--ddpo.gradient-accumulation-steps 3"],
     None),
    ("eval steps below 1", ["--eval-steps", "0,4"], ["--eval-steps"], None),
    ("eval steps beyond schedule", ["--eval-steps", "1,1001"], ["--eval-steps", "1000 timesteps"], None),
    ("train steps below 1", ["--train-steps", "0"], ["--train-steps"], None),
    ("lora rank 0", ["--ddpo.lora-rank", "0"], ["--ddpo.lora-rank", "at least 1"], None),
    ("negative learning rate", ["--ddpo.learning-rate", "-1"], ["--ddpo.learning-rate", "positive"], None),
    ("zero learning rate", ["--rebel.learning-rate", "0"], ["--rebel.learning-rate", "positive"], None),
    ("tracker sizes", ["--ddpo.tracker-min-count", "99"], ["--ddpo.tracker-min-count", "tracker_buffer_size"], None),
    ("epochs 0", ["--epochs", "0"], ["--epochs"], None),
    ("epochs not a number", ["--epochs", "abc"], ["--epochs", "'abc'"], None),
    ("unknown flag", ["--algo", "ppo"], ["--algo"], None),
    ("seeds not numbers", ["--seeds", "1,x"], ["--seeds"], None),
    ("sample batch vs group size", ["--loop.sample-batch-size", "3"], ["--loop.sample-batch-size 3", "group size 2"],
     None),
    ("sample batch 0", ["--loop.sample-batch-size", "0"], ["--loop.sample-batch-size", "at least 1"], None),
    ("steps per backward 0", ["--loop.steps-per-backward", "0"], ["--loop.steps-per-backward", "at least 1"], None),
    ("micro-batch 0", ["--loop.micro-batch", "0"], ["--loop.micro-batch", "at least 1"], None),
    ("negative reward-failure limit", ["--max-bad-reward-batches", "-1"], ["--max-bad-reward-batches"], None),
    ("resume and overwrite", ["--resume", "--overwrite"], ["--resume", "--overwrite"], None),
    ("resume with no run", ["--resume"], ["--resume", "no run"], None),
    ("out holds another run", [], ["--out", "--resume", "--overwrite"], _existing_run),
    ("resume with changed settings", ["--resume", "--epochs", "3"], ["--resume", "epochs"], _existing_run),
    ("resume a LoRA run fully fine-tuned", ["--resume", "--finetune", "full"], ["--resume", "finetune"], _existing_run),
    ("resume an older LoRA run fully fine-tuned", ["--resume", "--finetune", "full"], ["--resume", "finetune"],
     _run_recorded_before_finetune),
    ("out holds other files", ["--overwrite"], ["--out", "no stepzoo run"], _foreign_folder),
    ("out is a file", [], ["--out", "is a file"], _file_at_out),
    # Issue 29: inputs that meant nothing or something else, and messages that misled.
    ("reward weight 0", ["--reward", "jpeg_compressibility:0"], ["error: --reward:", "weight 0", "non-zero"], None),
    ("reward weight nan", ["--reward", "jpeg_compressibility:nan"], ["error: --reward:", "weight nan", "finite"],
     None),
    ("reward weight inf", ["--reward", "jpeg_compressibility:1,tiny-align-gold:inf"], ["--reward", "weight inf"],
     None),
    ("eval reward weight 0", ["--eval-rewards", "tiny-align-gold:0"], ["error: --eval-rewards:", "weight 0"], None),
    ("trajectories 0", ["--trajectories-per-epoch", "0"], ["--trajectories-per-epoch", "at least 1, got 0"], None),
    ("eval samples 0", ["--eval-samples-per-prompt", "0"], ["--eval-samples-per-prompt", "at least 1, got 0"],
     None),
    ("out in /proc", ["--out", "/proc/stepzoo-run"], ["--out /proc/stepzoo-run", "no folder can be made in /proc"],
     None),
    ("out under a file", ["--out", "{tmp}/notes.txt/run"], ["--out", "notes.txt is a file", "choose another --out"],
     _file_above_out),
    ("corrupt reward path folder", ["--reward", "tiny-clip", "--reward-path", "tiny-clip={tmp}/clip"],
     ["--reward-path tiny-clip", "config.json is not valid JSON", "intact copy"], _corrupt_clip_folder),
    ("seed listed twice", ["--seeds", "0,1,0"], ["--seeds", "0 listed more than once"], None),
    ("eval steps listed twice", ["--eval-steps", "1,1"], ["--eval-steps", "1 listed more than once"], None),
    ("unknown eval reward", ["--eval-rewards", "nosuch"], ["error: --eval-rewards:", "'nosuch'"], None),
    ("eval plugin module missing", ["--eval-rewards", "no_such_module:Thing"],
     ["error: --eval-rewards no_such_module:Thing", "cannot be imported"], None),
    ("all among others", ["--algos", "all,ddpo"], ["--algos all,ddpo", "all stands alone", "--algos all"], None),
    ("learning rate inf", ["--ddpo.learning-rate", "inf"], ["--ddpo.learning-rate", "finite", "inf"], None),
    ("learning rate nan", ["--ddpo.learning-rate", "nan"], ["--ddpo.learning-rate", "finite", "nan"], None),
    ("clip range inf", ["--ddpo.clip-range", "inf"], ["--ddpo.clip-range", "finite"], None),
    ("extend with a flag for a recorded algorithm it does not train",
     ["--extend", "--algos", "nft", "--ddpo.clip-range", "1e-3"],
     ["--ddpo.clip-range 0.001", "--extend trains nft, not ddpo", "reused as recorded"], _existing_run),
]


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch, tmp_path):
    """Reaching `execute` (where models and rewards load) fails the test; no hub cache or
    model folder from the environment leaks into a case."""

    def loading(plan):
        raise AssertionError("validation passed and the run went on to load models")

    monkeypatch.setattr(benchmarks.run, "execute", loading)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name in [k for k in os.environ if k.startswith("STEPZOO_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("extra,expected,setup", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_in_one_line_before_loading(extra, expected, setup, tiny_pipeline_dir, tmp_path,
                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    if setup is not None:
        setup(tiny_pipeline_dir, out, monkeypatch)
    existed = out.exists()
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    capsys.readouterr()

    started = time.perf_counter()
    code = main(base_args(tiny_pipeline_dir, out) + extra)
    elapsed = time.perf_counter() - started

    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    # One line; missing weights or models get a line with the fix, then details.
    assert len(lines) == 1 or (len(lines) == 2 and "fix: " in lines[0]), captured.err
    assert lines[0].startswith("error: ") and "Traceback" not in captured.err
    assert not any(mark in lines[0] for mark in "╭│╰"), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert captured.out == ""
    assert elapsed < QUICK_SECONDS
    assert out.exists() == existed


def test_table_covers_at_least_fifteen_inputs():
    assert len(CASES) >= 15


def test_a_refused_config_value_is_one_line_from_the_command_line(tiny_pipeline_dir, tmp_path):
    """The real process: tyro's error box for a value a config's __post_init__ refuses
    never reaches the terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPZOO_")}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *base_args(tiny_pipeline_dir, tmp_path / "run"),
         "--ddpo.learning-rate", "-1"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --ddpo.learning-rate: learning_rate must be positive (got -1.0)."
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--reward", "jpeg_compressibility:-1"],
     "--reward jpeg_compressibility:-1: the weight -1 of jpeg_compressibility is negative, so training minimises "
     "jpeg_compressibility"),
    (["--reward", "tiny-aesthetic-gold"],
     "--reward tiny-aesthetic-gold: tiny-aesthetic-gold is the evaluation-only gold of tiny-aesthetic"),
    (["--algos", "ddpo,rebel"],
     "--sdpo.gradient-accumulation-steps: for algorithms that --algos ddpo,rebel leaves out; ignored"),
])
def test_inputs_that_may_be_meant_run_with_a_one_line_note(extra, expected, tiny_pipeline_dir, tmp_path):
    """A negative reward weight (minimising may be wanted), a gold as the training reward
    (an upper bound) and per-algorithm flags for algorithms a run leaves out (one set of
    flags passed to runs of different --algos; base_args sets sdpo's) are accepted, each
    with a note (`main` prints them as `note: ...` lines) that says what they do."""
    notes = make_plan(parse_args(base_args(tiny_pipeline_dir, tmp_path / "run") + extra)).notes
    assert [note for note in notes if expected in note and "\n" not in note], notes
