"""--jobs N: the independent jobs of a benchmark or tuning invocation (each seed's base
evaluation, each (algorithm, seed, configuration) training run) in N worker processes give
the records, metrics, tables and LoRA weights of a serial run; a job killed in its worker
resumes from its own checkpoint; bad values are refused before anything loads."""

import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from benchmarks import tune
from benchmarks.checkpoint import KILL_AT_ENV, load_state
from benchmarks.cli import UsageError, parse_args
from benchmarks.plan import make_plan
from benchmarks.run import main

from helpers.runs import micro_args

ALGOS = ["ddpo", "rebel"]
SEEDS = [0, 1]
TIMING = {"wall_time"}
"""Record fields that measure time, the only ones a parallel run may change."""


def run_args(model: str, out: Path, seeds: list[int] = SEEDS) -> list[str]:
    """Two algorithms x two seeds on the micro budget: six jobs (two of them base evaluations)."""
    return micro_args(model, out) + ["--algos", ",".join(ALGOS), "--seeds", ",".join(map(str, seeds))]


def _rows(path: Path, seeds: list[int] = SEEDS) -> list[dict]:
    """The rows of a JSON-lines file of `seeds`, without their timing fields."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows if row["seed"] in seeds]


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "table.csv").drop(columns="train s")


def _assert_same_run(out: Path, reference: Path, seeds: list[int] = SEEDS) -> None:
    """`out` holds the rows, metrics and LoRA weights of `reference` for `seeds` (and its
    table, when those are all of them)."""
    for name in ("records.jsonl", "metrics.jsonl"):
        assert _rows(out / name) == _rows(reference / name, seeds), name
    if seeds == SEEDS:
        pd.testing.assert_frame_equal(_table(out), _table(reference))
    for algo in ALGOS:
        for seed in seeds:
            name = f"lora/{algo}_seed{seed}/pytorch_lora_weights.safetensors"
            mine, theirs = load_file(out / name), load_file(reference / name)
            assert mine.keys() == theirs.keys()
            assert all((mine[k] == theirs[k]).all() for k in mine), name


def _started(err: str) -> list[str]:
    """The jobs a --jobs run's progress lines say it started."""
    return [line.split("] started ", 1)[1] for line in err.splitlines() if "] started " in line]


@pytest.fixture(scope="module")
def serial_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    assert main(run_args(tiny_pipeline_dir, out)) == 0
    return out


def test_two_workers_give_the_serial_records(serial_run, tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    terminated = []
    # Workers of a run whose jobs all finished exit on their own: one terminated on its way
    # out leaves its semaphores behind (the resource tracker's "leaked semaphore" warning).
    real_terminate = multiprocessing.process.BaseProcess.terminate
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "terminate",
                        lambda process: terminated.append(process.name) or real_terminate(process))
    capsys.readouterr()
    assert main(run_args(tiny_pipeline_dir, out) + ["--jobs", "2"]) == 0
    assert terminated == []
    _assert_same_run(out, serial_run)
    err = capsys.readouterr().err
    expected = [f"{name} seed {seed}" for seed in SEEDS for name in ["base", *ALGOS]]
    assert sorted(_started(err)) == sorted(expected)
    assert sum("] finished " in line for line in err.splitlines()) == len(expected)


def test_a_job_killed_in_its_worker_resumes_from_its_own_checkpoint(serial_run, tiny_pipeline_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """Seed 0 alone (three jobs): the kill hook SIGKILLs the worker that reaches REBEL's
    second epoch; the run stops with one line naming the job, REBEL's checkpoint holds its
    first epoch, and --resume runs only the jobs without rows, REBEL from that checkpoint,
    to the serial run's rows of seed 0."""
    out = tmp_path / "run"
    args = run_args(tiny_pipeline_dir, out, seeds=[0]) + ["--jobs", "2"]
    monkeypatch.setenv(KILL_AT_ENV, "train:rebel:2")
    capsys.readouterr()
    assert main(args) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: rebel seed 0: its worker process died (signal SIGKILL)"), last
    assert load_state(out / "checkpoints" / "rebel_seed0.pt")["epoch"] == 1
    records = out / "records.jsonl"
    recorded = {f"{r['algo']} seed {r['seed']}" for r in _rows(records, [0])} if records.exists() else set()

    monkeypatch.delenv(KILL_AT_ENV)
    assert main(args + ["--resume"]) == 0
    started = _started(capsys.readouterr().err)
    assert "rebel seed 0" in started and not recorded & set(started)
    _assert_same_run(out, serial_run, seeds=[0])


def test_tuning_with_two_workers_gives_the_serial_tuning(tiny_pipeline_dir, tmp_path):
    """A 2-point grid, one algorithm and seed, one epoch: four jobs across two run folders."""
    micro = micro_args(tiny_pipeline_dir, tmp_path / "unused")
    owned = {micro.index(flag) for flag in ("--out", "--eval-every")}
    run_flags = [arg for i, arg in enumerate(micro) if i not in owned and i - 1 not in owned]
    argv = ["--grid", "learning_rate=1e-3,1e-1", *run_flags, "--algos", "ddpo", "--epochs", "1", "--seeds", "100"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert tune.main(["--out", str(serial), *argv]) == 0
    assert tune.main(["--out", str(parallel), *argv, "--jobs", "2"]) == 0
    for point in ("learning_rate=0.001", "learning_rate=0.1"):
        assert _rows(parallel / point / "records.jsonl") == _rows(serial / point / "records.jsonl")
    pd.testing.assert_frame_equal(pd.read_csv(parallel / "tuning.csv"), pd.read_csv(serial / "tuning.csv"))
    assert (json.loads((parallel / "selected.json").read_text())["selected"]
            == json.loads((serial / "selected.json").read_text())["selected"])


def test_bad_jobs_are_refused_in_one_line_before_anything_loads(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(micro_args(tiny_pipeline_dir, out) + ["--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs must be at least 1 (worker processes), got 0"
    assert tune.main(["--out", str(tmp_path / "tune"), "--model", tiny_pipeline_dir, "--jobs", "-1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --jobs must be at least 1")
    # Under accelerate launch every process plans: each one refuses.
    with pytest.raises(UsageError, match="^--jobs 2: under accelerate launch"):
        make_plan(parse_args(micro_args(tiny_pipeline_dir, out) + ["--jobs", "2"]), num_processes=2)
    assert not out.exists() and not (tmp_path / "tune").exists()
