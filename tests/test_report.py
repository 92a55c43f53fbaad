"""The report of a run folder, on hand-made records whose cells can be computed by hand.

The synthetic run: algorithms sdpo and ddpo plus base, seeds 0 and 1, eval step counts
1, 2, 4, evaluations at epochs 2, 4 and 5 (eval_every 2, plus the last epoch), and the
extra held-out reward "aesthetic" next to the training reward "tiny-clip".

tiny-clip mean of an evaluation = BASE_MEAN[k] + GAIN[algo] * epoch + SEED_OFFSET * seed,
with within-evaluation std 0.05 + 0.01 * seed. So at the final epoch 5, every cell's two
seeds differ by 0.04: the mean over seeds is the seed-0 value + 0.02, and the std over
seeds (ddof 1) is |0.04| / sqrt(2) = 0.028284... for every cell, printed "± 0.028".
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from PIL import Image

from benchmarks.report import curve_points, load_records, main, write_report

TRAINING, EXTRA = "tiny-clip", "aesthetic"
ALGOS = ("sdpo", "ddpo")
BASE_MEAN = {1: 0.10, 2: 0.20, 4: 0.30}
GAIN = {"base": 0.0, "sdpo": 0.05, "ddpo": 0.02}
SEED_OFFSET = 0.04
SEED_STD = SEED_OFFSET / math.sqrt(2)
CALLS_PER_SAMPLE = {"base": 0, "sdpo": 3, "ddpo": 1}
BATCH = 32
STRIP_PROMPTS, STRIP_SIDE = 3, 16


def record(algo: str, seed: int, epoch: int, steps: int, reward: str) -> dict:
    samples = BATCH * epoch
    if reward == TRAINING:
        mean, std = BASE_MEAN[steps] + GAIN[algo] * epoch + SEED_OFFSET * seed, 0.05 + 0.01 * seed
    else:  # the training reward's gains come with a falling held-out reward: reward hacking
        mean, std = 5.0 - 2 * GAIN[algo] * epoch + 0.1 * seed, 0.2
    return {
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


def strip_color(algo: str, seed: int, steps: int) -> tuple[int, int, int]:
    """A color per strip, never gray, so neither the white canvas nor the labels match it."""
    return (40 + 60 * ["base", *ALGOS].index(algo), 20 + 40 * steps, 30 + 150 * seed)


def make_run(tmp_path, seeds=(0, 1), steps=(1, 2, 4), epochs=(2, 4, 5), rewards=(TRAINING, EXTRA), drop=None):
    """Write records.jsonl and the strips of every (algo, seed, steps) into a run folder.

    `drop(record) -> bool` leaves records out (to interrupt a run).
    """
    rows = [
        record(algo, seed, epoch, k, reward)
        for seed in seeds
        for algo, algo_epochs in [("base", (0,)), *((a, epochs) for a in ALGOS)]
        for epoch in algo_epochs
        for k in steps
        for reward in rewards
    ]
    rows = [r for r in rows if not (drop and drop(r))]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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


def test_table_cells_csv_and_pictures(tmp_path):
    """Cells by hand (seed 0 value + 0.02 ± 0.028, see the module docstring):
    sdpo at 4 steps: 0.30 + 0.05 * 5 = 0.55 and 0.59 → 0.570 ± 0.028;
    ddpo at 1 step:  0.10 + 0.02 * 5 = 0.20 and 0.24 → 0.220 ± 0.028;
    base at 2 steps: 0.20 and 0.24 → 0.220 ± 0.028.
    Budget at epoch 5: 160 samples; sdpo 3 * 160 = 480 reward calls, ddpo 160; wall time
    50 and 51 s → 50.5. Base: epoch 0, wall time 0 and 1 s → 0.5.
    """
    run = make_run(tmp_path)
    text = write_report(run, TRAINING)

    assert text == (run / "table.md").read_text()
    rows = markdown_rows(text)
    assert list(rows) == ["algorithm", "base", "sdpo", "ddpo"]
    assert rows["algorithm"] == ["1 step", "2 steps", "4 steps", "epochs", "samples", "reward calls", "wall time (s)"]
    assert rows["sdpo"][2] == "0.570 ± 0.028"
    assert rows["ddpo"][0] == "0.220 ± 0.028"
    assert rows["base"][1] == "0.220 ± 0.028"
    assert rows["sdpo"][3:] == ["5", "160", "480", "50.5"]
    assert rows["ddpo"][3:] == ["5", "160", "160", "50.5"]
    assert rows["base"][3:] == ["0", "0", "0", "0.5"]
    assert "mean over 2 seeds ± std over seeds" in text
    assert "interrupted" not in text
    # The extra reward gets its own table in table.md: sdpo's aesthetic falls 5.0 → 4.5.
    assert f"### {TRAINING} (training reward)" in text and f"### {EXTRA} (extra held-out reward)" in text
    extra = pd.read_csv(run / f"table_{EXTRA}.csv", index_col="algorithm")
    assert extra.loc["sdpo", "4 steps"] == pytest.approx(4.55)
    assert extra.loc["base", "4 steps"] == pytest.approx(5.05)

    expected = pd.DataFrame(
        {
            "1 step": [0.12, 0.37, 0.22],
            "1 step spread": [SEED_STD] * 3,
            "2 steps": [0.22, 0.47, 0.32],
            "2 steps spread": [SEED_STD] * 3,
            "4 steps": [0.32, 0.57, 0.42],
            "4 steps spread": [SEED_STD] * 3,
            "seeds": [2, 2, 2],
            "epochs": [0.0, 5.0, 5.0],
            "samples": [0.0, 160.0, 160.0],
            "reward calls": [0.0, 480.0, 160.0],
            "wall time (s)": [0.5, 50.5, 50.5],
        },
        index=pd.Index(["base", "sdpo", "ddpo"], name="algorithm"),
    )
    pd.testing.assert_frame_equal(pd.read_csv(run / "table.csv", index_col="algorithm"), expected)

    for name in ["curves.png", f"curves_{EXTRA}.png"]:
        with Image.open(run / name) as curves:
            width, height = curves.size
            assert width >= 3 * 350 and 250 <= height < width  # three panels side by side
    with Image.open(run / "samples.png") as grid:
        # Strips of 48 x 16 px are enlarged to cells of 384 x 128; 3 rows x 3 step counts.
        assert grid.width >= 3 * 384 and grid.height >= 3 * 128
        colors = {color for _, color in grid.convert("RGB").getcolors(grid.width * grid.height)}
    for algo in ["base", *ALGOS]:
        for k in BASE_MEAN:
            assert strip_color(algo, 0, k) in colors
            assert strip_color(algo, 1, k) not in colors  # one seed, the first, for the grid


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
    so its row comes from epoch 4: 4 steps 0.30 + 0.08 = 0.38 and 0.42 → 0.400 ± 0.028,
    128 samples and reward calls, wall time 40 and 41 s → 40.5."""
    run = make_run(tmp_path, drop=lambda r: r["algo"] == "ddpo" and r["epoch"] == 5 and r["eval_steps"] != 1)
    rows = markdown_rows(write_report(run, TRAINING, algos=["ddpo", "sdpo"]))

    assert list(rows) == ["algorithm", "base", "ddpo", "sdpo"]  # base first, then as given
    assert rows["ddpo"][2] == "0.400 ± 0.028"
    assert rows["ddpo"][3:] == ["4", "128", "128", "40.5"]
    assert rows["sdpo"][3:] == ["5", "160", "480", "50.5"]
    assert "ddpo stopped at epoch 4 of 5 (interrupted)" in (run / "table.md").read_text()


def test_single_seed_single_step_count_and_missing_strips(tmp_path):
    """One seed: the spread is the evaluation's standard error, its std over its images
    (0.05 for seed 0) / √64: sdpo at 4 steps 0.5500 ± 0.0063; missing strips leave the
    grid without them."""
    run = make_run(tmp_path, seeds=(0,), steps=(4,), rewards=(TRAINING,))
    (run / "samples" / "ddpo_seed0_steps4.png").unlink()
    text = write_report(run, TRAINING)

    rows = markdown_rows(text)
    assert rows["algorithm"][0] == "4 steps" and rows["algorithm"][1] == "epochs"
    assert rows["sdpo"][0] == "0.5500 ± 0.0063"
    assert "single seed: mean ± its standard error over 64 images (std / √n)" in text
    assert pd.read_csv(run / "table.csv", index_col="algorithm").loc["sdpo", "4 steps spread"] == pytest.approx(0.05 / 8)
    assert not list(run.glob("table_*.csv"))
    with Image.open(run / "samples.png") as grid:
        colors = {color for _, color in grid.convert("RGB").getcolors(grid.width * grid.height)}
    assert strip_color("sdpo", 0, 4) in colors and strip_color("ddpo", 0, 4) not in colors


def test_cli_prints_the_table_and_names_bad_choices(tmp_path, capsys):
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
