"""The tuning protocol: every algorithm gets the same configurations, each trained under
the full budget and scored on validation prompts only; the selection follows the
declared rule."""

import json

import pandas as pd
import pytest

from benchmarks.cli import UsageError
from benchmarks.presets import tiny
from benchmarks.tune import TUNING_SEEDS, Point, main, make_points, score_points, scoring_reward, select

from helpers.runs import micro_args


def test_select_keeps_the_best_mean_validation_reward_and_breaks_ties_by_grid_order():
    """ddpo: scores -1.0, -0.8, -0.9 at lr 1e-3, 3e-3, 1e-2 -> 3e-3. rebel: -0.5 at both
    1e-3 and 1e-2 (a tie) -> the first in the grid, 1e-3, whatever order the rows come in.
    d3po: NaN (diverged) never wins over a finite score."""
    scores = pd.DataFrame([
        {"algo": "ddpo", "learning_rate": 1e-3, "order": 0, "score": -1.0},
        {"algo": "ddpo", "learning_rate": 3e-3, "order": 1, "score": -0.8},
        {"algo": "ddpo", "learning_rate": 1e-2, "order": 2, "score": -0.9},
        {"algo": "rebel", "learning_rate": 1e-2, "order": 2, "score": -0.5},
        {"algo": "rebel", "learning_rate": 1e-3, "order": 0, "score": -0.5},
        {"algo": "d3po", "learning_rate": 1e-3, "order": 0, "score": float("nan")},
        {"algo": "d3po", "learning_rate": 3e-3, "order": 1, "score": -2.0},
    ])
    chosen = select(scores, ["learning_rate"])
    assert chosen["ddpo"] == {"learning_rate": 3e-3, "score": -0.8}
    assert chosen["rebel"]["learning_rate"] == 1e-3
    assert chosen["d3po"]["learning_rate"] == 3e-3


def test_tuning_trains_every_configuration_and_scores_it_on_validation_prompts(tiny_pipeline_dir, tmp_path):
    """Two learning rates x two algorithms, one epoch each: one run folder per learning
    rate, evaluated once (after the last epoch) on the validation prompts with the tuning
    seed; the table has one row per (algorithm, learning rate) and the selection is the
    row with the best mean over step counts."""
    out = tmp_path / "tune"
    micro = micro_args(tiny_pipeline_dir, tmp_path / "unused")
    owned = {micro.index(flag) for flag in ("--out", "--eval-every")}
    run_args = [arg for i, arg in enumerate(micro) if i not in owned and i - 1 not in owned]
    argv = ["--out", str(out), "--grid", "learning_rate=1e-3,1e-1", *run_args, "--algos", "ddpo,rebel",
            "--epochs", "1"]
    tuning_seeds = [int(seed) for seed in TUNING_SEEDS.split(",")]
    assert len(tuning_seeds) >= 2 and not set(tuning_seeds) & {0, 1, 2}
    planned = make_points(argv[4:], {"learning_rate": (1e-3,)}, out, resume=False, overwrite=False)
    assert planned[0].plan.seeds == tuning_seeds
    first_seed, new_seed = tuning_seeds[:2]
    assert main([*argv, "--seeds", str(first_seed)]) == 0

    validation = list(tiny().val_prompts)
    for lr in ("0.001", "0.1"):
        run = out / f"learning_rate={lr}"
        config = json.loads((run / "config.json").read_text())
        assert config["eval_split"] == "validation" and config["eval_prompts"] == validation
        assert not set(validation) & set(tiny().eval_prompts)
        assert config["seeds"] == [first_seed]
        assert config["algorithm_configs"]["rebel"]["learning_rate"] == float(lr)
        records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        assert {r["epoch"] for r in records if r["algo"] != "base"} == {1}
        assert all(r["count"] == len(validation) for r in records)
    table = pd.read_csv(out / "tuning.csv")
    assert sorted(zip(table["algo"], table["learning_rate"])) == [
        ("ddpo", 0.001), ("ddpo", 0.1), ("rebel", 0.001), ("rebel", 0.1)]
    selected = json.loads((out / "selected.json").read_text())["selected"]
    for algo, rows in table.groupby("algo"):
        best = rows.loc[rows["score"].idxmax()]
        assert selected[algo]["learning_rate"] == best["learning_rate"]
        assert best["score"] == pytest.approx(rows.loc[best.name, ["1 step", "2 steps"]].mean())
    assert (table["selected"].sum()) == 2
    assert "max approx_kl" in table.columns

    # --extend adds a tuning seed to every configuration, trains only that seed, and
    # selects again on the mean over both seeds.
    first = {lr: (out / f"learning_rate={lr}" / "records.jsonl").read_text() for lr in ("0.001", "0.1")}
    assert main([*argv, "--extend", "--seeds", f"{first_seed},{new_seed}"]) == 0
    for lr, lines in first.items():
        records = [json.loads(line) for line in (out / f"learning_rate={lr}" / "records.jsonl").read_text().splitlines()]
        assert (out / f"learning_rate={lr}" / "records.jsonl").read_text().startswith(lines)
        assert {r["seed"] for r in records} == {first_seed, new_seed}
    extended = pd.read_csv(out / "tuning.csv")
    for algo, lr in (("ddpo", "0.001"), ("rebel", "0.1")):
        records = pd.DataFrame(
            [json.loads(line) for line in (out / f"learning_rate={lr}" / "records.jsonl").read_text().splitlines()])
        mine = records[(records["algo"] == algo) & (records["reward"] == "jpeg_compressibility")]
        row = extended[(extended["algo"] == algo) & (extended["learning_rate"] == float(lr))].iloc[0]
        assert row["score"] == pytest.approx(mine.groupby("eval_steps")["mean"].mean().mean())
    assert f"seeds {first_seed}, {new_seed}" in (out / "tuning.md").read_text()

    # --extend --redo retrains the recorded algorithms of every finished configuration.
    both_seeds = ["--seeds", f"{first_seed},{new_seed}"]
    redone = make_points([*argv[4:], *both_seeds, "--redo"], {"learning_rate": (1e-3, 1e-1)}, out, resume=False,
                         overwrite=False, extend=True)
    assert [point.plan.redone for point in redone] == [("ddpo", "rebel")] * 2
    with pytest.raises(UsageError, match="--redo: .* pass it with --extend"):
        make_points([*argv[4:], *both_seeds, "--redo"], {"learning_rate": (1e-3,)}, out, resume=False, overwrite=False)


def _records(folder, values: dict[str, tuple[float, float]]) -> None:
    """records.jsonl of a finished one-algorithm run: reward -> its means at 1 and 4 steps."""
    folder.mkdir()
    lines = [
        {"algo": "ddpo", "seed": 100, "epoch": 10, "eval_steps": steps, "reward": reward, "mean": mean}
        for reward, means in values.items() for steps, mean in zip((1, 4), means)
    ]
    (folder / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_proxy_is_tuned_by_its_gold_and_a_plain_reward_by_itself(tmp_path):
    """Where a configuration raises the proxy and drops its gold (hacking), the tuner ranks by
    the gold; a reward without a gold is ranked by itself."""
    from types import SimpleNamespace

    assert scoring_reward("tiny-aesthetic") == "tiny-aesthetic-gold"
    assert scoring_reward("tiny-align") == "tiny-align-gold"
    assert scoring_reward("jpeg_compressibility") == "jpeg_compressibility"
    hacks, aligns = tmp_path / "hacks", tmp_path / "aligns"
    _records(hacks, {"tiny-aesthetic": (0.9, 0.9), "tiny-aesthetic-gold": (0.1, 0.2)})
    _records(aligns, {"tiny-aesthetic": (0.6, 0.7), "tiny-aesthetic-gold": (0.6, 0.8)})
    points = [
        Point({"learning_rate": lr}, SimpleNamespace(out_dir=folder, algos=["ddpo"], reward="tiny-aesthetic",
                                                     eval_rewards=["tiny-aesthetic-gold"]))
        for lr, folder in ((8e-3, hacks), (1e-3, aligns))
    ]
    scores = score_points(points)
    assert list(scores["score"]) == pytest.approx([0.15, 0.7])
    assert list(scores["4 steps"]) == pytest.approx([0.9, 0.7])  # the table still shows the proxy
    assert select(scores, ["learning_rate"])["ddpo"]["learning_rate"] == 1e-3


def test_the_peak_rule_scores_each_configuration_at_its_best_validation_epoch(tmp_path):
    """lr 8e-3 peaks on the gold at epoch 4 (0.75 over 1 and 4 steps) and then hacks it down
    to 0.15 at epoch 10; lr 1e-3 rises to 0.7 at epoch 10. The last-epoch rule picks 1e-3,
    the peak rule 8e-3 at epoch 4 (its proxy, not the rule's score, peaks at epoch 10)."""
    from types import SimpleNamespace

    fast, slow = tmp_path / "fast", tmp_path / "slow"
    for folder, curve in ((fast, {4: ((0.5, 0.5), (0.7, 0.8)), 10: ((0.9, 0.9), (0.1, 0.2))}),
                          (slow, {4: ((0.5, 0.5), (0.5, 0.6)), 10: ((0.6, 0.7), (0.6, 0.8))})):
        folder.mkdir()
        lines = [
            {"algo": "ddpo", "seed": 100, "epoch": epoch, "eval_steps": steps, "reward": reward, "mean": mean}
            for epoch, (proxy, gold) in curve.items()
            for reward, means in (("tiny-aesthetic", proxy), ("tiny-aesthetic-gold", gold))
            for steps, mean in zip((1, 4), means)
        ]
        (folder / "records.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    points = [
        Point({"learning_rate": lr}, SimpleNamespace(out_dir=folder, algos=["ddpo"], reward="tiny-aesthetic",
                                                     eval_rewards=["tiny-aesthetic-gold"]))
        for lr, folder in ((8e-3, fast), (1e-3, slow))
    ]
    assert select(score_points(points), ["learning_rate"])["ddpo"]["learning_rate"] == 1e-3
    peak = score_points(points, peak=True)
    assert list(peak["epoch"]) == [4, 10]
    assert list(peak["score"]) == pytest.approx([0.75, 0.7])
    assert select(peak, ["learning_rate"])["ddpo"] == {"learning_rate": 8e-3, "score": pytest.approx(0.75), "epoch": 4}


def test_curve_points_evaluate_every_epochs_over_n(tiny_pipeline_dir, tmp_path):
    micro = micro_args(tiny_pipeline_dir, tmp_path / "unused")
    owned = {micro.index(flag) for flag in ("--out", "--eval-every")}
    run_args = [arg for i, arg in enumerate(micro) if i not in owned and i - 1 not in owned] + ["--epochs", "10"]
    points = make_points(run_args, {"learning_rate": (1e-3,)}, tmp_path / "t", False, False, curve_points=5)
    assert points[0].plan.eval_every == 2
    with pytest.raises(UsageError, match="--curve-points 11"):
        make_points(run_args, {"learning_rate": (1e-3,)}, tmp_path / "t", False, False, curve_points=11)


def test_tuner_refuses_flags_it_owns(tiny_pipeline_dir, tmp_path, capsys):
    """--eval-split belongs to the tuner: passing it is refused in one line, before training."""
    code = main(["--out", str(tmp_path / "t"), "--model", tiny_pipeline_dir, "--eval-split", "test"])
    assert code == 2
    assert "--eval-split" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


ADDED_LATER = {"awm", "mixgrpo"}
"""Algorithms tuned only on the verdict's preset and task (tiny-turbo, tiny-aesthetic);
elsewhere benchmarks/presets.py gives them AWM_UNTUNED and GRPO's rates."""
UNTUNED = {
    ("tiny", "jpeg_compressibility"): {"grpo", "draft", "nft"} | ADDED_LATER,
    **{(preset, task): ADDED_LATER for preset in ("tiny", "tiny-flow") for task in ("tiny-aesthetic", "tiny-align")},
    # Not tuned on the distilled model: they keep `tiny`'s rates.
    ("tiny-turbo", "tiny-aesthetic"): {"grpo", "draft", "nft"},
    # The flow student: every algorithm but reward back-propagation.
    ("tiny-flow-turbo", "tiny-aesthetic"): {"draft"},
}
"""Per (preset, task), the algorithms no committed tuning run has selected a learning rate
for (benchmarks/presets.py: they train at another task's or preset's rate; DRaFT cannot
train on JPEG at all)."""


@pytest.mark.parametrize("preset_name, reward", [
    ("tiny", "tiny-aesthetic"), ("tiny", "tiny-align"), ("tiny", "jpeg_compressibility"),
    ("tiny-flow", "tiny-aesthetic"), ("tiny-flow", "tiny-align"), ("tiny-turbo", "tiny-aesthetic"),
    ("tiny-flow-turbo", "tiny-aesthetic"),
])
def test_tiny_presets_carry_the_committed_tuning_selection(preset_name, reward):
    """For each tuned (preset, task), the learning rates the preset trains with are the ones
    its committed tuning run (results/tune-<preset>-<reward>/selected.json) selected, from
    the grid that run tried; the current tasks were tuned on the preset's own grid."""
    from pathlib import Path

    from benchmarks.presets import PRESETS
    from benchmarks.cli import preset_algo_configs

    run = Path(__file__).resolve().parents[1] / "results" / f"tune-{preset_name}-{reward}"
    selected = json.loads((run / "selected.json").read_text())
    tried = set(pd.read_csv(run / "tuning.csv")["learning_rate"])
    preset = PRESETS[preset_name]()
    assert selected["preset"] == preset_name and selected["reward"] == reward
    configs = preset_algo_configs(preset, reward)
    untuned = UNTUNED[preset_name, reward]
    assert set(selected["selected"]) == set(preset.algo_overrides) - untuned
    for algo, chosen in selected["selected"].items():
        assert chosen["learning_rate"] in tried
        if reward != "jpeg_compressibility":
            assert chosen["learning_rate"] in preset.tuning_grid["learning_rate"]
        assert getattr(configs, algo).learning_rate == chosen["learning_rate"], algo
