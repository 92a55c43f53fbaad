"""Measure the tiny world's gold and proxy rewards: `python -m rewards.evaluate_tiny_gold`.

Writes results/tiny-world/gold.json and the section "Gold and proxy rewards" at the end
of results/tiny-world/README.md (replacing it if present):
- the alignment gold's accuracy on renders, where the truth is known (colour, shape,
  background, all three), and its score for the own caption and for captions with one
  attribute changed;
- headroom: the four rewards (tiny-aesthetic, tiny-aesthetic-gold, tiny-align,
  tiny-align-gold) on the base model's samples at each step count (DDIM, eta 1,
  guidance zoo.tiny.DEFAULT_GUIDANCE) for the train and the held-out captions, next to
  the data generator's renders and its best renders for the aesthetic gold (largest,
  centred);
- the aesthetic proxy's accuracy against the gold on images it was not trained on
  (fresh renders and base samples, other seeds than the build's): Pearson, Spearman and
  RMSE, overall and per image set;
- both proxies' accuracy inside the comparisons RL makes: pairs of base samples of one
  prompt, sharing x_T (SDPO, D3PO) or not (DDPO, REBEL), how often the proxy prefers the
  member the gold prefers;
- scoring cost.
Every reward is loaded through `rewards.registry.load_reward`, as the benchmark does.

`--model pipeline-turbo` (or any model folder of `MODEL_SAMPLING`) re-checks the tasks on
that model's samples instead, drawn as its preset draws them (its guidance and training
sampler), and writes gold-<model>.json and gold-<model>.md beside the README (headroom and
the proxies inside RL's comparisons), leaving the README's section, which is the base's.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from scipy.stats import mannwhitneyu, pearsonr, spearmanr

from rewards.catalog import GOLD_OF
from rewards.registry import load_reward
from rewards.tiny_gold import pair_sign_agreement, pair_ties
from zoo.tiny import ASSETS, DEFAULT_GUIDANCE, FLOW_GUIDANCE, TURBO_GUIDANCE, data, gold
from zoo.tiny.evaluate import GOLD_SECTION, load_pipeline, sample
from zoo import strict_json

REWARD_NAMES = ("tiny-aesthetic", "tiny-aesthetic-gold", "tiny-align", "tiny-align-gold")
BASE_MODEL = "pipeline"

MODEL_SAMPLING = {
    "pipeline": ("ddim", 1.0, DEFAULT_GUIDANCE),
    "pipeline-turbo": ("ddim", 1.0, TURBO_GUIDANCE),
    "pipeline-flow": ("flow", 0.7, FLOW_GUIDANCE),
    "pipeline-flow-turbo": ("flow", 0.7, TURBO_GUIDANCE),
}
"""Model folder -> (training sampler kind, its eta, guidance): as the tiny, tiny-turbo,
tiny-flow and tiny-flow-turbo presets train them (benchmarks/presets.py). Images for the
headroom come from the model's own pipeline (DDIM eta 1, or the flow model's Euler ODE)."""


@dataclass(frozen=True)
class GoldEvalConfig:
    out: Path = Path("results/tiny-world")
    assets: Path = ASSETS
    """Folder with clip/, pipeline/ and aesthetic/ (what `zoo.tiny.build --out` wrote)."""
    steps: tuple[int, ...] = (1, 2, 4, 8)
    train_samples_per_step: int = 160
    """Base samples per step count on the train captions (4 per caption)."""
    heldout_samples_per_step: int = 64
    """Base samples per step count on the held-out captions (8 per caption)."""
    renders_per_caption: int = 64
    """Renders per caption (all 48) for the alignment gold's accuracy."""
    seed: int = 20_000
    """Seeds the evaluation's renders and noise (the build's head used other streams)."""
    pairs_per_step: int = 256
    """Same-prompt pairs of base samples (train captions) per step count and noise kind."""
    threads: int = 1
    model: str = BASE_MODEL
    """The model folder under --assets whose samples are scored (a key of MODEL_SAMPLING)."""

    @property
    def guidance(self) -> float:
        return MODEL_SAMPLING[self.model][2]


def _stats(values: torch.Tensor) -> dict:
    values = values.double()
    return dict(mean=values.mean().item(), sem=(values.std() / len(values) ** 0.5).item(), n=len(values))


def alignment_accuracy(cfg: GoldEvalConfig) -> dict:
    """Gold attribute accuracy on renders of every caption, and the gold for the own
    caption vs. captions with one attribute swapped (to the next colour/shape/background)."""
    captions = [c for c in data.all_captions() for _ in range(cfg.renders_per_caption)]
    images = data.render(captions, torch.Generator().manual_seed(cfg.seed))
    measured = gold.attributes(images)
    truth = [data.parse_caption(c) for c in captions]
    seen = [measured.names(i) for i in range(len(captions))]
    result = {
        name: sum(s[k] == t[k] for s, t in zip(seen, truth)) / len(captions)
        for k, name in enumerate(("colour", "shape", "background"))
    }
    result["all_three"] = sum(s == t for s, t in zip(seen, truth)) / len(captions)
    result["renders"] = len(captions)
    result["own_caption"] = gold.alignment(images, captions).mean().item()
    colours, shapes, backgrounds = list(data.COLOURS), list(data.SHAPES), list(data.BACKGROUNDS)
    for name, swap in (
        ("other_colour", lambda c, s, b: (colours[(colours.index(c) + 1) % len(colours)], s, b)),
        ("other_shape", lambda c, s, b: (c, shapes[(shapes.index(s) + 1) % len(shapes)], b)),
        ("other_background", lambda c, s, b: (c, s, backgrounds[(backgrounds.index(b) + 1) % len(backgrounds)])),
    ):
        swapped = [data.caption(*swap(*t)) for t in truth]
        result[name] = gold.alignment(images, swapped).mean().item()
    confusion: dict[str, int] = {}
    for s, t in zip(seen, truth):
        if s[1] != t[1]:
            key = f"{t[1]}->{s[1]}"
            confusion[key] = confusion.get(key, 0) + 1
    result["shape_confusions"] = confusion
    return result


def image_sets(cfg: GoldEvalConfig) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Named (images, prompts): renders and best renders of the train captions, and base
    samples at each step count for the train and the held-out captions."""
    train, heldout = data.train_captions(), data.heldout_captions()
    train_prompts = [train[i % len(train)] for i in range(cfg.train_samples_per_step)]
    heldout_prompts = [heldout[i % len(heldout)] for i in range(cfg.heldout_samples_per_step)]
    sets = {
        "renders": (data.render(train_prompts, torch.Generator().manual_seed(cfg.seed + 1)), train_prompts),
        "best renders": (gold.best_renders(train_prompts, torch.Generator().manual_seed(cfg.seed + 2)), train_prompts),
    }
    pipe, _ = load_pipeline(cfg.assets / cfg.model)
    for steps in cfg.steps:
        sets[f"base {steps} steps, train"] = (sample(pipe, train_prompts, steps, cfg.guidance, cfg.seed + 100 + steps), train_prompts)
        print(f"  sampled {steps} steps (train)", flush=True)
    for steps in cfg.steps:
        sets[f"base {steps} steps, held-out"] = (
            sample(pipe, heldout_prompts, steps, cfg.guidance, cfg.seed + 200 + steps),
            heldout_prompts,
        )
    return sets


def pair_agreement(cfg: GoldEvalConfig, rewards: dict) -> dict:
    """{"<k> steps, shared x_T" | "<k> steps, independent": {"<proxy>": fraction of pairs,
    among those neither the proxy nor its gold ties, in which the proxy's difference has the
    gold's sign (`pair_sign_agreement`), "<proxy> gold ties": the gold's tied fraction, "n": pairs}}: pairs of base
    samples of one train caption, drawn by the model's training sampler (`zoo.sampling`;
    `MODEL_SAMPLING`) as the algorithms draw them."""
    from zoo.kernels import SamplerConfig
    from zoo.loading import load_policy
    from zoo.sampling import TrajectorySampler

    policy = load_policy(str(cfg.assets / cfg.model))
    kind, eta, guidance = MODEL_SAMPLING[cfg.model]
    train = data.train_captions()
    prompts = [train[i % len(train)] for i in range(cfg.pairs_per_step)]
    result = {}
    for steps in cfg.steps:
        sampler = TrajectorySampler(policy, SamplerConfig(kind, steps, eta, guidance, "trailing" if kind == "ddim" else None))
        for shared in (True, False):
            generator = torch.Generator().manual_seed(cfg.seed + 300 + 2 * steps + shared)
            images = torch.cat([
                sampler.sample(prompts[i : i + 64], group_size=2, shared_noise=shared, generator=generator,
                               record_transitions=False).images
                for i in range(0, len(prompts), 64)
            ])  # (P, 2, 3, H, W)
            paired = [p for p in prompts for _ in range(2)]
            row: dict = {"n": len(prompts)}
            for proxy, gold_name in GOLD_OF.items():
                proxy_diff, gold_diff = (rewards[name].score(images.flatten(0, 1), paired).view(-1, 2).diff(dim=1).squeeze(1)
                                         for name in (proxy, gold_name))
                row[proxy], _ = pair_sign_agreement(proxy_diff, gold_diff)
                row[f"{proxy} gold ties"] = pair_ties(gold_diff)
            result[f"{steps} steps, {'shared x_T' if shared else 'independent'}"] = row
            print(f"  pairs {steps} steps shared={shared}: {row}", flush=True)
    return result


def main() -> None:
    cfg = tyro.cli(GoldEvalConfig)
    if cfg.model not in MODEL_SAMPLING:
        raise SystemExit(f"--model {cfg.model}: not one of {', '.join(MODEL_SAMPLING)}")
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    paths = {"tiny-aesthetic": cfg.assets / "aesthetic", "tiny-aesthetic:clip": cfg.assets / "clip", "tiny-align": cfg.assets / "clip"}
    rewards = {name: load_reward(name, paths=paths) for name in REWARD_NAMES}

    accuracy = alignment_accuracy(cfg)
    print(f"alignment gold on renders: {accuracy}", flush=True)
    sets = image_sets(cfg)

    rows, scores, exact_right, seconds = {}, {}, {}, {name: 0.0 for name in REWARD_NAMES}
    for set_name, (images, prompts) in sets.items():
        scores[set_name] = {}
        for name, reward in rewards.items():
            started = time.perf_counter()
            scores[set_name][name] = reward.score(images, prompts)
            seconds[name] += time.perf_counter() - started
        exact = gold.attributes(images)
        exact_match = torch.tensor(
            [exact.names(i) == data.parse_caption(p) for i, p in enumerate(prompts)], dtype=torch.float32
        )
        rows[set_name] = {name: _stats(values) for name, values in scores[set_name].items()}
        rows[set_name]["gold all three right"] = _stats(exact_match)
        exact_right[set_name] = exact_match
        print(f"  {set_name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in rows[set_name].items()), flush=True)

    def agreement(proxy_name: str, gold_name: str, set_names: list[str]) -> dict:
        proxy = torch.cat([scores[s][proxy_name] for s in set_names])
        truth = torch.cat([scores[s][gold_name] for s in set_names])
        return dict(
            pearson=float(pearsonr(proxy, truth)[0]),
            spearman=float(spearmanr(proxy, truth)[0]),
            rmse=(proxy - truth).pow(2).mean().sqrt().item(),
            n=len(proxy),
        )

    def separation(set_names: list[str]) -> float:
        """AUROC of tiny-align for "gold finds all three right" (Mann-Whitney U / n1 n2)."""
        proxy = torch.cat([scores[s]["tiny-align"] for s in set_names])
        right = torch.cat([exact_right[s] for s in set_names]).bool()
        if right.all() or not right.any():
            return math.nan
        return float(mannwhitneyu(proxy[right], proxy[~right]).statistic) / (int(right.sum()) * int((~right).sum()))

    proxy_accuracy = {"all": agreement("tiny-aesthetic", "tiny-aesthetic-gold", list(sets))}
    proxy_accuracy.update({name: agreement("tiny-aesthetic", "tiny-aesthetic-gold", [name]) for name in sets})
    base_sets = [name for name in sets if name.startswith("base")]
    align_accuracy = {
        name: {**agreement("tiny-align", "tiny-align-gold", members), "auroc_all_three": separation(members)}
        for name, members in [("all", list(sets)), ("base samples", base_sets)] + [(n, [n]) for n in base_sets]
    }
    count = sum(len(images) for images, _ in sets.values())
    head_config = json.loads((cfg.assets / "aesthetic" / "config.json").read_text())
    metrics = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        command="python -m rewards.evaluate_tiny_gold" + (f" --model {cfg.model}" if cfg.model != BASE_MODEL else ""),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        torch=torch.__version__,
        threads=cfg.threads,
        alignment_gold_on_renders=accuracy,
        headroom=rows,
        aesthetic_proxy_vs_gold=proxy_accuracy,
        alignment_proxy_vs_gold=align_accuracy,
        pair_agreement=pair_agreement(cfg, rewards),
        aesthetic_head=dict(
            bytes=(cfg.assets / "aesthetic" / "model.safetensors").stat().st_size,
            parameters=sum(p.numel() for p in rewards["tiny-aesthetic"].head.parameters()),
            training=head_config.get("training", {}),
        ),
        scoring_images_per_second={name: count / max(s, 1e-9) for name, s in seconds.items()},
    )
    if cfg.model == BASE_MODEL:
        (cfg.out / "gold.json").write_text(strict_json.dumps(metrics, indent=2) + "\n")
        write_section(metrics, cfg.out / "README.md")
    else:
        (cfg.out / f"gold-{cfg.model}.json").write_text(strict_json.dumps(metrics, indent=2) + "\n")
        (cfg.out / f"gold-{cfg.model}.md").write_text(model_report(metrics, cfg.model))


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['sem']:.3f}"


def _headroom_tables(metrics: dict) -> tuple[list[str], list[str], list[str]]:
    """Markdown lines: the rewards of every image set, the headroom per step count, and the
    proxies' agreement with their golds inside pairs."""
    rows = metrics["headroom"]
    columns = ["tiny-aesthetic", "tiny-aesthetic-gold", "tiny-align", "tiny-align-gold", "gold all three right"]
    table = [
        "| images | n | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        table.append(f"| {name} | {row['tiny-aesthetic']['n']} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    pair_table = ["| pairs | n | tiny-aesthetic | tiny-align | tiny-align gold ties |", "|---|---:|---:|---:|---:|"]
    for name, a in metrics["pair_agreement"].items():
        pair_table.append(f"| {name} | {a['n']} | {a['tiny-aesthetic']:.3f} | {a['tiny-align']:.3f} "
                          f"| {a['tiny-align gold ties']:.2f} |")
    gaps = ["| steps | aesthetic gold | aesthetic proxy | alignment gold | alignment proxy |", "|---:|---:|---:|---:|---:|"]
    for k in metrics["config"]["steps"]:
        base = rows[f"base {k} steps, train"]
        gaps.append(
            f"| {k} | {rows['best renders']['tiny-aesthetic-gold']['mean'] - base['tiny-aesthetic-gold']['mean']:+.3f} "
            f"| {rows['best renders']['tiny-aesthetic']['mean'] - base['tiny-aesthetic']['mean']:+.3f} "
            f"| {rows['renders']['tiny-align-gold']['mean'] - base['tiny-align-gold']['mean']:+.3f} "
            f"| {rows['renders']['tiny-align']['mean'] - base['tiny-align']['mean']:+.3f} |"
        )
    return table, gaps, pair_table


def model_report(metrics: dict, model: str) -> str:
    """gold-<model>.md: the tasks re-checked on another model than the base."""
    kind, eta, guidance = MODEL_SAMPLING[model]
    table, gaps, pair_table = _headroom_tables(metrics)
    return f"""# The tiny tasks on `{model}`

Produced by `{metrics['command']}` (gold-{model}.json and this file) on {metrics['machine']}
(shared), torch {metrics['torch']}, {metrics['threads']} thread(s). The base model's report, with the
tasks' definitions and the proxies' accuracy, is the "Gold and proxy rewards" section of
README.md; the image sets, seeds and cells here are the same, with `{model}`'s samples as
"base": its own pipeline at guidance {guidance} for the headroom, its training sampler
({kind}, eta {eta}, guidance {guidance}) for the pairs.

## Headroom

{chr(10).join(table)}

Best renders minus the model (aesthetic), renders minus the model (alignment), train captions:

{chr(10).join(gaps)}

## Both proxies inside the comparisons RL makes
Cell: the fraction of same-prompt pairs in which the proxy prefers the member its gold
prefers (0.5 = chance), gold ties left out; last column: the alignment gold's tied fraction.

{chr(10).join(pair_table)}
"""


def write_section(metrics: dict, path: Path) -> None:
    """Replaces (or appends) the gold section at the end of the tiny world's README."""
    accuracy = metrics["alignment_gold_on_renders"]
    training = metrics["aesthetic_head"]["training"]
    rows = metrics["headroom"]
    table, gaps, pair_table = _headroom_tables(metrics)
    agreement = metrics["aesthetic_proxy_vs_gold"]
    proxy_table = ["| images | n | Pearson | Spearman | RMSE |", "|---|---:|---:|---:|---:|"]
    for name, a in agreement.items():
        proxy_table.append(f"| {name} | {a['n']} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['rmse']:.3f} |")
    align_table = ["| images | n | Pearson | Spearman | AUROC, all three right |", "|---|---:|---:|---:|---:|"]
    for name, a in metrics["alignment_proxy_vs_gold"].items():
        align_table.append(
            f"| {name} | {a['n']} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['auroc_all_three']:.3f} |"
        )
    steps = metrics["config"]["steps"]
    one = rows[f"base {steps[0]} steps, train"]
    sources = ", ".join(f"{count} {source}" for source, count in training.get("sources", {}).items())
    speed = ", ".join(f"{name} {rate:.0f}" for name, rate in metrics["scoring_images_per_second"].items())
    text = f"""{GOLD_SECTION}

Produced by `{metrics['command']}` (gold.json and this section) on {metrics['machine']}
(shared), torch {metrics['torch']}, {metrics['threads']} thread(s), from the head built by
`{training.get('command', 'python -m zoo.tiny.build')}` ({training.get('seconds', 'n/a')} s, of
which {training.get('sampling_seconds', 'n/a')} s sampling its training images).

Two tasks, each with a gold rule on the pixels (evaluation only) and a proxy to train on
(rewards/tiny_gold.py, formulas in zoo/tiny/gold.py):
- `tiny-aesthetic-gold` = presence x framing x (0.4 size + 0.1 centring + 0.2 saturation
  + 0.3 crispness) of the segmented shape, 0..1, prompt-agnostic. `tiny-aesthetic` = an
  MLP head (64 -> 32 -> 1, {metrics['aesthetic_head']['parameters']} parameters,
  {metrics['aesthetic_head']['bytes']} bytes of safetensors) on the judge's mean patch token
  (its vision tower's last hidden state averaged over the 64 patches; why not its projected
  embedding: `zoo.tiny.judge.PATCH_FEATURES`), trained on {training.get('images', 'n/a')} images ({sources}; train captions)
  labelled gold + N(0, {training.get('label_noise', 'n/a')}²).
- `tiny-align-gold` = the fraction of the prompt's colour, shape and background that the
  segmented picture shows (1/3 each). `tiny-align` = the judge's probability of the
  prompt among the 48 captions (softmax of logit scale x cosine).

### Alignment gold on renders (truth known)
{accuracy['renders']} renders (64 of each caption): colour {accuracy['colour']:.4f}, shape
{accuracy['shape']:.4f}, background {accuracy['background']:.4f}, all three {accuracy['all_three']:.4f}
(shape confusions: {accuracy['shape_confusions'] or 'none'}). Mean gold for the own caption
{accuracy['own_caption']:.4f}; for the caption with the next colour {accuracy['other_colour']:.4f},
the next shape {accuracy['other_shape']:.4f}, the other background {accuracy['other_background']:.4f}.

### Headroom: base model vs. the data generator
Mean ± standard error. Base samples: DDIM, eta 1, guidance {DEFAULT_GUIDANCE}; "train" are the
40 train captions, 4 samples each, "held-out" the 8 held-out captions, 8 each. "renders":
random size, position and shades, as in training; "best renders": largest radius, centred
(the aesthetic gold's optimum within the generator). "gold all three right": colour, shape
and background all measured right.

{chr(10).join(table)}

Headroom, train captions: best renders minus base (aesthetic), renders minus base
(alignment; best renders score lower on the alignment proxy, the judge never saw shapes
that large and centred that often):

{chr(10).join(gaps)}

Reading: the aesthetic gold leaves room at every step count (size and crispness: base
samples are the data's average size, and softer-edged than renders even at 8 steps); the
alignment tasks leave room at 1 and 2 steps only, where the judge's probability of the
prompt is {one['tiny-align']['mean']:.2f} and the gold finds all three attributes right in
{one['gold all three right']['mean']:.0%} of 1-step samples. The aesthetic proxy is
imperfect in the way a learned reward is: it sees position less than size (a mean over
patches is nearly translation-invariant) and rates blurry 1-step samples above their gold
({one['tiny-aesthetic']['mean']:.3f} vs {one['tiny-aesthetic-gold']['mean']:.3f}), a direction
a policy can exploit; the gold catches it.

### Aesthetic proxy vs. gold on images it was not trained on
Other seeds than the build's; "all" pools every set above.

{chr(10).join(proxy_table)}

### Both proxies inside the comparisons RL makes
Pairs of base samples of one train caption, drawn by the training sampler (DDIM, eta 1,
trailing spacing, guidance {DEFAULT_GUIDANCE}): sharing x_T, as SDPO and D3PO draw their
pairs, or from independent noise, as DDPO's and REBEL's per-prompt baselines compare them.
Cell: the fraction of pairs in which the proxy prefers the member its gold prefers (0.5 =
chance), pairs the gold ties left out (the aesthetic gold, continuous, ties almost none; the
alignment gold's tied fraction is the last column: at 1 step pairs that share x_T differ by
the last step's noise only, and at 8 steps nearly every sample is right). Across images a proxy can track its
gold well and still be near chance here, and here is where the policy gradient reads it.

{chr(10).join(pair_table)}

### Alignment proxy vs. gold
`tiny-align` (the judge's probability of the prompt) against `tiny-align-gold` (fraction of
the prompt's attributes the pixels show); AUROC: how well the proxy ranks samples whose gold
finds all three attributes right above those it does not (0.5 = chance).

{chr(10).join(align_table)}

Scoring speed on this CPU (images/s, batches of 64-160): {speed}.

Commands: `python -m zoo.tiny.build --out zoo/tiny/assets --only aesthetic` (the proxy
head, deterministic from `--seed`, 0 by default), then `python -m rewards.evaluate_tiny_gold`
(this section and gold.json; `python -m zoo.tiny.evaluate` keeps this section when it
rewrites the file above), `python -m pytest -q tests/test_tiny_gold.py`.
"""
    old = path.read_text() if path.exists() else ""
    if GOLD_SECTION in old:
        old = old[: old.index(GOLD_SECTION)].rstrip("\n") + "\n"
    path.write_text(old + ("\n" if old else "") + text)


if __name__ == "__main__":
    main()
