"""The verdict's statistics on worked numbers, and its files on a synthetic and a committed run.

Independent routes for the numbers checked here:
- Student t with 2 degrees of freedom has a closed form: F(t) = 1/2 + t / (2 √(2 + t²)), so
  the two-sided p of t is 1 - t / √(2 + t²) and the quantile q is a √(2 / (1 - a²)) with
  a = 2q - 1 (at q = 0.975: 0.95 √(2 / 0.0975) = 4.302653).
- Power: statsmodels 0.15.0 `TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8,
  alternative="two-sided")` gives the effect size d at which a one-sample t-test of n has
  80% power; the noncentrality is d √n (n = 2: 16.334010735, 3: 5.653489272, 10: 3.149634592).
  With `effect_size=d` it gives the seeds needed: 33.37 at d = 0.5 (so 34 seeds), 9.94 at
  d = 1 (10), 8.23 at d = 0.03 / √0.0007 (9).
- rliable 1.2.0 (`metrics.aggregate_iqm`, `metrics.probability_of_improvement`) on the gains
  of tiny-tiny-aesthetic-3seeds (see RLIABLE_GAINS), run once in a scratch venv.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmarks.checkpoint import read_jsonl
from benchmarks import verdict as v
from benchmarks.records import load_records
from benchmarks.report import bootstrap_interval

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "tiny-tiny-aesthetic-3seeds"
AESTHETIC, ALIGN = "tiny-aesthetic-gold", "tiny-align-gold"


def t2_quantile(q: float) -> float:
    """The Student t quantile at 2 degrees of freedom, in closed form."""
    a = 2 * q - 1
    return a * math.sqrt(2 / (1 - a * a))


def t2_p(t: float) -> float:
    """The two-sided p of t at 2 degrees of freedom, in closed form."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


# --- One cell -------------------------------------------------------------------------------


def test_t_interval_and_paired_p_of_three_gains():
    """Gains 0.01, 0.02, 0.06: mean 0.03, deviations -0.02, -0.01, 0.03, sd = √(0.0014 / 2)
    = √0.0007, se = √(0.0007 / 3) = 0.0152753; t = 0.03 / se = √(27 / 7) = 1.96396, so
    p = 1 - √(27 / 41) = 0.188497; half-width 4.302653 × 0.0152753 = 0.065724."""
    se = math.sqrt(0.0007 / 3)
    half = t2_quantile(0.975) * se
    assert half == pytest.approx(0.065724, abs=1e-6)
    low, high = v.t_interval([0.01, 0.02, 0.06])
    assert (low, high) == pytest.approx((0.03 - half, 0.03 + half), rel=1e-9)
    assert v.paired_t_p([0.01, 0.02, 0.06]) == pytest.approx(1 - math.sqrt(27 / 41), rel=1e-9)
    assert v.paired_t_p([0.01, 0.02, 0.06]) == pytest.approx(0.188497, abs=1e-6)
    assert v.paired_t_p([-0.01, -0.02, -0.06]) == pytest.approx(0.188497, abs=1e-6)  # two-sided
    # 0.100, 0.101, 0.102: t = 0.101 / (0.001 / √3), t² = 30603.
    assert v.paired_t_p([0.100, 0.101, 0.102]) == pytest.approx(t2_p(math.sqrt(30603)), rel=1e-6)


def test_equal_gains_are_not_tested():
    """tiny-tiny-align-3seeds, grpo at 2 steps on tiny-align-gold: every seed lost 0.010417
    (2 of 192 attribute thirds). No p, MDE or mark; Holm's m counts the other cell only, so
    sdpo's p = 1 - √(27 / 29) = 0.0351 (gains 0.02, 0.03, 0.04) stays below 0.05: ↑."""
    pairs = pd.DataFrame(
        {
            "algo": ["grpo"] * 3 + ["sdpo"] * 3, "eval_steps": [2] * 6, "seed": [0, 1, 2] * 2, "epoch": [10] * 6,
            "gain": [-0.010417] * 3 + [0.02, 0.03, 0.04],
        }
    )
    equal, tested = v.table_verdicts("run", ALIGN, pairs, ["grpo", "sdpo"])
    assert (equal.mean, equal.sd, equal.low, equal.high) == (-0.010417, 0.0, -0.010417, -0.010417)
    assert math.isnan(equal.p) and math.isnan(equal.mde) and equal.seeds_needed is None and equal.mark == 0
    assert tested.p_holm == pytest.approx(t2_p(math.sqrt(27)), rel=1e-9) and tested.mark == 1
    assert v.count_marks([equal, tested]) == v.TableCount(tested=1, uncorrected=1, holm=1)


def test_power_counts_both_tails():
    """At noncentrality 0 the power is the level, α = 0.05, half of it in each tail;
    statsmodels' power at d = 1 / √3 with 3 seeds (noncentrality 1): 0.09520175549788396, at
    d = √2 with 2 (noncentrality 2): 0.1257563177570527."""
    assert v.t_test_power(0.0, 2) == pytest.approx(0.05, rel=1e-9)
    assert v.t_test_power(1.0, 2) == pytest.approx(0.09520175549788396, rel=1e-9)
    assert v.t_test_power(2.0, 1) == pytest.approx(0.1257563177570527, rel=1e-9)


@pytest.mark.parametrize("n, statsmodels", [(2, 16.334010735), (3, 5.653489272), (10, 3.149634592)])
def test_noncentrality_at_80_percent_power_matches_statsmodels(n, statsmodels):
    assert v.noncentrality_for_power(n) == pytest.approx(statsmodels, rel=1e-6)
    assert v.t_test_power(v.noncentrality_for_power(n), n - 1) == pytest.approx(0.8, abs=1e-9)


def test_minimum_detectable_effect_and_seeds_for_power():
    """MDE = noncentrality × sd / √n: at 3 seeds and sd √0.0007, 5.653489 × 0.0152753 =
    0.086358. Seeds: statsmodels' 33.37 → 34 at d = 0.5, 9.94 → 10 at d = 1."""
    assert v.minimum_detectable_effect(math.sqrt(0.0007), 3) == pytest.approx(0.086358, abs=1e-6)
    assert v.seeds_for_power(0.5, 1.0) == 34
    assert v.seeds_for_power(-1.0, 1.0) == 10
    assert v.seeds_for_power(0.03, math.sqrt(0.0007)) == 9
    assert v.seeds_for_power(0.0, 1.0) is None
    assert v.seeds_for_power(1e-3, 1.0) is None  # (2.8 / 1e-3)² ≈ 8 million seeds > MAX_SEEDS


def test_holm_adjusted_p_values():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4), sorted 0.005, 0.01, 0.03, 0.04: times 4, 3, 2, 1 =
    0.02, 0.03, 0.06, 0.04, kept non-decreasing: 0.02, 0.03, 0.06, 0.06."""
    assert v.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # A NaN is no test: m = 2, 0.02 × 2 = 0.04 then 0.6 × 1.
    adjusted = v.holm([0.6, math.nan, 0.02])
    assert adjusted[[0, 2]] == pytest.approx([0.6, 0.04]) and math.isnan(adjusted[1])
    assert v.holm([0.7, 0.9]) == pytest.approx([1.0, 1.0])  # 1.4 capped at 1


def test_report_marks_fire_on_a_quarter_of_null_cells_at_three_seeds():
    """Of the 8 sign patterns of three differences, benchmarks.report's bootstrap interval
    excludes 0 for the 2 of one sign: 1/4; of the 4 patterns of two, 2: 1/2."""
    for n in (2, 3):
        signs = itertools.product((1, -1), repeat=n)
        patterns = [[sign * 0.01 * (i + 1) for i, sign in enumerate(pattern)] for pattern in signs]
        excluding = sum(low > 0 or high < 0 for low, high in map(bootstrap_interval, patterns))
        assert excluding / len(patterns) == v.report_mark_false_rate(n)
    assert v.report_mark_false_rate(5) is None


# --- Aggregates -----------------------------------------------------------------------------


def test_iqm_drops_a_quarter_at_each_end():
    """8 values sorted 0, 0.1, ..., 0.5, 0.8, 0.9: the middle four average 0.35; 6 values
    0..4, 10: drop one each end, mean(1, 2, 3, 4) = 2.5; 5 values: mean(3, 5, 7) = 5."""
    assert v.iqm(np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.0, 0.8])) == pytest.approx(0.35)
    assert v.iqm(np.array([3.0, 1, 2, 10, 4, 0])) == pytest.approx(2.5)
    assert v.iqm(np.array([5.0, 1, 9, 3, 7])) == pytest.approx(5.0)
    values = np.random.default_rng(0).normal(size=(4, 13))
    assert v.iqm(values) == pytest.approx(stats.trim_mean(values, 0.25, axis=1))


def test_probability_of_improvement_averages_strata():
    """Stratum 1, x = 1, 3, 4 against y = 2, 3: x wins 3 of 6 pairs (3 > 2, 4 > 2, 4 > 3) and
    ties 1 (3 = 3): 3.5 / 6 = 7/12. Stratum 2, 0.5, 0.5 against 0.2: 1. Mean 19/24. Pooled
    into one stratum it would be 8.5 / 15."""
    x = [np.array([1.0, 3, 4]), np.array([0.5, 0.5])]
    y = [np.array([2.0, 3]), np.array([0.2])]
    assert v.probability_of_improvement(x, y) == pytest.approx(19 / 24)
    assert v.probability_of_improvement(y, x) == pytest.approx(1 - 19 / 24)


def test_performance_profile_counts_gains_strictly_above_tau_per_stratum():
    """A = 0.1, 0.3 and B = 0.5, 0.6, 0.7, 0.8: above 0.25, 1/2 of A and all of B: 0.75
    (pooled: 5/6); above 0.3, none of A (strictly): 0.5."""
    strata = [np.array([0.1, 0.3]), np.array([0.5, 0.6, 0.7, 0.8])]
    assert v.performance_profile(strata, np.array([0.0, 0.25, 0.3, 0.8])) == pytest.approx([1.0, 0.75, 0.5, 0.0])


# tiny-tiny-aesthetic-3seeds, tiny-aesthetic-gold, final epoch: gains (rounded as the verdict
# rounds them) of three algorithms, rows seeds 0-2, columns 1, 2, 4, 8 steps (rliable's
# (runs, tasks) layout).
RLIABLE_GAINS = {
    "nft": [
        [0.037107, 0.0178, 0.015527, 0.012896],
        [0.046908, 0.03769, 0.046842, 0.035339],
        [0.083297, 0.071859, 0.063826, 0.032758],
    ],
    "ddpo": [
        [0.006922, 0.006586, 0.019059, 0.015826],
        [0.035648, 0.034287, 0.019266, -0.000828],
        [-0.002844, -0.009342, -0.005224, 0.001987],
    ],
    "rebel": [
        [0.040852, 0.028232, -0.000575, -0.039291],
        [-0.107121, -0.195885, -0.160555, -0.203752],
        [0.005451, -0.115033, -0.081923, -0.093188],
    ],
}


def strata_of(algo: str) -> list[np.ndarray]:
    return list(np.array(RLIABLE_GAINS[algo]).T)


def test_iqm_and_probability_of_improvement_match_rliable():
    """rliable 1.2.0 on RLIABLE_GAINS: aggregate_iqm nft 0.03944066666666667, ddpo
    0.008258666666666666, rebel -0.07285516666666667; probability_of_improvement nft over
    ddpo 0.8888888888888888, ddpo over rebel 0.8055555555555556, ddpo over zeros (the base)
    0.6666666666666666. Its stratified bootstrap (get_interval_estimates, 50000 resamples,
    another generator) gave nft's IQM [0.0272, 0.0532], ddpo's [-0.0005, 0.0191] and nft over
    ddpo [0.722, 1.0]; this file's 10000 resamples give [0.0281, 0.0531], [-0.0003, 0.0191]
    and [0.722, 1.0] (bootstrap noise apart, the same)."""
    rliable_iqm = {"nft": 0.03944066666666667, "ddpo": 0.008258666666666666, "rebel": -0.07285516666666667}
    for algo, expected in rliable_iqm.items():
        assert v.iqm(np.concatenate(strata_of(algo))) == pytest.approx(expected, rel=1e-12)
    assert v.probability_of_improvement(strata_of("nft"), strata_of("ddpo")) == pytest.approx(0.8888888888888888)
    assert v.probability_of_improvement(strata_of("ddpo"), strata_of("rebel")) == pytest.approx(0.8055555555555556)
    zeros = [np.zeros(1)] * 4
    assert v.probability_of_improvement(strata_of("ddpo"), zeros) == pytest.approx(0.6666666666666666)


def test_stratified_bootstrap_resamples_within_each_stratum():
    """Resamples of a stratum hold only its own runs, as many as it has."""
    strata = [np.array([0.0, 1.0]), np.array([10.0, 11.0, 12.0])]
    first, second = v.stratified_resamples(strata, np.random.default_rng(0))
    assert first.shape == (v.RESAMPLES, 2) and second.shape == (v.RESAMPLES, 3)
    assert set(np.unique(first)) == {0.0, 1.0} and set(np.unique(second)) == {10.0, 11.0, 12.0}
    # Drawn with replacement: both runs of the first stratum equal in about half the resamples.
    assert (first[:, 0] == first[:, 1]).mean() == pytest.approx(0.5, abs=0.02)


def test_stratified_intervals_by_hand():
    """IQM of A = 0, 1 and B = 5, 5: resampled within strata, B stays 5, 5 and A is 0, 0 (1/4),
    mixed (1/2) or 1, 1 (1/4); the middle two of the four are then 0, 5 → 2.5 or 1, 5 → 3:
    interval [2.5, 3], estimate IQM(0, 1, 5, 5) = 3. Pooled resampling would reach 0.
    P(X > base) with X = A: 1, -1, B: 1, 1, C: -1, -1: B gives 1, C 0, A 0, 1/2 or 1 with
    probabilities 1/4, 1/2, 1/4, so the mean over strata is 1/3, 1/2 or 2/3: interval
    [1/3, 2/3]. Pooled, the count of six draws above 0 is binomial(6, 1/2): [1/6, 5/6]."""
    estimate = v.iqm_estimate({("a", 1): np.array([0.0, 1.0]), ("a", 2): np.array([5.0, 5.0])})
    assert (estimate.value, estimate.low, estimate.high) == pytest.approx((3.0, 2.5, 3.0))
    x = {("a", k): np.array(runs) for k, runs in [(1, [1.0, -1.0]), (2, [1.0, 1.0]), (4, [-1.0, -1.0])]}
    base = {key: np.zeros(1) for key in x}
    poi = v.poi_estimate(x, base)
    assert (poi.value, poi.low, poi.high) == pytest.approx((0.5, 1 / 3, 2 / 3))
    profile = v.profile_estimate(x, np.array([0.0]))
    assert (profile.fraction, profile.low, profile.high) == pytest.approx(([0.5], [1 / 3], [2 / 3]))


def test_bootstrap_interval_cuts_two_and_a_half_percent_each_side():
    """Four strata of 1, -1 against the base: 8 draws, K of them above 0, K binomial(8, 1/2):
    P(K ≤ 0) = 1/256 = 0.4%, P(K ≤ 1) = 9/256 = 3.5%: the 2.5th percentile of K / 8 is 1/8
    (a 90% interval would cut at 5%: 2/8), the 97.5th 7/8."""
    x = {("a", k): np.array([1.0, -1.0]) for k in (1, 2, 4, 8)}
    poi = v.poi_estimate(x, {key: np.zeros(1) for key in x})
    assert (poi.value, poi.low, poi.high) == pytest.approx((0.5, 1 / 8, 7 / 8))


# --- Records: pairing and epochs ------------------------------------------------------------

BASE_BY_SEED = {0: 0.50, 1: 0.60, 2: 0.40}
# gains[(algo, reward, steps)] per seed 0, 1, 2, at the final epoch 10 (epoch 5: half of it).
GAINS = {
    ("sdpo", AESTHETIC, 1): [0.01, 0.02, 0.06],
    ("sdpo", AESTHETIC, 2): [0.02, 0.03, 0.04],
    ("ddpo", AESTHETIC, 1): [0.03, -0.03, 0.00],
    ("ddpo", AESTHETIC, 2): [0.100, 0.101, 0.102],
}
GAINS |= {(algo, ALIGN, k): [-g for g in gains] for (algo, _, k), gains in GAINS.items()}


PROXY = "tiny-aesthetic"


def record(algo, seed, epoch, steps, reward, mean) -> dict:
    return {
        "algo": algo, "seed": seed, "epoch": epoch, "eval_steps": steps, "reward": reward, "mean": mean, "std": 0.1,
        "count": 64,
    }


def rows(base_seeds=(0, 1, 2), align_scale=1.0) -> list[dict]:
    """Records of GAINS: the base at epoch 0 (BASE_BY_SEED + 0.1 × steps), each algorithm at
    epochs 5 and 10 with gain × epoch / 10 over it (tiny-align-gold's gains times
    `align_scale`); and the training proxy, 8.5 over its base everywhere, which is no gold and
    must not be read."""
    out = [
        record("base", seed, 0, k, gold, BASE_BY_SEED[seed] + 0.1 * k)
        for gold in (AESTHETIC, ALIGN) for k in (1, 2) for seed in base_seeds
    ]
    out += [
        record(algo, seed, epoch, k, gold, BASE_BY_SEED[seed] + 0.1 * k + gains[seed] * epoch / 10 * scale)
        for (algo, gold, k), gains in GAINS.items() for seed in (0, 1, 2) for epoch in (5, 10)
        for scale in [align_scale if gold == ALIGN else 1.0]
    ]
    out += [record("base", seed, 0, k, PROXY, 0.5) for seed in base_seeds for k in (1, 2)]
    out += [
        record(algo, seed, epoch, k, PROXY, 9.0)
        for algo in ("sdpo", "ddpo") for seed in (0, 1, 2) for epoch in (5, 10) for k in (1, 2)
    ]
    return out


def write_run(folder: Path, records: list[dict], reward: str | None = PROXY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)  # pairing must go by seed, not by the order of the lines
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    if reward is not None:
        (folder / "config.json").write_text(json.dumps({"reward": reward}))
    return folder


def test_gains_pair_each_seed_with_its_own_base(tmp_path):
    """The bases differ by seed (0.5, 0.6, 0.4 + 0.1 × steps); the gains come back exactly."""
    records = load_records(write_run(tmp_path, rows()))
    pairs = v.paired_gains(v.select_epochs(records), AESTHETIC)
    for (algo, gold, k), gains in GAINS.items():
        if gold != AESTHETIC:
            continue
        cell = pairs[(pairs["algo"] == algo) & (pairs["eval_steps"] == k)].sort_values("seed")
        assert cell["gain"].tolist() == pytest.approx(gains, abs=1e-12)
        assert cell["base"].tolist() == pytest.approx([BASE_BY_SEED[s] + 0.1 * k for s in (0, 1, 2)])


def test_gains_drop_seeds_without_a_base_and_round_float_noise_to_ties(tmp_path):
    records = load_records(write_run(tmp_path, rows(base_seeds=(0, 2))))
    pairs = v.paired_gains(v.select_epochs(records), AESTHETIC)
    assert sorted(set(pairs["seed"])) == [0, 2]
    # tiny-tiny-aesthetic-3seeds, seed 2, 1 step, tiny-align-gold: base and nft, equal but for float noise.
    noisy = [record("base", 0, 0, 1, ALIGN, 0.6197916818782687), record("nft", 0, 10, 1, ALIGN, 0.61979168234393)]
    records = load_records(write_run(tmp_path / "noisy", noisy, reward=None))
    assert v.paired_gains(v.select_epochs(records), ALIGN)["gain"].tolist() == [0.0]


def test_epochs_default_to_the_last_complete_one_and_can_be_chosen(tmp_path):
    """Epochs 5 and 10 at both step counts, and an interrupted epoch 12 at 1 step only."""
    interrupted = [record("sdpo", s, 12, 1, AESTHETIC, 0.0) for s in (0, 1, 2)]
    records = load_records(write_run(tmp_path, rows() + interrupted))
    final = v.select_epochs(records)
    assert set(final.loc[final["algo"] != "base", "epoch"]) == {10}
    chosen = v.select_epochs(records, {("sdpo", 1): 5})
    pairs = v.paired_gains(chosen, AESTHETIC)
    sdpo = pairs[(pairs["algo"] == "sdpo") & (pairs["eval_steps"] == 1)].set_index("seed").sort_index()
    assert sdpo["epoch"].to_dict() == {0: 10, 1: 5, 2: 10}
    assert sdpo["gain"].tolist() == pytest.approx([0.01, 0.02 / 2, 0.06])  # seed 1 at half its gain
    with pytest.raises(ValueError, match="epoch 12 was not evaluated at step counts \\[2\\]"):
        v.select_epochs(records, {("sdpo", 0): 12})
    with pytest.raises(ValueError, match="not recorded"):
        v.select_epochs(records, {("sdpo", 7): 5})


def test_golds_of_the_training_reward_come_first():
    recorded = [AESTHETIC, "tiny-align", ALIGN]
    assert v.gold_order("tiny-align", recorded) == [ALIGN, AESTHETIC]
    assert v.gold_order(AESTHETIC, [ALIGN, AESTHETIC]) == [AESTHETIC, ALIGN]  # trained on a gold itself
    assert v.gold_order(None, [ALIGN, AESTHETIC]) == [ALIGN, AESTHETIC]
    assert v.gold_order("module.path:Plugin", recorded) == [AESTHETIC, ALIGN]
    assert v.gold_order("tiny-align", [AESTHETIC]) == [AESTHETIC]  # its gold not recorded


# --- Files ----------------------------------------------------------------------------------

FILES = ["verdict.md", "verdict.json", "step_generalization.png", "poi_matrix.png", "performance_profiles.png"]


def test_synthetic_run_verdict_files_and_numbers(tmp_path):
    """On GAINS (3 seeds, 1 and 2 steps):
    - sdpo at 1 step: the numbers of test_t_interval_and_paired_p_of_three_gains; MDE 0.086358;
      9 seeds for its mean;
    - sdpo at 2 steps: mean 0.03, sd 0.01, t² = 27: p = 1 - √(27 / 29) = 0.0351, below α but
      third smallest of the table's 4: × 3 = 0.105 after Holm, no mark;
    - ddpo at 2 steps: p = 3.27e-5, × 4 cells = 1.3e-4 after Holm: the table's only mark, ↑
      on tiny-aesthetic-gold and ↓ on tiny-align-gold (gains negated there); uncorrected
      marks 2 of 4, α·m = 0.2 expected false;
    - IQM of sdpo over its 6 runs 0.01, 0.02, 0.02, 0.03, 0.04, 0.06: mean(0.02, 0.02, 0.03,
      0.04) = 0.0275; P(ddpo > sdpo): at 1 step 0.03 beats 0.01 and 0.02 (2 of 9), at 2 steps
      every pair (1): 11/18; P(ddpo > base): (1/2 + 1) / 2, the 0 at 1 step a tie;
    - the proxy tiny-aesthetic (its own gains of 8.5) is no gold and appears nowhere."""
    run = write_run(tmp_path / "synthetic", rows())
    text = v.write_verdict([run], tmp_path / "out", epochs=None)
    for name in FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0
    result = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert result["runs"] == [{"name": "synthetic", "reward": PROXY, "golds": [AESTHETIC, ALIGN]}]
    cells = {(c["gold"], c["algo"], c["steps"]): c for c in result["cells"]}
    sdpo = cells[AESTHETIC, "sdpo", 1]
    half = t2_quantile(0.975) * math.sqrt(0.0007 / 3)
    assert (sdpo["n"], sdpo["mean"]) == (3, pytest.approx(0.03))
    assert (sdpo["ci_low"], sdpo["ci_high"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert sdpo["p"] == pytest.approx(0.188497, abs=1e-6)
    assert sdpo["mde"] == pytest.approx(5.653489272 * math.sqrt(0.0007 / 3), rel=1e-6)
    assert sdpo["seeds_needed"] == 9 and sdpo["epochs"] == {"0": 10, "1": 10, "2": 10}
    ddpo = cells[AESTHETIC, "ddpo", 2]
    assert ddpo["p_holm"] == pytest.approx(4 * t2_p(math.sqrt(30603)), rel=1e-6)
    assert cells[AESTHETIC, "sdpo", 2]["p"] == pytest.approx(t2_p(math.sqrt(27)), rel=1e-9)
    assert cells[AESTHETIC, "sdpo", 2]["p_holm"] == pytest.approx(3 * t2_p(math.sqrt(27)), rel=1e-9)
    marks = {key: c["mark"] for key, c in cells.items() if c["mark"]}
    assert marks == {(AESTHETIC, "ddpo", 2): 1, (ALIGN, "ddpo", 2): -1}
    assert result["tables"][0] == {
        "run": "synthetic", "gold": AESTHETIC, "tested": 4, "uncorrected_marks": 2, "holm_marks": 1,
        "expected_false_marks_uncorrected": pytest.approx(0.2),
    }
    aesthetic = result["aggregates"][0]
    assert aesthetic["gold"] == AESTHETIC and aesthetic["strata"] == [{"run": "synthetic", "steps": k} for k in (1, 2)]
    assert aesthetic["iqm"]["sdpo"]["value"] == pytest.approx(0.0275)
    assert aesthetic["poi"]["ddpo"]["base"]["value"] == pytest.approx(0.75)
    assert aesthetic["poi"]["ddpo"]["sdpo"]["value"] == pytest.approx(11 / 18)
    assert aesthetic["poi"]["sdpo"]["ddpo"]["value"] == pytest.approx(7 / 18)
    assert "tiny-aesthetic " not in text and "8.5" not in text
    # ddpo at 1 step: sd 0.03, half-width 4.302653 × 0.03 / √3 = 0.0745; at 2 steps 0.0025.
    assert "| ddpo | +0.000 ± 0.075 | +0.101 ± 0.002 ↑ |" in text
    assert "2 have an uncorrected p ≤ 0.05" in text and "Holm keeps 1" in text and "α·m = 0.20" in text
    assert text == (tmp_path / "out" / "verdict.md").read_text()


def test_seeds_for_half_width_on_closed_forms():
    """The t interval's half-width at n seeds is q(n - 1) sd / √n. At n = 2, q(1) is the
    Cauchy quantile tan(0.475 π) = 12.706205: half-width 8.984644 sd, so sd 0.002 reaches
    ±0.02 with 2 seeds and 0.0023 does not. At n = 3 (q(2) = 4.302653 in closed form) the
    boundary is sd = 0.02 √3 / 4.302653 = 0.0080509: just below it takes 3 seeds, just above
    it more."""
    assert math.tan(0.475 * math.pi) / math.sqrt(2) == pytest.approx(8.984644, abs=1e-6)
    assert v.seeds_for_half_width(0.002) == 2
    assert v.seeds_for_half_width(0.0023) == 3
    boundary = 0.02 * math.sqrt(3) / t2_quantile(0.975)
    assert v.seeds_for_half_width(boundary * 0.999) == 3
    assert v.seeds_for_half_width(boundary * 1.001) == 4
    assert v.seeds_for_half_width(0.0) == 2
    assert v.seeds_for_half_width(10.0) is None  # ±0.02 is out of reach of MAX_SEEDS seeds


def test_precision_bar_exempts_only_diverging_algorithms(tmp_path):
    """On GAINS, own gold tiny-aesthetic-gold: sdpo's widest half-width is at 1 step, 0.065724
    (sd √0.0007 = 0.026458; ±0.02 needs q(n - 1) / √n ≤ 0.7559: 2.306004 / 3 = 0.7687 at 9
    seeds, 2.262157 / √10 = 0.7154 at 10), its worst mean -0.03 on tiny-align-gold: not met.
    ddpo's tiny-align-gold loss at 2 steps is 0.101 > DIVERGENCE: exempt. Halving the
    tiny-align-gold gains (0.0505) brings ddpo under the bar: both then fail it. A seed is
    counted as collapsed where its own gain falls below -0.10."""
    run = write_run(tmp_path / "synthetic", rows())
    text = v.write_verdict([run], tmp_path / "out")
    result = json.loads((tmp_path / "out" / "verdict.json").read_text())
    rows_by_algo = {p["algo"]: p for p in result["precision"]}
    sdpo, ddpo = rows_by_algo["sdpo"], rows_by_algo["ddpo"]
    assert sdpo["gold"] == AESTHETIC and sdpo["widest_steps"] == 1 and sdpo["seeds"] == 3
    assert sdpo["widest_half_width"] == pytest.approx(t2_quantile(0.975) * math.sqrt(0.0007 / 3))
    assert sdpo["seeds_for_target"] == 10
    assert (sdpo["worst_mean_gain"], sdpo["worst_gold"]) == (pytest.approx(-0.03), ALIGN)
    assert (sdpo["diverges"], sdpo["met"]) == (False, False)
    assert (ddpo["worst_mean_gain"], ddpo["worst_gold"], ddpo["worst_steps"]) == (pytest.approx(-0.101), ALIGN, 2)
    assert (ddpo["diverges"], ddpo["widest_steps"]) == (True, 1)
    # ddpo's seeds at 2 steps on tiny-align-gold lost 0.100, 0.101 and 0.102: two beyond 0.10.
    assert (ddpo["collapsed_seeds"], sdpo["collapsed_seeds"]) == (2, 0)
    assert "| ddpo | 0.0745 (1 step) |" in text and "| 2 of 3 | diverges: exempt |" in text
    assert "±0.02 at every step count: not met by 1 of 1 (sdpo)" in text
    halved = v.write_verdict([write_run(tmp_path / "halved", rows(align_scale=0.5))], tmp_path / "halved-out")
    assert "not met by 2 of 2 (ddpo, sdpo)" in halved or "not met by 2 of 2 (sdpo, ddpo)" in halved


def test_an_algorithm_with_more_seeds_than_the_others_is_read_on_its_own_seeds(tmp_path):
    """A partial extension (`--extend --partial-seeds`): ddpo and the base have a fourth seed
    (base 0.7, ddpo's gains 0.06 at 1 step and 0.103 at 2), sdpo has not. ddpo at 2 steps:
    gains 0.100, 0.101, 0.102, 0.103, mean 0.1015, sd √(0.00000166...) = 0.0012910; its
    half-width q(3) 3.182446 × 0.0012910 / 2 = 0.0020542. sdpo reads as on three seeds, and
    each row names its own count instead of marking sdpo's cells n=3."""
    records = rows(base_seeds=(0, 1, 2))
    extra = {1: 0.06, 2: 0.103}
    for gold, sign in ((AESTHETIC, 1), (ALIGN, -1)):
        for k in (1, 2):
            records.append(record("base", 3, 0, k, gold, 0.7 + 0.1 * k))
            records += [record("ddpo", 3, epoch, k, gold, 0.7 + 0.1 * k + sign * extra[k] * epoch / 10)
                        for epoch in (5, 10)]
    text = v.write_verdict([write_run(tmp_path / "partial", records)], tmp_path / "out")
    result = json.loads((tmp_path / "out" / "verdict.json").read_text())
    cells = {(c["gold"], c["algo"], c["steps"]): c for c in result["cells"]}
    ddpo, sdpo = cells[AESTHETIC, "ddpo", 2], cells[AESTHETIC, "sdpo", 2]
    assert (ddpo["n"], sdpo["n"]) == (4, 3)
    assert ddpo["mean"] == pytest.approx(0.1015)
    half = stats.t.ppf(0.975, 3) * np.std([0.100, 0.101, 0.102, 0.103], ddof=1) / 2
    assert (ddpo["ci_high"] - ddpo["ci_low"]) / 2 == pytest.approx(half)
    assert "| ddpo (4 seeds) | +0.015 ± " in text and "| sdpo (3 seeds) | +0.030 ± 0.066 |" in text
    assert "(n=3)" not in text and "mean over each algorithm's seeds (beside its name)" in text
    precision = {p["algo"]: p["seeds"] for p in result["precision"]}
    assert precision == {"ddpo": 4, "sdpo": 3}
    assert "at each algorithm's seeds (`collapsed seeds` counts them)" in text


def test_an_algorithm_collapsing_after_the_analysed_epoch_diverges(tmp_path):
    """ddpo analysed at epoch 5 (every seed), where its worst mean is -0.0505 (tiny-align-gold,
    2 steps: half its epoch-10 loss of 0.101): no divergence there, but at its last epoch 10
    it loses 0.101, so it is exempt, as diverging by the last epoch. sdpo, analysed at its
    last epoch, has the same worst mean in both columns (-0.03)."""
    run = write_run(tmp_path / "synthetic", rows())
    result = v.verdict([run], epochs=[{("ddpo", seed): 5 for seed in (0, 1, 2)}])
    by_algo = {p.algo: p for p in result.precision}
    ddpo, sdpo = by_algo["ddpo"], by_algo["sdpo"]
    assert (ddpo.worst, ddpo.worst_gold, ddpo.worst_steps) == (pytest.approx(-0.0505), ALIGN, 2)
    assert (ddpo.final_worst, ddpo.final_worst_gold, ddpo.final_worst_steps) == (pytest.approx(-0.101), ALIGN, 2)
    assert ddpo.diverges and ddpo.diverges_by_the_end
    assert sdpo.final_worst == pytest.approx(sdpo.worst) == pytest.approx(-0.03) and not sdpo.diverges
    text = v.precision_markdown(result.precision)
    ddpo_row = next(line for line in text.splitlines() if line.startswith("| ddpo |"))
    assert ddpo_row.endswith("| -0.101 (tiny-align-gold, 2 steps) | 0 of 3 | diverges by the last epoch: exempt |")
    assert "not met by 1 of 1 (sdpo)" in text


def test_committed_run_verdict(tmp_path):
    """tiny-tiny-aesthetic-3seeds: the files appear; nft's gold gain at 4 steps, read from the
    raw records, is the cell's; the aggregates are rliable's numbers (RLIABLE_GAINS)."""
    v.write_verdict([COMMITTED], tmp_path)
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0
    raw = [json.loads(line) for line in read_jsonl(COMMITTED / "records.jsonl")]  # committed packed
    at_4 = [r for r in raw if r["reward"] == AESTHETIC and r["eval_steps"] == 4]
    gold = {(r["algo"], r["seed"], r["epoch"]): r["mean"] for r in at_4}
    expected = [gold["nft", s, 10] - gold["base", s, 0] for s in (0, 1, 2)]
    result = json.loads((tmp_path / "verdict.json").read_text())
    cell = next(c for c in result["cells"] if (c["gold"], c["algo"], c["steps"]) == (AESTHETIC, "nft", 4))
    assert [cell["gains"][s] for s in "012"] == pytest.approx(expected, abs=1e-6)
    # 7 algorithms × 4 step counts; on tiny-align-gold nft at 1 step gained 0 on every seed: not tested.
    assert [t["tested"] for t in result["tables"]] == [28, 27]
    assert result["aggregates"][0]["iqm"]["nft"]["value"] == pytest.approx(0.03944066666666667)
    assert result["aggregates"][0]["poi"]["nft"]["ddpo"]["value"] == pytest.approx(0.8888888888888888)


def test_a_run_of_the_base_alone_has_no_verdict(tmp_path):
    run = write_run(tmp_path / "base-only", [r for r in rows() if r["algo"] == "base"])
    with pytest.raises(ValueError, match="no trained algorithm"):
        v.write_verdict([run], tmp_path / "out")


def test_cli_writes_into_the_run_folder_or_out(tmp_path, capsys):
    run = write_run(tmp_path / "a", rows())
    v.main([str(run)])
    assert "# Verdict: a" in capsys.readouterr().out and (run / "verdict.json").exists()
    other = write_run(tmp_path / "b", rows())
    with pytest.raises(SystemExit, match="--out is needed"):
        v.main([str(run), str(other)])
    v.main([str(run), str(other), "--out", str(tmp_path / "both")])
    pooled = json.loads((tmp_path / "both" / "verdict.json").read_text())["aggregates"][0]
    assert len(pooled["strata"]) == 4  # (run folder, step count): 2 × 2
    # The 6 runs twice: drop 3 of 12 at each end, mean(0.02, 0.02, 0.02, 0.03, 0.03, 0.04).
    assert pooled["iqm"]["sdpo"]["value"] == pytest.approx(0.16 / 6)


def test_tasks_with_different_golds_pool_each_runs_own_gold_first(tmp_path):
    """Run a trains tiny-aesthetic, run c tiny-align: sdpo's own-gold runs are a's
    tiny-aesthetic-gold gains 0.01, 0.02, 0.06, 0.02, 0.03, 0.04 and c's tiny-align-gold gains,
    -2 times those. IQM: the middle six of twelve, -0.04, -0.04, -0.02, 0.01, 0.02, 0.02:
    -0.05 / 6 (with each run's other gold, 0); P(sdpo > base): 1 in a's two strata, 0 in c's:
    1/2."""
    a = write_run(tmp_path / "a", rows())
    c = write_run(tmp_path / "c", rows(align_scale=2.0), reward="tiny-align")
    v.write_verdict([a, c], tmp_path / "out")
    result = json.loads((tmp_path / "out" / "verdict.json").read_text())
    own = result["aggregates"][0]
    assert own["gold"] == v.OWN_GOLD and [g["gold"] for g in result["aggregates"][1:]] == [AESTHETIC, ALIGN]
    assert own["strata"] == [{"run": run, "steps": k} for run in "ac" for k in (1, 2)]
    assert own["iqm"]["sdpo"]["value"] == pytest.approx(-0.05 / 6)
    assert own["poi"]["sdpo"]["base"]["value"] == pytest.approx(0.5)
