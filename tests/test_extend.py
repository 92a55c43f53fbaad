"""`--extend`: new algorithms added to a finished run folder, and the portable model path
that lets a run folder move between checkouts."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.portable import REPO_ROOT, portable_model, recorded_model
from benchmarks.run import main, make_plan, parse_args
from test_benchmark_run import micro_args

TINY_PIPELINE = "zoo/tiny/assets/pipeline"
"""The committed pipeline, relative to the repository root."""


@pytest.fixture(scope="module")
def ddpo_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A finished micro run of DDPO alone; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("extend") / "ddpo"
    assert main(micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo"]) == 0
    return out


def test_config_records_a_repository_folder_relative_and_another_absolute(ddpo_run, tiny_pipeline_dir, tmp_path):
    assert json.loads((ddpo_run / "config.json").read_text())["model"] == str(Path(tiny_pipeline_dir).resolve())
    plan = make_plan(parse_args(micro_args(str(REPO_ROOT / TINY_PIPELINE), tmp_path / "out")))
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
    assert main(micro_args(TINY_PIPELINE, out) + resume) == 2
    assert "--resume: the run in" in capsys.readouterr().err
    assert main(micro_args(str(REPO_ROOT / TINY_PIPELINE), out) + resume) == 0
    assert json.loads((out / "config.json").read_text())["model"] == TINY_PIPELINE


def test_a_moved_absolute_model_reads_as_its_repository_tail():
    """Runs recorded before paths were portable name another checkout's folder."""
    assert recorded_model(f"/elsewhere/checkout/{TINY_PIPELINE}") == str(REPO_ROOT / TINY_PIPELINE)
    assert recorded_model("/elsewhere/checkout/results") == "/elsewhere/checkout/results"  # no pipeline there
    assert recorded_model(TINY_PIPELINE) == str(REPO_ROOT / TINY_PIPELINE)
    assert recorded_model("stabilityai/sd-turbo") == "stabilityai/sd-turbo"
