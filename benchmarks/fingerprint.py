"""Every number a short run of every algorithm produces, on each tiny model and task, as one
JSON file: the check that a refactor changed no number.

A refactor that claims "behaviour unchanged" runs this before and after and diffs the two
files; any row that differs names the preset, task, algorithm and field that moved.

    python -m benchmarks.fingerprint --out /tmp/before.json
    ... refactor ...
    python -m benchmarks.fingerprint --out /tmp/after.json --compare /tmp/before.json

Two epochs of eight trajectories at K=2 per algorithm: every code path of the loop (sampling,
the rewards, every loss, the curve evaluation) in about 20 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro

from zoo import strict_json

PRESETS = ("tiny", "tiny-turbo", "tiny-flow", "tiny-flow-turbo")
TASKS = ("tiny-aesthetic", "tiny-align")
# Fields that measure the machine, not the computation.
CLOCK_FIELDS = frozenset({"wall_time", "seconds", "samples_per_second"})


def _without_clocks(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in CLOCK_FIELDS}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [_without_clocks(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def run_case(preset: str, task: str, folder: Path) -> dict:
    """One preset and task, every algorithm, seed 0: its records and metrics without clocks."""
    command = [
        sys.executable, "-m", "benchmarks.run",
        "--preset", preset, "--reward", task, "--algos", "all", "--seeds", "0",
        "--epochs", "2", "--eval-every", "1", "--trajectories-per-epoch", "8",
        "--eval-samples-per-prompt", "1", "--train-steps", "2", "--eval-steps", "1,2",
        # One update per epoch each at this size, as the runner's micro tests have it.
        "--d3po.gradient-accumulation-steps", "1", "--sdpo.gradient-accumulation-steps", "2",
        "--out", str(folder),
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-4000:]}")
    return {"records": _rows(folder / "records.jsonl"), "metrics": _rows(folder / "metrics.jsonl")}


def differences(before: dict, after: dict) -> list[str]:
    """One line per case, table and row that differs, naming the first differing field."""
    lines = []
    for case in sorted(set(before) | set(after)):
        if case not in before or case not in after:
            lines.append(f"{case}: only in {'after' if case in after else 'before'}")
            continue
        for table in ("records", "metrics"):
            old, new = before[case][table], after[case][table]
            if len(old) != len(new):
                lines.append(f"{case} {table}: {len(old)} rows before, {len(new)} after")
            for index, (a, b) in enumerate(zip(old, new)):
                if a != b:
                    field = next(key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key))
                    lines.append(f"{case} {table}[{index}] {field}: {a.get(field)!r} -> {b.get(field)!r}")
    return lines


@dataclass
class Args:
    out: Path
    """Where the fingerprint JSON goes."""
    compare: Path | None = None
    """An earlier fingerprint: print every difference and exit 1 if any."""
    presets: tuple[str, ...] = PRESETS
    tasks: tuple[str, ...] = TASKS


def main(args: Args) -> None:
    if args.compare is not None and not args.compare.is_file():
        raise SystemExit(f"--compare {args.compare}: no such file; make one first with --out")
    fingerprint = {}
    with tempfile.TemporaryDirectory() as scratch:
        for preset in args.presets:
            for task in args.tasks:
                case = f"{preset}/{task}"
                print(f"fingerprint: {case}", flush=True)
                fingerprint[case] = run_case(preset, task, Path(scratch) / case)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(strict_json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    rows = sum(len(case["records"]) + len(case["metrics"]) for case in fingerprint.values())
    print(f"fingerprint: {len(fingerprint)} cases, {rows} rows -> {args.out}")
    if args.compare is not None:
        # NaN as null on both sides: NaN equals nothing, null equals null.
        before = strict_json.finite_or_null(json.loads(args.compare.read_text()))
        lines = differences(before, strict_json.finite_or_null(fingerprint))
        print("\n".join(lines) if lines else f"fingerprint: identical to {args.compare}")
        if lines:
            raise SystemExit(1)


if __name__ == "__main__":
    main(tyro.cli(Args))
