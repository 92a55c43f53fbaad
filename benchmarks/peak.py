"""Curves to the peak: the final gold, the peak gold and the trajectories that reach 90% of it.

A reward model's proxy can be pushed past the point where its gold still improves (reward
overoptimization, Gao et al. 2022, arXiv 2210.10760), so a table at the last epoch alone can
report an algorithm after its peak. A run evaluated on both prompt sets (`benchmarks.run
--eval-split both`) chooses each algorithm's reported epoch on the validation prompts and
reports the test prompts there, so the choice never sees what it reports:

- selection: per algorithm, the evaluated epoch (after the first, the base's epoch 0 is
  not a choice) with the highest validation score averaged over seeds and step counts, the
  score being the training reward's gold where it declares one (the tiny world's proxies),
  else the training reward: `benchmarks.tune.TUNING_RULE`'s score, here over epochs;
- peak: every step count's test score at that epoch, mean over seeds;
- to 90%: the trajectories (samples seen, mean over seeds) at the first evaluated epoch
  whose mean test gain over the base reaches 90% of the peak's gain; "–" where the peak
  gains nothing over the base.

Outputs in the run folder: `peak.md` / `peak.csv` and `proxy_gold.png` (per algorithm, the
gold against the proxy along training, one line per step count: where the proxy still
rises and the gold falls, the proxy is being hacked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402

from benchmarks.figures import save_figure  # noqa: E402
from benchmarks.records import BASE, load_records, load_records_and_base_curve, steps_label, with_base  # noqa: E402
from rewards.catalog import GOLD_OF  # noqa: E402

FRACTION_OF_PEAK = 0.9


def scoring_reward(reward: str) -> str:
    """The reward whose validation means choose an epoch here and a configuration in
    `benchmarks.tune` (`TUNING_RULE`, `PEAK_RULE`) for training reward `reward`: its gold
    when it declares one, else itself."""
    return GOLD_OF.get(reward, reward)


def _complete_epochs(records: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean score per (algo, epoch, eval_steps), over the epochs that every seed of the
    algorithm evaluated at every step count (an interrupted seed does not decide)."""
    cells = records.groupby(["algo", "epoch"]).agg(seeds=("seed", "nunique"), rows=("seed", "size")).reset_index()
    cells["all_seeds"] = cells["algo"].map(records.groupby("algo")["seed"].nunique())
    steps = records["eval_steps"].nunique()
    complete = cells[(cells["seeds"] == cells["all_seeds"]) & (cells["rows"] == cells["seeds"] * steps)]
    kept = records.merge(complete[["algo", "epoch"]], on=["algo", "epoch"])
    return kept.groupby(["algo", "epoch", "eval_steps"])["mean"].mean().rename("mean").reset_index()


def chosen_epochs(validation: pd.DataFrame, reward: str) -> dict[str, int]:
    """Per trained algorithm, the epoch with the best validation score (module docstring);
    ties go to the earlier epoch. An algorithm without a finite score at any epoch (its
    reward failed at every evaluation) gets none."""
    score = scoring_reward(reward)
    curve = _complete_epochs(validation[(validation["reward"] == score) & (validation["algo"] != BASE)])
    per_epoch = curve.groupby(["algo", "epoch"])["mean"].mean().dropna().reset_index()
    chosen = {}
    for algo, rows in per_epoch.groupby("algo", sort=False):
        best = rows["mean"].max()
        chosen[algo] = int(rows.loc[rows["mean"] == best, "epoch"].min())
    return chosen


def peak_table(test: pd.DataFrame, reward: str, epochs: dict[str, int], rows: Sequence[str],
               base_curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per trained algorithm (index) and step count k: `<k> final`, `<k> peak` (the mean
    test score over seeds at the last complete epoch and at the chosen one) and `<k> to
    90%` (trajectories, module docstring; each point's gain over the base of its seed on its
    own images where `base_curve` holds them, `records.with_base`); `epoch` the chosen
    epoch, for the reward `reward` (a gold, or any recorded reward)."""
    of_reward = test[test["reward"] == reward]
    curve = _complete_epochs(of_reward)
    paired = with_base(of_reward[of_reward["algo"] != BASE], of_reward[of_reward["algo"] == BASE], base_curve)
    gains = _complete_epochs(paired.assign(mean=paired["mean"] - paired["base"]))
    samples = of_reward.groupby(["algo", "epoch"])["samples_seen"].mean()
    table = pd.DataFrame(index=pd.Index([r for r in rows if r != BASE and r in epochs], name="algorithm"))
    table["epoch"] = [epochs[algo] for algo in table.index]
    for k in sorted(of_reward["eval_steps"].unique()):
        finals, peaks, reach = [], [], []
        for algo in table.index:
            own = curve[(curve["algo"] == algo) & (curve["eval_steps"] == k)].set_index("epoch")["mean"].sort_index()
            finals.append(float(own.iloc[-1]) if len(own) else math.nan)
            peaks.append(float(own.get(epochs[algo], math.nan)))
            own_gains = gains[(gains["algo"] == algo) & (gains["eval_steps"] == k)].set_index("epoch")["mean"]
            own_gains = own_gains.sort_index()
            gain = float(own_gains.get(epochs[algo], math.nan))
            if not gain > 0:
                reach.append(math.nan)
                continue
            reached = own_gains[own_gains >= FRACTION_OF_PEAK * gain]
            reach.append(float(samples[algo, int(reached.index[0])]))
        table[f"{k} final"] = finals
        table[f"{k} peak"] = peaks
        table[f"{k} to 90%"] = reach
    return table


def markdown(table: pd.DataFrame, reward: str, base: pd.Series, base_curve: pd.Series | None = None,
             curve_samples: int | None = None) -> str:
    """`base`, `base_curve`: the base's seed-mean per step count on the full evaluation's
    images and on the curve's (`curve_samples` a prompt; None: not recorded)."""
    steps = sorted({int(c.split()[0]) for c in table.columns if c.endswith(" final")})
    header = ["algorithm", "epoch"] + [f"{steps_label(k)}: final / peak / to 90%" for k in steps]
    lines = [
        f"### {reward}: final and peak (epoch chosen on the validation prompts)",
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
        "| base | 0 | " + " | ".join(f"{base.get(k, math.nan):.3f}" for k in steps) + " |",
    ]
    if base_curve is not None and not base_curve.empty:
        lines.append(f"| base, on the curve's {curve_samples} images a prompt | 0 | "
                     + " | ".join(f"{base_curve.get(k, math.nan):.3f}" for k in steps) + " |")
    for algo, row in table.iterrows():
        cells = []
        for k in steps:
            to_90 = row[f"{k} to 90%"]
            cells.append(f"{row[f'{k} final']:.3f} / {row[f'{k} peak']:.3f} / "
                         + ("–" if math.isnan(to_90) else f"{to_90:.0f}"))
        lines.append(f"| {algo} | {int(row['epoch'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mean {reward} over seeds on the test prompts: at the last epoch (final) and at the epoch with the best "
        f"validation score averaged over seeds and step counts (peak; epoch column), and the trajectories at the "
        f"first evaluated epoch whose mean test gain over the base reaches {FRACTION_OF_PEAK:.0%} of the peak's "
        f"(– where the peak gains nothing). Intermediate epochs may be evaluated on fewer images than the last "
        f"(config.json: curve_samples_per_prompt); the base is then scored on those images too, and each point's "
        f"gain is over it (the same noise).",
    ]
    return "\n".join(lines)


def plot_proxy_gold(test: pd.DataFrame, proxy: str, gold: str, rows: Sequence[str], path: Path) -> None:
    """Per algorithm, the seed-mean gold against the seed-mean proxy at every evaluated
    epoch (from the base's point), one line per step count."""
    curves = {name: _complete_epochs(test[test["reward"] == name]) for name in (proxy, gold)}
    trained = [r for r in rows if r != BASE]
    steps = sorted(test["eval_steps"].unique())
    figure, axes = plt.subplots(1, len(trained), figsize=(3.6 * len(trained), 3.4), squeeze=False,
                                sharex=True, sharey=True, layout="constrained")
    for ax, algo in zip(axes[0], trained):
        for index, k in enumerate(steps):
            points = []
            for name in (proxy, gold):
                c = curves[name]
                at_k = c[(c["eval_steps"] == k) & c["algo"].isin([BASE, algo])]
                points.append(at_k.sort_values("epoch").set_index("epoch")["mean"])
            joined = pd.concat(points, axis=1, keys=["proxy", "gold"]).dropna()
            ax.plot(joined["proxy"], joined["gold"], marker="o", markersize=2.5, color=f"C{index}",
                    label=steps_label(k))
            ax.plot(joined["proxy"].iloc[:1], joined["gold"].iloc[:1], marker="s", color=f"C{index}")
        ax.set_title(algo)
        ax.set_xlabel(f"{proxy} (proxy)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{gold} (gold)")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="outside right center")
    figure.suptitle("Proxy against gold along training (test prompts, mean over seeds; square: the base)")
    save_figure(figure, path, dpi=100)


def write_peak(run_dir: str | Path, reward: str, rows: Sequence[str]) -> dict[str, int] | None:
    """Write `peak.md`, `peak.csv` and, for a proxy with its gold, `proxy_gold.png`; return
    the chosen epoch of every algorithm, or None unless the run evaluated both prompt sets."""
    run_dir = Path(run_dir)
    try:
        test, base_curve = load_records_and_base_curve(run_dir, "test")
        validation = load_records(run_dir, "validation")
    except ValueError:
        return None
    epochs = chosen_epochs(validation, reward)
    scored = [name for name in dict.fromkeys([scoring_reward(reward), reward]) if name in set(test["reward"])]
    sections, frames = [], []
    for name in scored:
        table = peak_table(test, name, epochs, rows, base_curve)
        base = test[(test["reward"] == name) & (test["algo"] == BASE)].groupby("eval_steps")["mean"].mean()
        of_curve = base_curve[base_curve["reward"] == name]
        sections.append(markdown(table, name, base, of_curve.groupby("eval_steps")["mean"].mean(),
                                 int(of_curve["samples_per_prompt"].max()) if not of_curve.empty else None))
        frames.append(table.assign(reward=name))
    pd.concat(frames).to_csv(run_dir / "peak.csv")
    (run_dir / "peak.md").write_text("\n\n".join(sections) + "\n")
    gold = GOLD_OF.get(reward)
    if gold in set(test["reward"]):
        plot_proxy_gold(test, reward, gold, rows, run_dir / "proxy_gold.png")
    return epochs
