"""The benchmark's report: step-generalization tables, reward curves and a sample grid.

Everything is derived from a run folder, so a finished (or interrupted) run can be
re-reported without training: `python -m benchmarks.report RUN_DIR --reward tiny-clip`.

Inputs, as the runner writes them:
- `records.jsonl`: one evaluation per line (algo, seed, epoch, samples_seen, eval_steps,
  reward, mean, std, count, reward_calls, reward_images, wall_time). The untrained model is
  algo "base" at epoch 0; every algorithm's curve starts from the base of the same seed.
- `samples/{algo}_seed{seed}_steps{k}.png`: one strip of the evaluation prompts per
  algorithm, seed and step count, at the final checkpoint.

Outputs, next to them: `table.md`, `table.csv` and `curves.png` for the training reward;
`table_<reward>.csv` and `curves_<reward>.png` for every extra held-out reward (their
tables are appended to `table.md`, so reward hacking is visible next to the gains); and
`samples.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

BASE = "base"
RECORD_KEY = ["algo", "seed", "epoch", "eval_steps", "reward"]
# Final training budget per row: record field -> table column.
BUDGET_COLUMNS = {
    "epoch": "epochs",
    "samples_seen": "samples",
    "reward_calls": "reward calls",
    "wall_time": "wall time (s)",
}
STRIP_NAME = re.compile(r"(?P<algo>.+)_seed(?P<seed>\d+)_steps(?P<steps>\d+)\.png")
# Sample cells are resized to this height range: tiny-world images (32 px) are too small
# to judge, SD-sized strips would make a grid of tens of megapixels.
MIN_CELL_HEIGHT, MAX_CELL_HEIGHT = 128, 256


def steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def spread_label(steps: int) -> str:
    return f"{steps_label(steps)} spread"


def file_suffix(reward: str) -> str:
    """A reward name made safe for a file name (weighted sums carry `*`, `+`, spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", reward)


def load_records(run_dir: str | Path) -> pd.DataFrame:
    """The run's evaluation records, one row per (algo, seed, epoch, eval_steps, reward)."""
    path = Path(run_dir) / "records.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed while appending leaves at most its last line cut short.
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not valid JSON") from None
            warnings.warn(f"{path}: ignoring the truncated last line", stacklevel=2)
    if not records:
        raise ValueError(f"{path} holds no records")
    frame = pd.DataFrame(records)
    # A resumed run can evaluate an epoch again; its latest evaluation is the one that counts.
    return frame.drop_duplicates(RECORD_KEY, keep="last").reset_index(drop=True)


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


def summary_table(records: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """The step-generalization table of one reward's records, indexed by algorithm.

    Per step count, `<k> steps` is the mean over seeds of the final evaluation's mean, and
    `<k> steps spread` the std over seeds (ddof 1) when the cell has two or more seeds,
    otherwise the single evaluation's standard error (its std over its images / √count),
    which is what tells whether two rows' means differ. `seeds` counts the seeds; the
    budget columns are final values, mean over seeds. Rows without records are all NaN.
    """
    final = final_records(records)
    steps = sorted(records["eval_steps"].unique())
    cells = final.groupby(["algo", "eval_steps"]).agg(
        mean=("mean", "mean"), seed_std=("mean", "std"), eval_std=("std", "first"), count=("count", "first"),
        seeds=("seed", "nunique"),
    )
    eval_error = cells["eval_std"] / cells["count"].clip(lower=1) ** 0.5
    cells["spread"] = cells["seed_std"].where(cells["seeds"] >= 2, eval_error)
    table = pd.DataFrame(index=pd.Index(list(rows), name="algorithm"))
    for k in steps:
        at_k = cells.xs(k, level="eval_steps")
        table[steps_label(k)] = at_k["mean"].reindex(table.index)
        table[spread_label(k)] = at_k["spread"].reindex(table.index)
    table["seeds"] = final.groupby("algo")["seed"].nunique().reindex(table.index)
    # Budget counters are the same at every step count of an evaluation; one row per seed.
    budget = final.groupby(["algo", "seed"])[list(BUDGET_COLUMNS)].max().groupby("algo").mean()
    for field, column in BUDGET_COLUMNS.items():
        table[column] = budget[field].reindex(table.index)
    return table


def _decimals(spreads: pd.Series) -> int:
    """Decimals that show the smallest positive spread to two significant figures."""
    positive = spreads[spreads > 0]
    if positive.empty:
        return 3
    return min(6, max(1, 1 - math.floor(math.log10(positive.min()))))


def _count(value: float) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _caption(table: pd.DataFrame, reward: str, training: bool, counts: Sequence[int]) -> str:
    images = "/".join(str(c) for c in sorted(set(counts)))
    kind = "training" if training else "held-out, not trained on"
    seeds = table["seeds"].dropna()
    several, single = seeds[seeds >= 2], seeds[seeds == 1]
    if single.empty:
        over = f"{int(seeds.iloc[0])} seeds" if seeds.nunique() == 1 else "seeds"
        spread = f"mean over {over} ± std over seeds (ddof 1)"
    elif several.empty:
        spread = f"single seed: mean ± its standard error over {images} images (std / √n)"
    else:
        spread = (
            "mean over seeds ± std over seeds (ddof 1); rows with a single seed "
            f"({', '.join(single.index)}) show ± the standard error over {images} images instead"
        )
    parts = [
        f"Mean {reward} reward ({kind}) of {images} held-out images at each row's last evaluated epoch; "
        f"{spread}. Budget columns: final values, mean over seeds."
    ]
    trained = table.drop(index=BASE, errors="ignore")
    longest = trained["epochs"].max()
    for algo, epochs in trained["epochs"].items():
        if pd.isna(epochs):
            parts.append(f"{algo}: no evaluation recorded.")
        elif epochs < longest:
            parts.append(f"{algo} stopped at epoch {_count(epochs)} of {_count(longest)} (interrupted).")
    return " ".join(parts)


def markdown_table(table: pd.DataFrame, reward: str, training: bool, counts: Sequence[int]) -> str:
    """One titled Markdown table with its caption line underneath."""
    step_columns = [c for c in table.columns if c.endswith(("step", "steps"))]
    decimals = _decimals(table[[f"{c} spread" for c in step_columns]].stack())
    header = ["algorithm", *step_columns, *BUDGET_COLUMNS.values()]
    lines = [
        f"### {reward} ({'training reward' if training else 'extra held-out reward'})",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for algo, row in table.iterrows():
        cells = [
            "–" if pd.isna(row[c]) else f"{row[c]:.{decimals}f} ± {row[f'{c} spread']:.{decimals}f}"
            for c in step_columns
        ]
        budget = [_count(row[c]) for c in BUDGET_COLUMNS.values()]
        budget[-1] = "–" if pd.isna(row["wall time (s)"]) else f"{row['wall time (s)']:.1f}"
        lines.append("| " + " | ".join([str(algo), *cells, *budget]) + " |")
    lines += ["", _caption(table, reward, training, counts)]
    return "\n".join(lines)


def curve_points(records: pd.DataFrame, algo: str, steps: int) -> pd.DataFrame:
    """One algorithm's curve at one step count: per epoch, samples seen and the mean,
    min and max over seeds, starting from the base evaluation of the same seeds."""
    own = records[(records["algo"] == algo) & (records["eval_steps"] == steps)]
    base = records[(records["algo"] == BASE) & (records["eval_steps"] == steps) & records["seed"].isin(own["seed"])]
    # Seeds whose algorithm rows already include epoch 0 need no base prepended.
    base = base[~base["seed"].isin(own.loc[own["epoch"] == 0, "seed"])]
    points = pd.concat([base.assign(epoch=0, samples_seen=0), own])
    return (
        points.groupby("epoch")
        .agg(samples=("samples_seen", "mean"), mean=("mean", "mean"), low=("mean", "min"), high=("mean", "max"))
        .sort_index()
    )


def plot_curves(records: pd.DataFrame, reward: str, rows: Sequence[str], path: Path) -> None:
    """The SDPO paper's figure: reward against training samples, one panel per step count."""
    steps = sorted(records["eval_steps"].unique())
    figure, axes = plt.subplots(
        1, len(steps), figsize=(4.2 * len(steps), 3.6), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, k in zip(axes[0], steps):
        base = records[(records["algo"] == BASE) & (records["eval_steps"] == k)]
        if not base.empty:
            ax.axhline(base["mean"].mean(), color="0.5", linestyle=":", linewidth=1, label=BASE)
        for index, algo in enumerate(a for a in rows if a != BASE):
            curve = curve_points(records, algo, k)
            if curve.empty:
                continue
            color = f"C{index}"
            ax.plot(curve["samples"], curve["mean"], marker="o", markersize=3, color=color, label=algo)
            ax.fill_between(curve["samples"], curve["low"], curve["high"], color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{reward} vs samples at {steps_label(k)}")
        ax.set_xlabel("training samples seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean {reward} (held-out prompts)")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="outside right center")
    figure.suptitle(f"Step generalization: {reward} reward vs training samples (mean over seeds, band: min–max)")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except ImportError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def compose_samples(run_dir: Path, rows: Sequence[str], path: Path) -> bool:
    """Grid of the final sample strips: rows algorithms (base first), columns step counts.

    One seed for the whole grid, the smallest with any strip, so every cell shows the same
    prompts and noise; missing strips leave their cell blank. Returns False, writing
    nothing, when there is no strip at all.
    """
    found = {}
    for file in sorted((run_dir / "samples").glob("*.png")):
        match = STRIP_NAME.fullmatch(file.name)
        if match and match["algo"] in rows:
            found[match["algo"], int(match["seed"]), int(match["steps"])] = file
    if not found:
        return False
    seed = min(s for _, s, _ in found)
    strips = {(algo, k): Image.open(file).convert("RGB") for (algo, s, k), file in found.items() if s == seed}
    grid_rows = [algo for algo in rows if any(a == algo for a, _ in strips)]
    grid_columns = sorted({k for _, k in strips})

    tallest = max(image.height for image in strips.values())
    height = min(MAX_CELL_HEIGHT, max(MIN_CELL_HEIGHT, tallest))
    for key, image in strips.items():
        width = round(image.width * height / image.height)
        enlarging = height > image.height
        strips[key] = image.resize((width, height), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)

    font = _font(max(14, height // 8))
    pad = 8
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    corner = f"seed {seed}"
    label_width = max(measure.textlength(text, font=font) for text in [*grid_rows, corner])
    text_height = measure.textbbox((0, 0), "Ag", font=font)[3]
    left, top = int(label_width) + 2 * pad, text_height + 2 * pad
    widths = [max((strips[a, k].width for a in grid_rows if (a, k) in strips)) for k in grid_columns]
    canvas = Image.new(
        "RGB", (left + sum(widths) + pad * len(widths), top + (height + pad) * len(grid_rows)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), corner, fill="gray", font=font)
    x = left
    for k, width in zip(grid_columns, widths):
        draw.text((x, pad), steps_label(k), fill="black", font=font)
        for r, algo in enumerate(grid_rows):
            if (algo, k) in strips:
                canvas.paste(strips[algo, k], (x, top + r * (height + pad)))
        x += width + pad
    for r, algo in enumerate(grid_rows):
        draw.text((pad, top + r * (height + pad) + (height - text_height) // 2), algo, fill="black", font=font)
    canvas.save(path)
    return True


def write_report(run_dir: str | Path, reward: str, algos: Sequence[str] | None = None) -> str:
    """Write tables, curves and the sample grid of a run folder; return `table.md`'s text.

    `reward` is the training reward; any other recorded reward gets its own table and
    curves. `algos` orders the rows after base (default: order of first appearance).
    """
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    recorded = list(dict.fromkeys(records["reward"]))
    if reward not in recorded:
        raise ValueError(f"reward {reward!r} is not in {run_dir / 'records.jsonl'}; recorded: {', '.join(recorded)}")
    rows = row_order(records, algos)
    sections = []
    for name in [reward, *(r for r in recorded if r != reward)]:
        training = name == reward
        of_reward = records[records["reward"] == name]
        table = summary_table(of_reward, rows)
        suffix = "" if training else f"_{file_suffix(name)}"
        table.to_csv(run_dir / f"table{suffix}.csv")
        sections.append(markdown_table(table, name, training, final_records(of_reward)["count"].tolist()))
        plot_curves(of_reward, name, rows, run_dir / f"curves{suffix}.png")
    text = "\n\n".join(sections) + "\n"
    (run_dir / "table.md").write_text(text)
    compose_samples(run_dir, rows, run_dir / "samples.png")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Regenerate table.md/csv, curves.png and samples.png from a run folder.",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder holding records.jsonl (and samples/)")
    parser.add_argument("--reward", help="the training reward (default: the only reward recorded)")
    parser.add_argument("--algos", help="comma list of algorithms, in row order (default: as recorded)")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.run_dir)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    rewards = list(dict.fromkeys(records["reward"]))
    if args.reward is None and len(rewards) > 1:
        parser.error(f"--reward is needed, the run recorded several: {', '.join(rewards)}")
    reward = args.reward or rewards[0]
    algos = None
    if args.algos:
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        recorded = sorted(set(records["algo"]))
        unknown = [a for a in algos if a not in recorded]
        if unknown:
            parser.error(f"--algos: {', '.join(unknown)} not recorded; choices: {', '.join(recorded)}")
    try:
        print(write_report(args.run_dir, reward, algos), end="")
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
