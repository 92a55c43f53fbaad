"""The job matrix on cluster engines: Ray and Slurm (through submitit).

    python -m benchmarks.run --cluster.engine ray --jobs 8 --cluster.gpus 1 ...      # a local Ray instance
    python -m benchmarks.run --cluster.engine ray --cluster.ray-address auto --jobs 32 ...
    python -m benchmarks.run --cluster.engine slurm --jobs 32 --cluster.gpus 1 --cluster.slurm-partition gpu ...
    python -m benchmarks.tune --cluster.engine slurm --jobs 64 ...                   # every grid point's jobs

Each (algorithm, seed, configuration) job of `benchmarks.jobs` runs as one remote call
that declares its CPUs and GPUs (`--cluster.cpus`, `--cluster.gpus`); at most `--jobs` run at once.
This process stays the only writer of the run folder's shared files, so the folder must
be on a filesystem the workers see (each job writes its checkpoint, LoRA and sample
strips there, as under `--jobs N`). A remote call has no channel back while it runs: its
per-epoch metrics go to its own file beside its checkpoint (`metrics_path`), and the
driver logs them, with the job's rows, when the call returns.

A call that fails without an answer from the job (the worker or node died, Slurm
preempted or timed it out) is submitted again, up to `--cluster.retries` times, and resumes
from the job's own checkpoint, so a retry costs at most the epoch in flight. An error of
the job itself (a diverged loss, a reward that cannot load) is not retried: it stops the
run as it would a serial one, and `--resume` continues every job from its checkpoint.
The records equal a serial run's (tests/test_cluster.py: a Ray instance with 2 workers
and submitit's local executor on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.jobs import Job, JobEvents, job_accelerator, load_rewards, picklable, run_job, with_hooks
from benchmarks.loop import RunStopped
from benchmarks.train import checkpoint_path

class JobLost(RunStopped):
    """A job's remote call failed without an answer from the job on every try."""


def metrics_path(job: Job) -> Path:
    """Where a remote job keeps its per-epoch metrics rows: beside its checkpoint."""
    return checkpoint_path(job.settings.out_dir, job.algo, job.seed).with_suffix(".metrics.jsonl")


@dataclass
class Outcome:
    """What a remote call returns: the job's rows, or the job's own error, and the
    evaluations it made in this call (for the tracker)."""

    rows: list[dict] | None
    evaluations: list[list[dict]] = field(default_factory=list)
    error: Exception | None = None


def remote_job(job: Job, threads: int) -> Outcome:
    """Run `job` on a cluster worker: a fresh accelerator on the GPU the engine assigned
    (the engine sets CUDA_VISIBLE_DEVICES), `threads` torch threads, the job's rewards; its
    metrics rows appended to `metrics_path` as they are made (a retry resumes from the
    checkpoint and logs the later epochs again, keyed by epoch)."""
    import torch

    from benchmarks.checkpoint import write_jsonl

    torch.set_num_threads(threads)
    path = metrics_path(job)
    logged = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    evaluations: list[list[dict]] = []

    def log(job: Job, row: dict) -> None:
        logged.append(row)
        write_jsonl(path, logged)

    events = JobEvents(metrics=log, evaluations=lambda job, records: evaluations.append(records))
    try:
        accelerator = job_accelerator(job)
        rows = run_job(with_hooks(job, events, progress_bars=False), load_rewards(job, accelerator.device), accelerator)
    except Exception as error:  # the job's own failure: reported, not retried
        return Outcome(None, evaluations, picklable(error, job))
    return Outcome(rows, evaluations)


@dataclass
class RemoteExecutor(ABC):
    """Runs each job as a remote call, at most `parallel` at once, submitting again a call
    that fails without the job's answer (`retries` times). Engines implement `_submit`,
    `_wait` and `_result`."""

    parallel: int
    cpus: int = 1
    """CPUs each job declares (and its torch threads)."""
    gpus: int = 0
    """GPUs each job declares."""
    retries: int = 2

    def run(self, jobs: list[Job], events: JobEvents) -> Iterator[tuple[Job, list[dict]]]:
        pending = list(jobs)
        running: dict[Any, tuple[Job, int]] = {}  # handle -> (job, tries so far)
        try:
            while pending or running:
                while pending and len(running) < self.parallel:
                    job = pending.pop(0)
                    events.started(job)
                    running[self._submit(job)] = (job, 1)
                handle = self._wait(list(running))
                job, tries = running.pop(handle)
                try:
                    outcome = self._result(handle)
                except Exception as lost:  # the engine's failure, not the job's: try again from its checkpoint
                    if tries > self.retries:
                        raise JobLost(
                            f"{job.name}: its remote call failed {tries} times ({type(lost).__name__}: {lost}); "
                            "--resume continues every job from its last checkpoint"
                        ) from lost
                    running[self._submit(job)] = (job, tries + 1)
                    continue
                if outcome.error is not None:
                    raise outcome.error
                path = metrics_path(job)
                if path.is_file():
                    for line in path.read_text().splitlines():
                        events.metrics(job, json.loads(line))
                for records in outcome.evaluations:
                    events.evaluations(job, records)
                yield job, outcome.rows
        finally:
            self._cancel(list(running))
            self._close()

    @abstractmethod
    def _submit(self, job: Job) -> Any:
        """Start `job`'s remote call; returns its handle."""

    @abstractmethod
    def _wait(self, handles: list[Any]) -> Any:
        """Block until one of `handles` is done; return it."""

    @abstractmethod
    def _result(self, handle: Any) -> Outcome:
        """The finished call's outcome; raises when the call failed without one."""

    def _cancel(self, handles: list[Any]) -> None:
        """Stop calls still running when the run stops."""

    def _close(self) -> None:
        """Release the engine."""


@dataclass
class RayExecutor(RemoteExecutor):
    """Jobs as Ray tasks (`ray.remote(num_cpus=cpus, num_gpus=gpus)`) on the cluster at
    `address`, or on a local instance with `parallel` x `cpus` CPUs when it is None."""

    address: str | None = None
    _remote: Any = None
    _started_here: bool = False

    def _ray(self):
        import ray  # installed: benchmarks.plan refuses --cluster.engine ray without it

        if self._remote is None:
            if not ray.is_initialized():
                repo = str(Path(__file__).resolve().parent.parent)
                # Workers import stepzoo from this checkout, with one torch thread per CPU declared.
                runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
                    filter(None, [repo, os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": str(self.cpus)}}
                local = {} if self.address else {"num_cpus": self.parallel * self.cpus,
                                                 "num_gpus": self.parallel * self.gpus, "include_dashboard": False}
                ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False, **local)
                self._started_here = True
            self._remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(remote_job)
        return ray

    def _submit(self, job: Job) -> Any:
        self._ray()
        return self._remote.remote(job, self.cpus)

    def _wait(self, handles: list[Any]) -> Any:
        done, _ = self._ray().wait(handles, num_returns=1)
        return done[0]

    def _result(self, handle: Any) -> Outcome:
        return self._ray().get(handle)

    def _cancel(self, handles: list[Any]) -> None:
        if handles:
            ray = self._ray()
            for handle in handles:
                ray.cancel(handle, force=True)

    def _close(self) -> None:
        if self._started_here:
            import ray

            ray.shutdown()


@dataclass
class SubmititExecutor(RemoteExecutor):
    """Jobs as Slurm jobs through submitit (`cluster` "slurm"), or as subprocesses of this
    machine through submitit's local executor (`cluster` "local"); logs in `folder`."""

    folder: Path = Path("submitit")
    cluster: str = "slurm"
    partition: str | None = None
    time_min: int = 24 * 60
    """Slurm's time limit per job, minutes: a job it stops is submitted again and resumes."""
    _executor: Any = None

    def _submitit(self):
        if self._executor is None:
            import submitit  # installed: benchmarks.plan refuses the submitit engines without it

            self._executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
            slurm = {"slurm_partition": self.partition} if self.partition and self.cluster == "slurm" else {}
            self._executor.update_parameters(
                timeout_min=self.time_min, cpus_per_task=self.cpus, gpus_per_node=self.gpus, nodes=1,
                tasks_per_node=1, name="stepzoo", **slurm,
            )
        return self._executor

    def _submit(self, job: Job) -> Any:
        return self._submitit().submit(remote_job, job, self.cpus)

    def _wait(self, handles: list[Any]) -> Any:
        while True:
            for handle in handles:
                if handle.done():
                    return handle
            time.sleep(0.5)

    def _result(self, handle: Any) -> Outcome:
        return handle.result()

    def _cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            handle.cancel(check=False)


def make_executor(args: Any, out: Path) -> Any:
    """The executor that `args` (`--jobs`, `--cluster.*`) asks for; submitit's logs go under `out`."""
    from benchmarks.jobs import ProcessExecutor

    cluster = args.cluster
    if cluster.engine == "processes":
        return ProcessExecutor(args.jobs)
    shared = dict(parallel=args.jobs, cpus=cluster.cpus, gpus=cluster.gpus, retries=cluster.retries)
    if cluster.engine == "ray":
        return RayExecutor(**shared, address=cluster.ray_address)
    return SubmititExecutor(**shared, folder=out / "submitit", cluster="slurm" if cluster.engine == "slurm" else "local",
                            partition=cluster.slurm_partition, time_min=cluster.slurm_time_min)
