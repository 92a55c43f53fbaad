"""The verdict of run folders: which gold gains over the base stand outside the seed noise.

    python -m benchmarks.verdict results/tiny-tiny-aesthetic-3seeds [MORE_RUN_FOLDERS] [--out DIR]

`benchmarks.report` tabulates every recorded reward with one mark per cell. This file asks
what a ranking needs, on the golds only (the held-out rewards nothing trained on,
`rewards.catalog.GOLD_OF`), from one epoch of every (algorithm, seed): by default its last
fully evaluated one (`records.final_records`); `write_verdict(..., epochs=...)` picks others
(each seed's peak, say).

A run is one (run folder, algorithm, seed, step count), and its score is its **gain**: the
gold of the algorithm minus the gold of the base of the same seed and step count. The base
rows differ by seed (each seed draws its own evaluation noise), so pairing by seed removes
that noise from every comparison.

Per cell (run folder, gold, algorithm, step count), over the seeds:
- the mean gain and its Student t 95% interval (n - 1 degrees of freedom);
- the paired t-test of "no gain" (two-sided p);
- the minimum detectable effect (MDE): the true mean gain that a paired t-test at
  two-sided α = 0.05 detects with 80% power, given n seeds and the observed sd of the
  gains; exact, from the noncentral t distribution (`noncentrality_for_power`); and the
  seeds that power needs for the observed mean gain (a planning number: the observed mean
  and sd of a few seeds are themselves noisy);
- the ↑ / ↓ mark: significant after Holm–Bonferroni over all the cells of its table (every
  algorithm × step count of one run folder and gold; family-wise error ≤ α), next to the
  α·m false marks that m uncorrected tests at α would carry in expectation when nothing
  moved.

Per run folder and algorithm, its precision on the run's own gold: the widest interval
half-width over the step counts against PRECISION_TARGET (±0.02), the seeds that would
reach it, and whether the algorithm diverges (a mean loss beyond DIVERGENCE on some gold,
at the epochs analysed or at the end of its budget, which exempts it: its width measures
how differently its seeds collapse).

Aggregates per gold, pooling every run folder given (Agarwal et al. 2021, "Deep RL at the
edge of the statistical precipice", and its library github.com/google-research/rliable),
with strata (run folder, step count):
- the interquartile mean (IQM) of an algorithm's gains over all its runs;
- the probability of improvement P(X > Y) of each algorithm over the base and over each
  other algorithm: within a stratum, the fraction of (run of X, run of Y) pairs where X's
  gain is higher, ties counting 1/2 (the Mann–Whitney U statistic / (n m)), averaged over
  the strata. The base's gain is 0 in every run, so over the base it is the fraction of
  runs with a positive gain;
- performance profiles: the fraction of runs whose gain exceeds τ, averaged over strata,
  at every τ where it steps (each observed gain, and 0);
- each with the 95% percentile interval of a stratified bootstrap: seeds are resampled
  with replacement within each stratum (and independently for X and Y), `RESAMPLES`
  times from a fixed seed, so the numbers are reproducible.
One gold's scores share one scale, so the gains pool across run folders unnormalised. When
the run folders train rewards with different golds (the aesthetic and the alignment task),
one more aggregate comes first: each folder's own gold (`OWN_GOLD`), the tasks pooled; the
tiny world's golds both score in 0..1, which is what lets their gains pool unnormalised.

Outputs in the output folder: `verdict.md` (the tables and what they allow one to say),
`verdict.json` (every number), `step_generalization.png`, `poi_matrix.png` and
`performance_profiles.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tyro  # noqa: E402
from scipy import optimize, stats  # noqa: E402

from benchmarks.figures import save_figure  # noqa: E402
from benchmarks.records import (  # noqa: E402
    BASE, final_records, load_records_and_base_curve, row_order, steps_label, with_base,
)
from rewards.catalog import GOLD_OF  # noqa: E402
from rewards.errors import UnknownReward  # noqa: E402
from rewards.spec import gold_rewards  # noqa: E402
from zoo import strict_json  # noqa: E402

ALPHA = 0.05
"""Two-sided level of every test; intervals are at 1 - ALPHA."""
POWER = 0.8
"""The power at which the minimum detectable effect is stated."""
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MAX_SEEDS = 10_000
"""Seed counts searched for `seeds_for_power`; more are reported as "more than"."""
GAIN_DECIMALS = 6
"""Gains are rounded to this many decimals. The golds score in float32 and the records
average them in an order that differs between runs: two evaluations whose scores sum to
the same value can record means 1e-9 apart (tiny-tiny-aesthetic-3seeds, nft and base at
1 step on tiny-align-gold, seed 2: 4.7e-10). Unrounded, that would be a gain, not a tie;
real gains are a few thousandths or more (an image of 64 moving a third of a point)."""
CHANCE = 0.5
"""P(X > Y) of two algorithms that do not differ."""
OWN_GOLD = "own gold of each run"
"""The aggregate over every run folder's own gold (its training reward's)."""
PRECISION_TARGET = 0.02
"""The half-width of the t interval of a gain that a verdict table is built to reach on its
training reward's gold, for every algorithm that does not diverge (issue 27's bar: a
ranking of gains a few hundredths apart needs intervals narrower than the gains)."""
DIVERGENCE = 0.10
"""A mean gold loss beyond this at some step count, on any gold, marks an algorithm as
diverging: its intervals are wide because its seeds collapse differently, and more seeds
would only measure the collapse more precisely."""

EpochChoice = Mapping[tuple[str, int], int]
"""(algorithm, seed) -> the epoch to judge; pairs left out take their last evaluated epoch."""
Strata = dict[tuple[str, int], np.ndarray]
"""(run folder, step count) -> one algorithm's gains there, one per seed."""


# --- Selecting and pairing the evaluations ---------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run folder's records and its golds: the training reward's own first (itself
    when it is a gold), then the other golds as first recorded."""

    name: str
    records: pd.DataFrame
    reward: str | None
    golds: list[str]
    base_curve: pd.DataFrame | None = None
    """The base's rows on the curve's images (`records.load_records_and_base_curve`),
    which pair with trained rows at the curve's points; None or empty: none recorded."""


def own_golds(reward: str | None) -> list[str]:
    """The golds of a training reward: itself when it is a gold, the golds of its proxies
    otherwise; none for no reward or one the registry does not know (another version's)."""
    if reward is None:
        return []
    if reward in GOLD_OF.values():
        return [reward]
    try:
        return gold_rewards(reward)
    except UnknownReward:
        return []


def gold_order(reward: str | None, recorded: Sequence[str]) -> list[str]:
    """The recorded golds, those of the training reward `reward` first."""
    every_gold = set(GOLD_OF.values())
    ordered = [*own_golds(reward), *(name for name in recorded if name in every_gold)]
    return [name for name in dict.fromkeys(ordered) if name in recorded]


def load_run(run_dir: str | Path) -> Run:
    """A run folder's records, its training reward (config.json's `reward`; None without a
    config.json) and golds."""
    run_dir = Path(run_dir)
    records, base_curve = load_records_and_base_curve(run_dir)
    config = run_dir / "config.json"
    reward = json.loads(config.read_text())["reward"] if config.exists() else None
    golds = gold_order(reward, list(dict.fromkeys(records["reward"])))
    if not golds:
        every_gold = ", ".join(sorted(set(GOLD_OF.values())))
        raise ValueError(f"{run_dir / 'records.jsonl'} records no gold reward (golds: {every_gold})")
    return Run(run_dir.resolve().name, records, reward, golds, base_curve)


def select_epochs(records: pd.DataFrame, chosen: EpochChoice | None = None) -> pd.DataFrame:
    """Every (algorithm, seed)'s rows at one epoch: `chosen[(algo, seed)]` where given, its
    last fully evaluated epoch (`records.final_records`) otherwise. A chosen epoch must be
    evaluated at every step count its (algorithm, seed) was; ValueError otherwise, and for
    a chosen pair that was not recorded."""
    final = final_records(records)
    if not chosen:
        return final
    recorded = {(algo, int(seed)) for algo, seed in zip(final["algo"], final["seed"])}
    unknown = sorted(set(chosen) - recorded)
    if unknown:
        raise ValueError(f"epochs chosen for (algorithm, seed) pairs that were not recorded: {unknown}")
    parts = []
    for (algo, seed), rows in final.groupby(["algo", "seed"], sort=False):
        epoch = chosen.get((algo, int(seed)))
        if epoch is None:
            parts.append(rows)
            continue
        at = records[(records["algo"] == algo) & (records["seed"] == seed) & (records["epoch"] == epoch)]
        missing = set(rows["eval_steps"]) - set(at["eval_steps"])
        if missing:
            raise ValueError(f"{algo} seed {seed}: epoch {epoch} was not evaluated at step counts {sorted(missing)}")
        parts.append(at)
    return pd.concat(parts, ignore_index=True)


def paired_gains(selected: pd.DataFrame, gold: str, base_curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (algo, seed, eval_steps) of a trained algorithm: its epoch, its `gold`
    mean, `base` (the base's mean at the same seed and step count, on the row's own images
    where `base_curve` holds them: `records.with_base`) and `gain`, the difference. Seeds
    without a base row, and non-finite scores, are left out."""
    of_gold = selected[selected["reward"] == gold]
    trained = of_gold.loc[of_gold["algo"] != BASE]
    pairs = with_base(trained, of_gold[of_gold["algo"] == BASE], base_curve)
    pairs = pairs[["algo", "seed", "eval_steps", "epoch", "mean", "base"]]
    pairs["gain"] = (pairs["mean"] - pairs["base"]).round(GAIN_DECIMALS)
    return pairs[np.isfinite(pairs["gain"].astype(float))].reset_index(drop=True)


# --- One cell: a t interval, a paired t-test and its power ------------------------------


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """The Student t 1 - ALPHA interval of the mean of `values` (two or more)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def paired_t_p(gains: Sequence[float]) -> float:
    """Two-sided p of the t-test that the mean gain is 0 (two or more gains, not all equal)."""
    gains = np.asarray(gains, dtype=float)
    n = len(gains)
    t = gains.mean() / (gains.std(ddof=1) / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def t_test_power(noncentrality: float, df: int) -> float:
    """Power of a two-sided t-test at ALPHA: P(|T| > t_crit) for T noncentral t with `df`
    degrees of freedom and noncentrality mean / (sd / √n)."""
    critical = stats.t.ppf(1 - ALPHA / 2, df)
    # P(T < -c) as P(-T > c), -T noncentral t at -noncentrality: scipy's cdf far in the
    # tail is NaN where this form underflows to 0.
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))


@functools.cache
def noncentrality_for_power(n: int) -> float:
    """The noncentrality at which a paired t-test of `n` seeds (two or more) has power
    POWER at two-sided ALPHA; the MDE is it times sd / √n."""
    df = n - 1
    high = stats.t.ppf(1 - ALPHA / 2, df) + 1.0
    while t_test_power(high, df) < POWER:
        high *= 2
    return float(optimize.brentq(lambda lam: t_test_power(lam, df) - POWER, 0.0, high, xtol=1e-10))


def minimum_detectable_effect(sd: float, n: int) -> float:
    """The smallest true mean gain a paired t-test of `n` seeds with gains of sd `sd`
    detects with power POWER at two-sided ALPHA."""
    return noncentrality_for_power(n) * sd / math.sqrt(n)


def fewest_seeds(enough: Callable[[int], bool]) -> int | None:
    """The fewest seeds n (two or more) for which `enough(n)`, a condition that once true
    stays true as n grows (a width or an MDE that falls with n); None when MAX_SEEDS are not
    enough."""
    if not enough(MAX_SEEDS):
        return None
    low, high = 2, MAX_SEEDS
    while low < high:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle + 1
    return low


def seeds_for_power(mean: float, sd: float) -> int | None:
    """The fewest seeds (two or more) whose MDE at sd `sd` is at most |mean|; None when
    more than MAX_SEEDS are needed (always, for a mean of 0)."""
    if mean == 0:
        return None
    return fewest_seeds(lambda n: minimum_detectable_effect(sd, n) <= abs(mean))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p values, in the given order: the i-th smallest p times
    (m - i + 1), made non-decreasing along the sorted order and capped at 1. A NaN p stays
    NaN and is not counted in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class CellVerdict:
    """One (run folder, gold, algorithm, step count): the seeds' gains and their statistics
    (NaN where fewer than two seeds allow none); `p_holm` and `mark` (1 / -1 / 0) are
    filled in over the cell's table."""

    run: str
    gold: str
    algo: str
    steps: int
    gains: dict[int, float]
    epochs: dict[int, int]
    mean: float
    sd: float
    low: float
    high: float
    p: float
    mde: float
    seeds_needed: int | None
    p_holm: float = math.nan
    mark: int = 0

    @property
    def n(self) -> int:
        return len(self.gains)


def cell_verdict(run: str, gold: str, algo: str, steps: int, pairs: pd.DataFrame) -> CellVerdict:
    """A cell's statistics from its rows of `paired_gains`. Gains equal on every seed leave
    nothing to test (no p, MDE or seed count): the t-test's zero variance would make any
    such gain infinitely significant, where it only says that a discrete gold (tiny-align-gold
    scores thirds of a prompt's attributes) moved by the same step on every seed."""
    gains = {int(s): float(g) for s, g in zip(pairs["seed"], pairs["gain"])}
    epochs = {int(s): int(e) for s, e in zip(pairs["seed"], pairs["epoch"])}
    values = list(gains.values())
    mean = float(np.mean(values)) if values else math.nan
    if len(values) < 2:
        return CellVerdict(run, gold, algo, steps, gains, epochs, mean, *[math.nan] * 5, None)
    if len(set(values)) == 1:
        only = values[0]
        return CellVerdict(run, gold, algo, steps, gains, epochs, only, 0.0, only, only, math.nan, math.nan, None)
    sd = float(np.std(values, ddof=1))
    return CellVerdict(
        run, gold, algo, steps, gains, epochs, mean, sd, *t_interval(values), paired_t_p(values),
        minimum_detectable_effect(sd, len(values)), seeds_for_power(mean, sd),
    )


def table_verdicts(run: str, gold: str, pairs: pd.DataFrame, algos: Sequence[str]) -> list[CellVerdict]:
    """Every (algorithm, step count) cell of one run folder and gold, with its Holm mark
    over the table."""
    cells = [
        cell_verdict(run, gold, algo, int(k), pairs[(pairs["algo"] == algo) & (pairs["eval_steps"] == k)])
        for algo in algos
        for k in sorted(pairs["eval_steps"].unique())
    ]
    adjusted = holm([cell.p for cell in cells])
    return [
        dataclasses.replace(cell, p_holm=float(p), mark=int(np.sign(cell.mean)) if p <= ALPHA else 0)
        for cell, p in zip(cells, adjusted)
    ]


# --- Aggregates: IQM, probability of improvement, profiles, stratified bootstrap --------


def iqm(values: np.ndarray) -> np.ndarray:
    """Interquartile mean along the last axis: the mean after dropping the floor(n / 4)
    lowest and highest values (rliable's `scipy.stats.trim_mean(values, 0.25)`)."""
    ordered = np.sort(values, axis=-1)
    n = ordered.shape[-1]
    return ordered[..., n // 4 : n - n // 4].mean(axis=-1)


def probability_of_improvement(x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 of a run of X against a run of Y of the same stratum,
    averaged over the strata. `x[s]`, `y[s]`: stratum s's runs on the last axis (leading
    axes, bootstrap resamples for one, are kept)."""
    per_stratum = []
    for a, b in zip(x, y):
        above = (a[..., :, None] > b[..., None, :]).mean(axis=(-2, -1))  # (..., runs of x, runs of y) averaged
        ties = (a[..., :, None] == b[..., None, :]).mean(axis=(-2, -1))
        per_stratum.append(above + ties / 2)
    return np.mean(per_stratum, axis=0)


def performance_profile(strata: Sequence[np.ndarray], taus: np.ndarray) -> np.ndarray:
    """The fraction of a stratum's runs (last axis) with a gain above each τ, averaged over
    the strata: shape (..., len(taus))."""
    return np.mean([(runs[..., :, None] > taus).mean(axis=-2) for runs in strata], axis=0)


def stratified_resamples(strata: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """RESAMPLES bootstrap copies of each stratum, shape (RESAMPLES, runs): runs drawn with
    replacement from that stratum alone."""
    return [runs[rng.integers(0, len(runs), size=(RESAMPLES, len(runs)))] for runs in strata]


def percentile_interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1 - ALPHA percentile interval of bootstrap draws (resamples on axis 0)."""
    low, high = np.percentile(draws, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)], axis=0)
    return low, high


@dataclass(frozen=True)
class Estimate:
    """A statistic and its 1 - ALPHA interval."""

    value: float
    low: float
    high: float

    def separable(self, null: float) -> bool:
        """Whether the interval excludes `null`."""
        return self.low > null or self.high < null


def iqm_estimate(strata: Strata) -> Estimate:
    """The IQM of all the runs of `strata` and its stratified bootstrap interval."""
    runs = list(strata.values())
    draws = iqm(np.concatenate(stratified_resamples(runs, np.random.default_rng(BOOTSTRAP_SEED)), axis=1))
    return Estimate(float(iqm(np.concatenate(runs))), *map(float, percentile_interval(draws)))


def poi_estimate(x: Strata, y: Strata) -> Estimate:
    """P(X > Y) over the strata both have, with its stratified bootstrap interval (X's and
    Y's seeds resampled independently)."""
    shared = [s for s in x if s in y]
    xs, ys = [x[s] for s in shared], [y[s] for s in shared]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = probability_of_improvement(stratified_resamples(xs, rng), stratified_resamples(ys, rng))
    return Estimate(float(probability_of_improvement(xs, ys)), *map(float, percentile_interval(draws)))


@dataclass(frozen=True)
class Profile:
    """A performance profile on `taus` with its pointwise stratified bootstrap band."""

    fraction: np.ndarray
    low: np.ndarray
    high: np.ndarray


def profile_estimate(strata: Strata, taus: np.ndarray) -> Profile:
    runs = list(strata.values())
    draws = performance_profile(stratified_resamples(runs, np.random.default_rng(BOOTSTRAP_SEED)), taus)
    return Profile(performance_profile(runs, taus), *percentile_interval(draws))


@dataclass(frozen=True)
class Aggregate:
    """One gold's aggregates over every run folder that recorded it."""

    gold: str
    """The gold, or OWN_GOLD: each run folder's own."""
    runs: list[str]
    strata: list[tuple[str, int]]
    iqm: dict[str, Estimate]
    poi: dict[str, dict[str, Estimate]]
    """poi[x][y]: P(x > y); y ranges over the other algorithms and BASE."""
    taus: np.ndarray
    profiles: dict[str, Profile]


def gold_strata(cells: Sequence[CellVerdict], algo: str) -> Strata:
    """An algorithm's gains per (run folder, step count), from its cells with gains."""
    return {(c.run, c.steps): np.array(list(c.gains.values())) for c in cells if c.algo == algo and c.gains}


def aggregate(gold: str, cells: Sequence[CellVerdict], algos: Sequence[str]) -> Aggregate:
    """The IQM, probability-of-improvement and profile aggregates of `gold` from its cells."""
    strata = {algo: gold_strata(cells, algo) for algo in algos}
    strata = {algo: s for algo, s in strata.items() if s}
    runs = list(dict.fromkeys(c.run for c in cells))
    keys = sorted({key for s in strata.values() for key in s}, key=lambda key: (runs.index(key[0]), key[1]))
    # The base's gain is 0 in every run; one such run per stratum gives the same P(X > base)
    # as any number of them.
    base = {key: np.zeros(1) for key in keys}
    gains = np.concatenate([g for s in strata.values() for g in s.values()])
    # A profile only steps at a run's gain: evaluated there (and at 0), it is exact between.
    taus = np.unique(np.append(gains, 0.0))
    return Aggregate(
        gold=gold,
        runs=runs,
        strata=keys,
        iqm={algo: iqm_estimate(s) for algo, s in strata.items()},
        poi={
            x: {y: poi_estimate(strata[x], strata[y] if y != BASE else base) for y in [*strata, BASE] if y != x}
            for x in strata
        },
        taus=taus,
        profiles={algo: profile_estimate(s, taus) for algo, s in strata.items()},
    )


# --- Precision against the bar ----------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Whether one algorithm of one run folder reaches PRECISION_TARGET on the run's own
    gold: its widest half-width there, the seeds that cell would need at its observed sd,
    and its worst mean gain on any gold, at the epochs analysed and at its last evaluated
    epoch (below -DIVERGENCE at either: diverging, exempt)."""

    run: str
    algo: str
    gold: str
    widest: float
    widest_steps: int
    seeds: int
    seeds_needed: int | None
    worst: float
    worst_gold: str
    worst_steps: int
    collapsed: int
    """Seeds that lost more than DIVERGENCE on some gold and step count: a mean that does
    not diverge can still hold seeds that did, and they, not the others' spread, are what
    widens its intervals."""
    final_worst: float
    """The worst mean gain on any gold at each seed's last evaluated epoch, the end of the
    budget (`worst` itself where the last epochs are the ones analysed). An algorithm whose
    gold collapses by then diverges, even where an earlier epoch chosen on the validation
    prompts is analysed: there its seeds stand at different points of their collapse, and
    the interval's width measures when each began."""
    final_worst_gold: str
    final_worst_steps: int

    @property
    def diverges(self) -> bool:
        return min(self.worst, self.final_worst) < -DIVERGENCE

    @property
    def diverges_by_the_end(self) -> bool:
        """Diverging at the budget's end only, not at the epochs analysed."""
        return self.diverges and self.worst >= -DIVERGENCE

    @property
    def met(self) -> bool:
        return self.widest <= PRECISION_TARGET


def seeds_for_half_width(sd: float, target: float = PRECISION_TARGET) -> int | None:
    """The fewest seeds (two or more) whose t interval at sd `sd` has a half-width of at
    most `target`; None when more than MAX_SEEDS are needed."""
    return fewest_seeds(lambda n: stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n) <= target)


def worst_final_gains(final: pd.DataFrame, golds: Sequence[str]) -> dict[str, tuple[float, str, int]]:
    """Each trained algorithm's worst mean gain over seeds in `final` (a run's rows at every
    seed's last evaluated epoch, `select_epochs` without a choice), on any of `golds`:
    algorithm -> (mean gain, gold, step count); ties go to the first gold (the run's own),
    then to the fewer steps, as in `precision`."""
    worst: dict[str, tuple[float, bool, int, str]] = {}
    for gold in golds:
        means = paired_gains(final, gold).groupby(["algo", "eval_steps"])["gain"].mean()
        for (algo, steps), gain in means.items():
            key = (float(gain), gold != golds[0], int(steps), gold)
            worst[algo] = min(worst.get(algo, key), key)
    return {algo: (gain, gold, steps) for algo, (gain, _, steps, gold) in worst.items()}


def precision(cells: Sequence[CellVerdict], run: Run, final: pd.DataFrame) -> list[Precision]:
    """Each algorithm's Precision in `run` (its cells of every gold; `final`: its rows at
    every seed's last evaluated epoch), on the run's own gold; none when the run has no own
    gold (a training reward without one) or fewer than two seeds anywhere."""
    own = run.golds[0] if run.golds and run.golds[0] in own_golds(run.reward) else None
    of_run = [c for c in cells if c.run == run.name and c.n >= 2]
    at_the_end = worst_final_gains(final, run.golds) if own else {}
    result = []
    for algo in dict.fromkeys(c.algo for c in of_run if c.gold == own):
        mine = [c for c in of_run if c.algo == algo]
        widest = max((c for c in mine if c.gold == own), key=lambda c: (c.high - c.low, -c.steps))
        worst = min(mine, key=lambda c: (c.mean, c.gold != own, c.steps))
        collapsed = {seed for c in mine for seed, gain in c.gains.items() if gain < -DIVERGENCE}
        result.append(
            Precision(
                run.name, algo, own, (widest.high - widest.low) / 2, widest.steps, widest.n,
                seeds_for_half_width(widest.sd), worst.mean, worst.gold, worst.steps, len(collapsed),
                *at_the_end[algo],
            )
        )
    return result


# --- The verdict of run folders ---------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Every cell (run folder, gold, algorithm, step count) and every gold's aggregate."""

    runs: list[Run]
    algos: list[str]
    cells: list[CellVerdict]
    aggregates: list[Aggregate]
    precision: list[Precision]
    """Every run folder's precision rows, in run order."""
    epochs: str
    """How the epochs were chosen, in words."""


def verdict(run_dirs: Sequence[str | Path], epochs: Sequence[EpochChoice | None] | None = None) -> Verdict:
    """The cells and aggregates of run folders; `epochs[i]` chooses `run_dirs[i]`'s epochs
    (`select_epochs`; None: each (algorithm, seed)'s last evaluated epoch)."""
    if epochs is not None and len(epochs) != len(run_dirs):
        raise ValueError(f"epochs has {len(epochs)} entries for {len(run_dirs)} run folders")
    runs = [load_run(d) for d in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"run folders must have distinct names (they label the tasks): {names}")
    algos = [a for a in dict.fromkeys(a for run in runs for a in row_order(run.records)) if a != BASE]
    chosen = list(epochs) if epochs is not None else [None] * len(runs)
    cells, finals = [], []
    for run, choice in zip(runs, chosen):
        selected = select_epochs(run.records, choice)
        # Precision also reads the last epochs: the rows selected here, unless epochs were chosen.
        finals.append(select_epochs(run.records) if choice else selected)
        for gold in run.golds:
            pairs = paired_gains(selected, gold, run.base_curve)
            cells += table_verdicts(run.name, gold, pairs, [a for a in algos if a in set(pairs["algo"])])
    if not any(c.gains for c in cells):
        raise ValueError(f"no trained algorithm has a gold evaluation paired with a base in {', '.join(names)}")
    pooled = {g: [c for c in cells if c.gold == g] for g in dict.fromkeys(g for run in runs for g in run.golds)}
    own = {run.name: run.golds[0] for run in runs if run.golds[0] in own_golds(run.reward)}
    if len(set(own.values())) > 1:
        pooled = {OWN_GOLD: [c for c in cells if own.get(c.run) == c.gold], **pooled}
    # A gold with no trained algorithm's gain (a run of the base alone) has nothing to aggregate.
    aggregates = [aggregate(g, of_gold, algos) for g, of_gold in pooled.items() if any(c.gains for c in of_gold)]
    how = "the epochs chosen per (algorithm, seed)" if any(chosen) else "each (algorithm, seed)'s last evaluated epoch"
    rows = [p for run, final in zip(runs, finals) for p in precision(cells, run, final)]
    return Verdict(runs, algos, cells, aggregates, rows, how)


@dataclass(frozen=True)
class TableCount:
    """What one table's marks amount to: m tested cells, those with an uncorrected p ≤
    ALPHA, those Holm keeps, and the false marks α·m uncorrected tests would carry."""

    tested: int
    uncorrected: int
    holm: int

    @property
    def expected_false(self) -> float:
        return ALPHA * self.tested


def count_marks(cells: Sequence[CellVerdict]) -> TableCount:
    """The marks of one table's cells (those with a p value)."""
    tested = [c for c in cells if not math.isnan(c.p)]
    return TableCount(len(tested), sum(c.p <= ALPHA for c in tested), sum(c.mark != 0 for c in tested))


# --- verdict.md ---------------------------------------------------------------------------


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.3f}"


def _seeds_text(needed: int | None) -> str:
    return f"> {MAX_SEEDS}" if needed is None else str(needed)


def report_mark_false_rate(n: int) -> float | None:
    """The chance that `benchmarks.report`'s paired ↑ / ↓ marks a cell that nothing moved,
    at n = 2 or 3 seeds, where its percentile bootstrap interval is the range of the seed
    differences (see report.BOOTSTRAP_METHOD): every difference of one sign, 2 × 2^-n for
    symmetric continuous noise. None for other n, where it has no closed form."""
    return 2.0 ** (1 - n) if n in (2, 3) else None


def _gain_text(cell: CellVerdict, seeds: int) -> str:
    if math.isnan(cell.mean):
        return "–"
    if cell.n < 2:
        return f"{_signed(cell.mean)} (1 seed)"
    text = f"{_signed(cell.mean)} ± {(cell.high - cell.low) / 2:.3f}{' (n=%d)' % cell.n if cell.n != seeds else ''}"
    return text + (" =" if cell.sd == 0 else {1: " ↑", -1: " ↓"}.get(cell.mark, ""))


def table_markdown(cells: Sequence[CellVerdict], run: Run, gold: str, algos: Sequence[str]) -> str:
    """The gain and MDE tables of one run folder and gold, with what to expect of the marks."""
    steps = sorted({c.steps for c in cells})
    at = {(c.algo, c.steps): c for c in cells}
    rows = [a for a in algos if any((a, k) in at for k in steps)]
    seeds = max((c.n for c in cells), default=0)
    # Where algorithms have different numbers of seeds (`benchmarks.run --extend
    # --partial-seeds`), each row names its own and a cell says n= only below its row's.
    own = {a: max(at[a, k].n for k in steps if (a, k) in at) for a in rows}
    uneven = len(set(own.values())) > 1
    label = {a: f"{a} ({own[a]} seeds)" if uneven else a for a in rows}
    role = "the training reward itself" if gold == run.reward else (
        f"gold of the training reward {run.reward}" if gold in own_golds(run.reward) else "held-out gold"
    )
    header = "| algorithm | " + " | ".join(steps_label(k) for k in steps) + " |"
    rule = "|---" + "|---:" * len(steps) + "|"
    gains = [header, rule] + [
        f"| {label[a]} | " + " | ".join(_gain_text(at[a, k], own[a]) if (a, k) in at else "–" for k in steps) + " |"
        for a in rows
    ]
    mdes = [header, rule] + [
        f"| {label[a]} | "
        + " | ".join(
            f"{at[a, k].mde:.3f} · {_seeds_text(at[a, k].seeds_needed)}"
            if (a, k) in at and not math.isnan(at[a, k].mde)
            else "–"
            for k in steps
        )
        + " |"
        for a in rows
    ]
    count = count_marks(cells)
    m = count.tested
    marks = [
        f"Of the {m} cells tested here, {count.uncorrected} have an uncorrected p ≤ {ALPHA}: marks at α = {ALPHA} "
        f"without correction would carry α·m = {count.expected_false:.2f} false marks in expectation if no algorithm "
        f"moved {gold}. Holm keeps {count.holm}."
    ]
    rate = report_mark_false_rate(seeds)
    if rate is not None:
        marks.append(
            f"For comparison, table.md's paired ↑ / ↓ at {seeds} seeds fires on a cell that nothing moved with "
            f"probability {rate:g} (every seed moved the same way), {rate * m:.1f} false marks expected over "
            "these cells."
        )
    gain_table = [f"## {run.name}: {gold} ({role})", "", *gains, ""]
    fewer = " (fewer where n= says)" if any(0 < at[a, k].n < own[a] for a, k in at if a in own) else ""
    over = "each algorithm's seeds (beside its name)" if uneven else f"{seeds} seeds"
    if seeds < 2:
        return "\n".join([*gain_table, "Gold gain over the base of the same seed, one seed: no interval, test or MDE."])
    return "\n".join(
        [
            *gain_table,
            f"Gold gain over the base of the same seed, mean over {over}{fewer} ± the "
            f"half-width of its Student t {1 - ALPHA:.0%} interval (n - 1 degrees of freedom). ↑ / ↓: the paired "
            f"t-test of no gain is significant after Holm over the {m} cells of this table (family-wise error ≤ "
            f"{ALPHA}); no mark: not separable from the base; =: every seed gained exactly the same, no variance "
            "to test against (a discrete gold), not tested. " + " ".join(marks),
            "",
            *mdes,
            "",
            f"`MDE · seeds`: the minimum detectable effect, the true mean gain that a paired t-test of these seeds "
            f"(two-sided α = {ALPHA}) detects with {POWER:.0%} power at the observed sd of the gains (noncentral t, "
            f"exact); then the seeds the same test would need to detect the observed mean gain at that sd "
            "(a planning number: both are estimated from these few seeds).",
        ]
    )


def precision_markdown(rows: Sequence[Precision]) -> str:
    """One run folder's precision table and whether it clears the bar."""
    run, gold = rows[0].run, rows[0].gold
    lines = [
        f"## {run}: precision on {gold}",
        "",
        f"| algorithm | widest ± on {gold} | seeds for ±{PRECISION_TARGET} | worst mean gain (gold, steps) | "
        "at the last epoch | collapsed seeds | bar |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.diverges:
            bar = "diverges by the last epoch: exempt" if row.diverges_by_the_end else "diverges: exempt"
        else:
            bar = "met" if row.met else "not met"
        lines.append(
            f"| {row.algo} | {row.widest:.4f} ({steps_label(row.widest_steps)}) | {_seeds_text(row.seeds_needed)} | "
            f"{_signed(row.worst)} ({row.worst_gold}, {steps_label(row.worst_steps)}) | {_signed(row.final_worst)} "
            f"({row.final_worst_gold}, {steps_label(row.final_worst_steps)}) | {row.collapsed} of {row.seeds} | {bar} |"
        )
    judged = [row for row in rows if not row.diverges]
    short = [row.algo for row in judged if not row.met]
    counts = {row.seeds for row in rows}
    at_seeds = f"{rows[0].seeds} seeds" if len(counts) == 1 else "each algorithm's seeds (`collapsed seeds` counts them)"
    verdict_text = (
        f"met by all {len(judged)}" if not short else f"not met by {len(short)} of {len(judged)} ({', '.join(short)})"
    )
    lines += [
        "",
        f"The bar: every algorithm that does not diverge (a mean gold loss of more than {DIVERGENCE:.2f} at some step "
        f"count, on any gold, at the epochs analysed or at the last epoch) has a Student t {1 - ALPHA:.0%} interval "
        f"of its gain on {gold} no wider than ±{PRECISION_TARGET} at every step count: {verdict_text}. `widest ±`: "
        f"the widest half-width over the step counts, at {at_seeds}; `seeds for ±{PRECISION_TARGET}`: "
        "the seeds that cell would need at its observed sd (a planning number); `at the last epoch`: the worst mean "
        "gain at the end of the budget, where an algorithm analysed at an earlier epoch may have collapsed since "
        f"(its seeds then stand at different points of the collapse); `collapsed seeds`: seeds whose own gain falls "
        f"below -{DIVERGENCE:.2f} on some gold and step count, which a mean above that line hides.",
    ]
    return "\n".join(lines)


def _estimate_text(estimate: Estimate, null: float, decimals: int) -> str:
    text = f"{estimate.value:.{decimals}f} [{estimate.low:.{decimals}f}, {estimate.high:.{decimals}f}]"
    return f"**{text}**" if estimate.separable(null) else text


def _separable_text(poi: Estimate) -> str:
    """Whether X is separably above Y by P(X > Y)'s interval, or separably below."""
    if poi.low > CHANCE:
        return "separable"
    return "separable the other way (by P)" if poi.high < CHANCE else "not separable"


def aggregate_markdown(agg: Aggregate, algos: Sequence[str]) -> str:
    """One gold's IQM table, probability-of-improvement matrix and ranking statements."""
    rows = [a for a in algos if a in agg.iqm]
    lines = [
        f"## Aggregate: {agg.gold} over {', '.join(agg.runs)}",
        "",
        "| algorithm | IQM gain [95% CI] | P(algorithm > base) [95% CI] |",
        "|---|---:|---:|",
        *(
            f"| {a} | {_estimate_text(agg.iqm[a], 0.0, 3)} | {_estimate_text(agg.poi[a][BASE], CHANCE, 2)} |"
            for a in rows
        ),
        "",
        f"Over every run (seed × step count × run folder; {len(agg.strata)} strata (run folder, step count)) of each "
        "algorithm: the interquartile mean of the gains over the base of the same seed, and the probability that "
        "a run's gain is positive (ties 1/2). Intervals: stratified percentile bootstrap, seeds resampled within "
        f"each stratum, {RESAMPLES} resamples, seed {BOOTSTRAP_SEED}. Bold: the interval excludes 0 (IQM) or "
        f"{CHANCE} (P).",
        "",
        "| P(row > column) | " + " | ".join([*rows, BASE]) + " |",
        "|---" + "|---:" * (len(rows) + 1) + "|",
    ]
    for x in rows:
        cells = ["–" if y == x else _estimate_text(agg.poi[x][y], CHANCE, 2) for y in [*rows, BASE]]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    pairs = [(x, y) for x in rows for y in rows if x != y and agg.poi[x][y].value > CHANCE]
    separable = [f"{x} over {y}" for x, y in pairs if agg.poi[x][y].separable(CHANCE)]
    ranked = sorted(rows, key=lambda a: -agg.iqm[a].value)
    neighbours = [f"{a} over {b}: {_separable_text(agg.poi[a][b])}" for a, b in zip(ranked, ranked[1:])]
    comparisons = len(rows) * (len(rows) - 1) // 2
    lines += [
        "",
        f"Probability of improvement of the row's algorithm over the column's, per stratum over every pair of runs "
        f"(Mann–Whitney, ties 1/2), averaged over strata; X's and Y's seeds resampled independently. Bold: the "
        f"{1 - ALPHA:.0%} interval excludes {CHANCE}, the pair is separable.",
        "",
        f"Separable pairs ({len(separable)} of {comparisons}): {', '.join(separable) if separable else 'none'}; every "
        "other pair of algorithms is not separable. "
        f"In the order of the IQM, each algorithm against the next: {'; '.join(neighbours) or 'one algorithm'}. These "
        f"{comparisons} intervals are not corrected for multiplicity: about {ALPHA * comparisons:.2f} would exclude "
        f"{CHANCE} by chance if no algorithm differed from another; and a bootstrap from a few seeds per stratum "
        "is narrower than the truth (see benchmarks/report.py), so a separable pair here is a lead for more seeds, "
        "the Holm marks above are the test.",
    ]
    return "\n".join(lines)


def verdict_markdown(result: Verdict) -> str:
    parts = [
        f"# Verdict: {', '.join(run.name for run in result.runs)}",
        "",
        f"Written by `python -m benchmarks.verdict` from {result.epochs}, on the golds (held-out rewards nothing "
        "was trained on); a run's score is its gold minus the base's at the same seed and step count. Figures: "
        "`step_generalization.png`, `poi_matrix.png`, `performance_profiles.png`; every number: `verdict.json`.",
    ]
    for run in result.runs:
        for gold in run.golds:
            cells = [c for c in result.cells if c.run == run.name and c.gold == gold]
            parts += ["", table_markdown(cells, run, gold, result.algos)]
        rows = [p for p in result.precision if p.run == run.name]
        if rows:
            parts += ["", precision_markdown(rows)]
    for agg in result.aggregates:
        parts += ["", aggregate_markdown(agg, result.algos)]
    return "\n".join(parts) + "\n"


# --- verdict.json -------------------------------------------------------------------------


def _estimate_json(estimate: Estimate) -> dict:
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high}


def verdict_json(result: Verdict) -> dict:
    """Every number of the verdict, as plain JSON types (seeds as string keys)."""
    tables = []
    for run in result.runs:
        for gold in run.golds:
            count = count_marks([c for c in result.cells if c.run == run.name and c.gold == gold])
            tables.append(
                {
                    "run": run.name, "gold": gold, "tested": count.tested, "uncorrected_marks": count.uncorrected,
                    "holm_marks": count.holm, "expected_false_marks_uncorrected": count.expected_false,
                }
            )
    return {
        "settings": {
            "alpha": ALPHA, "power": POWER, "bootstrap_resamples": RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED,
            "epochs": result.epochs, "precision_target": PRECISION_TARGET, "divergence": DIVERGENCE,
        },
        "runs": [{"name": run.name, "reward": run.reward, "golds": run.golds} for run in result.runs],
        "cells": [
            {
                "run": c.run, "gold": c.gold, "algo": c.algo, "steps": c.steps, "n": c.n,
                "gains": {str(s): g for s, g in c.gains.items()}, "epochs": {str(s): e for s, e in c.epochs.items()},
                "mean": c.mean, "sd": c.sd, "ci_low": c.low, "ci_high": c.high, "p": c.p, "p_holm": c.p_holm,
                "mark": c.mark, "mde": c.mde, "seeds_needed": c.seeds_needed,
            }
            for c in result.cells
        ],
        "tables": tables,
        "precision": [
            {
                "run": p.run, "algo": p.algo, "gold": p.gold, "widest_half_width": p.widest,
                "widest_steps": p.widest_steps, "seeds": p.seeds, "seeds_for_target": p.seeds_needed,
                "worst_mean_gain": p.worst, "worst_gold": p.worst_gold, "worst_steps": p.worst_steps,
                "collapsed_seeds": p.collapsed, "final_worst_mean_gain": p.final_worst,
                "final_worst_gold": p.final_worst_gold, "final_worst_steps": p.final_worst_steps,
                "diverges": p.diverges, "met": p.met,
            }
            for p in result.precision
        ],
        "aggregates": [
            {
                "gold": agg.gold,
                "runs": agg.runs,
                "strata": [{"run": run, "steps": steps} for run, steps in agg.strata],
                "iqm": {a: _estimate_json(e) for a, e in agg.iqm.items()},
                "poi": {x: {y: _estimate_json(e) for y, e in row.items()} for x, row in agg.poi.items()},
                "profiles": {
                    "tau": agg.taus.tolist(),
                    **{
                        a: {"fraction": p.fraction.tolist(), "low": p.low.tolist(), "high": p.high.tolist()}
                        for a, p in agg.profiles.items()
                    },
                },
            }
            for agg in result.aggregates
        ],
    }


# --- Figures ------------------------------------------------------------------------------


def _colors(algos: Sequence[str]) -> dict[str, str]:
    """An algorithm's colour: its place among the trained rows, as in report's curves.png."""
    return {algo: f"C{index}" for index, algo in enumerate(algos)}


def plot_step_generalization(result: Verdict, path: Path) -> None:
    """Gold gain over the base against step count, one line per algorithm with its t
    interval, one panel per (run folder, gold); a filled marker is a Holm mark."""
    columns = max(len(run.golds) for run in result.runs)
    figure, axes = plt.subplots(
        len(result.runs), columns, figsize=(5.2 * columns, 4.0 * len(result.runs)), squeeze=False, layout="constrained"
    )
    colors = _colors(result.algos)
    # Each algorithm's points sit a little apart on the log axis so that intervals do not hide each other.
    spread = {a: 2 ** (0.06 * (i - (len(result.algos) - 1) / 2)) for i, a in enumerate(result.algos)}
    for row, run in enumerate(result.runs):
        for column in range(columns):
            ax = axes[row][column]
            if column >= len(run.golds):
                ax.set_visible(False)
                continue
            gold = run.golds[column]
            cells = [c for c in result.cells if c.run == run.name and c.gold == gold and c.n >= 1]
            ax.axhline(0, color="0.3", linewidth=1, linestyle="--", label="base")
            for algo in result.algos:
                own = sorted((c for c in cells if c.algo == algo), key=lambda c: c.steps)
                if not own:
                    continue
                x = np.array([c.steps * spread[algo] for c in own])
                mean = np.array([c.mean for c in own])
                # One seed has no interval: its point stands alone.
                error = np.nan_to_num([[c.mean - c.low for c in own], [c.high - c.mean for c in own]])
                ax.errorbar(x, mean, yerr=error, color=colors[algo], capsize=3, linewidth=1.2, label=algo)
                for c, xi in zip(own, x):
                    face = colors[algo] if c.mark else "white"
                    ax.plot(xi, c.mean, "o", color=colors[algo], markersize=6, markerfacecolor=face)
            steps = sorted({c.steps for c in cells})
            # The panel spans the means (and 0) with room to spare; a few seeds' t intervals
            # can be ten times wider and would otherwise flatten every line into the zero line.
            means = [0.0, *(c.mean for c in cells)]
            room = 0.5 * (max(means) - min(means)) + 0.005
            ax.set_ylim(min(means) - room, max(means) + room)
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [str(k) for k in steps])
            ax.minorticks_off()
            ax.set_xlabel("sampling steps")
            ax.set_ylabel(f"{gold} gain over base")
            ax.set_title(f"{run.name}: {gold}", fontsize=10)
            ax.grid(alpha=0.3)
    _finish(figure, axes, path,
            f"Step generalization: gold gain over the base of the same seed, mean and {1 - ALPHA:.0%} t interval "
            "over seeds\n(filled marker: significant after Holm over its panel; intervals beyond the panel are cut "
            "at its edge)")


def _finish(figure, axes, path: Path, title: str, **title_style) -> None:
    """One legend for every panel, the title, the file."""
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="outside right center")
    figure.suptitle(title, **title_style)
    save_figure(figure, path, dpi=110)


def plot_poi_matrix(result: Verdict, path: Path) -> None:
    """P(row > column) per gold, annotated; framed where the interval excludes 1/2."""
    cell = 0.75  # inches per matrix cell
    figure, axes = plt.subplots(
        1, len(result.aggregates),
        figsize=(cell * (len(result.algos) + 1) * len(result.aggregates) + 2.5, cell * len(result.algos) + 1.4),
        squeeze=False, layout="constrained",
    )
    for ax, agg in zip(axes[0], result.aggregates):
        rows = [a for a in result.algos if a in agg.poi]
        columns = [*rows, BASE]
        matrix = np.array([[agg.poi[x][y].value if y != x else math.nan for y in columns] for x in rows])
        image = ax.imshow(matrix, cmap="RdBu", vmin=0, vmax=1)
        for i, x in enumerate(rows):
            for j, y in enumerate(columns):
                if y == x:
                    continue
                estimate = agg.poi[x][y]
                dark = abs(estimate.value - CHANCE) > 0.3
                ax.text(j, i, f"{estimate.value:.2f}", ha="center", va="center", color="white" if dark else "black")
                if estimate.separable(CHANCE):
                    frame = plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="black", linewidth=2)
                    ax.add_patch(frame)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("column (Y)")
        ax.set_ylabel("row (X)")
        ax.set_title(f"{agg.gold}: P(X > Y)", fontsize=10)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="probability of improvement")
    figure.suptitle(
        f"Probability that a run of the row beats a run of the column (gain over the base, same stratum)\n"
        f"framed: separable, the {1 - ALPHA:.0%} stratified bootstrap interval excludes {CHANCE}",
        fontsize=10,
    )
    save_figure(figure, path, dpi=110)


def plot_performance_profiles(result: Verdict, path: Path) -> None:
    """Fraction of runs with a gain above τ, per gold, with the bootstrap band."""
    figure, axes = plt.subplots(
        1, len(result.aggregates), figsize=(5.2 * len(result.aggregates) + 1.5, 4.0), squeeze=False,
        layout="constrained",
    )
    colors = _colors(result.algos)
    for ax, agg in zip(axes[0], result.aggregates):
        for algo, profile in agg.profiles.items():
            ax.plot(agg.taus, profile.fraction, color=colors[algo], label=algo, linewidth=1.5, drawstyle="steps-post")
            ax.fill_between(
                agg.taus, profile.low, profile.high, color=colors[algo], alpha=0.12, linewidth=0, step="post"
            )
        ax.axvline(0, color="0.3", linewidth=1, linestyle="--")
        # Linear within a typical gain of 0, logarithmic beyond: the few large losses
        # (a diverging algorithm) would otherwise squeeze every other curve against 0.
        typical = float(np.median(np.abs(agg.taus)))  # the observed gains (and 0)
        ax.set_xscale("symlog", linthresh=max(typical, 1e-3), linscale=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel(f"τ ({agg.gold} gain over base; symmetric log beyond ±{max(typical, 1e-3):.3f})")
        ax.set_ylabel("fraction of runs with gain > τ")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{agg.gold}", fontsize=10)
        ax.grid(alpha=0.3)
    _finish(figure, axes, path,
            f"Performance profiles over runs (seed × step count × run folder), band: {1 - ALPHA:.0%} stratified "
            "bootstrap", fontsize=10)


# --- Writing it all -----------------------------------------------------------------------


def write_verdict(
    run_dirs: Sequence[str | Path], out_dir: str | Path, epochs: Sequence[EpochChoice | None] | None = None
) -> str:
    """Write verdict.md, verdict.json and the three figures of `run_dirs` into `out_dir`;
    return verdict.md's text. `epochs`: see `verdict`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = verdict(run_dirs, epochs)
    text = verdict_markdown(result)
    (out_dir / "verdict.md").write_text(text)
    (out_dir / "verdict.json").write_text(strict_json.dumps(verdict_json(result), indent=1) + "\n")
    plot_step_generalization(result, out_dir / "step_generalization.png")
    plot_poi_matrix(result, out_dir / "poi_matrix.png")
    plot_performance_profiles(result, out_dir / "performance_profiles.png")
    return text


@dataclass
class VerdictArgs:
    """Gold gains over the base with t intervals, MDEs, Holm marks and rliable aggregates."""

    run_dirs: Annotated[tuple[Path, ...], tyro.conf.Positional]
    """Run folders holding records.jsonl (and config.json); several pool into the aggregates."""
    out: Path | None = None
    """The folder to write into (default: the run folder; required with several)."""


def main(argv: Sequence[str] | None = None) -> None:
    args = tyro.cli(VerdictArgs, args=argv, description=__doc__.split("\n\n")[0])
    if args.out is None and len(args.run_dirs) != 1:
        raise SystemExit("--out is needed with several run folders: their verdict is one")
    try:
        print(write_verdict(args.run_dirs, args.out or args.run_dirs[0]), end="")
    except (OSError, ValueError) as error:
        raise SystemExit(f"benchmarks.verdict: {error}") from None


if __name__ == "__main__":
    main()
