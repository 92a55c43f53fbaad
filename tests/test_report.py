"""The report of a run folder, on hand-made records whose cells can be computed by hand.

The synthetic run: algorithms sdpo and ddpo plus base, seeds 0 and 1, eval step counts
1, 2, 4, evaluations at epochs 2, 4 and 5 (eval_every 2, plus the last epoch), and the
extra held-out reward "aesthetic" next to the training reward "tiny-clip".

tiny-clip mean of an evaluation = BASE_MEAN[k] + GAIN[algo] * epoch + SEED_OFFSET * seed,
with within-evaluation std 0.05 + 0.01 * seed. So at the final epoch 5, every cell's two
seeds differ by 0.04: the mean over seeds is the seed-0 value + 0.02, the std over seeds
(ddof 1) is |0.04| / sqrt(2) = 0.028284... for every cell, and the 95% percentile
bootstrap interval of the mean of two values is the two values themselves (a resample of
two is both low, mixed or both high, with probabilities 1/4, 1/2, 1/4). Every row carries
the same seed offsets, so a row's per-seed differences from another row are all equal:
the paired test separates any two rows whose means differ.

Tests that need other numbers pass their own `mean_of(algo, seed, epoch, steps)`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from benchmarks.records import load_records
from benchmarks.report import curve_points, main, write_report
from zoo import strict_json

TRAINING, EXTRA = "tiny-clip", "aesthetic"
ALGOS = ("sdpo", "ddpo")
BASE_MEAN = {1: 0.10, 2: 0.20, 4: 0.30}
GAIN = {"base": 0.0, "sdpo": 0.05, "ddpo": 0.02}
SEED_OFFSET = 0.04
SEED_STD = SEED_OFFSET / math.sqrt(2)
CALLS_PER_SAMPLE = {"base": 0, "sdpo": 3, "ddpo": 1}
UPDATES_PER_EPOCH = {"base": 0, "sdpo": 4, "ddpo": 2}
BACKWARD_PER_UPDATE = {"base": 0, "sdpo": 2, "ddpo": 1}  # sdpo accumulates 2 backward passes per update
BATCH = 32
STRIP_PROMPTS, STRIP_SIDE = 3, 16
STEP_FIELDS = ["", " ci_low", " ci_high", " spread", " seeds", " vs base", " best"]
BUDGET = ["trajectories", "updates", "backward passes", "reward calls", "train s", "epochs"]
# Per-seed noise shared by every row (what the evaluation's common prompts and noise do).
SEED_NOISE = {0: 0.0, 1: 0.05, 2: -0.03}


def default_mean(algo: str, seed: int, epoch: int, steps: int) -> float:
    return BASE_MEAN[steps] + GAIN[algo] * epoch + SEED_OFFSET * seed


def record(algo: str, seed: int, epoch: int, steps: int, reward: str, mean_of=default_mean, legacy=False) -> dict:
    """One evaluation record; `legacy` ones predate optimizer_updates and backward_passes."""
    samples = BATCH * epoch
    if reward == TRAINING:
        mean, std = mean_of(algo, seed, epoch, steps), 0.05 + 0.01 * seed
    else:  # the training reward's gains come with a falling held-out reward: reward hacking
        mean, std = 5.0 - 2 * GAIN[algo] * epoch + 0.1 * seed, 0.2
    row = {
        "algo": algo,
        "seed": seed,
        "epoch": epoch,
        "samples_seen": samples,
        "eval_steps": steps,
        "reward": reward,
        "mean": mean,
        "std": std,
        "count": 64,
        "reward_calls": CALLS_PER_SAMPLE[algo] * samples,
        "reward_images": CALLS_PER_SAMPLE[algo] * samples,
        "wall_time": 10.0 * epoch + seed,
    }
    if not legacy:
        updates = UPDATES_PER_EPOCH[algo] * epoch
        row |= {"optimizer_updates": updates, "backward_passes": BACKWARD_PER_UPDATE[algo] * updates}
    return row


def strip_color(algo: str, seed: int, steps: int) -> tuple[int, int, int]:
    """A color per strip, never gray, so neither the white canvas nor the labels match it."""
    return (40 + 60 * ["base", *ALGOS].index(algo), 20 + 40 * steps, 30 + 150 * seed)


def make_run(
    tmp_path, seeds=(0, 1), steps=(1, 2, 4), epochs=(2, 4, 5), rewards=(TRAINING, EXTRA), drop=None,
    mean_of=default_mean, legacy=lambda r: False, dumps=json.dumps,
):
    """Write records.jsonl and the strips of every (algo, seed, steps) into a run folder.

    `drop(record) -> bool` leaves records out (to interrupt a run); `mean_of` gives the
    training reward's means; `legacy(record) -> bool` writes a record without the budget
    counters that older runs did not record; `dumps` writes each record (json.dumps writes
    a NaN as older runs did, bare).
    """
    rows = [
        record(algo, seed, epoch, k, reward, mean_of, legacy({"algo": algo, "seed": seed}))
        for seed in seeds
        for algo, algo_epochs in [("base", (0,)), *((a, epochs) for a in ALGOS)]
        for epoch in algo_epochs
        for k in steps
        for reward in rewards
    ]
    rows = [r for r in rows if not (drop and drop(r))]
    (tmp_path / "records.jsonl").write_text("".join(dumps(r) + "\n" for r in rows))
    (tmp_path / "samples").mkdir()
    for algo in ["base", *ALGOS]:
        for seed in seeds:
            for k in steps:
                strip = Image.new("RGB", (STRIP_PROMPTS * STRIP_SIDE, STRIP_SIDE), strip_color(algo, seed, k))
                strip.save(tmp_path / "samples" / f"{algo}_seed{seed}_steps{k}.png")
    return tmp_path


def markdown_rows(text: str) -> dict[str, list[str]]:
    """The first Markdown table's cells, keyed by its first column (header included)."""
    lines = [line for line in text.split("\n\n")[1].splitlines() if not line.startswith("|---")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells}


def table_csv(run) -> pd.DataFrame:
    return pd.read_csv(run / "table.csv", index_col="algorithm")


def scipy_interval(values, confidence=0.95) -> tuple[float, float]:
    """scipy.stats.bootstrap called directly, with the settings the report declares."""
    result = stats.bootstrap(
        (np.asarray(values, dtype=float),), np.mean, confidence_level=confidence, n_resamples=9999,
        method="percentile", rng=0,
    )
    return result.confidence_interval.low, result.confidence_interval.high


def test_table_cells_csv_and_pictures(tmp_path):
    """Cells by hand (seed values v and v + 0.04, see the module docstring):
    sdpo at 4 steps: 0.30 + 0.05 * 5 = 0.55 and 0.59 → 0.570 [0.550, 0.590], above base
    (↑) and the column's best, separable from ddpo (paired differences all 0.15): bold;
    ddpo at 1 step: 0.10 + 0.02 * 5 = 0.20 and 0.24 → 0.220 [0.200, 0.240] ↑;
    base at 2 steps: 0.20 and 0.24 → 0.220 [0.200, 0.240], no mark (it is the reference).
    Budget at epoch 5: 160 trajectories; sdpo 4 * 5 = 20 updates, 2 * 20 = 40 backward
    passes, 3 * 160 = 480 reward calls; ddpo 10, 10, 160; wall time 50 and 51 s → 50.5.
    Base: epoch 0, all counters 0, wall time 0 and 1 s → 0.5. The held-out aesthetic
    falls with training (sdpo 4.55, ddpo 4.85, base 5.05): both ↓, base bold.
    """
    run = make_run(tmp_path)
    text = write_report(run, TRAINING)

    assert text == (run / "table.md").read_text()
    rows = markdown_rows(text)
    assert list(rows) == ["algorithm", "base", "sdpo", "ddpo"]
    assert rows["algorithm"] == ["1 step", "2 steps", "4 steps", *BUDGET]
    assert rows["sdpo"][2] == "**0.570 [0.550, 0.590]** ↑"
    assert rows["ddpo"][0] == "0.220 [0.200, 0.240] ↑"
    assert rows["base"][1] == "0.220 [0.200, 0.240]"
    assert rows["sdpo"][3:] == ["160", "20", "40", "480", "50.5", "5"]
    assert rows["ddpo"][3:] == ["160", "10", "10", "160", "50.5", "5"]
    assert rows["base"][3:] == ["0", "0", "0", "0", "0.5", "0"]
    assert "mean over 2 seeds" in text
    assert "95% percentile bootstrap interval of that mean" in text
    assert "covers the true mean only about 50% of the time at 2 seeds, not 95%" in text
    assert "interrupted" not in text
    # The extra reward gets its own table in table.md: sdpo's aesthetic falls 5.0 → 4.5.
    assert f"### {TRAINING} (training reward)" in text and f"### {EXTRA} (extra held-out reward)" in text
    extra_md = markdown_rows(text.split(f"### {EXTRA}")[1])
    assert extra_md["base"][2] == "**5.050 [5.000, 5.100]**" and extra_md["sdpo"][2] == "4.550 [4.500, 4.600] ↓"
    extra = pd.read_csv(run / f"table_{EXTRA}.csv", index_col="algorithm")
    assert extra.loc["sdpo", "4 steps"] == pytest.approx(4.55)
    assert extra.loc["base", "4 steps"] == pytest.approx(5.05)
    assert extra["4 steps vs base"].tolist()[1:] == [-1, -1] and extra["4 steps best"].tolist() == [True, False, False]

    table = table_csv(run)
    steps = ["1 step", "2 steps", "4 steps"]
    assert table.columns.tolist() == [f"{k}{field}" for k in steps for field in STEP_FIELDS] + ["seeds", *BUDGET]
    expected = pd.DataFrame(
        {
            "4 steps": [0.32, 0.57, 0.42],
            "4 steps ci_low": [0.30, 0.55, 0.40],
            "4 steps ci_high": [0.34, 0.59, 0.44],
            "4 steps spread": [SEED_STD] * 3,
            "4 steps seeds": [2, 2, 2],
            "4 steps vs base": [math.nan, 1.0, 1.0],
            "4 steps best": [False, True, False],
            "seeds": [2, 2, 2],
            "trajectories": [0.0, 160.0, 160.0],
            "updates": [0.0, 20.0, 10.0],
            "backward passes": [0.0, 40.0, 10.0],
            "reward calls": [0.0, 480.0, 160.0],
            "train s": [0.5, 50.5, 50.5],
            "epochs": [0.0, 5.0, 5.0],
        },
        index=pd.Index(["base", "sdpo", "ddpo"], name="algorithm"),
    )
    pd.testing.assert_frame_equal(table[expected.columns], expected)
    assert table["1 step"].tolist() == pytest.approx([0.12, 0.37, 0.22])

    for name in ["curves.png", f"curves_{EXTRA}.png"]:
        with Image.open(run / name) as curves:
            width, height = curves.size
            assert width >= 3 * 350 and 250 <= height < width  # three panels side by side
    with Image.open(run / "samples.png") as grid:
        # Strips of 48 x 16 px are enlarged to cells of 384 x 128; 3 rows x 3 step counts.
        assert grid.width >= 3 * 384 and grid.height >= 3 * 128
        assert grid.mode == "P"  # a palette PNG: the committed folders' size
        colors = {color for _, color in grid.convert("RGB").getcolors(grid.width * grid.height)}
    for algo in ["base", *ALGOS]:
        for k in BASE_MEAN:
            assert strip_color(algo, 0, k) in colors
            assert strip_color(algo, 1, k) not in colors  # one seed, the first, for the grid


def test_three_seed_interval_is_scipys_bootstrap(tmp_path):
    """sdpo at 4 steps over seeds 0, 1, 2: 0.55, 0.59, 0.63, mean 0.59, std 0.04. A
    resample of three values is all 0.55 with probability 1/27 = 3.7% > 2.5%, likewise all
    0.63, so the 95% percentile interval is the whole range [0.55, 0.63]: what
    scipy.stats.bootstrap returns when called directly with the report's settings, and
    not what it returns at 90% (1/27 < 5%: [0.563, 0.617]), so a report at another level
    fails here. Eight irregular seeds (sdpo at 2 steps, 0.45 + 0, 0.013, 0.041, 0.07,
    0.022, 0.009, 0.055, 0.031) give an interval strictly inside their range, again
    scipy's to the last digit, and one that depends on the resampling seed (rng 1 gives a
    low end of 0.465 instead of 0.465375), so the fixed seed is checked too.
    """
    run = make_run(tmp_path, seeds=(0, 1, 2), rewards=(TRAINING,))
    text = write_report(run, TRAINING)
    table = table_csv(run)
    low, high = table.loc["sdpo", ["4 steps ci_low", "4 steps ci_high"]]
    mean = table.loc["sdpo", "4 steps"]

    assert mean == pytest.approx(0.59)
    assert (low, high) == pytest.approx(scipy_interval([0.55, 0.59, 0.63]), rel=1e-12)
    assert (low, high) == pytest.approx((0.55, 0.63))
    assert low < mean < high
    assert scipy_interval([0.55, 0.59, 0.63], confidence=0.90)[0] > low + 0.01
    assert table.loc["sdpo", "4 steps spread"] == pytest.approx(0.04)
    assert markdown_rows(text)["sdpo"][2] == "**0.590 [0.550, 0.630]** ↑"
    assert "covers the true mean only about 75% of the time at 3 seeds" in text

    offsets = dict(enumerate([0.0, 0.013, 0.041, 0.07, 0.022, 0.009, 0.055, 0.031]))
    eight = tmp_path / "eight"
    eight.mkdir()
    make_run(
        eight, seeds=tuple(offsets), steps=(2,), epochs=(5,), rewards=(TRAINING,),
        mean_of=lambda algo, seed, epoch, k: 0.2 + GAIN[algo] * epoch + offsets[seed],
    )
    write_report(eight, TRAINING)
    table = table_csv(eight)
    values = [0.45 + o for o in offsets.values()]
    low, high = table.loc["sdpo", ["2 steps ci_low", "2 steps ci_high"]]
    assert (low, high) == pytest.approx(scipy_interval(values), rel=1e-12)
    assert min(values) < low < np.mean(values) < high < max(values)
    assert write_report(eight, TRAINING) and table_csv(eight).equals(table)  # reproducible


def shared_noise_mean(gaps):
    """`mean_of` with base 0.30 + SEED_NOISE[seed] at every step count and each algorithm
    at base + gaps[algo, k][seed] (seed noise shared by all rows, as the evaluation's
    common prompts and x_T make it)."""

    def mean_of(algo, seed, epoch, k):
        return 0.30 + SEED_NOISE[seed] + (0.0 if algo == "base" else gaps[algo, k][seed])

    return mean_of


TINY = {0: 0.001, 1: -0.002, 2: 0.0015}  # seed noise of a clear gain: 1.0 ± 0.002
WITHIN = {0: 0.01, 1: -0.02, 2: 0.005}  # no gain: per-seed differences of both signs


def test_marks_only_when_clearly_apart_from_base(tmp_path):
    """Three seeds, paired by seed against base. sdpo = base + 1.0 + TINY at 1 and 2
    steps: every per-seed difference is near +1.0, ↑. ddpo = base - 1.0 + TINY at 1 step:
    ↓. ddpo = base + WITHIN at 2 steps: differences +0.01, -0.02, +0.005 (mean -0.0017),
    the bootstrap interval [-0.02, 0.01] holds 0: no mark, although the mean is lower.
    sdpo = base + 0.03 + TINY at 4 steps: a gain smaller than the seed noise (base's range
    [0.27, 0.35] overlaps sdpo's [0.3015, 0.378]) but on every seed, so the paired
    interval [0.028, 0.0315] excludes 0: ↑, which unpaired intervals would not give.
    ddpo = base at 4 steps: the paired interval is [0, 0], which does not exclude 0."""
    gaps = {
        ("sdpo", 1): {s: 1.0 + TINY[s] for s in TINY},
        ("sdpo", 2): {s: 1.0 + TINY[s] for s in TINY},
        ("sdpo", 4): {s: 0.03 + TINY[s] for s in TINY},
        ("ddpo", 1): {s: -1.0 + TINY[s] for s in TINY},
        ("ddpo", 2): WITHIN,
        ("ddpo", 4): {s: 0.0 for s in TINY},
    }
    run = make_run(tmp_path, seeds=(0, 1, 2), steps=(1, 2, 4), epochs=(5,), rewards=(TRAINING,),
                   mean_of=shared_noise_mean(gaps))
    rows = markdown_rows(write_report(run, TRAINING))
    table = table_csv(run)

    assert rows["sdpo"][0].endswith("↑") and rows["sdpo"][1].endswith("↑")
    assert rows["ddpo"][0].endswith("↓")
    assert rows["ddpo"][1] == "0.305 [0.275, 0.330]"  # base 0.307 [0.270, 0.350]: within noise
    assert table["1 step vs base"].tolist()[1:] == [1, -1]
    assert table["2 steps vs base"].tolist()[1:] == [1, 0]
    assert table.loc["ddpo", "2 steps"] < table.loc["base", "2 steps"]
    assert table.loc["sdpo", "4 steps ci_low"] < table.loc["base", "4 steps ci_high"]  # intervals overlap
    assert rows["sdpo"][2] == "**0.337 [0.301, 0.378]** ↑"  # and bold: clear of base and ddpo
    assert table["4 steps vs base"].tolist()[1:] == [1, 0]


def test_marks_without_pairs_need_intervals_apart(tmp_path):
    """Without the same seeds in both rows the test is non-overlap of the 95% intervals.
    One seed: interval = mean ± 1.96 se, se = 0.05 / √64 = 0.00625, so ± 0.01225. sdpo at
    0.30 + 1.0: ↑; ddpo at 2 steps 0.31 vs base 0.30: [0.2977, 0.3223] overlaps
    [0.2877, 0.3123], no mark. Three seeds with ddpo's seed 2 missing: ddpo = base + 0.03
    at 2 steps has both its per-seed differences positive, but its interval [0.33, 0.38]
    overlaps base's [0.27, 0.35]: no mark, while sdpo (same seeds as base) is paired: ↑."""
    gaps = {
        ("sdpo", 1): {s: 1.0 for s in TINY},
        ("sdpo", 2): {s: 1.0 + TINY[s] for s in TINY},
        ("ddpo", 1): {s: -1.0 for s in TINY},
        ("ddpo", 2): {s: 0.01 for s in TINY},
    }
    single = tmp_path / "single"
    single.mkdir()
    make_run(single, seeds=(0,), steps=(1, 2), epochs=(5,), rewards=(TRAINING,), mean_of=shared_noise_mean(gaps))
    rows = markdown_rows(write_report(single, TRAINING))
    table = table_csv(single)
    assert rows["sdpo"][0] == "**1.3000 ± 0.0063** ↑"
    assert rows["ddpo"][0] == "-0.7000 ± 0.0063 ↓"
    assert rows["ddpo"][1] == "0.3100 ± 0.0063"
    assert table.loc["ddpo", "2 steps ci_low"] == pytest.approx(0.31 - 1.959964 * 0.00625)
    assert table.loc["ddpo", "2 steps ci_high"] == pytest.approx(0.31 + 1.959964 * 0.00625)
    assert table["2 steps vs base"].tolist()[1:] == [1, 0]

    apart = tmp_path / "apart"
    apart.mkdir()
    gaps["ddpo", 2] = {s: 0.03 for s in TINY}
    make_run(apart, seeds=(0, 1, 2), steps=(1, 2), epochs=(5,), rewards=(TRAINING,), mean_of=shared_noise_mean(gaps),
             drop=lambda r: r["algo"] == "ddpo" and r["seed"] == 2)
    write_report(apart, TRAINING)
    table = table_csv(apart)
    assert table.loc["ddpo", ["2 steps ci_low", "2 steps ci_high"]].tolist() == pytest.approx([0.33, 0.38])
    assert table.loc["base", ["2 steps ci_low", "2 steps ci_high"]].tolist() == pytest.approx([0.27, 0.35])
    assert table["2 steps vs base"].tolist()[1:] == [1, 0]


def test_bold_only_when_the_top_two_rows_separate(tmp_path):
    """At 1 step sdpo (base + 1.0) leads ddpo (base + 0.5) by 0.5 on every seed: bold. At
    2 steps sdpo = base + 1.0 + TINY leads ddpo = base + 1.0 + WITHIN by 0.0018 on
    average, but the per-seed differences are -0.009, +0.018, -0.0035: no bold anywhere in
    that column, although both rows are clearly above base (↑)."""
    gaps = {
        ("sdpo", 1): {s: 1.0 + TINY[s] for s in TINY},
        ("sdpo", 2): {s: 1.0 + TINY[s] for s in TINY},
        ("ddpo", 1): {s: 0.5 + TINY[s] for s in TINY},
        ("ddpo", 2): {s: 1.0 + WITHIN[s] for s in TINY},
    }
    run = make_run(tmp_path, seeds=(0, 1, 2), steps=(1, 2), epochs=(5,), rewards=(TRAINING,),
                   mean_of=shared_noise_mean(gaps))
    text = write_report(run, TRAINING)
    rows = markdown_rows(text)
    table = table_csv(run)

    assert rows["sdpo"][0].startswith("**") and not rows["ddpo"][0].startswith("**")
    assert table["1 step best"].tolist() == [False, True, False]
    assert table.loc["sdpo", "2 steps"] > table.loc["ddpo", "2 steps"]
    assert not any("**" in rows[algo][1] for algo in ["base", "sdpo", "ddpo"])
    assert table["2 steps best"].tolist() == [False, False, False]
    assert rows["sdpo"][1].endswith("↑") and rows["ddpo"][1].endswith("↑")
    assert "a column without bold has no clear winner" in text


def test_budget_columns_show_a_dash_where_records_lack_them(tmp_path):
    """Records written before optimizer_updates and backward_passes existed: those two
    columns read "–" (empty in the CSV) and the others stay. When only one seed of a row
    lacks them (sdpo seed 1), that row's mean over seeds is not defined: "–" too, while
    ddpo, with both seeds, shows 10 updates and 10 backward passes."""
    old = tmp_path / "old"
    old.mkdir()
    make_run(old, rewards=(TRAINING,), legacy=lambda r: True)
    rows = markdown_rows(write_report(old, TRAINING))
    assert rows["sdpo"][3:] == ["160", "–", "–", "480", "50.5", "5"]
    assert rows["base"][3:] == ["0", "–", "–", "0", "0.5", "0"]
    assert table_csv(old)[["updates", "backward passes"]].isna().all().all()

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    make_run(mixed, rewards=(TRAINING,), legacy=lambda r: r["algo"] == "sdpo" and r["seed"] == 1)
    rows = markdown_rows(write_report(mixed, TRAINING))
    assert rows["sdpo"][3:] == ["160", "–", "–", "480", "50.5", "5"]
    assert rows["ddpo"][3:] == ["160", "10", "10", "160", "50.5", "5"]


@pytest.mark.parametrize("dumps", [json.dumps, strict_json.dumps], ids=["bare NaN, as older runs wrote", "null"])
def test_nan_evaluations_leave_their_seed_out_of_the_cell(tmp_path, dumps):
    """An evaluation whose every score was NaN has mean NaN, written as null (strict JSON)
    or, by runs before that, as a bare NaN: both read the same. sdpo's seed 1 at 4 steps is
    one: the cell is its seed 0 alone, 0.550 ± 0.006 (0.05 / √64, shown at the table's 3
    decimals), compared by interval (0.55 ± 0.01225 against base's [0.30, 0.34]): ↑, and
    the legend names sdpo as a one-seed row. ddpo at 4 steps, NaN on both seeds: "–", no
    mark, and the column's best is decided among the others."""

    def mean_of(algo, seed, epoch, k):
        if k == 4 and (algo, seed) in {("sdpo", 1), ("ddpo", 0), ("ddpo", 1)}:
            return math.nan
        return default_mean(algo, seed, epoch, k)

    run = make_run(tmp_path, rewards=(TRAINING,), mean_of=mean_of, dumps=dumps)
    assert ("NaN" in (run / "records.jsonl").read_text()) == (dumps is json.dumps)
    text = write_report(run, TRAINING)
    rows = markdown_rows(text)
    table = table_csv(run)

    assert rows["sdpo"][2] == "**0.550 ± 0.006** ↑"
    assert rows["sdpo"][1] == "**0.470 [0.450, 0.490]** ↑"
    assert rows["ddpo"][2] == "–"
    assert table.loc["sdpo", "4 steps seeds"] == 1 and table.loc["ddpo", "4 steps seeds"] == 0
    assert pd.isna(table.loc["ddpo", "4 steps vs base"]) and not table.loc["ddpo", "4 steps best"]
    assert "`mean ± se` (one seed: sdpo)" in text


def test_curves_start_from_base_of_the_same_seeds(tmp_path):
    """sdpo at 4 steps over epochs 0 (base), 2, 4, 5: seed 0 is 0.30, 0.40, 0.50, 0.55 and
    seed 1 is 0.04 higher; the line is their mean, the band their min and max."""
    records = load_records(make_run(tmp_path, rewards=(TRAINING,)))
    curve = curve_points(records, "sdpo", 4)
    assert curve.index.tolist() == [0, 2, 4, 5]
    assert curve["samples"].tolist() == [0, 64, 128, 160]
    assert curve["mean"].tolist() == pytest.approx([0.32, 0.42, 0.52, 0.57])
    assert curve["low"].tolist() == pytest.approx([0.30, 0.40, 0.50, 0.55])
    assert curve["high"].tolist() == pytest.approx([0.34, 0.44, 0.54, 0.59])


def test_interrupted_algorithm_reports_its_last_evaluated_epoch(tmp_path):
    """ddpo was killed during its epoch-5 evaluation (only the 1-step rows were written),
    so its row comes from epoch 4: 4 steps 0.30 + 0.08 = 0.38 and 0.42 → 0.400 [0.380,
    0.420] ↑; 128 trajectories, 2 * 4 = 8 updates and backward passes, 128 reward calls,
    wall time 40 and 41 s → 40.5."""
    run = make_run(tmp_path, drop=lambda r: r["algo"] == "ddpo" and r["epoch"] == 5 and r["eval_steps"] != 1)
    rows = markdown_rows(write_report(run, TRAINING, algos=["ddpo", "sdpo"]))

    assert list(rows) == ["algorithm", "base", "ddpo", "sdpo"]  # base first, then as given
    assert rows["ddpo"][2] == "0.400 [0.380, 0.420] ↑"
    assert rows["ddpo"][3:] == ["128", "8", "8", "128", "40.5", "4"]
    assert rows["sdpo"][3:] == ["160", "20", "40", "480", "50.5", "5"]
    assert "ddpo stopped at epoch 4 of 5 (interrupted)" in (run / "table.md").read_text()


def test_single_seed_single_step_count_and_missing_strips(tmp_path):
    """One seed: the cell shows the evaluation's standard error, its std over its images
    (0.05 for seed 0) / √64: sdpo at 4 steps 0.5500 ± 0.0063; its interval is 0.55 ± 1.96
    * 0.00625, clear of base's (0.30) and ddpo's (0.40): ↑ and bold. Missing strips leave
    the grid without them."""
    run = make_run(tmp_path, seeds=(0,), steps=(4,), rewards=(TRAINING,))
    (run / "samples" / "ddpo_seed0_steps4.png").unlink()
    text = write_report(run, TRAINING)

    rows = markdown_rows(text)
    assert rows["algorithm"][0] == "4 steps" and rows["algorithm"][1] == "trajectories"
    assert rows["sdpo"][0] == "**0.5500 ± 0.0063** ↑"
    assert "`mean ± se`: the single evaluation's standard error over its 64 images (std / √n)" in text
    assert "bootstrap" not in text.split("\n\n")[3].split("↑")[0]  # no seeds to resample
    table = table_csv(run)
    assert table.loc["sdpo", "4 steps spread"] == pytest.approx(0.05 / 8)
    assert table.loc["sdpo", "4 steps ci_low"] == pytest.approx(0.55 - 1.959964 * 0.05 / 8)
    assert not list(run.glob("table_*.csv"))
    with Image.open(run / "samples.png") as grid:
        colors = {color for _, color in grid.convert("RGB").getcolors(grid.width * grid.height)}
    assert strip_color("sdpo", 0, 4) in colors and strip_color("ddpo", 0, 4) not in colors


def test_cli_prints_the_table_and_names_bad_choices(tmp_path, capsys):
    """The CLI prints table.md; a missing --reward (two recorded), an unknown algorithm or
    reward each end with a message naming the choices."""
    run = make_run(tmp_path, steps=(2,), epochs=(1,))
    main([str(run), "--reward", TRAINING])
    assert capsys.readouterr().out == (run / "table.md").read_text()

    with pytest.raises(SystemExit):
        main([str(run), "--algos", "sdpo"])  # two rewards recorded: --reward is required
    assert f"several: {TRAINING}, {EXTRA}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run), "--reward", TRAINING, "--algos", "sdpo,rebel"])
    assert "--algos: rebel not recorded; choices: base, ddpo, sdpo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(run), "--reward", "pickscore"])
    assert "'pickscore' is not in" in capsys.readouterr().err


# ---------------------------------------------------------------- gold next to proxy
PROXY, GOLD = "tiny-aesthetic", "tiny-aesthetic-gold"
ALIGN, ALIGN_GOLD = "tiny-align", "tiny-align-gold"
UP = {s: 0.2 + TINY[s] for s in TINY}  # above base on every seed
DOWN = {s: -0.2 + TINY[s] for s in TINY}  # below base on every seed


def gold_run(tmp_path, gaps, rewards=(PROXY, "tiny-clip", GOLD)):
    """Three seeds, one final epoch, step counts 1 and 2, `rewards` recorded in that order.
    Every reward's mean is 0.5 + SEED_NOISE[seed] for base and that plus
    gaps[reward, algo, k][seed] for an algorithm (0 where `gaps` has no entry)."""
    rows = []
    for seed in TINY:
        for algo, epoch in [("base", 0), ("sdpo", 5), ("ddpo", 5)]:
            for k in (1, 2):
                for reward in rewards:
                    gap = 0.0 if algo == "base" else gaps.get((reward, algo, k), {}).get(seed, 0.0)
                    rows.append({**record(algo, seed, epoch, k, TRAINING), "reward": reward,
                                 "mean": 0.5 + SEED_NOISE[seed] + gap})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def titles(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("### ")]


def test_hacking_marked_where_the_proxy_rises_and_its_gold_falls_on_every_seed(tmp_path):
    """sdpo at 1 step: proxy above base and gold below on all three seeds (paired test ↑
    and ↓): marked ⚠. The cases that are not: sdpo at 2 steps (proxy ↑, gold ↑ too); ddpo
    at 1 step (gold ↓ but the proxy within noise, differences of both signs); ddpo at 2
    steps (proxy ↑, gold within noise). The gold's table comes right after the proxy's,
    though tiny-clip was recorded between them; only the proxy's table carries the mark
    and the `hacking` columns (empty for base)."""
    gaps = {
        (PROXY, "sdpo", 1): UP, (GOLD, "sdpo", 1): DOWN,
        (PROXY, "sdpo", 2): UP, (GOLD, "sdpo", 2): UP,
        (PROXY, "ddpo", 1): WITHIN, (GOLD, "ddpo", 1): DOWN,
        (PROXY, "ddpo", 2): UP, (GOLD, "ddpo", 2): WITHIN,
    }
    run = gold_run(tmp_path, gaps)
    text = write_report(run, PROXY)
    proxy_rows = markdown_rows(text)
    gold_text = text.split(f"### {GOLD}")[1]
    gold_rows = markdown_rows(gold_text)

    assert titles(text) == [f"### {PROXY} (training reward)", f"### {GOLD} (extra held-out reward, gold of {PROXY})",
                            "### tiny-clip (extra held-out reward)"]
    assert proxy_rows["sdpo"][0].endswith("↑ ⚠") and gold_rows["sdpo"][0].endswith("↓")
    assert proxy_rows["sdpo"][1].endswith("↑") and gold_rows["sdpo"][1].endswith("↑")
    assert not proxy_rows["ddpo"][0].endswith(("↑", "↓", "⚠"))
    assert gold_rows["ddpo"][0].endswith("↓")
    assert proxy_rows["ddpo"][1].endswith("↑") and not gold_rows["ddpo"][1].endswith(("↑", "↓"))
    assert sum(cell.count("⚠") for row in proxy_rows.values() for cell in row) == 1
    assert "⚠" not in gold_text.split("\n\n")[1]
    assert ("⚠ HACKING: proxy significantly up, gold significantly down at the same step count, by the table's "
            f"paired test (↑ here and ↓ in the {GOLD} table, its gold).") in text.split(f"### {GOLD}")[0]

    table = table_csv(run)
    assert table.columns.get_loc("1 step hacking") == table.columns.get_loc("1 step best") + 1
    assert table["1 step hacking"].isna().tolist() == [True, False, False]
    assert table.loc[["sdpo", "ddpo"], "1 step hacking"].tolist() == [True, False]
    assert table.loc[["sdpo", "ddpo"], "2 steps hacking"].tolist() == [False, False]
    for other in [GOLD, "tiny-clip"]:
        assert not any("hacking" in c for c in pd.read_csv(run / f"table_{other}.csv").columns)


def test_no_hacking_mark_where_the_gold_rises_with_the_proxy(tmp_path):
    """Both algorithms raise the proxy and the gold on every seed at both step counts:
    no ⚠ anywhere, the `hacking` columns all False (base empty), the legend still says
    what the mark would mean."""
    gaps = {(reward, algo, k): UP for reward in (PROXY, GOLD) for algo in ALGOS for k in (1, 2)}
    run = gold_run(tmp_path, gaps)
    text = write_report(run, PROXY)
    table = table_csv(run)

    assert "⚠" not in "".join(cell for row in markdown_rows(text).values() for cell in row)
    assert all(cell.endswith("↑") for algo in ALGOS for cell in markdown_rows(text)[algo][:2])
    assert table.loc[list(ALGOS), ["1 step hacking", "2 steps hacking"]].eq(False).all().all()
    assert "⚠ HACKING: proxy significantly up, gold significantly down" in text


def test_every_declared_pair_is_checked_and_rewards_without_gold_are_unchanged(tmp_path):
    """Training on tiny-aesthetic with the alignment pair watched (recorded gold first):
    tiny-align is checked against tiny-align-gold as well (sdpo at 2 steps ⚠), and each gold
    follows its proxy. A run whose rewards declare no gold (tiny-clip trained, aesthetic
    watched: as the JPEG task) has no hacking column, mark or legend line."""
    gaps = {(ALIGN, "sdpo", 2): UP, (ALIGN_GOLD, "sdpo", 2): DOWN}
    run = gold_run(tmp_path, gaps, rewards=(PROXY, ALIGN_GOLD, "tiny-clip", GOLD, ALIGN))
    text = write_report(run, PROXY)
    order = [PROXY, GOLD, "tiny-clip", ALIGN, ALIGN_GOLD]
    assert [t.split(" (")[0] for t in titles(text)] == [f"### {r}" for r in order]
    assert f"### {ALIGN_GOLD} (extra held-out reward, gold of {ALIGN})" in text
    align = pd.read_csv(run / f"table_{ALIGN}.csv", index_col="algorithm")
    assert align.loc[["sdpo", "ddpo"], "2 steps hacking"].tolist() == [True, False]
    assert markdown_rows(text.split(f"### {ALIGN} ")[1])["sdpo"][1].endswith("↑ ⚠")

    plain = tmp_path / "plain"
    plain.mkdir()
    text = write_report(make_run(plain), TRAINING)
    assert "⚠" not in text and "HACKING" not in text
    assert not any("hacking" in c for c in table_csv(plain).columns)


def test_rows_without_a_split_are_of_the_runs_eval_split_beside_rows_that_name_one(tmp_path):
    """An old run extended since (`--extend`, `--redo`): its reused rows predate the split
    field, the new rows name it; all are the run's --eval-split, and the report is written."""
    (tmp_path / "config.json").write_text(json.dumps({"eval_split": "test"}))
    rows = [{"algo": algo, "seed": 0, "epoch": epoch, "eval_steps": 1, "reward": "r", "mean": mean, "std": 0.1,
             "count": 4, "samples_seen": 8 * epoch, **extra}
            for algo, epoch, mean, extra in [("base", 0, 0.1, {}), ("ddpo", 1, 0.2, {}),
                                             ("grpo", 1, 0.3, {"split": "test"})]]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert set(load_records(tmp_path)["algo"]) == {"base", "ddpo", "grpo"}
    assert set(load_records(tmp_path, "test")["split"]) == {"test"}
    with pytest.raises(ValueError, match="holds no records of the validation prompts"):
        load_records(tmp_path, "validation")
    write_report(tmp_path, reward="r")
    assert "| grpo |" in (tmp_path / "table.md").read_text()
