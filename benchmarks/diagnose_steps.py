"""Where does a training signal come from, step by step? Measures, for the base model and
for every trained adapter of a run, the two quantities that step generalization turns on:

- x̂0 quality at each denoising step k of a K-step trajectory: the training reward and
  its gold of the decoded prediction x̂0_k. With "trailing" DDIM spacing, x̂0_0 (at
  t = 999) is the 1-step sample from the same x_T (the same prediction; the single step
  lands on it up to the residual noise of alphas_cumprod[0]), so a model that improves
  x̂0_0 improves its 1-step samples, whatever K it trained at.
- the per-step reward signal: how well a reward of x̂0_k predicts the final image's
  reward (Pearson over samples) and, within a pair that shares x_T as SDPO samples them,
  how often the pair's reward difference at step k has the sign of the final difference,
  for the training reward and for the gold. SDPO's dense rewards are these x̂0_k scores;
  DDPO, D3PO and REBEL credit every step with the final image's reward.

    python -m benchmarks.diagnose_steps --run results/tiny-tiny-aesthetic-3seeds --seed 0

Writes `steps.md` and `steps.json` into `--out` (default: the run folder) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.evaluate import evaluation_seed
from benchmarks.portable import recorded_model
from benchmarks.presets import PRESETS
from benchmarks.run_folder import ALGORITHM_CONFIG_DEFAULTS, recorded_setting
from benchmarks.train import trained_weights_folder
from rewards.registry import load_reward
from rewards.spec import gold_rewards
from rewards.tiny_gold import pair_sign_agreement, pair_ties
from zoo.loading import load_policy
from zoo.policy import LoraSettings, Policy
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler
from zoo.sdpo import anchor_similarities
from zoo import strict_json

DIAGNOSIS_SEED_OFFSET = 7_919
"""Added to the run seed so that the diagnosis draws noise that no evaluation cell drew."""


@dataclass(frozen=True)
class StepStats:
    """One reward's statistics of x̂0_k at one step k of one policy."""

    step: int
    timestep: int
    mean: float
    stderr: float
    corr_with_final: float
    """Pearson of this reward of x̂0_k with the same reward of the final image."""
    pair_sign_agreement: float
    """Fraction of pairs, among those whose step-k difference is not a tie, where the
    step-k difference has the sign of the final difference (of the same reward)."""
    pair_sign_agreement_with_gold: float
    """The same, against the gold's final difference: does this step's signal point at the truth?"""
    pair_ties: float
    """Fraction of pairs whose x̂0_k score the same (at k = 0 pairs that share x_T always do)."""
    gold_pair_ties: float
    """Fraction of pairs whose final images the gold scores the same (left out of the gold agreement)."""


def step_statistics(
    scores: torch.Tensor, gold_final: torch.Tensor, timesteps: list[int]
) -> list[StepStats]:
    """scores (P, 2, K + 1): a reward of x̂0_0 .. x̂0_{K-1} and of the final image, per pair;
    gold_final (P, 2): the gold of the final image."""
    final = scores[..., -1]
    final_diff = final[:, 0] - final[:, 1]
    gold_diff = gold_final[:, 0] - gold_final[:, 1]
    gold_ties = pair_ties(gold_diff)
    out = []
    for k, timestep in enumerate(timesteps):
        at_k = scores[..., k]
        step_diff = at_k[:, 0] - at_k[:, 1]
        agreement, ties = pair_sign_agreement(step_diff, final_diff)
        gold_agreement, _ = pair_sign_agreement(step_diff, gold_diff)
        flat = at_k.flatten().double()
        out.append(StepStats(
            step=k,
            timestep=timestep,
            mean=float(flat.mean()),
            stderr=float(flat.std() / math.sqrt(len(flat))),
            corr_with_final=float(torch.corrcoef(torch.stack([flat, final.flatten().double()]))[0, 1]),
            pair_sign_agreement=agreement,
            pair_sign_agreement_with_gold=gold_agreement,
            pair_ties=ties,
            gold_pair_ties=gold_ties,
        ))
    return out


@torch.no_grad()
def score_steps(
    policy: Policy, sampler_config: SamplerConfig, prompts: list[str], pairs_per_prompt: int,
    rewards: dict, seed: int, shared_noise: bool = True, batch_prompts: int = 16,
) -> tuple[dict[str, torch.Tensor], list[int], torch.Tensor]:
    """Sample pairs, sharing x_T (SDPO's and D3PO's sampling) or not (`shared_noise`), and
    score x̂0 at every step and the final image: {reward: (P * pairs, 2, K + 1)}, the K timesteps, and SDPO's anchor step of every
    trajectory (the middle x̂0 its dense rewards score, `zoo.sdpo.anchor_similarities`)."""
    sampler = TrajectorySampler(policy, sampler_config)
    generator = torch.Generator().manual_seed(evaluation_seed(seed + DIAGNOSIS_SEED_OFFSET, sampler_config.num_steps))
    everything = [p for p in prompts for _ in range(pairs_per_prompt)]
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    anchors: list[torch.Tensor] = []
    timesteps: list[int] = []
    for start in range(0, len(everything), batch_prompts):
        chunk = everything[start : start + batch_prompts]
        traj = sampler.sample(chunk, group_size=2, shared_noise=shared_noise, generator=generator, record_pred_x0=True,
                              record_transitions=False)
        timesteps = [int(t) for t in traj.timesteps[0, 0]]
        anchors.append(anchor_similarities(traj.pred_x0)[0].flatten())
        num_steps = traj.pred_x0.shape[2]
        pred = traj.pred_x0.flatten(0, 2)  # (P*2*K, C, h, w), step fastest
        images = torch.cat([policy.decode(pred[i : i + 64]) for i in range(0, len(pred), 64)])
        images = images.view(len(chunk), 2, num_steps, *images.shape[1:])
        all_images = torch.cat([images, traj.images[:, :, None]], dim=2)  # (P, 2, K + 1, 3, H, W)
        repeated = [p for p in chunk for _ in range(2 * (num_steps + 1))]
        for name, reward in rewards.items():
            flat = reward.score(all_images.flatten(0, 2), repeated).float().cpu()
            collected[name].append(flat.view(len(chunk), 2, num_steps + 1))
    scores = {name: torch.cat(parts) for name, parts in collected.items()}
    return scores, timesteps, torch.cat(anchors)


def diagnose(run: Path, seed: int, algos: list[str] | None, split: str, pairs_per_prompt: int,
             steps: int | None, shared_noise: bool = True) -> dict:
    config = json.loads((run / "config.json").read_text())
    preset = PRESETS[config["preset"]]()
    prompts = list(preset.val_prompts if split == "validation" else preset.eval_prompts)
    train_reward = config["reward"]
    reward_names = [train_reward, *gold_rewards(train_reward)]
    if len(reward_names) < 2:
        raise SystemExit(f"--run {run}: its training reward {train_reward} declares no gold; "
                         "the diagnosis compares a proxy with its gold (e.g. tiny-aesthetic, tiny-align)")
    gold = reward_names[1]
    rewards = {name: load_reward(name) for name in reward_names}
    algo_configs = config["algorithm_configs"]
    chosen = list(algo_configs) if algos is None else algos
    unknown = [a for a in chosen if a not in algo_configs]
    if unknown:
        raise SystemExit(f"--algos: {unknown} not in the run {run} (it trained {list(algo_configs)})")
    # Every algorithm of a run samples with the preset's shared sampler fields.
    first = next(iter(algo_configs.values()))
    num_steps = steps or first["num_steps"]
    flow_sde = first.get("flow_sde", ALGORITHM_CONFIG_DEFAULTS["flow_sde"])
    sampler_config = SamplerConfig(first["sampler"], num_steps, first["eta"], first["guidance_scale"],
                                   config.get("timestep_spacing"), flow_sde)
    model = recorded_model(config["model"])
    results: dict = {"run": str(run), "seed": seed, "split": split, "num_steps": num_steps,
                     "pairs_per_prompt": pairs_per_prompt, "shared_noise": shared_noise, "prompts": prompts,
                     "rewards": reward_names,
                     "policies": {}}
    finetune = recorded_setting(config, "finetune")
    policies: list[tuple[str, Path | None, LoraSettings | None]] = [("base", None, None)]
    for algo in chosen:
        folder = trained_weights_folder(run, algo, seed, finetune)
        if not folder.is_dir():
            raise SystemExit(f"--seed {seed}: {folder} is missing; the run trained seeds {config['seeds']}")
        fields = algo_configs[algo]
        lora = None if finetune == "full" else LoraSettings(
            fields["lora_rank"], fields["lora_alpha"], tuple(fields["lora_target_modules"]))
        policies.append((algo, folder, lora))
    for name, folder, lora in policies:
        policy = load_policy(model, lora=lora)
        if folder is not None:
            policy.load_weights(folder)
        scores, timesteps, anchors = score_steps(policy, sampler_config, prompts, pairs_per_prompt, rewards, seed,
                                                 shared_noise)
        results["policies"][name] = {
            reward: [vars(s) for s in step_statistics(scores[reward], scores[gold][..., -1], timesteps)]
            for reward in reward_names
        } | {
            "final": {reward: float(scores[reward][..., -1].mean()) for reward in reward_names},
            "anchor_fraction": [float((anchors == k).double().mean()) for k in range(num_steps)],
        }
    return results


def render(results: dict) -> str:
    train_reward, gold = results["rewards"][:2]
    lines = [
        f"### Per-step signal at K = {results['num_steps']} ({results['split']} prompts, "
        f"{results['pairs_per_prompt']} pairs {'sharing' if results['shared_noise'] else 'not sharing'} x_T "
        f"per prompt, seed {results['seed']})",
        "",
        f"x̂0_k scored by {train_reward} (the training reward) and {gold} (its gold). "
        "corr: Pearson with the final image's score of the same reward. sign: fraction of "
        "pairs (neither difference tied) whose step-k difference has the final difference's sign, "
        f"of the training reward / of the gold; ties: pairs whose step-k scores tie; gold ties: pairs "
        f"whose final gold scores tie (left out). Step 0 (t = 999) is the 1-step sample.",
        "",
        f"| policy | k | t | {train_reward} x̂0_k | {gold} x̂0_k | corr {train_reward} | corr {gold} "
        f"| sign vs final {train_reward} | sign vs final {gold} | ties | gold ties |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_reward in results["policies"].items():
        for proxy, truth in zip(per_reward[train_reward], per_reward[gold]):
            lines.append(
                f"| {name} | {proxy['step']} | {proxy['timestep']} | {proxy['mean']:.3f} ± {proxy['stderr']:.3f} "
                f"| {truth['mean']:.3f} ± {truth['stderr']:.3f} | {proxy['corr_with_final']:.2f} "
                f"| {truth['corr_with_final']:.2f} | {proxy['pair_sign_agreement']:.2f} "
                f"| {proxy['pair_sign_agreement_with_gold']:.2f} | {proxy['pair_ties']:.2f} "
                f"| {proxy['gold_pair_ties']:.2f} |"
            )
    lines += ["", "SDPO's anchor step (the middle x̂0 its dense rewards score), fraction of trajectories per k:", ""]
    for name, per_reward in results["policies"].items():
        fractions = ", ".join(f"k={k} {f:.2f}" for k, f in enumerate(per_reward["anchor_fraction"]))
        lines.append(f"- {name}: {fractions}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a benchmarks.run output folder")
    parser.add_argument("--seed", type=int, default=0,
                        help="which seed's trained weights (lora/<algo>_seed<N>, or model/ in full fine-tuning)")
    parser.add_argument("--algos", default=None,
                        help='comma-separated; default: every algorithm of the run; "" for the base model alone')
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--pairs-per-prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="K; default: the run's training K")
    parser.add_argument("--independent-noise", action="store_true",
                        help="pairs from independent x_T (DDPO's and REBEL's comparisons) instead of a shared one "
                             "(SDPO's and D3PO's); writes steps-independent.md/json")
    parser.add_argument("--out", type=Path, default=None, help="default: the run folder")
    args = parser.parse_args(argv)
    if not (args.run / "config.json").is_file():
        print(f"--run {args.run}: no config.json; pass a benchmarks.run output folder", file=sys.stderr)
        return 2
    algos = None if args.algos is None else [a for a in args.algos.split(",") if a]
    results = diagnose(args.run, args.seed, algos, args.split,
                       args.pairs_per_prompt, args.steps, not args.independent_noise)
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    stem = "steps-independent" if args.independent_noise else "steps"
    (out / f"{stem}.json").write_text(strict_json.dumps(results, indent=1))
    table = render(results)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
