"""Weights & Biases tracking of a benchmark run (`--wandb`), on the main process only.

One wandb run per results folder: named after the folder, its files under the folder,
its config the folder's `config.json`, offline unless WANDB_MODE says otherwise (then
`wandb sync RESULTS/wandb/offline-run-*` uploads it). It logs

- every per-epoch training metrics row (the rows of `metrics.jsonl`) as
  `train/{algo}/seed{seed}/{metric}`, against `epoch`;
- every evaluation as it happens, the mean as `eval/{reward}/{algo}/seed{seed}/steps{k}`
  and the std over its images as `eval_std/...`, against `samples_seen`: one chart per
  reward and algorithm with the `steps*` keys on it draws reward against training
  samples, one line per step count; the untrained model is algo `base`;
- when the run ends, the report: `samples.png` and the `curves*.png` as images and each
  `table*.csv` as a table, under `report/`.

Resume: the wandb run id is kept in the folder's `wandb_run_id`, and `--resume` passes it
back with resume="allow", so that online the resumed run continues the same wandb run
(already logged evaluations and epochs are not logged again). wandb 0.31 does not resume
offline runs: offline, the resumed part is a second `offline-run-*` folder with the same
id, and only what was logged after the resume is in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks.checkpoint import write_text

RUN_ID_FILE = "wandb_run_id"
"""The file in a results folder that holds its wandb run id, for `--resume`."""


class WandbMissing(ValueError):
    """`--wandb` was passed and the wandb package cannot be imported."""


def require_wandb() -> None:
    """Refuse `--wandb` before anything loads when the package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbMissing("--wandb: the wandb package is not installed; pip install wandb, or leave out --wandb") from None


class Tracker:
    """The wandb run of one results folder."""

    def __init__(self, out_dir: Path, project: str):
        import wandb

        self.out_dir = out_dir
        id_path = out_dir / RUN_ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else None
        self.run = wandb.init(
            project=project,
            name=out_dir.name,
            dir=str(out_dir),
            config=json.loads((out_dir / "config.json").read_text()),
            id=run_id,
            resume="allow",
            mode=None if "WANDB_MODE" in os.environ else "offline",
            # A run that an earlier benchmark in this process left unfinished (it raised)
            # is finished, not handed back to log into.
            reinit="finish_previous",
        )
        if run_id is None:
            write_text(id_path, self.run.id + "\n")
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")
        self.run.define_metric("samples_seen")
        self.run.define_metric("eval/*", step_metric="samples_seen")
        self.run.define_metric("eval_std/*", step_metric="samples_seen")

    def log_metrics(self, row: dict[str, Any]) -> None:
        """One epoch's training metrics (a `metrics.jsonl` row)."""
        prefix = f"train/{row['algo']}/seed{row['seed']}"
        metrics = {f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, float)}
        self.run.log({"epoch": row["epoch"], **metrics})

    def log_evaluations(self, records: list[dict[str, Any]]) -> None:
        """One evaluation's records: one checkpoint (so one `samples_seen`), every step
        count and reward."""
        values: dict[str, Any] = {"samples_seen": records[0]["samples_seen"]}
        for r in records:
            name = f"{r['reward']}/{r['algo']}/seed{r['seed']}/steps{r['eval_steps']}"
            values[f"eval/{name}"] = r["mean"]
            values[f"eval_std/{name}"] = r["std"]
        self.run.log(values)

    def finish(self) -> None:
        """Log the report's images and tables (those the folder holds), then close the run."""
        import pandas as pd
        import wandb

        report: dict[str, Any] = {}
        for path in sorted(self.out_dir.glob("curves*.png")) + sorted(self.out_dir.glob("samples.png")):
            report[f"report/{path.stem}"] = wandb.Image(str(path))
        for path in sorted(self.out_dir.glob("table*.csv")):
            report[f"report/{path.stem}"] = wandb.Table(dataframe=pd.read_csv(path))
        if report:
            self.run.log(report)
        self.run.finish()
