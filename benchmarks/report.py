"""The benchmark's report: step-generalization tables, reward curves and a sample grid.

Everything is derived from a run folder, so a finished (or interrupted) run can be
re-reported without training: `python -m benchmarks.report RUN_DIR --reward tiny-clip`.

Inputs, as the runner writes them:
- `records.jsonl`: one evaluation per line (algo, seed, epoch, samples_seen, eval_steps,
  reward, mean, std, count, reward_calls, reward_images, wall_time, and in newer runs
  optimizer_updates and backward_passes); a non-finite number is null (`zoo.strict_json`;
  runs before it wrote a bare NaN, read as well). The untrained model is algo "base" at epoch 0;
  every algorithm's curve starts from the base of the same seed.
- `samples/{algo}_seed{seed}_steps{k}.png`: one strip of the evaluation prompts per
  algorithm, seed and step count, at the final checkpoint.

Outputs, next to them: `table.md`, `table.csv` and `curves.png` for the training reward;
with two or more seeds and a gold, the verdict (`benchmarks.verdict`: gold gains with t
intervals, Holm marks, rliable aggregates, the step-generalization figure), and for a run
evaluated on both prompt sets the peak report (`benchmarks.peak`) and, in `peak/`, the
verdict at the epochs chosen on the validation prompts;
`table_<reward>.csv` and `curves_<reward>.png` for every extra held-out reward (their
tables are appended to `table.md`, so reward hacking is visible next to the gains; a
proxy's gold, `rewards.catalog.GOLD_OF`, right after the proxy's table); and
`samples.png`.

The statistics of a table cell (one row, one step count), all at 95% (`CONFIDENCE`):
- interval: with two or more seeds, the percentile bootstrap interval of the mean over
  seeds of each seed's final evaluation mean (`scipy.stats.bootstrap`, fixed seed); with
  one seed, mean ± 1.96 standard errors of that evaluation (std over its images / √count);
- mark against base (↑ / ↓): paired by seed when both rows have the same two or more
  seeds (the bootstrap interval of the mean per-seed difference excludes 0), otherwise
  the two rows' intervals do not overlap;
- bold: the column's best mean, only when it is separable from the second-best by the
  same test;
- hacking (⚠, in the table of a proxy whose gold was evaluated too): the row is marked ↑
  on the proxy and ↓ on its gold at the same step count, both by the test above.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks.figures import save_figure  # noqa: E402
from benchmarks.records import BASE, final_records, load_records, row_order, steps_label  # noqa: E402
from rewards.catalog import GOLD_OF  # noqa: E402
from rewards.errors import UnknownReward  # noqa: E402
from rewards.spec import gold_rewards  # noqa: E402

# Final training budget per row, in column order: record field -> table column. Runs
# recorded before optimizer_updates and backward_passes existed show "–" there.
BUDGET_COLUMNS = {
    "samples_seen": "trajectories",
    "optimizer_updates": "updates",
    "backward_passes": "backward passes",
    "reward_calls": "reward calls",
    "wall_time": "train s",
    "epoch": "epochs",
}
CONFIDENCE = 0.95
# Percentile, not BCa. With the 2-3 seeds a benchmark can afford, every bootstrap interval
# of a mean is narrow: a resample mean never leaves [min, max] of the seeds, and at 3 seeds
# each extreme is drawn (all three resamples equal to it) with probability 1/27 = 3.7% >
# 2.5%, so the 95% percentile interval is exactly the range of the seed means. That range
# covers the true mean 1 - 2^(1-n) of the time (50% at 2 seeds, 75% at 3), and a paired
# mark at 3 seeds means "all three seeds moved the same way" (a sign test, p = 0.25), which
# the legend says in words. BCa is worse here: its bias correction and jackknife
# acceleration, estimated from 3 values, shrink that range further (in 72% of simulated
# 3-seed cells) and it is undefined (NaN) when the values are equal, e.g. a zero paired
# difference. At 5 seeds both still cover only about 85% (simulated, normal seed noise).
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the same resamples for every cell, so a report is reproducible
# The single-seed interval: mean ± z standard errors, z = 1.96 at 95%.
NORMAL_Z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))
STEP_COLUMN = re.compile(r"\d+ steps?")
HACKING_MARK = "⚠"
STRIP_NAME = re.compile(r"(?P<algo>.+)_seed(?P<seed>\d+)_steps(?P<steps>\d+)\.png")
# Sample cells are resized to this height range: tiny-world images (32 px) are too small
# to judge, SD-sized strips would make a grid of tens of megapixels.
MIN_CELL_HEIGHT, MAX_CELL_HEIGHT = 128, 256


def spread_label(steps: int) -> str:
    return f"{steps_label(steps)} spread"


def ci_labels(steps: int) -> tuple[str, str]:
    return f"{steps_label(steps)} ci_low", f"{steps_label(steps)} ci_high"


def seeds_label(steps: int) -> str:
    return f"{steps_label(steps)} seeds"


def vs_base_label(steps: int) -> str:
    return f"{steps_label(steps)} vs base"


def best_label(steps: int) -> str:
    return f"{steps_label(steps)} best"


def file_suffix(reward: str) -> str:
    """A reward name made safe for a file name (weighted sums carry `*`, `+`, spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", reward)


@dataclass(frozen=True)
class Cell:
    """One row at one step count: the mean over seeds, its 95% interval, the spread shown
    next to a single seed's mean, and the seeds' own final means (for paired tests).
    Seeds whose evaluation mean is NaN (every image's score non-finite) are left out."""

    mean: float
    low: float
    high: float
    spread: float
    per_seed: dict[int, float]


EMPTY_CELL = Cell(math.nan, math.nan, math.nan, math.nan, {})


def bootstrap_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean of `values` (two or more)."""
    result = stats.bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method=BOOTSTRAP_METHOD,
        rng=BOOTSTRAP_SEED,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def cell_statistics(final: pd.DataFrame) -> Cell:
    """A cell from its final evaluations (one row per seed).

    Two or more seeds: the mean over seeds, the bootstrap interval of that mean and, as
    spread, the std over seeds (ddof 1). One seed: its mean, the evaluation's standard
    error (std over its images / √count) as spread and mean ± NORMAL_Z standard errors.
    """
    finite = final[np.isfinite(final["mean"].astype(float))]
    per_seed = {int(seed): float(mean) for seed, mean in zip(finite["seed"], finite["mean"])}
    values = list(per_seed.values())
    if len(values) >= 2:
        return Cell(float(np.mean(values)), *bootstrap_interval(values), float(np.std(values, ddof=1)), per_seed)
    if len(values) == 1:
        only = finite.iloc[0]
        error = float(only["std"]) / max(float(only["count"]), 1.0) ** 0.5
        return Cell(values[0], values[0] - NORMAL_Z * error, values[0] + NORMAL_Z * error, error, per_seed)
    return EMPTY_CELL


def compare(a: Cell, b: Cell) -> int:
    """1 when `a` is significantly above `b`, -1 when below, 0 when not separable.

    Paired by seed when both cells have the same two or more seeds: the bootstrap interval
    of the mean of the per-seed differences a - b excludes 0. Otherwise (different seeds, a
    single seed) the two cells' intervals do not overlap. An empty cell compares as 0.
    """
    if math.isnan(a.mean) or math.isnan(b.mean):
        return 0
    if len(a.per_seed) >= 2 and a.per_seed.keys() == b.per_seed.keys():
        low, high = bootstrap_interval([a.per_seed[s] - b.per_seed[s] for s in sorted(a.per_seed)])
    else:
        low, high = a.low - b.high, a.high - b.low  # low > 0: a's interval lies above b's
    return 1 if low > 0 else -1 if high < 0 else 0


def summary_table(records: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """The step-generalization table of one reward's records, indexed by algorithm.

    Per step count k (see `cell_statistics` and `compare`): `<k> steps` the mean over seeds
    of the final evaluation's mean, `<k> steps ci_low` / `ci_high` its 95% interval,
    `<k> steps spread` the std over seeds (ddof 1), or with one seed the evaluation's
    standard error, `<k> steps seeds` the seeds with a finite mean, `<k> steps vs base`
    1 / -1 / 0 for significantly above / below / not separable from the base row (empty
    for base itself and without a base row), and `<k> steps best` whether the row is the
    column's best mean and separable from the second-best. `seeds` counts the seeds. The
    budget columns (`BUDGET_COLUMNS`) are the final values, mean over seeds; empty when
    some seed's records lack the field (runs recorded before it existed). Rows without
    records are empty.
    """
    final = final_records(records)
    steps = sorted(records["eval_steps"].unique())
    table = pd.DataFrame(index=pd.Index(list(rows), name="algorithm"))
    for k in steps:
        at_k = final[final["eval_steps"] == k]
        cells = {algo: cell_statistics(at_k[at_k["algo"] == algo]) for algo in rows}
        low, high = ci_labels(k)
        table[steps_label(k)] = [cells[algo].mean for algo in rows]
        table[low] = [cells[algo].low for algo in rows]
        table[high] = [cells[algo].high for algo in rows]
        table[spread_label(k)] = [cells[algo].spread for algo in rows]
        table[seeds_label(k)] = [len(cells[algo].per_seed) for algo in rows]
        base = cells.get(BASE)
        marks = [
            None if base is None or algo == BASE or math.isnan(cells[algo].mean) else compare(cells[algo], base)
            for algo in rows
        ]
        table[vs_base_label(k)] = pd.array(marks, dtype="Int64")
        ranked = sorted((a for a in rows if not math.isnan(cells[a].mean)), key=lambda a: -cells[a].mean)
        best = ranked[0] if len(ranked) >= 2 and compare(cells[ranked[0]], cells[ranked[1]]) == 1 else None
        table[best_label(k)] = [algo == best for algo in rows]
    table["seeds"] = final.groupby("algo")["seed"].nunique().reindex(table.index)
    # Budget counters are the same at every step count of an evaluation; one value per seed.
    for field, column in BUDGET_COLUMNS.items():
        if field not in final:
            table[column] = math.nan
            continue
        per_seed = final.groupby(["algo", "seed"])[field].max()
        table[column] = per_seed.groupby("algo").mean(skipna=False).reindex(table.index)
    return table


def with_hacking(proxy: pd.DataFrame, gold: pd.DataFrame) -> pd.DataFrame:
    """`proxy`'s summary table with, after each step count's `<k> steps best`, a column
    `<k> steps hacking`: True where the row is significantly above base on the proxy and
    significantly below base on its gold at that step count (both tables' `vs base`, the
    test of `compare`), False otherwise; empty where either mark is (base itself, no base
    row, an empty cell). `gold` is the gold's summary table over the same rows."""
    table = proxy.copy()
    for column in _step_columns(proxy):
        up = proxy[f"{column} vs base"]
        down = gold.get(f"{column} vs base", pd.Series(pd.NA, index=gold.index)).reindex(proxy.index)
        marks = [pd.NA if pd.isna(u) or pd.isna(d) else bool(u == 1 and d == -1) for u, d in zip(up, down)]
        table.insert(table.columns.get_loc(f"{column} best") + 1, f"{column} hacking", pd.array(marks, dtype="boolean"))
    return table


def _golds(reward: str) -> list[str]:
    """The golds declared for `reward` (each member of a weighted sum); none for a name
    the registry does not know (a run recorded under another version)."""
    try:
        return gold_rewards(reward)
    except UnknownReward:
        return []


def section_order(reward: str, recorded: Sequence[str]) -> list[str]:
    """The order of the report's tables: the training reward first, every proxy's recorded
    gold right after the proxy's table, the other rewards as first recorded."""
    golds = {name: [g for g in _golds(name) if g in recorded] for name in dict.fromkeys([reward, *recorded])}
    after_proxy = {g for name, of_name in golds.items() for g in of_name if g != name} - {reward}
    order: list[str] = []
    for name, of_name in golds.items():
        if name not in after_proxy and name not in order:
            order += [name, *(g for g in of_name if g not in order)]
    return order


def _decimals(widths: pd.Series) -> int:
    """Decimals that show the table's median positive interval half-width (or standard
    error) to two significant figures: the smallest would print every cell of a table with
    one tight row (base) to five decimals."""
    positive = widths[widths > 0]
    if positive.empty:
        return 3
    return min(6, max(1, 1 - math.floor(math.log10(positive.median()))))


def _count(value: float) -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _step_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if STEP_COLUMN.fullmatch(c)]


def _cell_text(row: pd.Series, column: str, decimals: int) -> str:
    """`mean [lo, hi]` (two or more seeds) or `mean ± se` (one seed), bold when best, then
    the mark against base and the hacking mark."""
    if pd.isna(row[column]):
        return "–"
    mean = f"{row[column]:.{decimals}f}"
    if row[f"{column} seeds"] >= 2:
        text = f"{mean} [{row[f'{column} ci_low']:.{decimals}f}, {row[f'{column} ci_high']:.{decimals}f}]"
    else:
        text = f"{mean} ± {row[f'{column} spread']:.{decimals}f}"
    if row[f"{column} best"]:
        text = f"**{text}**"
    vs_base = row[f"{column} vs base"]
    mark = "" if pd.isna(vs_base) else {1: " ↑", -1: " ↓"}.get(int(vs_base), "")
    hacking = row.get(f"{column} hacking")
    return text + mark + (f" {HACKING_MARK}" if not pd.isna(hacking) and hacking else "")


def _caption(table: pd.DataFrame, reward: str, training: bool, counts: Sequence[int]) -> str:
    images = "/".join(str(c) for c in sorted(set(counts)))
    kind = "training" if training else "held-out, not trained on"
    seeds = table["seeds"].dropna()
    over = f"{int(seeds.iloc[0])} seed{'s' if seeds.iloc[0] > 1 else ''}" if seeds.nunique() == 1 else "seeds"
    parts = [
        f"Mean {reward} reward ({kind}, higher is better) of {images} held-out images at each row's last "
        f"evaluated epoch, mean over {over}. Budget columns, final values, mean over seeds: trajectories "
        "sampled for training, optimizer updates, backward passes, reward-model calls (images scored) and "
        "training seconds; – where the records lack the counter."
    ]
    trained = table.drop(index=BASE, errors="ignore")
    longest = trained["epochs"].max()
    for algo, epochs in trained["epochs"].items():
        if pd.isna(epochs):
            parts.append(f"{algo}: no evaluation recorded.")
        elif epochs < longest:
            parts.append(f"{algo} stopped at epoch {_count(epochs)} of {_count(longest)} (interrupted).")
    return " ".join(parts)


def _legend(table: pd.DataFrame, counts: Sequence[int], gold: str | None = None) -> str:
    """How to read the cells, marks and bold of this table, in one paragraph; `gold`: the
    gold this proxy's table was checked against for hacking."""
    level = f"{CONFIDENCE:.0%}"
    seeds = table[[f"{c} seeds" for c in _step_columns(table)]]
    several = sorted({int(n) for n in seeds.stack() if n >= 2})
    single = [algo for algo, row in seeds.iterrows() if (row == 1).any()]
    parts = []
    if several:
        few = [n for n in several if n <= 3]
        caveat = ""
        if few:
            coverage = " and ".join(f"{1 - 2 ** (1 - n):.0%} of the time at {n} seeds" for n in few)
            caveat = (
                f"; with {' or '.join(str(n) for n in few)} seeds this interval is the range of the seed "
                f"means, which covers the true mean only about {coverage}, not {level}"
            )
        parts.append(
            f"`mean [lo, hi]`: mean over seeds and the {level} {BOOTSTRAP_METHOD} bootstrap interval of that mean "
            f"(scipy.stats.bootstrap over the seeds' final means, {BOOTSTRAP_RESAMPLES} resamples, "
            f"seed {BOOTSTRAP_SEED}){caveat}."
        )
    if single:
        images = "/".join(str(c) for c in sorted(set(counts)))
        which = f" (one seed: {', '.join(single)})" if several else ""
        parts.append(
            f"`mean ± se`{which}: the single evaluation's standard error over its {images} images (std / √n); "
            f"its {level} interval is mean ± {NORMAL_Z:.2f} se."
        )
    if BASE in table.index:
        parts.append(
            f"↑ / ↓: significantly above / below base at the same step count, paired by seed when both rows "
            f"have the same seeds (the {level} bootstrap interval of the mean per-seed difference excludes 0; "
            "at 3 seeds: every seed moved the same way), otherwise their intervals do not overlap; no mark: "
            "not separable from base."
        )
    else:
        parts.append("No base row, so no marks.")
    parts.append(
        "Bold: the column's best mean, only when it is separable from the second-best by the same test; a "
        "column without bold has no clear winner."
    )
    if gold is not None and BASE in table.index:
        parts.append(
            f"{HACKING_MARK} HACKING: proxy significantly up, gold significantly down at the same step count, by "
            f"the table's paired test (↑ here and ↓ in the {gold} table, its gold)."
        )
    return " ".join(parts)


def markdown_table(
    table: pd.DataFrame, reward: str, training: bool, counts: Sequence[int], gold: str | None = None,
    proxy: str | None = None,
) -> str:
    """One titled Markdown table with its caption and legend underneath. `gold`: the gold
    that `table`'s hacking marks (`with_hacking`) were set against; `proxy`: the proxy
    whose gold this table is."""
    step_columns = _step_columns(table)
    widths = pd.concat(
        [
            ((table[f"{c} ci_high"] - table[f"{c} ci_low"]) / 2).where(table[f"{c} seeds"] >= 2, table[f"{c} spread"])
            for c in step_columns
        ]
    )
    decimals = _decimals(widths)
    header = ["algorithm", *step_columns, *BUDGET_COLUMNS.values()]
    lines = [
        f"### {reward} ({'training reward' if training else 'extra held-out reward'}"
        f"{f', gold of {proxy}' if proxy else ''})",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for algo, row in table.iterrows():
        cells = [_cell_text(row, c, decimals) for c in step_columns]
        budget = [_count(row[c]) for c in BUDGET_COLUMNS.values()]
        seconds = row[BUDGET_COLUMNS["wall_time"]]
        budget[list(BUDGET_COLUMNS).index("wall_time")] = "–" if pd.isna(seconds) else f"{seconds:.1f}"
        lines.append("| " + " | ".join([str(algo), *cells, *budget]) + " |")
    lines += ["", _caption(table, reward, training, counts), "", _legend(table, counts, gold)]
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
    save_figure(figure, path, dpi=100)


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
    # A 256-colour palette: half the bytes of RGB for these flat renders, so that committed run
    # folders keep the tree within the GPU machine's 64 MiB transfer.
    canvas.quantize(colors=256).save(path, optimize=True)
    return True


def write_report(run_dir: str | Path, reward: str, algos: Sequence[str] | None = None) -> str:
    """Write tables, curves and the sample grid of a run folder; return `table.md`'s text.

    `reward` is the training reward; any other recorded reward gets its own table and
    curves, a proxy's gold right after the proxy (`section_order`), and a proxy whose
    gold was recorded gets the hacking marks (`with_hacking`). `algos` orders the rows
    after base (default: order of first appearance).
    """
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    recorded = list(dict.fromkeys(records["reward"]))
    if reward not in recorded:
        raise ValueError(f"reward {reward!r} is not in {run_dir / 'records.jsonl'}; recorded: {', '.join(recorded)}")
    rows = row_order(records, algos)
    tables = {name: summary_table(records[records["reward"] == name], rows) for name in recorded}
    # Hacking is checked for a declared proxy only, not for a weighted sum with one among
    # its members: the other members can move the sum either way.
    gold_of = {name: GOLD_OF[name] for name in recorded if GOLD_OF.get(name) in recorded}
    proxy_of = {gold: name for name, gold in gold_of.items()}
    sections = []
    for name in section_order(reward, recorded):
        training = name == reward
        of_reward = records[records["reward"] == name]
        gold = gold_of.get(name)
        table = tables[name] if gold is None else with_hacking(tables[name], tables[gold])
        suffix = "" if training else f"_{file_suffix(name)}"
        table.to_csv(run_dir / f"table{suffix}.csv")
        counts = final_records(of_reward)["count"].tolist()
        sections.append(markdown_table(table, name, training, counts, gold=gold, proxy=proxy_of.get(name)))
        plot_curves(of_reward, name, rows, run_dir / f"curves{suffix}.png")
    text = "\n\n".join(sections) + "\n"
    (run_dir / "table.md").write_text(text)
    compose_samples(run_dir, rows, run_dir / "samples.png")
    from benchmarks.peak import write_peak  # both read records through benchmarks.records
    from benchmarks.verdict import write_verdict

    peak_epochs = write_peak(run_dir, reward, rows)
    seeds = sorted(set(records["seed"]))
    if len(seeds) >= 2 and set(recorded) & set(GOLD_OF.values()):
        write_verdict([run_dir], run_dir)
        if peak_epochs:
            # Each algorithm's own seeds: after `--extend --partial-seeds` some have fewer.
            seeds_of = records.groupby("algo")["seed"].unique()
            write_verdict([run_dir], run_dir / "peak", epochs=[
                {(algo, int(seed)): epoch for algo, epoch in peak_epochs.items() for seed in seeds_of[algo]}])
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Regenerate table.md/csv, curves.png and samples.png from a run folder.",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder holding records.jsonl, or packed (and samples/)")
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
