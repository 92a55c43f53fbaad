"""(Algorithm, seed) runs per hour of one benchmark command at this checkout against another
commit, on this machine, in one sitting; and the records of each, compared.

    python -m benchmarks.speed_check                                  # tiny: 4 algorithms x 2 seeds, vs e821817
    python -m benchmarks.speed_check --against e821817 --jobs 2 -- --epochs 2 --eval-every 2
    python -m benchmarks.speed_check --also-preset tiny-turbo   # and the few-step model, --jobs 2

The other commit is checked out into a temporary git worktree and runs the same
`python -m benchmarks.run` command there (flags after `--` are passed to every run, so they
must exist at that commit); this
checkout runs it serially and with `--jobs N`. Each is one process from start to finish,
its start-up (imports, model and reward loading), base evaluations and report included, as
a user would wait for it. `--also-preset` adds a last run of this checkout with --jobs N on
another preset (the distilled few-step model, which samples without classifier-free
guidance): a different model, so its records are not compared, only its time. Runs per hour: (algorithms x seeds) / wall hours. Measure on an
otherwise idle machine: on shared cores the ratios mean little.

The records are compared too (every field but wall time, on the fields both commits
write): a change meant to be exact must leave them equal. Thread counts are left to torch
(all cores) for the serial runs, and one per worker under --jobs, as the runner sets them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
TIMING_FIELDS = ("wall_time",)
"""Record fields that measure time: the only ones a faster run may change."""


@dataclass
class SpeedCheck:
    """Runs per hour of this checkout (serial and --jobs N) against another commit."""

    against: str = "e821817"
    """The commit to compare with (any git revision), run from a temporary worktree."""
    preset: str = "tiny"
    """The preset of every run."""
    algos: str = "ddpo,rebel,d3po,sdpo"
    """Comma-separated algorithms of every run (the default: `make bench`'s)."""
    seeds: str = "0,1"
    """Comma-separated seeds of every run: runs = algorithms x seeds."""
    jobs: int = 2
    """Worker processes of this checkout's parallel run; 0 leaves that run out."""
    also_preset: str | None = None
    """A preset that this checkout also runs with --jobs N, after the others (same algorithms,
    seeds and flags)."""
    keep: str | None = None
    """Keep the run folders under this folder (default: deleted at the end)."""


@dataclass
class Measurement:
    label: str
    seconds: float
    out: Path


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _this_commit() -> str:
    head = _git("rev-parse", "--short", "HEAD")
    return head + ("+changes" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _run(tree: Path, argv: list[str], out: Path, log: Path) -> float:
    """Wall seconds of `python -m benchmarks.run ARGV --out OUT` with `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "benchmarks.run", *argv, "--out", str(out)]
    started = time.perf_counter()
    with open(log, "w") as stderr:
        result = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    seconds = time.perf_counter() - started
    if result.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"error: {shlex.join(command)} (in {tree}) exited {result.returncode}: {' / '.join(tail)}")
    return seconds


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def compare_records(mine: list[dict], theirs: list[dict]) -> str:
    """'identical' when the rows match on every field both write except wall time, else
    what differs."""
    if len(mine) != len(theirs):
        return f"DIFFERENT: {len(mine)} rows against {len(theirs)}"
    only = sorted({k for a, b in zip(mine, theirs) for k in a.keys() ^ b.keys()})
    differing = [i for i, (a, b) in enumerate(zip(mine, theirs))
                 if any(a[k] != b[k] for k in a.keys() & b.keys() if k not in TIMING_FIELDS)]
    fields = f" (compared on the fields both write; only one writes {', '.join(only)})" if only else ""
    if differing:
        first = mine[differing[0]]
        return (f"DIFFERENT in {len(differing)} of {len(mine)} rows{fields}, first: {first['algo']} seed "
                f"{first['seed']} epoch {first['epoch']} at {first['eval_steps']} steps")
    return "identical, wall times aside" + fields


def main(check: SpeedCheck, run_flags: list[str]) -> int:
    """Measure and print; `run_flags` go to every `benchmarks.run`."""
    algos, seeds = check.algos.split(","), check.seeds.split(",")
    runs = len(algos) * len(seeds)
    argv = ["--preset", check.preset, "--algos", check.algos, "--seeds", check.seeds, *run_flags]
    folder = Path(check.keep) if check.keep else Path(tempfile.mkdtemp(prefix="stepzoo-speed-"))
    folder.mkdir(parents=True, exist_ok=True)
    other = Path(tempfile.mkdtemp(prefix="stepzoo-speed-tree-")) / "tree"
    other_commit = _git("rev-parse", "--short", check.against)
    _git("worktree", "add", "--detach", str(other), check.against)
    this = _this_commit()
    plan = [(f"{other_commit} serial", other, argv), (f"{this} serial", REPO, argv)]
    if check.jobs:
        plan.append((f"{this} --jobs {check.jobs}", REPO, [*argv, "--jobs", str(check.jobs)]))
    if check.also_preset:
        other_preset = ["--preset", check.also_preset, *argv[2:]]
        plan.append((f"{this} --jobs {max(check.jobs, 1)} --preset {check.also_preset}", REPO,
                     [*other_preset, "--jobs", str(max(check.jobs, 1))]))
    print(f"{runs} (algorithm, seed) runs per command: python -m benchmarks.run {shlex.join(argv)}", flush=True)
    measured = []
    try:
        for label, tree, command in plan:
            out = folder / label.replace(" ", "_")
            seconds = _run(tree, command, out, folder / f"{out.name}.log")
            measured.append(Measurement(label, seconds, out))
            print(f"  {label}: {seconds:.0f} s", flush=True)
    finally:
        _git("worktree", "remove", "--force", str(other))
        shutil.rmtree(other.parent, ignore_errors=True)
    baseline = measured[0]
    print(f"\n| commit, mode | seconds | runs/hour | ratio to {baseline.label} |\n|---|---:|---:|---:|")
    for m in measured:
        print(f"| {m.label} | {m.seconds:.0f} | {runs * 3600 / m.seconds:.1f} | {baseline.seconds / m.seconds:.2f} |")
    print()
    for m in measured[1:]:
        if check.also_preset and m is measured[-1]:
            print(f"records of {m.label}: another model, not compared")
            continue
        reference = measured[1] if m is not measured[1] else baseline
        print(f"records of {m.label} against {reference.label}: "
              f"{compare_records(_records(m.out), _records(reference.out))}")
    if check.jobs and os.environ.get("OMP_NUM_THREADS") != "1":
        print("(the serial runs used torch's default thread count and the workers one thread each: float sums may "
              "round differently; at OMP_NUM_THREADS=1 they are equal, tests/test_jobs.py)")
    if not check.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    arguments, passed = sys.argv[1:], []
    if "--" in arguments:
        arguments, passed = arguments[: arguments.index("--")], arguments[arguments.index("--") + 1 :]
    sys.exit(main(tyro.cli(SpeedCheck, args=arguments, description=__doc__.split("\n\n")[0]), passed))
