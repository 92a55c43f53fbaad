"""`--extend`: new algorithms or seeds added to a finished run folder, and the portable model
path that lets a run folder move between checkouts."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import benchmarks.run
import benchmarks.train
from benchmarks.cli import parse_args
from benchmarks.plan import make_plan
from benchmarks.portable import REPO_ROOT, portable_model, recorded_model
from benchmarks.run import main

from helpers.runs import EVAL_STEPS, micro_args

TINY_PIPELINE = "zoo/tiny/assets/pipeline"
"""The committed pipeline, relative to the repository root."""
SEEDS = [0, 1]


def _run_args(model: str, out: Path, *extra: str) -> list[str]:
    """The micro run (helpers.runs), with two seeds: an extension must keep the
    rows of the seeds after the one it is training."""
    return [*micro_args(model, out), "--seeds", ",".join(map(str, SEEDS)), *extra]


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced, or the flag added."""
    if flag not in args:
        return [*args, flag, value]
    changed = list(args)
    changed[changed.index(flag) + 1] = value
    return changed


def _lines(out: Path, algo: str) -> list[str]:
    return [line for line in (out / "records.jsonl").read_text().splitlines() if json.loads(line)["algo"] == algo]


def _without_time(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]


class Interrupted(Exception):
    pass


def _watch_training(monkeypatch, stop_at_seed: int | None = None) -> list[tuple[str, int]]:
    """The (algorithm, seed) runs trained from now on, in order; `stop_at_seed` interrupts
    the run before it trains that seed."""
    trained = []
    real_run_algorithm = benchmarks.train.run_algorithm

    def run_algorithm(algo, config, seed, *args, **kwargs):
        if seed == stop_at_seed:
            raise Interrupted
        trained.append((algo, seed))
        return real_run_algorithm(algo, config, seed, *args, **kwargs)

    monkeypatch.setattr(benchmarks.train, "run_algorithm", run_algorithm)
    return trained


@pytest.fixture(scope="module")
def ddpo_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A finished micro run of DDPO alone; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("extend") / "ddpo"
    assert main(_run_args(tiny_pipeline_dir, out, "--algos", "ddpo")) == 0
    return out


@pytest.fixture
def refused_before_running(monkeypatch):
    """A refusal comes from planning: nothing is loaded, trained or written."""
    monkeypatch.setattr(benchmarks.run, "execute", lambda plan: pytest.fail("a refused extension ran"))


def test_extend_adds_the_new_rows_and_reuses_the_recorded_ones(ddpo_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # Without checkpoints, as a committed run folder: the rows can come from records.jsonl only.
    shutil.copytree(ddpo_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    ddpo_lines = _lines(out, "ddpo")
    saved = json.loads((out / "config.json").read_text())
    samples_before = (out / "samples.png").read_bytes()

    def no_base(*args, **kwargs):
        raise AssertionError("the base rows were evaluated again")

    monkeypatch.setattr(benchmarks.train, "evaluate_base", no_base)
    trained = _watch_training(monkeypatch)
    assert main(_run_args(tiny_pipeline_dir, out, "--algos", "d3po", "--extend")) == 0

    assert trained == [("d3po", seed) for seed in SEEDS]
    assert _lines(out, "ddpo") == ddpo_lines
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["algo"] for r in records].count("base") == len(EVAL_STEPS) * len(SEEDS)
    assert {r["algo"] for r in records} == {"base", "ddpo", "d3po"}
    assert pd.read_csv(out / "table.csv").iloc[:, 0].tolist() == ["base", "ddpo", "d3po"]
    assert "| d3po |" in (out / "table.md").read_text()
    assert (out / "samples.png").read_bytes() != samples_before
    config = json.loads((out / "config.json").read_text())
    assert config["algos"] == ["ddpo", "d3po"]
    assert config["algorithm_configs"]["ddpo"] == saved["algorithm_configs"]["ddpo"]
    assert set(config["algorithm_configs"]) == {"ddpo", "d3po"}

    # The extension's new rows are those of a run of the new algorithm alone.
    monkeypatch.undo()
    alone = tmp_path / "d3po"
    assert main(_run_args(tiny_pipeline_dir, alone, "--algos", "d3po")) == 0
    assert _without_time(_lines(out, "d3po")) == _without_time(_lines(alone, "d3po"))


def test_an_interrupted_extension_keeps_every_recorded_row_and_resumes(ddpo_run, tiny_pipeline_dir, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(ddpo_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    recorded = {algo: _lines(out, algo) for algo in ("base", "ddpo")}
    _watch_training(monkeypatch, stop_at_seed=SEEDS[-1])
    with pytest.raises(Interrupted):
        main(_run_args(tiny_pipeline_dir, out, "--algos", "d3po", "--extend"))
    assert {algo: _lines(out, algo) for algo in recorded} == recorded
    assert {json.loads(line)["seed"] for line in _lines(out, "d3po")} == set(SEEDS[:-1])

    monkeypatch.undo()
    trained = _watch_training(monkeypatch)
    assert main(_run_args(tiny_pipeline_dir, out, "--algos", "ddpo,d3po", "--resume")) == 0
    assert trained == [("d3po", SEEDS[-1])]
    assert {algo: _lines(out, algo) for algo in recorded} == recorded
    assert {json.loads(line)["seed"] for line in _lines(out, "d3po")} == set(SEEDS)


def test_extend_adds_a_seed_to_every_algorithm_and_reuses_the_recorded_seeds(ddpo_run, tiny_pipeline_dir, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(ddpo_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    recorded = {algo: _lines(out, algo) for algo in ("base", "ddpo")}
    new_seed = SEEDS[-1] + 1
    evaluated = []
    real_evaluate_base = benchmarks.train.evaluate_base

    def evaluate_base(settings, seed, *args, **kwargs):
        evaluated.append(seed)
        return real_evaluate_base(settings, seed, *args, **kwargs)

    monkeypatch.setattr(benchmarks.train, "evaluate_base", evaluate_base)
    trained = _watch_training(monkeypatch)
    seeds = ",".join(map(str, [*SEEDS, new_seed]))
    assert main([*_with(_run_args(tiny_pipeline_dir, out), "--seeds", seeds), "--algos", "ddpo", "--extend"]) == 0

    assert trained == [("ddpo", new_seed)] and evaluated == [new_seed]
    seeds_of = {algo: [json.loads(line)["seed"] for line in _lines(out, algo)] for algo in recorded}
    assert all(set(found) == {*SEEDS, new_seed} for found in seeds_of.values())
    assert {algo: _lines(out, algo)[: len(lines)] for algo, lines in recorded.items()} == recorded
    assert json.loads((out / "config.json").read_text())["seeds"] == [*SEEDS, new_seed]
    assert pd.read_csv(out / "table.csv")["seeds"].tolist() == [len(SEEDS) + 1] * 2

    # The new seed's rows are those of a run of that seed alone.
    monkeypatch.undo()
    alone = tmp_path / "alone"
    assert main([*_with(_run_args(tiny_pipeline_dir, alone), "--seeds", str(new_seed)), "--algos", "ddpo"]) == 0
    for algo in recorded:
        assert _without_time(_lines(out, algo)[len(recorded[algo]):]) == _without_time(_lines(alone, algo))


def _seeds(out: Path, algo: str) -> set[int]:
    return {json.loads(line)["seed"] for line in _lines(out, algo)}


def test_partial_seeds_train_only_the_named_algorithms_and_an_interrupted_extension_resumes_them(
        ddpo_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    """`--extend --partial-seeds`: the new seed trains DDPO only (its interval is the widest),
    D3PO keeps its seeds and rows, the base is evaluated on the new seed; the new rows are a
    run of that seed alone, and an interrupted extension resumes the seeds it planned, not a
    new seed of D3PO."""
    out = tmp_path / "run"
    shutil.copytree(ddpo_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(_run_args(tiny_pipeline_dir, out, "--algos", "d3po", "--extend")) == 0
    d3po_lines = _lines(out, "d3po")
    new_seed = SEEDS[-1] + 1
    seeds = ",".join(map(str, [*SEEDS, new_seed]))
    # Through --config: the run's settings without retyping them, the seeds and algorithm added.
    partial = ["--config", str(out / "config.json"), "--seeds", seeds, "--algos", "ddpo", "--extend",
               "--partial-seeds"]

    _watch_training(monkeypatch, stop_at_seed=new_seed)
    with pytest.raises(Interrupted):
        main(partial)
    assert json.loads((out / "config.json").read_text())["algo_seeds"] == {"d3po": SEEDS}
    monkeypatch.undo()
    trained = _watch_training(monkeypatch)
    resume = [*_with(_run_args(tiny_pipeline_dir, out), "--seeds", seeds), "--algos", "ddpo,d3po", "--resume"]
    assert main(resume) == 0

    assert trained == [("ddpo", new_seed)]
    assert _lines(out, "d3po") == d3po_lines and _seeds(out, "ddpo") == {*SEEDS, new_seed}
    config = json.loads((out / "config.json").read_text())
    assert config["seeds"] == [*SEEDS, new_seed] and config["algo_seeds"] == {"d3po": SEEDS}
    table = pd.read_csv(out / "table.csv", index_col=0)
    assert table.loc[["ddpo", "d3po"], "seeds"].tolist() == [len(SEEDS) + 1, len(SEEDS)]

    # The partial extension's new rows are those of a run of that seed alone, and a full
    # extension afterwards gives D3PO the seed it lacks.
    monkeypatch.undo()
    alone = tmp_path / "alone"
    assert main([*_with(_run_args(tiny_pipeline_dir, alone), "--seeds", str(new_seed)), "--algos", "ddpo"]) == 0
    for algo in ("base", "ddpo"):
        new_rows = [line for line in _lines(out, algo) if json.loads(line)["seed"] == new_seed]
        assert _without_time(new_rows) == _without_time(_lines(alone, algo))
    trained = _watch_training(monkeypatch)
    assert main([*_with(_run_args(tiny_pipeline_dir, out), "--seeds", seeds), "--algos", "d3po", "--extend"]) == 0
    assert trained == [("d3po", new_seed)]
    assert "algo_seeds" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize(
    "extra, expected",
    [(["--seeds", "0,1,2", "--algos", "ddpo", "--partial-seeds"], "--partial-seeds adds seeds to some algorithms"),
     (["--seeds", "1,2", "--algos", "ddpo", "--extend", "--partial-seeds"], "ddpo in {out} holds seeds 0,1"),
     (["--seeds", "0,1", "--algos", "ddpo", "--extend", "--partial-seeds"], "already holds ddpo on every seed")],
)
def test_partial_seeds_refuse_without_extend_a_dropped_seed_or_nothing_to_add(ddpo_run, tiny_pipeline_dir,
                                                                              refused_before_running, capsys, extra,
                                                                              expected):
    args = _run_args(tiny_pipeline_dir, ddpo_run)
    args = [*_with(args, "--seeds", extra[1]), *extra[2:]]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and expected.format(out=ddpo_run) in error


def _metric_keys(out: Path, algo: str) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["seed"], row["epoch"]) for row in rows if row["algo"] == algo]


def test_redo_trains_a_recorded_algorithm_again_and_replaces_only_its_rows(ddpo_run, tiny_pipeline_dir, tmp_path,
                                                                          monkeypatch):
    """After a fix changes what an algorithm computes, `--extend --redo` retrains it on
    every seed at this checkout's settings (a new learning rate stands in for the fix):
    its rows are a fresh run's, the base rows and the other algorithms' are reused, and
    its old checkpoints are not resumed from."""
    both = tmp_path / "both"
    shutil.copytree(ddpo_run, both)  # checkpoints kept: a finished DDPO checkpoint must not be resumed
    assert main(_run_args(tiny_pipeline_dir, both, "--algos", "d3po", "--extend")) == 0
    kept = {algo: _lines(both, algo) for algo in ("base", "d3po")}
    old_ddpo, metric_keys = _lines(both, "ddpo"), _metric_keys(both, "ddpo")

    def no_base(*args, **kwargs):
        raise AssertionError("the base rows were evaluated again")

    monkeypatch.setattr(benchmarks.train, "evaluate_base", no_base)
    trained = _watch_training(monkeypatch)
    redo = ["--algos", "ddpo", "--ddpo.learning-rate", "0.02", "--extend", "--redo"]
    assert main(_run_args(tiny_pipeline_dir, both, *redo)) == 0

    assert trained == [("ddpo", seed) for seed in SEEDS]
    assert {algo: _lines(both, algo) for algo in kept} == kept
    assert _without_time(_lines(both, "ddpo")) != _without_time(old_ddpo)
    assert _metric_keys(both, "ddpo") == metric_keys  # each epoch once: the old rows went
    config = json.loads((both / "config.json").read_text())
    assert config["algos"] == ["ddpo", "d3po"] and list(config["algorithm_configs"]) == ["ddpo", "d3po"]
    assert config["algorithm_configs"]["ddpo"]["learning_rate"] == 0.02
    assert pd.read_csv(both / "table.csv").iloc[:, 0].tolist() == ["base", "ddpo", "d3po"]

    monkeypatch.undo()
    alone = tmp_path / "alone"
    assert main(_run_args(tiny_pipeline_dir, alone, "--algos", "ddpo", "--ddpo.learning-rate", "0.02")) == 0
    assert _without_time(_lines(both, "ddpo")) == _without_time(_lines(alone, "ddpo"))


@pytest.mark.parametrize(
    "extra, expected",
    [(["--algos", "ddpo", "--redo"], "--redo replaces algorithms' rows in a finished run: pass it with --extend"),
     (["--algos", "d3po", "--extend", "--redo"], "--redo: " + "{out} holds none of d3po")],
)
def test_redo_refuses_without_extend_or_a_recorded_algorithm(ddpo_run, tiny_pipeline_dir, refused_before_running,
                                                             capsys, extra, expected):
    assert main(_run_args(tiny_pipeline_dir, ddpo_run, *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and expected.format(out=ddpo_run) in error


@pytest.mark.parametrize(
    "extra, expected",
    [
        # A seed added to a run must be added to every algorithm it holds.
        (["--algos", "d3po"], "list ddpo in --algos too"),
        # ... at the settings its recorded seeds trained with.
        (["--algos", "ddpo", "--ddpo.learning-rate", "0.5"], "--ddpo.learning-rate 0.5: ddpo in"),
    ],
)
def test_extend_refuses_a_seed_the_recorded_rows_could_not_share(ddpo_run, tiny_pipeline_dir, refused_before_running,
                                                                 capsys, extra, expected):
    seeds = ",".join(map(str, [*SEEDS, SEEDS[-1] + 1]))
    assert main([*_with(_run_args(tiny_pipeline_dir, ddpo_run), "--seeds", seeds), *extra, "--extend"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert expected in error and str(ddpo_run / "config.json") in error


@pytest.mark.parametrize(
    "flag, value",
    [("--seeds", "0"), ("--epochs", "3"), ("--eval-steps", "1"), ("--model", str(REPO_ROOT / TINY_PIPELINE)),
     ("--train-steps", "1")],
)
def test_extend_refuses_other_settings(ddpo_run, tiny_pipeline_dir, refused_before_running, capsys, flag, value):
    args = _with(_run_args(tiny_pipeline_dir, ddpo_run, "--algos", "d3po", "--extend"), flag, value)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert flag in error and str(ddpo_run / "config.json") in error


def test_extend_refuses_an_algorithm_already_in_the_folder(ddpo_run, tiny_pipeline_dir, refused_before_running, capsys):
    assert main(_run_args(tiny_pipeline_dir, ddpo_run, "--algos", "d3po,ddpo", "--extend")) == 2
    error = capsys.readouterr().err
    assert "already holds ddpo" in error and "--resume" in error and "--overwrite" in error


@pytest.mark.parametrize("other", ["--resume", "--overwrite"])
def test_extend_with_resume_or_overwrite_is_a_usage_error(ddpo_run, tiny_pipeline_dir, refused_before_running, capsys,
                                                          other):
    assert main(_run_args(tiny_pipeline_dir, ddpo_run, "--algos", "d3po", "--extend", other)) == 2
    assert f"--extend and {other} contradict each other" in capsys.readouterr().err


def test_extend_refuses_a_folder_without_a_finished_run(ddpo_run, tiny_pipeline_dir, tmp_path, refused_before_running,
                                                        capsys):
    args = ["--algos", "d3po", "--extend"]
    assert main(_run_args(tiny_pipeline_dir, tmp_path / "new", *args)) == 2
    assert "holds no run to extend" in capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(ddpo_run, unfinished)
    (unfinished / "records.jsonl").write_text("".join(line + "\n" for line in _lines(ddpo_run, "base")))
    assert main(_run_args(tiny_pipeline_dir, unfinished, *args)) == 2
    error = capsys.readouterr().err
    assert "has no rows of ddpo seed 0, ddpo seed 1" in error and "--resume" in error


def test_config_records_a_repository_folder_relative_and_another_absolute(ddpo_run, tiny_pipeline_dir, tmp_path):
    assert json.loads((ddpo_run / "config.json").read_text())["model"] == str(Path(tiny_pipeline_dir).resolve())
    plan = make_plan(parse_args(_run_args(str(REPO_ROOT / TINY_PIPELINE), tmp_path / "out")))
    assert plan.config_json()["model"] == TINY_PIPELINE
    assert portable_model("stabilityai/sd-turbo") == "stabilityai/sd-turbo"


def test_a_relative_model_resumes_from_another_working_directory(ddpo_run, tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                  capsys):
    """A run recorded with the committed pipeline, resumed from outside the repository: the
    recorded path is relative to the repository root, not to the working directory, where
    a folder at the same relative path is another model."""
    out = tmp_path / "run"
    shutil.copytree(ddpo_run, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model": TINY_PIPELINE}, indent=2) + "\n")
    (tmp_path / TINY_PIPELINE).parent.mkdir(parents=True)
    (tmp_path / TINY_PIPELINE).symlink_to(tiny_pipeline_dir)
    monkeypatch.chdir(tmp_path)
    resume = ["--algos", "ddpo", "--resume"]
    assert main(_run_args(TINY_PIPELINE, out, *resume)) == 2
    assert "--resume: the run in" in capsys.readouterr().err
    assert main(_run_args(str(REPO_ROOT / TINY_PIPELINE), out, *resume)) == 0
    assert json.loads((out / "config.json").read_text())["model"] == TINY_PIPELINE


def test_a_moved_absolute_model_reads_as_its_repository_tail():
    """Runs recorded before paths were portable name another checkout's folder."""
    assert recorded_model(f"/elsewhere/checkout/{TINY_PIPELINE}") == str(REPO_ROOT / TINY_PIPELINE)
    assert recorded_model("/elsewhere/checkout/results") == "/elsewhere/checkout/results"  # no pipeline there
    assert recorded_model(TINY_PIPELINE) == str(REPO_ROOT / TINY_PIPELINE)
    assert recorded_model("stabilityai/sd-turbo") == "stabilityai/sd-turbo"


def test_a_packed_run_folder_reads_as_before_and_extends_into_plain_files(ddpo_run, tiny_pipeline_dir, tmp_path,
                                                                         monkeypatch):
    """`benchmarks.pack` (committed results are stored gzipped): the records and metrics read
    the same packed, the report is remade from them, and an extension reads the packed rows
    and writes plain files that replace the packed ones; packing twice gives the same bytes."""
    from benchmarks.checkpoint import read_jsonl
    from benchmarks.pack import main as pack
    from benchmarks.records import load_records
    from benchmarks.report import main as report

    out = tmp_path / "run"
    shutil.copytree(ddpo_run, out, ignore=shutil.ignore_patterns("checkpoints"))
    records, metrics = read_jsonl(out / "records.jsonl"), read_jsonl(out / "metrics.jsonl")
    frame = load_records(out)
    assert pack([str(out)]) == 0
    assert not (out / "records.jsonl").exists() and not (out / "metrics.jsonl").exists()
    blob = (out / "records.jsonl.gz").read_bytes()
    assert read_jsonl(out / "records.jsonl") == records and read_jsonl(out / "metrics.jsonl") == metrics
    pd.testing.assert_frame_equal(load_records(out), frame)
    (out / "table.md").unlink()
    report([str(out)])
    assert "| ddpo |" in (out / "table.md").read_text()

    assert main(_run_args(tiny_pipeline_dir, out, "--algos", "d3po", "--extend")) == 0
    assert (out / "records.jsonl").is_file() and not (out / "records.jsonl.gz").exists()
    assert not (out / "metrics.jsonl.gz").exists()
    assert _lines(out, "ddpo") == [line for line in records if json.loads(line)["algo"] == "ddpo"]
    assert {json.loads(line)["algo"] for line in read_jsonl(out / "metrics.jsonl")} == {"ddpo", "d3po"}

    again = tmp_path / "again"
    shutil.copytree(ddpo_run, again, ignore=shutil.ignore_patterns("checkpoints"))
    assert pack([str(again)]) == 0
    assert (again / "records.jsonl.gz").read_bytes() == blob
    assert pack([str(tmp_path / "nowhere")]) == 2
