"""A run folder's evaluation records as tables read them: one prompt set's rows (the
reported split unless asked), each (algorithm, seed)'s last complete evaluation, the rows'
order and the step counts' labels. The report (`benchmarks.report`), the peak
(`benchmarks.peak`), the verdict (`benchmarks.verdict`) and the tuner read records here."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from benchmarks.checkpoint import jsonl_exists, packed, read_jsonl

BASE = "base"
"""The untrained model's rows."""
RECORD_KEY = ["algo", "seed", "epoch", "eval_steps", "reward"]
"""What identifies one evaluation record."""


def steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def load_records(run_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """The run's evaluation records of one prompt set, one row per (algo, seed, epoch,
    eval_steps, reward), with the images per prompt each scored (`samples_per_prompt`).

    `split`: "test" or "validation"; None: the reported one, the test prompts when the run
    evaluated them (`--eval-split test` or `both`), else the validation prompts (a tuning
    run). Records written before runs named their split are of the run's `--eval-split`.
    """
    return load_records_and_base_curve(run_dir, split)[0]


def load_records_and_base_curve(run_dir: str | Path, split: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`load_records`, and from the same reading the base's rows scored on the curve's
    images (a run whose intermediate points score fewer images than its last,
    `curve_samples_per_prompt`), which `with_base` pairs with those points; none in a run
    recorded before them."""
    path = Path(run_dir) / "records.jsonl"
    if not jsonl_exists(path):
        raise FileNotFoundError(f"{path} does not exist (nor its packed copy {packed(path).name})")
    lines = read_jsonl(path)
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            # Every value of a record that can be null is a number (a cell with no finite score).
            records.append({key: math.nan if value is None else value for key, value in json.loads(line).items()})
        except json.JSONDecodeError:
            # A run killed while appending leaves at most its last line cut short.
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not valid JSON") from None
            warnings.warn(f"{path}: ignoring the truncated last line", stacklevel=2)
    if not records:
        raise ValueError(f"{path} holds no records")
    frame = pd.DataFrame(records)
    # Rows written before runs named their split (all of an old run's, or the reused rows of
    # one extended since) are of the run's --eval-split.
    frame["split"] = frame["split"].fillna(_recorded_split(Path(run_dir))) if "split" in frame \
        else _recorded_split(Path(run_dir))
    recorded = set(frame["split"])
    wanted = split or ("test" if "test" in recorded else "validation")
    frame = frame[frame["split"] == wanted]
    if frame.empty:
        raise ValueError(f"{path} holds no records of the {wanted} prompts (it holds {', '.join(sorted(recorded))})")
    config = _config(Path(run_dir))
    frame = _with_samples_per_prompt(frame, config)
    # A resumed run can evaluate an epoch again; its latest evaluation is the one that counts.
    frame = frame.drop_duplicates([*RECORD_KEY, "samples_per_prompt"], keep="last")
    full = config.get("eval_samples_per_prompt", frame.loc[frame["algo"] == BASE, "samples_per_prompt"].max())
    counts = frame["samples_per_prompt"]
    of_curve = (frame["algo"] == BASE) & counts.notna() & (counts != full)
    return frame[~of_curve].reset_index(drop=True), frame[of_curve].reset_index(drop=True)


def _with_samples_per_prompt(frame: pd.DataFrame, config: dict) -> pd.DataFrame:
    """`frame` with every row's images per prompt: rows written before records named them
    are of the full evaluation at epoch 0 and at the run's last epoch, of the curve's between
    (config.json's counts; unknown without one)."""
    full = config.get("eval_samples_per_prompt", math.nan)
    curve = config.get("curve_samples_per_prompt") or full
    inferred = frame["epoch"].map(lambda epoch: full if epoch in (0, config.get("epochs")) else curve)
    recorded = frame["samples_per_prompt"] if "samples_per_prompt" in frame else math.nan
    return frame.assign(samples_per_prompt=pd.Series(recorded, index=frame.index).fillna(inferred))


def _config(run_dir: Path) -> dict:
    config = run_dir / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def _recorded_split(run_dir: Path) -> str:
    return _config(run_dir).get("eval_split", "test")


def with_base(rows: pd.DataFrame, base: pd.DataFrame, base_curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """`rows` (trained rows of one prompt set) with `base`: the base's mean at the same seed,
    step count and reward, scored on the same images as the row (the same noise, so that
    their difference is paired) where `base_curve` (`load_records_and_base_curve`)
    holds that evaluation, else on the full evaluation's (`base`, the base's reported rows);
    NaN for a seed without a base row."""
    on = ["seed", "eval_steps", "reward"]
    paired = rows.merge(base[on + ["mean"]].rename(columns={"mean": "base"}), on=on, how="left")
    if base_curve is not None and not base_curve.empty and "samples_per_prompt" in rows:
        own = base_curve[[*on, "samples_per_prompt", "mean"]].rename(columns={"mean": "base_curve"})
        paired = paired.merge(own, on=[*on, "samples_per_prompt"], how="left", indicator=True)
        paired["base"] = paired["base"].where(paired.pop("_merge") != "both", paired["base_curve"])
        paired = paired.drop(columns="base_curve")
    return paired


def row_order(records: pd.DataFrame, algos: Sequence[str] | None = None) -> list[str]:
    """Base first (when recorded), then `algos` in the order given, or as first recorded."""
    recorded = list(dict.fromkeys(records["algo"]))
    trained = [algo for algo in dict.fromkeys(algos if algos is not None else recorded) if algo != BASE]
    return ([BASE] if BASE in recorded else []) + trained


def final_records(records: pd.DataFrame) -> pd.DataFrame:
    """Each (algo, seed)'s rows at its last fully evaluated epoch.

    An interrupted run stops at a smaller epoch; one killed in the middle of an evaluation
    leaves that epoch with fewer step counts than the others, so it is passed over.
    """
    per_epoch = records.groupby(["algo", "seed", "epoch"])["eval_steps"].nunique().rename("n").reset_index()
    per_epoch["full"] = per_epoch.groupby(["algo", "seed"])["n"].transform("max")
    complete = per_epoch[per_epoch["n"] == per_epoch["full"]]
    last = complete.groupby(["algo", "seed"])["epoch"].max().rename("last").reset_index()
    merged = records.merge(last, on=["algo", "seed"])
    return merged[merged["epoch"] == merged["last"]].drop(columns="last")
