"""The runner's command line: `--config RUN/config.json` reads a run's settings as the flags,
refusing a flag that contradicts them; `--help` lists every preset."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from benchmarks.cli import UsageError, parse_args
from benchmarks.plan import make_plan
from benchmarks.presets import PRESETS
from zoo import strict_json

RECORDED = ["--epochs", "3", "--seeds", "0,1", "--eval-steps", "1,4", "--ema.decay", "0.9",
            "--ddpo.learning-rate", "0.01", "--train-steps", "2", "--eval-rewards", "tiny-align-gold"]
"""A run of the default preset with settings of every kind: numbers, comma lists, the EMA, a
per-algorithm field, --train-steps (recorded as each config's num_steps)."""


@pytest.fixture
def recorded_run(tmp_path) -> Path:
    """The config.json that a run started with `RECORDED` writes (planned, not trained)."""
    out = tmp_path / "run"
    plan = make_plan(parse_args([*RECORDED, "--out", str(out)]))
    out.mkdir()
    (out / "config.json").write_text(strict_json.dumps(plan.config_json(), indent=2))
    return out / "config.json"


def test_config_gives_the_recorded_run_and_its_folder(recorded_run, tmp_path):
    """Every recorded setting comes back: the plan records the same config.json, and --out
    defaults to the run's folder."""
    assert parse_args(["--config", str(recorded_run)]).out == str(recorded_run.parent)
    again = make_plan(parse_args(["--config", str(recorded_run), "--out", str(tmp_path / "again")]))
    assert json.loads(strict_json.dumps(again.config_json())) == json.loads(recorded_run.read_text())


@pytest.mark.parametrize("flags", [
    ["--epochs", "3", "--seeds", "0, 1", "--train-steps", "2", "--ddpo.learning-rate", "0.01"],
    ["--jobs", "2", "--max-bad-reward-batches", "7", "--loop.sample-batch-size", "8"],
])
def test_config_takes_flags_that_agree_or_are_free(recorded_run, flags):
    """The recorded values repeated, and flags outside the run's identity."""
    parse_args(["--config", str(recorded_run), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "4"], "--epochs 4: --config {} records 3; leave --epochs out"),
    (["--seeds", "0,1,2"], "--seeds 0,1,2: --config {} records 0,1;"),
    (["--preset", "tiny"], "--preset tiny: --config {} records tiny-turbo;"),
    (["--reward", "tiny-align"], "--reward tiny-align: --config {} records tiny-aesthetic;"),
    (["--ddpo.learning-rate", "0.02"], "--ddpo.learning-rate 0.02: --config {} records 0.01;"),
    (["--train-steps", "4"], "--train-steps 4: --config {} records d3po's num_steps 2;"),
    (["--ema.decay", "0.5"], "--ema.decay 0.5: --config {} records 0.9;"),
])
def test_config_refuses_a_contradicting_flag(recorded_run, flags, message):
    with pytest.raises(UsageError) as refused:
        parse_args(["--config", str(recorded_run), *flags])
    assert str(refused.value).startswith(message.format(recorded_run))


def test_config_with_extend_takes_the_algorithms_and_seeds_it_adds(recorded_run):
    """`--config RUN/config.json --extend` names what it adds (`extended` checks it against
    the run); every other recorded setting is still held."""
    args = parse_args(["--config", str(recorded_run), "--extend", "--partial-seeds", "--algos", "ddpo",
                       "--seeds", "0,1,2"])
    assert (args.algos, args.seeds, args.epochs) == ("ddpo", "0,1,2", 3)
    with pytest.raises(UsageError, match="--epochs 4: --config"):
        parse_args(["--config", str(recorded_run), "--extend", "--seeds", "0,1,2", "--epochs", "4"])


def test_config_names_an_unreadable_file(tmp_path):
    with pytest.raises(UsageError, match="--config: .*missing.json cannot be read"):
        parse_args(["--config", str(tmp_path / "missing.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UsageError, match="--config: .*broken.json is not valid JSON"):
        parse_args(["--config", str(tmp_path / "broken.json")])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UsageError, match="--config: .*other.json records no preset, reward, algorithm_configs"):
        parse_args(["--config", str(tmp_path / "other.json")])


def test_help_lists_every_preset():
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        parse_args(["--help"])
    flat = " ".join(shown.getvalue().split())
    assert f"Model, prompts, sampler and budget: {', '.join(PRESETS)} " in flat
