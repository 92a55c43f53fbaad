"""Train every algorithm from the same base under the same budget and tabulate held-out
reward against the number of sampling steps.

    python -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore
    accelerate launch --num_processes 8 -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore

Every input is checked before any model loads (names, weights, sizes, the output
folder); a bad one ends the run with one line naming the flag and exit code 2. A run
that cannot go on (a diverged loss, a failing reward, a full disk) ends with one line
and exit code 1, its last good checkpoint intact for `--resume`.

This module is the execution: `main` parses the flags (`benchmarks.cli`) and plans the run
(`benchmarks.plan`), then `execute` runs its jobs (`benchmarks.jobs`: each one
`benchmarks.train`'s training or base evaluation, which writes that job's checkpoint, LoRA
and sample strips). It owns the Accelerator of a serial run (the `--jobs` workers build
their own), the wandb tracker, and the run folder's shared files: config.json,
records.jsonl, metrics.jsonl and the report, which only this process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from benchmarks.cli import UsageError, parse_args
from benchmarks.plan import Plan, make_plan
from benchmarks.run_folder import clear_redone, reused_rows
from benchmarks.train import BASE
from zoo import strict_json


def execute(plan: Plan) -> str:
    """Run the plan: base evaluation and training per seed and algorithm (in --jobs worker
    processes when it says more than 1, on Ray or Slurm when --cluster.engine says so), then the report."""
    if in_workers(plan):
        return execute_in_workers([plan])[0]
    import torch
    from accelerate import Accelerator

    from benchmarks.checkpoint import write_jsonl
    from benchmarks.jobs import JobEvents, SerialExecutor
    from benchmarks.report import write_report
    from rewards.registry import load_reward

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=plan.preset.mixed_precision if on_gpu else "no")
    # The rewards first: one that cannot be built (RewardUnavailable) stops the run before
    # anything is written or any diffusion model loads.
    train_reward = load_reward(plan.reward, device=accelerator.device, paths=plan.reward_paths)
    eval_rewards = {plan.reward: train_reward}
    for name in plan.eval_rewards:
        eval_rewards[name] = load_reward(name, device=accelerator.device, paths=plan.reward_paths,
                                         flag="--eval-rewards")
    if accelerator.is_main_process:
        _start_folder(plan)
    accelerator.wait_for_everyone()

    tracker = None
    if plan.args.wandb and accelerator.is_main_process:
        from benchmarks.tracking import Tracker

        tracker = Tracker(plan.out_dir, plan.args.wandb_project)
    logger = _make_logger(plan, accelerator.is_main_process, tracker)
    # Rows already finished are reused as recorded: an extension's base and algorithm
    # rows, and a resumed run's whose checkpoints were not kept (committed results).
    rows = reused_rows(plan)
    events = JobEvents(metrics=lambda job, row: logger(row),
                       evaluations=lambda job, records: tracker.log_evaluations(records) if tracker else None)
    jobs = plan_jobs(plan, rows, plan.preset.mixed_precision if on_gpu else "no")
    for job, job_rows in SerialExecutor(accelerator, eval_rewards).run(jobs, events):
        rows[job.algo, job.seed] = job_rows
        if job.algo != BASE and accelerator.is_main_process:
            write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows))
    table = ""
    if accelerator.is_main_process:
        write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows))
        table = write_report(plan.out_dir, reward=plan.reward, algos=plan.algos)
        if tracker:
            tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return table


def in_workers(plan: Plan) -> bool:
    """Whether the plan's jobs run outside this process (`execute_in_workers`)."""
    return plan.args.jobs > 1 or plan.args.cluster.engine != "processes"


def execute_in_workers(plans: list[Plan]) -> list[str]:
    """Run the plans' jobs together in `--jobs` worker processes (`benchmarks.jobs.ProcessExecutor`),
    this process the only writer of each run folder's shared files; returns each plan's table.
    Every plan's records equal a serial run's, since each job computes what it would there."""
    import torch

    from benchmarks.checkpoint import write_jsonl
    from benchmarks.cluster import make_executor
    from benchmarks.jobs import JobEvents, JobProgress, load_rewards
    from benchmarks.report import write_report

    mixed_precision = plans[0].preset.mixed_precision if torch.cuda.is_available() else "no"
    folders = {plan.out_dir: plan for plan in plans}
    rows = {plan.out_dir: reused_rows(plan) for plan in plans}
    jobs = [job for plan in plans for job in plan_jobs(plan, rows[plan.out_dir], mixed_precision)]
    # The rewards are built here once, only to refuse one that cannot be (RewardUnavailable)
    # before anything is written; the workers build their own.
    checked = set()
    for job in jobs:
        if job.rewards not in checked:
            load_rewards(job, "cpu")
            checked.add(job.rewards)
    trackers, loggers = {}, {}
    for plan in plans:
        _start_folder(plan)
        if plan.args.wandb:
            from benchmarks.tracking import Tracker

            trackers[plan.out_dir] = Tracker(plan.out_dir, plan.args.wandb_project)
        loggers[plan.out_dir] = _make_logger(plan, True, trackers.get(plan.out_dir), in_plan_order=True)

    several = len(plans) > 1
    progress = JobProgress(len(jobs), lambda job: f"{job.settings.out_dir.name}: {job.name}" if several else job.name)

    def evaluations(job, records) -> None:
        if job.settings.out_dir in trackers:
            trackers[job.settings.out_dir].log_evaluations(records)

    events = JobEvents(started=progress.started, metrics=lambda job, row: loggers[job.settings.out_dir](row),
                       evaluations=evaluations)
    args = plans[0].args
    executor = make_executor(args, plans[0].out_dir)
    if jobs and args.cluster.engine == "processes":
        print(f"{len(jobs)} jobs in {min(executor.workers, len(jobs))} worker processes, "
              f"{executor.threads_per_worker} torch thread each", file=sys.stderr, flush=True)
    elif jobs:
        print(f"{len(jobs)} jobs on {args.cluster.engine}, at most {args.jobs} at once, {args.cluster.cpus} CPU and "
              f"{args.cluster.gpus} GPU each", file=sys.stderr, flush=True)
    for job, job_rows in executor.run(jobs, events):
        progress.finished(job)
        out = job.settings.out_dir
        rows[out][job.algo, job.seed] = job_rows
        write_jsonl(out / "records.jsonl", _in_plan_order(folders[out], rows[out]))
    tables = []
    for plan in plans:
        write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows[plan.out_dir]))
        tables.append(write_report(plan.out_dir, reward=plan.reward, algos=plan.algos))
        if plan.out_dir in trackers:
            trackers[plan.out_dir].finish()
    return tables


def _start_folder(plan: Plan) -> None:
    """The run folder with the plan's config.json (main process only)."""
    import shutil

    from benchmarks.checkpoint import write_text

    out = plan.out_dir
    # Only a folder that holds a run is ever deleted (`check_out_dir` refused others).
    if plan.args.overwrite and (out / "config.json").exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_redone(plan)
    write_text(out / "config.json", strict_json.dumps(plan.config_json(), indent=2) + "\n")


def plan_jobs(plan: Plan, rows: dict[tuple[str, int], list[dict]], mixed_precision: str) -> list:
    """The plan's jobs whose rows `rows` lacks, in the order a serial run takes them: per
    seed, the base evaluation (also when its rows lack one of its evaluations), then each
    algorithm that has the seed."""
    from benchmarks.jobs import Job
    from benchmarks.train import JobSettings, missing_base_evaluations

    jobs = []
    for seed in plan.seeds:
        settings = JobSettings(
            model=plan.model_source,
            epochs=plan.epochs,
            trajectories_per_epoch=plan.trajectories_per_epoch,
            groups_per_prompt=plan.groups_per_prompt,
            resolution=plan.preset.resolution,
            train_prompts=plan.preset.train_prompts,
            eval_every=plan.eval_every,
            eval=plan.eval_settings(seed),
            selection_eval=plan.eval_settings(seed, "validation") if plan.eval_split == "both" else None,
            curve_samples_per_prompt=plan.curve_samples_per_prompt,
            mixed_precision=mixed_precision,
            train_reward=plan.reward,
            out_dir=plan.out_dir,
            max_bad_reward_batches=plan.args.max_bad_reward_batches,
            performance=plan.args.performance,
            loop=plan.loop,
            ema=plan.args.ema,
            finetune=plan.args.finetune,
            fsdp=plan.args.fsdp,
        )
        # A base whose rows lack an evaluation (the curve's, in a run recorded before the base
        # was evaluated on the curve's images) is evaluated again.
        base_done = (BASE, seed) in rows and not missing_base_evaluations(settings, rows[BASE, seed])
        for name in [BASE, *plan.algos]:
            done = base_done if name == BASE else (name, seed) in rows
            if seed in plan.seeds_of(name) and not done:
                jobs.append(Job(name, seed, settings, None if name == BASE else plan.configs[name],
                                tuple(plan.eval_rewards), tuple(sorted(plan.reward_paths.items()))))
    return jobs


def _in_plan_order(plan: Plan, rows: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Every finished row, per seed: base, then the algorithms in the plan's order."""
    return [row for seed in plan.seeds for name in [BASE, *plan.algos] for row in rows.get((name, seed), [])]


def _make_logger(plan: Plan, main_process: bool, tracker, in_plan_order: bool = False):
    """Per-epoch training metrics to metrics.jsonl (and wandb when asked), main process only.
    `in_plan_order`: the rows sorted as a serial run logs them (per seed, base then the
    algorithms, epochs in order), for jobs that log side by side."""
    if not main_process:
        return lambda row: None
    from benchmarks.checkpoint import read_jsonl, write_jsonl

    path = plan.out_dir / "metrics.jsonl"
    # A resumed run logs again the epochs after its last checkpoint: rows are keyed by
    # epoch, so the new row replaces the interrupted run's and each epoch appears once.
    rows = {}
    for line in read_jsonl(path):
        row = json.loads(line)
        rows[row["algo"], row["seed"], row["epoch"]] = row

    order = {(name, seed): i for i, (seed, name) in enumerate((s, n) for s in plan.seeds for n in [BASE, *plan.algos])}

    def log(row: dict) -> None:
        rows[row["algo"], row["seed"], row["epoch"]] = row
        kept = sorted(rows, key=lambda key: (order.get(key[:2], len(order)), key[2])) if in_plan_order else rows
        write_jsonl(path, [rows[key] for key in kept])
        if tracker:
            tracker.log_metrics(row)

    return log


def _main_process_first(num_processes: int) -> contextlib.AbstractContextManager:
    """Under `accelerate launch`, the main process plans (and downloads) first and the
    others then find everything in the cache; a single process just plans."""
    if num_processes == 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    # The state `execute`'s Accelerator then shares: the same device choice as there.
    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.checkpoint import CorruptCheckpoint, WriteFailed
    from benchmarks.loop import RunStopped
    from rewards.errors import RewardUnavailable
    from zoo.hub import DownloadFailed
    from zoo.loading import ModelUnavailable

    argv = sys.argv[1:] if argv is None else argv
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(argv)
        with _main_process_first(num_processes):
            plan = make_plan(args, num_processes=num_processes)
    except (UsageError, RewardUnavailable, ModelUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DownloadFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        table = execute(plan)
    except RewardUnavailable as error:  # a reward that cannot be built: a bad input, found as it loads
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RunStopped, WriteFailed, CorruptCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if table:
        print(table)
        print(f"\nresults in {plan.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
