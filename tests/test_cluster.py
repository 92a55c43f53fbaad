"""The job matrix on cluster engines (benchmarks/cluster.py), on 127.0.0.1: a local Ray
instance with 2 workers (slow) and submitit's local executor give the records and metrics
of a serial run, the latter with a job whose worker dies, submitted again and resumed from
its checkpoint; a job's own error stops the run without a retry."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks.checkpoint import KILL_AT_ENV, KILL_ONCE_ENV
from benchmarks.cluster import JobLost, Outcome, RemoteExecutor
from benchmarks.jobs import Job, JobEvents
from benchmarks.run import main
from benchmarks.train import JobSettings

from helpers.runs import micro_args


def _run_args(model: str, out: Path, *extra: str) -> list[str]:
    return [*micro_args(model, out), "--algos", "ddpo,sdpo", "--seeds", "0", *extra]


def _rows(out: Path, name: str) -> list[dict]:
    """A run file's rows, wall times removed."""
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
            for line in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def serial_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    assert main(_run_args(tiny_pipeline_dir, out)) == 0
    return out


@pytest.fixture
def worker_path(monkeypatch):
    """Worker processes import stepzoo from this checkout, whatever the working directory."""
    repo = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))


@pytest.mark.slow  # 18 s on 2 idle cores, minutes beside other jobs (Ray's workers each import torch)
def test_ray_gives_the_records_of_a_serial_run(serial_run, tiny_pipeline_dir, tmp_path, worker_path):
    """A local Ray instance with 2 workers."""
    pytest.importorskip("ray")
    out = tmp_path / "run"
    assert main(_run_args(tiny_pipeline_dir, out, "--cluster.engine", "ray", "--jobs", "2")) == 0
    for name in ("records.jsonl", "metrics.jsonl"):
        assert _rows(out, name) == _rows(serial_run, name), name
    assert (out / "lora" / "sdpo_seed0").is_dir() and (out / "table.md").is_file()


@pytest.mark.slow  # three subprocess jobs and a serial run (31 s idle); the fake engine below covers retries
def test_a_job_whose_worker_dies_is_submitted_again_and_resumes(serial_run, tiny_pipeline_dir, tmp_path,
                                                                monkeypatch, worker_path):
    """submitit's local executor, 2 jobs at once: DDPO's worker is SIGKILLed during its
    second epoch (once: $STEPZOO_KILL_ONCE); the job is submitted again, resumes from its
    epoch-1 checkpoint, and the run's records and metrics are a serial run's."""
    pytest.importorskip("submitit")
    monkeypatch.setenv(KILL_AT_ENV, "train:ddpo:2")
    monkeypatch.setenv(KILL_ONCE_ENV, str(tmp_path / "killed"))
    out = tmp_path / "run"
    assert main(_run_args(tiny_pipeline_dir, out, "--cluster.engine", "submitit-local", "--jobs", "2")) == 0
    assert (tmp_path / "killed").exists()
    for name in ("records.jsonl", "metrics.jsonl"):
        assert _rows(out, name) == _rows(serial_run, name), name


@dataclass
class FakeEngine(RemoteExecutor):
    """An engine in this process: each job's call fails (no answer) `failures[algo]` times first."""

    failures: dict[str, int] = field(default_factory=dict)
    submitted: list[Job] = field(default_factory=list)
    error: Exception | None = None

    def _submit(self, job):
        self.submitted.append(job)
        return len(self.submitted) - 1  # a handle: the submission's number

    def _wait(self, handles):
        return handles[0]

    def _result(self, handle):
        job = self.submitted[handle]
        if self.failures.get(job.algo, 0):
            self.failures[job.algo] -= 1
            raise ConnectionError("node lost")
        return Outcome(None, error=self.error) if self.error else Outcome([{"algo": job.algo}])


def _jobs(tmp_path) -> list[Job]:
    settings = JobSettings(model="unused", epochs=1, trajectories_per_epoch=1, train_prompts=("a cat",), eval_every=1,
                           eval=None, mixed_precision="no", train_reward="jpeg_compressibility", out_dir=tmp_path)
    return [Job("ddpo", 0, settings), Job("sdpo", 0, settings)]


def test_lost_calls_are_retried_up_to_the_limit_and_a_jobs_own_error_is_not(tmp_path):
    engine = FakeEngine(parallel=2, retries=2, failures={"ddpo": 2})
    finished = [job.algo for job, rows in engine.run(_jobs(tmp_path), JobEvents())]
    assert sorted(finished) == ["ddpo", "sdpo"] and [job.algo for job in engine.submitted].count("ddpo") == 3

    with pytest.raises(JobLost, match="ddpo seed 0: its remote call failed 3 times"):
        list(FakeEngine(parallel=2, retries=2, failures={"ddpo": 3}).run(_jobs(tmp_path), JobEvents()))

    diverged = FakeEngine(parallel=1, retries=2, error=ValueError("the loss became nan"))
    with pytest.raises(ValueError, match="the loss became nan"):
        list(diverged.run(_jobs(tmp_path), JobEvents()))
    assert [job.algo for job in diverged.submitted] == ["ddpo"]


@pytest.mark.parametrize(
    "extra, expected",
    [(["--cluster.gpus", "1"], "--cluster.gpus, --cluster.ray-address and --cluster.slurm-partition declare jobs"),
     (["--cluster.engine", "ray", "--cluster.cpus", "0"], "--cluster.cpus and --cluster.slurm-time-min must be")],
)
def test_cluster_settings_that_cannot_run_are_refused(tiny_pipeline_dir, tmp_path, capsys, extra, expected):
    assert main(_run_args(tiny_pipeline_dir, tmp_path / "run", *extra)) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
