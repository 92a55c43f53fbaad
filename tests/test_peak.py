"""Curves to the peak: the epoch chosen on the validation prompts, reported on the test
prompts, and the trajectories to 90% of the peak, on worked numbers; and a run evaluated on
both prompt sets end to end."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.peak import chosen_epochs, peak_table, write_peak
from benchmarks.records import load_records, load_records_and_base_curve
from benchmarks.run import main

from helpers.runs import micro_args

PROXY, GOLD = "tiny-aesthetic", "tiny-aesthetic-gold"
SAMPLES_PER_EPOCH = 16
# (split, reward, algo, epoch) -> score at 1 and 2 steps, as the mean over the two seeds;
# seed 0 scores 0.01 less and seed 1 0.01 more, so that a mean over seeds gives these.
CURVES = {
    ("validation", GOLD, "base", 0): (0.50, 0.50),
    ("validation", GOLD, "ddpo", 2): (0.50, 0.50),
    # Best on validation, averaged over step counts: the chosen epoch (test peaks later).
    ("validation", GOLD, "ddpo", 4): (0.80, 0.60),
    ("validation", GOLD, "ddpo", 6): (0.60, 0.60),
    ("test", GOLD, "base", 0): (0.50, 0.50),
    # Best on the test prompts, averaged over step counts: choosing on them would pick it.
    ("test", GOLD, "ddpo", 2): (0.52, 0.75),
    ("test", GOLD, "ddpo", 4): (0.60, 0.60),
    ("test", GOLD, "ddpo", 6): (0.62, 0.40),
    ("test", PROXY, "base", 0): (0.40, 0.40),
    ("test", PROXY, "ddpo", 2): (0.45, 0.45),
    ("test", PROXY, "ddpo", 4): (0.50, 0.50),
    ("test", PROXY, "ddpo", 6): (0.70, 0.70),
    ("validation", PROXY, "base", 0): (0.40, 0.40),
    # The proxy's own validation best is epoch 6: the choice must follow the gold.
    ("validation", PROXY, "ddpo", 2): (0.45, 0.45),
    ("validation", PROXY, "ddpo", 4): (0.50, 0.50),
    ("validation", PROXY, "ddpo", 6): (0.90, 0.90),
}


def _write(run: Path, curves: dict, skip: set = frozenset()) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for (split, reward, algo, epoch), values in curves.items():
        for seed, offset in [(0, -0.01), (1, 0.01)]:
            if (split, algo, epoch, seed) in skip:
                continue
            for steps, value in zip([1, 2], values):
                lines.append(json.dumps({
                    "algo": algo, "seed": seed, "epoch": epoch, "split": split, "eval_steps": steps,
                    "reward": reward, "mean": value + offset, "std": 0.1, "count": 64,
                    "samples_seen": epoch * SAMPLES_PER_EPOCH,
                }))
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_the_epoch_is_chosen_on_the_validation_gold_and_reported_on_the_test_prompts(tmp_path):
    run = _write(tmp_path / "run", CURVES)
    validation, test = load_records(run, "validation"), load_records(run, "test")
    assert chosen_epochs(validation, PROXY) == {"ddpo": 4}
    table = peak_table(test, GOLD, {"ddpo": 4}, ["base", "ddpo"])
    row = table.loc["ddpo"]
    assert row["epoch"] == 4
    assert row["1 final"] == pytest.approx(0.62) and row["1 peak"] == pytest.approx(0.60)
    assert row["2 final"] == pytest.approx(0.40) and row["2 peak"] == pytest.approx(0.60)
    # 1 step: peak gain 0.10, 90% of it first reached at epoch 4 (epoch 2 gains 0.02).
    # 2 steps: epoch 2 gains 0.25 >= 0.09, so 2 epochs x 16 trajectories.
    assert row["1 to 90%"] == 4 * SAMPLES_PER_EPOCH
    assert row["2 to 90%"] == 2 * SAMPLES_PER_EPOCH


def test_no_gain_has_no_trajectories_to_ninety_percent(tmp_path):
    flat = {key: ((0.4, 0.4) if key[2] == "ddpo" else value) for key, value in CURVES.items()}
    run = _write(tmp_path / "run", flat)
    table = peak_table(load_records(run, "test"), GOLD, {"ddpo": 2}, ["base", "ddpo"])
    assert math.isnan(table.loc["ddpo", "1 to 90%"]) and math.isnan(table.loc["ddpo", "2 to 90%"])


def test_an_epoch_that_a_seed_did_not_evaluate_is_not_chosen(tmp_path):
    # Seed 1 was stopped before epoch 4: only epochs 2 and 6 are complete, and 6 wins.
    run = _write(tmp_path / "run", CURVES, skip={("validation", "ddpo", 4, 1)})
    assert chosen_epochs(load_records(run, "validation"), PROXY) == {"ddpo": 6}


def test_an_algorithm_scored_nowhere_gets_no_epoch(tmp_path):
    # Every validation score of the gold missing (the reward failed at every evaluation).
    missing = {key: ((math.nan, math.nan) if key[:2] == ("validation", GOLD) and key[2] == "ddpo" else value)
               for key, value in CURVES.items()}
    run = _write(tmp_path / "run", missing)
    assert chosen_epochs(load_records(run, "validation"), PROXY) == {}
    assert write_peak(run, PROXY, ["base", "ddpo"]) == {}


def test_write_peak_writes_the_tables_and_the_proxy_gold_figure(tmp_path):
    run = _write(tmp_path / "run", CURVES)
    assert write_peak(run, PROXY, ["base", "ddpo"]) == {"ddpo": 4}
    assert "| ddpo | 4 | 0.620 / 0.600 / 64 | 0.400 / 0.600 / 32 |" in (run / "peak.md").read_text()
    assert (run / "proxy_gold.png").is_file()
    saved = pd.read_csv(run / "peak.csv")
    assert set(saved["reward"]) == {GOLD, PROXY}


def test_a_run_with_one_prompt_set_has_no_peak_report(tmp_path):
    test_only = {key: value for key, value in CURVES.items() if key[0] == "test"}
    run = _write(tmp_path / "run", test_only)
    assert write_peak(run, PROXY, ["base", "ddpo"]) is None
    with pytest.raises(ValueError, match="no records of the validation prompts"):
        load_records(run, "validation")
    # A tuning run's: validation prompts only.
    validation_only = {key: value for key, value in CURVES.items() if key[0] == "validation"}
    assert write_peak(_write(tmp_path / "tuning", validation_only), PROXY, ["base", "ddpo"]) is None


def test_both_splits_are_evaluated_and_the_curve_points_use_fewer_images(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    args = micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo", "--eval-split", "both",
                                                 "--eval-samples-per-prompt", "2", "--curve-samples-per-prompt", "1"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    # 4 prompts per set: 2 samples each at the last epoch, 1 at the curve's point, and the
    # base at both (the curve's points pair with it on their own images).
    images = {(r["algo"], r["epoch"], r["split"], r["samples_per_prompt"], r["count"]) for r in records}
    assert images == {(algo, epoch, split, n, 4 * n) for split in ("test", "validation")
                      for algo, epoch, n in [("base", 0, 2), ("base", 0, 1), ("ddpo", 1, 1), ("ddpo", 2, 2)]}
    config = json.loads((out / "config.json").read_text())
    assert config["eval_split"] == "both" and config["curve_samples_per_prompt"] == 1
    assert len(config["val_prompts"]) == 4
    assert (out / "peak.md").is_file()
    # The reported table reads the test prompts only.
    assert set(load_records(out)["split"]) == {"test"}


def test_a_curve_point_pairs_with_the_base_scored_on_its_own_images(tiny_pipeline_dir, tmp_path):
    """A curve point scores fewer images than the last epoch, so the base is also evaluated on
    those very images (same prompts, same noise): a policy that has barely moved (a learning
    rate of 1e-30) scores exactly what the base scores there, and not what the base scores on
    the full evaluation's images; the verdict pairs the point with the former."""
    from benchmarks.verdict import load_run, paired_gains, select_epochs

    out = tmp_path / "run"
    assert main(micro_args(tiny_pipeline_dir, out) + [
        "--algos", "ddpo", "--eval-samples-per-prompt", "2", "--curve-samples-per-prompt", "1",
        "--ddpo.learning-rate", "1e-30", "--eval-rewards", "tiny-aesthetic-gold"]) == 0
    records, curve_rows = load_records_and_base_curve(out)
    point = records[(records["algo"] == "ddpo") & (records["epoch"] == 1)].set_index(["eval_steps", "reward"])["mean"]
    base_curve = curve_rows.set_index(["eval_steps", "reward"])["mean"]
    base_full = records[records["algo"] == "base"].set_index(["eval_steps", "reward"])["mean"]
    assert set(curve_rows["samples_per_prompt"]) == {1}
    pd.testing.assert_series_equal(point.sort_index(), base_curve.sort_index(), check_names=False, atol=1e-6)
    assert (point.sort_index() - base_full.sort_index()).abs().max() > 1e-3
    run = load_run(out)
    gains = paired_gains(select_epochs(run.records, {("ddpo", 0): 1}), "tiny-aesthetic-gold", run.base_curve)
    assert gains["gain"].abs().max() < 1e-5
    unpaired = paired_gains(select_epochs(run.records, {("ddpo", 0): 1}), "tiny-aesthetic-gold")
    assert unpaired["gain"].abs().max() > 1e-3


def test_a_run_recorded_before_the_base_was_scored_on_the_curves_images_gets_it_on_resume(tiny_pipeline_dir, tmp_path):
    """A finished run whose base rows are the full evaluation only (written before the base was
    also scored on the curve's images, its checkpoints not kept, as in results/) gains the
    base's curve evaluation with --resume; its trained rows are kept as recorded."""
    out = tmp_path / "run"
    args = micro_args(tiny_pipeline_dir, out) + ["--algos", "ddpo", "--eval-samples-per-prompt", "2",
                                                 "--curve-samples-per-prompt", "1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    old = [{k: v for k, v in row.items() if k != "samples_per_prompt"} for row in rows
           if row["algo"] != "base" or row["samples_per_prompt"] == 2]
    (out / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in old))
    for checkpoint in (out / "checkpoints").glob("*"):
        checkpoint.unlink()
    assert load_records_and_base_curve(out)[1].empty
    assert main(args + ["--resume"]) == 0
    again = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [row for row in again if row["algo"] == "ddpo"] == [row for row in old if row["algo"] == "ddpo"]
    base = {row["samples_per_prompt"]: row["mean"] for row in again if row["algo"] == "base"
            and row["eval_steps"] == 1}
    assert base == {2: next(row["mean"] for row in rows if row["algo"] == "base" and row["eval_steps"] == 1
                            and row["samples_per_prompt"] == 2),
                    1: next(row["mean"] for row in rows if row["algo"] == "base" and row["eval_steps"] == 1
                            and row["samples_per_prompt"] == 1)}


def test_the_report_writes_the_verdict_at_the_final_and_at_the_chosen_epochs(tmp_path):
    from benchmarks.report import write_report

    run = _write(tmp_path / "run", CURVES)
    write_report(run, PROXY)
    final = json.loads((run / "verdict.json").read_text())["cells"]
    peak = json.loads((run / "peak" / "verdict.json").read_text())["cells"]
    # Gold gains over the base (0.50) of the same seed: epoch 6 (0.62, 0.40), epoch 4 (0.60, 0.60).
    assert [cell["mean"] for cell in final] == pytest.approx([0.12, -0.10])
    assert [cell["mean"] for cell in peak] == pytest.approx([0.10, 0.10])
    assert all(set(cell["epochs"].values()) == {4} for cell in peak)


def test_the_chosen_epochs_verdict_reads_each_algorithm_on_its_own_seeds(tmp_path):
    """After `--extend --partial-seeds` one algorithm has a seed the other lacks: sdpo (ddpo's
    curves) and the base have seed 2 (seed 1's numbers again), ddpo has not; the verdict at
    the chosen epoch reads ddpo on seeds 0 and 1, sdpo on 0, 1 and 2."""
    from benchmarks.report import write_report

    run = _write(tmp_path / "run", CURVES)
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    sdpo = [{**row, "algo": "sdpo"} for row in rows if row["algo"] == "ddpo"]
    seed_2 = [{**row, "seed": 2} for row in rows + sdpo if row["algo"] in ("base", "sdpo") and row["seed"] == 1]
    (run / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + sdpo + seed_2))
    write_report(run, PROXY)
    peak = json.loads((run / "peak" / "verdict.json").read_text())["cells"]
    assert {(cell["algo"], cell["n"]) for cell in peak} == {("ddpo", 2), ("sdpo", 3)}
    assert all(set(cell["epochs"].values()) == {4} for cell in peak)
