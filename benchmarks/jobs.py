"""Jobs and executors: the independent runs of a benchmark invocation, and what runs them.

A `Job` is one seed's base evaluation or one (algorithm, seed, configuration) training
run. It reads the base model, writes only its own files in its run folder (its
checkpoint, `benchmarks.train.checkpoint_path`, its LoRA and sample strips) and hands its
rows and per-epoch metrics back, so jobs may run in any order and in any process, and
each resumes from its own checkpoint. The driver (`benchmarks.run`) is the only writer of
a run folder's shared files (records.jsonl, metrics.jsonl, the report).

An executor runs a list of jobs and yields each one with its rows as it finishes,
reporting what happens on the way through `JobEvents`:

- `SerialExecutor`: one after another in this process, on its accelerator (so also under
  `accelerate launch`, every process running each job together): `--jobs 1`.
- `ProcessExecutor`: in N worker processes, one torch thread each, and one GPU each
  (round-robin over the visible ones) where there are GPUs: `--jobs N`.

The cluster executors (Ray, Slurm through submitit) are in `benchmarks.cluster`, with the
same `run`: a job pickles, and its rows and events are plain values.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.loop import RunStopped
from benchmarks.train import BASE, JobSettings, ignore


@dataclass(frozen=True)
class Job:
    """One seed's base evaluation (`algo` BASE) or one training run of `algo` at `config`."""

    algo: str
    seed: int
    settings: JobSettings
    """The run's settings, its hooks left at their defaults: the executor sets them."""
    config: Any = None
    """The algorithm's config (zoo.registry); None for the base evaluation."""
    eval_rewards: tuple[str, ...] = ()
    """The rewards scored at evaluation besides the training reward (`settings.train_reward`)."""
    reward_paths: tuple[tuple[str, str], ...] = ()
    """`--reward-path` as (name, path) pairs."""

    @property
    def name(self) -> str:
        return f"{self.algo} seed {self.seed}"

    @property
    def rewards(self) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
        """What identifies the rewards a job loads: jobs with the same share them in a worker."""
        return self.settings.train_reward, self.eval_rewards, self.reward_paths


@dataclass
class JobEvents:
    """What an executor reports while it runs jobs, on the driver's process."""

    started: Callable[[Job], None] = ignore
    metrics: Callable[[Job, dict], None] = lambda job, row: None
    """One epoch's training metrics (a metrics.jsonl row)."""
    evaluations: Callable[[Job, list[dict]], None] = lambda job, records: None
    """One evaluation's records, as it is made."""


def load_rewards(job: Job, device) -> dict[str, Any]:
    """The training reward and the evaluation rewards of `job`, by name, training reward first."""
    from rewards.registry import load_reward

    paths = dict(job.reward_paths)
    loaded = {job.settings.train_reward: load_reward(job.settings.train_reward, device=device, paths=paths)}
    for name in job.eval_rewards:
        loaded[name] = load_reward(name, device=device, paths=paths, flag="--eval-rewards")
    return loaded


def job_accelerator(job: Job):
    """A fresh accelerator for one job in a worker (one keeps every model it prepared alive),
    on the GPU the worker sees, if any."""
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=job.settings.mixed_precision)


def run_job(job: Job, rewards: dict[str, Any], accelerator) -> list[dict]:
    """Run `job` here (resuming from its checkpoint) and return its rows. `rewards` as
    `load_rewards` gives them."""
    from benchmarks.train import evaluate_base, run_algorithm

    if job.algo == BASE:
        return evaluate_base(job.settings, job.seed, rewards, accelerator)
    train_reward = rewards[job.settings.train_reward]
    return run_algorithm(job.algo, job.config, job.seed, job.settings, train_reward, rewards, accelerator)


def with_hooks(job: Job, events: JobEvents, **settings: Any) -> Job:
    """`job` reporting its metrics and evaluations to `events`, with other `settings` replaced."""
    return dataclasses.replace(job, settings=dataclasses.replace(
        job.settings, log=lambda row: events.metrics(job, row),
        log_evaluations=lambda records: events.evaluations(job, records), **settings,
    ))


@dataclass
class SerialExecutor:
    """Every job in this process, in order, with rewards and an accelerator already made."""

    accelerator: Any
    rewards: dict[str, Any]

    def run(self, jobs: list[Job], events: JobEvents) -> Iterator[tuple[Job, list[dict]]]:
        for job in jobs:
            events.started(job)
            yield job, run_job(with_hooks(job, events), self.rewards, self.accelerator)


WORKER_EXIT_SECONDS = 60.0
"""How long the driver waits, once every job has reported, for each worker to exit on its own
before terminating it."""


class WorkerDied(RunStopped):
    """A worker process ended without reporting (killed by a signal, out of memory)."""


@dataclass
class ProcessExecutor:
    """Jobs in `workers` processes, each taking the next job when it finishes one. A job that
    fails stops the others (their checkpoints, written atomically, keep the last epoch each
    finished) and is raised here; `--resume` continues every job from its own checkpoint."""

    workers: int
    threads_per_worker: int = 1
    """Torch threads per worker: one, since two threads make one tiny run only ~1.1x faster
    than one while a second process doubles the throughput."""
    gpus: list[str] | None = None
    """The GPUs the workers take in turn (CUDA_VISIBLE_DEVICES entries); None: `visible_gpus()`."""

    def run(self, jobs: list[Job], events: JobEvents) -> Iterator[tuple[Job, list[dict]]]:
        context = multiprocessing.get_context("spawn")  # fork is unsafe after torch started threads or CUDA
        tasks, messages = context.Queue(), context.Queue()
        for number, job in enumerate(jobs):
            tasks.put((number, job))
        count = min(self.workers, len(jobs))
        gpus = visible_gpus() if self.gpus is None else self.gpus
        processes = []
        for index in range(count):
            tasks.put(None)
            gpu = gpus[index % len(gpus)] if gpus else None
            processes.append(context.Process(
                target=_work, args=(index, gpu, self.threads_per_worker, tasks, messages), daemon=True,
                name=f"stepzoo-job-worker-{index}",
            ))
        running: dict[int, int] = {}  # worker -> the number of the job it runs
        finished = 0
        ended = False  # every job reported: the workers have their end markers
        try:
            for process in processes:
                process.start()
            while finished < len(jobs):
                exitcodes = [process.exitcode for process in processes]
                try:
                    kind, worker, number, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    # Exit codes read before the wait: what a worker sent before it ended has
                    # arrived, so one that ended with its jobs unreported died (a kill, the
                    # out-of-memory killer, a failed start).
                    _check_alive(exitcodes, running, jobs)
                    continue
                job = jobs[number]
                if kind == "started":
                    running[worker] = number
                    events.started(job)
                elif kind == "metrics":
                    events.metrics(job, payload)
                elif kind == "evaluations":
                    events.evaluations(job, payload)
                elif kind == "finished":
                    del running[worker]
                    finished += 1
                    yield job, payload
                else:
                    raise payload
            ended = True
        finally:
            for process in processes:
                # A worker past its end marker is exiting on its own: terminated then, it
                # would leave its semaphores (tqdm's lock) for the resource tracker to
                # report as leaked at the driver's exit.
                process.join(timeout=WORKER_EXIT_SECONDS if ended else 0)
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join()
            for channel in (tasks, messages):
                channel.close()
                channel.join_thread()


def _check_alive(exitcodes: list[int | None], running: dict[int, int], jobs: list[Job]) -> None:
    """Raise WorkerDied when a worker ended other than by emptying the queue, or when every
    worker has ended with jobs unreported. `exitcodes`: the workers', None while running."""
    for worker, exitcode in enumerate(exitcodes):
        if exitcode not in (None, 0):
            what = jobs[running[worker]].name if worker in running else "a job"
            raise WorkerDied(
                f"{what}: its worker process died ({_exit_reason(exitcode)}); the other jobs were stopped; "
                "--resume continues each from its last checkpoint"
            )
    if all(exitcode is not None for exitcode in exitcodes):
        raise WorkerDied("every worker process ended with jobs unreported; --resume continues each from its last "
                         "checkpoint")


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [entry.strip() for entry in listed.split(",") if entry.strip()][: torch.cuda.device_count()]
    return [str(index) for index in range(torch.cuda.device_count())]


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _work(index: int, gpu: str | None, threads: int, tasks, messages) -> None:
    """A worker process: takes jobs until the queue's end marker, each on a fresh
    accelerator, with the rewards loaded once per reward set."""
    _die_with_driver()
    if gpu is not None:
        # Before CUDA starts in this process: the worker sees its one GPU as cuda:0.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import diffusers
    import torch
    import transformers

    torch.set_num_threads(threads)
    # Each job loads models: N workers' weight-loading bars would interleave with the
    # driver's one line per job.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    loaded: dict[tuple, dict[str, Any]] = {}
    while (task := tasks.get()) is not None:
        number, job = task
        messages.put(("started", index, number, None))
        try:
            accelerator = job_accelerator(job)
            if job.rewards not in loaded:
                loaded[job.rewards] = load_rewards(job, accelerator.device)
            events = JobEvents(
                metrics=lambda job, row: messages.put(("metrics", index, number, row)),
                evaluations=lambda job, records: messages.put(("evaluations", index, number, records)),
            )
            rows = run_job(with_hooks(job, events, progress_bars=False), loaded[job.rewards], accelerator)
        except Exception as error:  # reported to the driver, which stops the run
            messages.put(("failed", index, number, picklable(error, job)))
            return
        messages.put(("finished", index, number, rows))


def picklable(error: Exception, job: Job) -> Exception:
    """`error` itself when it pickles (stepzoo's own errors: the driver reports them as in a
    serial run), else a RuntimeError with the worker's traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{job.name}: {''.join(traceback.format_exception(error))}")


def _die_with_driver() -> None:
    """Linux: this worker is killed when the driver dies, instead of going on writing a
    checkpoint that a resumed run writes too."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class JobProgress:
    """One line per job started and finished, with the counts, for the jobs of a `--jobs N`
    run (N workers' progress bars would interleave)."""

    total: int
    label: Callable[[Job], str] = lambda job: job.name
    running: int = 0
    done: int = 0
    started_at: dict[int, float] = field(default_factory=dict)

    def started(self, job: Job) -> None:
        self.running += 1
        self.started_at[id(job)] = time.perf_counter()
        self._line(f"started {self.label(job)}")

    def finished(self, job: Job) -> None:
        self.running -= 1
        self.done += 1
        seconds = time.perf_counter() - self.started_at.pop(id(job), time.perf_counter())
        self._line(f"finished {self.label(job)} in {seconds:.0f} s")

    def _line(self, what: str) -> None:
        print(f"[jobs {self.done}/{self.total} done, {self.running} running] {what}", file=sys.stderr, flush=True)
