"""Compare the distillation methods of the few-step students: `python -m zoo.tiny.compare_turbo`.

Runs the build's stage 7 (`zoo.tiny.build --only turbo` / `--only flow-turbo`) once per
method into its own folder under --work (linking the shipped judge, base and flow models),
with every other setting at the shipped defaults, and measures each student as
`zoo.tiny.evaluate` measures the shipped models: the held-out prompts, 64 samples per step
count, the same seeds, the judge's fidelity and tiny-clip reward, without guidance. Writes
<out>/turbo-methods.json and prints a table; `python -m zoo.tiny.evaluate` puts it in the
README. `--jobs 2` runs two methods at a time (one torch thread each).

The winner's folder is what `--only turbo` (or `flow-turbo`) writes with that method and the
same seed: copy it to zoo/tiny/assets, or rerun the stage there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

from zoo import strict_json
from zoo.tiny import ASSETS

METHODS = {"turbo": ("endpoint", "consistency"), "flow-turbo": ("endpoint", "reflow")}
"""Stage -> the methods compared for it (zoo/tiny/turbo.py)."""
METHOD_FLAG = {"turbo": "--turbo-method", "flow-turbo": "--flow-turbo-method"}
FOLDER = {"turbo": "pipeline-turbo", "flow-turbo": "pipeline-flow-turbo"}
TEACHERS = ("clip", "pipeline", "pipeline-flow")


@dataclass(frozen=True)
class CompareConfig:
    work: Path = Path("build/turbo-methods")
    """Scratch folder: one build folder per (stage, method)."""
    out: Path = Path("results/tiny-world")
    assets: Path = ASSETS
    """Where the teachers and the judge are read from."""
    stages: tuple[str, ...] = ("turbo", "flow-turbo")
    jobs: int = 1
    """Methods built at once, each a process with one torch thread."""
    seed: int = 0


def _prepare(cfg: CompareConfig, stage: str, method: str) -> Path:
    folder = cfg.work / f"{stage}-{method}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in TEACHERS:
        link = folder / name
        if not link.exists():
            link.symlink_to((cfg.assets / name).resolve())
    return folder


def _build_and_measure(cfg: CompareConfig, stage: str, method: str) -> dict:
    folder = _prepare(cfg, stage, method)
    log = folder / "build.log"
    started = time.time()
    command = [sys.executable, "-m", "zoo.tiny.build", "--out", str(folder), "--seed", str(cfg.seed), "--only", stage,
               METHOD_FLAG[stage], method]
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = round(time.time() - started, 1)
    measured = subprocess.run(
        [sys.executable, "-m", "zoo.tiny.evaluate", "--assets", str(folder), "--measure-folder", FOLDER[stage]],
        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = json.loads(measured.stdout.strip().splitlines()[-1])
    record = json.loads((folder / "build_info.json").read_text())["stage_records"][stage]
    print(f"{stage} {method}: {seconds}s, fidelity " + " ".join(f"{r['steps']}:{r['fidelity']:.3f}" for r in rows), flush=True)
    return dict(stage=stage, method=method, build_seconds=seconds, record=record, steps=rows,
                command=" ".join(["python", "-m", "zoo.tiny.build", *command[3:]]))


def main() -> None:
    cfg = tyro.cli(CompareConfig)
    jobs = [(stage, method) for stage in cfg.stages for method in METHODS[stage]]
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        results = list(pool.map(lambda job: _build_and_measure(cfg, *job), jobs))
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "turbo-methods.json"
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in old if (r["stage"], r["method"]) not in set(jobs)]
    path.write_text(strict_json.dumps(kept + results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
