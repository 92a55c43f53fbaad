"""Train every algorithm from the same base under the same budget and tabulate held-out
reward against the number of sampling steps.

    python -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore
    accelerate launch --num_processes 8 -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore

Every input is checked before any model loads (names, weights, sizes, the output
folder); a bad one ends the run with one line naming the flag and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from benchmarks.presets import PRESETS, SD_TURBO_REWARD_SETTINGS, Preset
from zoo.registry import ALGORITHMS

AlgoConfigs = make_dataclass(
    "AlgoConfigs",
    [(name, config_cls, field(default_factory=config_cls)) for name, config_cls in ALGORITHMS.items()],
    frozen=True,
)
AlgoConfigs.__doc__ = "Per-algorithm hyperparameters (defaults: the published ones, then the preset's)."

# The sampler fields that a preset sets for every algorithm alike, so that all of them
# train on the same trajectories distribution and budget.
SHARED_SAMPLER_FIELDS = ("sampler", "num_steps", "guidance_scale", "eta")


@dataclass
class RunArgs:
    """stepzoo benchmark: RL fine-tuning algorithms compared at 1, 2, 4, 8 sampling steps."""

    algos: str = "all"
    """Comma-separated algorithms to train, or "all" for every registered one."""
    reward: str | None = None
    """Training reward: a registry name or a weighted sum like aesthetic:1,pickscore:0.5 (default: the preset's)."""
    preset: str = "tiny"
    """Model, prompts, sampler and budget: tiny (embedded, CPU), sd-turbo (SDPO), lcm (RLCM), sd15 (DDPO)."""
    model: str | None = None
    """Base model: a hub id in the Hugging Face cache or a local diffusers folder (default: the preset's)."""
    epochs: int | None = None
    """Training epochs per algorithm and seed (default: the preset's)."""
    train_steps: int | None = None
    """Sampling steps K during training, for every algorithm (default: the preset's)."""
    eval_steps: str = "1,2,4,8"
    """Comma-separated sampling step counts at which held-out reward is measured."""
    eval_every: int | None = None
    """Evaluate every this many epochs (and always after the last; default: the preset's)."""
    seeds: str = "0"
    """Comma-separated seeds; several give a mean and a spread per table cell."""
    eval_rewards: str = ""
    """Comma-separated extra rewards scored at evaluation only, to catch reward hacking."""
    trajectories_per_epoch: int | None = None
    """Trajectories sampled per epoch on each process (default: the preset's)."""
    eval_samples_per_prompt: int | None = None
    """Evaluation samples per held-out prompt and step count (default: the preset's)."""
    out: str | None = None
    """Output folder (default: results/<preset>-<reward>-<time>)."""
    resume: bool = False
    """Continue the run in --out from its last complete epoch."""
    overwrite: bool = False
    """Replace the run already in --out."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    reward_path: tuple[str, ...] = ()
    """Weights locations as NAME=PATH (e.g. pickscore=/models/PickScore_v1); see each reward's error for keys."""
    algo: Annotated[AlgoConfigs, tyro.conf.arg(name="")] = field(default_factory=AlgoConfigs)


class UsageError(ValueError):
    """A bad input, reported as one line before any model is loaded."""


def _split(text: str, flag: str, cast=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of {cast.__name__}") from None


def _peek(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv before full parsing (presets set other flags' defaults)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def preset_algo_configs(preset: Preset, reward: str) -> Any:
    """Each algorithm's published config, with the preset's shared sampler and its paper's
    per-algorithm settings applied."""
    configs = {}
    for name, config_cls in ALGORITHMS.items():
        overrides = {
            "sampler": preset.sampler,
            "num_steps": preset.num_steps,
            "guidance_scale": preset.guidance_scale,
            "eta": preset.eta,
            **preset.algo_overrides.get(name, {}),
        }
        if preset.name == "sd-turbo" and reward in SD_TURBO_REWARD_SETTINGS:
            lr, batch, accumulation, _ = SD_TURBO_REWARD_SETTINGS[reward]
            overrides.update(learning_rate=lr, train_batch_size=batch, gradient_accumulation_steps=accumulation)
        known = {f.name for f in dataclasses.fields(config_cls)}
        configs[name] = dataclasses.replace(config_cls(), **{k: v for k, v in overrides.items() if k in known})
    return AlgoConfigs(**configs)


def parse_args(argv: list[str]) -> RunArgs:
    preset_name = _peek(argv, "--preset") or "tiny"
    if preset_name not in PRESETS:
        raise UsageError(f"--preset: unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]()
    reward = _peek(argv, "--reward") or preset.reward
    defaults = RunArgs(preset=preset_name, algo=preset_algo_configs(preset, reward))
    try:
        return tyro.cli(RunArgs, args=argv, default=defaults)
    except ValueError as error:
        raise UsageError(str(error)) from None


@dataclass
class Plan:
    """A validated run: everything resolved, nothing loaded."""

    args: RunArgs
    preset: Preset
    algos: list[str]
    seeds: list[int]
    eval_steps: list[int]
    reward: str
    eval_rewards: list[str]
    reward_paths: dict[str, str]
    model: str
    epochs: int
    eval_every: int
    trajectories_per_epoch: int
    eval_samples_per_prompt: int
    out_dir: Path
    configs: dict[str, Any]

    def config_json(self) -> dict:
        return {
            "preset": self.preset.name,
            "model": self.model,
            "algos": self.algos,
            "seeds": self.seeds,
            "eval_steps": self.eval_steps,
            "reward": self.reward,
            "eval_rewards": self.eval_rewards,
            "epochs": self.epochs,
            "eval_every": self.eval_every,
            "trajectories_per_epoch": self.trajectories_per_epoch,
            "eval_samples_per_prompt": self.eval_samples_per_prompt,
            "train_prompts": list(self.preset.train_prompts),
            "eval_prompts": list(self.preset.eval_prompts),
            "mixed_precision": self.preset.mixed_precision,
            "algorithm_configs": {name: dataclasses.asdict(cfg) for name, cfg in self.configs.items()},
        }


def make_plan(args: RunArgs, num_processes: int = 1) -> Plan:
    """Check every input and resolve defaults; raises UsageError or RewardUnavailable /
    ModelUnavailable (one paragraph each) before anything heavy happens."""
    from rewards.registry import check_rewards, parse_reward_spec
    from zoo.policy import resolve_model

    preset = PRESETS[args.preset]()
    algos = list(ALGORITHMS) if args.algos == "all" else _split(args.algos, "--algos")
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown or not algos:
        raise UsageError(f"--algos: unknown algorithm {', '.join(unknown) or '(none)'}; choose from {', '.join(ALGORITHMS)}")
    seeds = _split(args.seeds, "--seeds", int)
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    eval_steps = _split(args.eval_steps, "--eval-steps", int)
    if not eval_steps or any(k < 1 or k > 1000 for k in eval_steps):
        raise UsageError(f"--eval-steps: step counts must lie in 1..1000 (the training schedule), got {args.eval_steps!r}")
    reward = args.reward or preset.reward
    parse_reward_spec(reward)
    eval_rewards = _split(args.eval_rewards, "--eval-rewards")
    for name in eval_rewards:
        parse_reward_spec(name)
    reward_paths = {}
    for item in args.reward_path:
        key, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--reward-path: expected NAME=PATH, got {item!r}")
        reward_paths[key] = path
    epochs = args.epochs if args.epochs is not None else preset.epochs
    if preset.name == "sd-turbo" and args.epochs is None and reward in SD_TURBO_REWARD_SETTINGS:
        epochs = SD_TURBO_REWARD_SETTINGS[reward][3]
    eval_every = args.eval_every if args.eval_every is not None else preset.eval_every
    trajectories = args.trajectories_per_epoch or preset.trajectories_per_epoch
    eval_samples = args.eval_samples_per_prompt or preset.eval_samples_per_prompt
    for flag, value in [("--epochs", epochs), ("--eval-every", eval_every), ("--trajectories-per-epoch", trajectories),
                        ("--eval-samples-per-prompt", eval_samples)]:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    configs = {name: getattr(args.algo, name) for name in algos}
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise UsageError(f"--train-steps must be at least 1, got {args.train_steps}")
        configs = {name: dataclasses.replace(cfg, num_steps=args.train_steps) for name, cfg in configs.items()}
    for name, cfg in configs.items():
        _check_batch_sizes(name, cfg, trajectories, num_processes)
    check_rewards(reward, reward_paths)
    for name in eval_rewards:
        check_rewards(name, reward_paths)
    model = args.model or preset.model
    resolve_model(model)
    out_dir = Path(args.out) if args.out else Path("results") / f"{preset.name}-{reward.replace(':', '').replace(',', '+')}-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = Plan(args, preset, algos, seeds, eval_steps, reward, eval_rewards, reward_paths, model, epochs,
                eval_every, trajectories, eval_samples, out_dir, configs)
    _check_out_dir(plan)
    return plan


def _check_batch_sizes(name: str, cfg: Any, trajectories: int, num_processes: int) -> None:
    group_size = cfg.build().needs.group_size
    if trajectories % group_size:
        raise UsageError(
            f"--trajectories-per-epoch {trajectories} is not divisible by {name}'s group size {group_size}"
        )
    groups = trajectories // group_size
    if groups % cfg.train_batch_size:
        raise UsageError(
            f"--{name}.train-batch-size {cfg.train_batch_size} does not divide the {groups} groups per process "
            f"per epoch (--trajectories-per-epoch {trajectories} / group size {group_size})"
        )
    calls = groups // cfg.train_batch_size * cfg.num_inner_epochs
    if not cfg.build().needs.whole_trajectory_loss:
        calls *= cfg.num_steps
    if calls % cfg.loss_calls_per_update:
        raise UsageError(
            f"--{name}.gradient-accumulation-steps {cfg.gradient_accumulation_steps} makes an optimizer step every "
            f"{cfg.loss_calls_per_update} loss calls, which does not divide the {calls} calls of an epoch "
            f"({groups} groups per process / --{name}.train-batch-size {cfg.train_batch_size}), so an epoch "
            "would end mid-update"
        )


def _check_out_dir(plan: Plan) -> None:
    out = plan.out_dir
    config_path = out / "config.json"
    if not config_path.exists():
        if plan.args.resume:
            raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
        return
    if plan.args.resume:
        saved = json.loads(config_path.read_text())
        if saved != json.loads(json.dumps(plan.config_json())):
            changed = sorted(k for k in saved.keys() | plan.config_json().keys()
                             if saved.get(k) != json.loads(json.dumps(plan.config_json().get(k))))
            raise UsageError(f"--resume: the run in {out} was started with other settings ({', '.join(changed)})")
        return
    if not plan.args.overwrite:
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def execute(plan: Plan) -> str:
    """Run the plan: base evaluation and training per seed and algorithm, then the report."""
    import shutil

    import torch
    from accelerate import Accelerator

    from benchmarks.checkpoint import write_jsonl, write_text
    from benchmarks.evaluate import EvalSettings
    from benchmarks.report import write_report
    from benchmarks.train import JobSettings, evaluate_base, run_algorithm
    from rewards.registry import load_reward

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=plan.preset.mixed_precision if on_gpu else "no")
    out = plan.out_dir
    if accelerator.is_main_process:
        if plan.args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.json", json.dumps(plan.config_json(), indent=2) + "\n")
    accelerator.wait_for_everyone()

    train_reward = load_reward(plan.reward, device=accelerator.device, paths=plan.reward_paths)
    eval_rewards = {plan.reward: train_reward}
    for name in plan.eval_rewards:
        eval_rewards[name] = load_reward(name, device=accelerator.device, paths=plan.reward_paths)

    logger = _make_logger(plan, accelerator)
    mixed_precision = plan.preset.mixed_precision if on_gpu else "no"
    records: list[dict] = []
    for seed in plan.seeds:
        settings = JobSettings(
            model=plan.model,
            epochs=plan.epochs,
            trajectories_per_epoch=plan.trajectories_per_epoch,
            train_prompts=plan.preset.train_prompts,
            eval_every=plan.eval_every,
            eval=EvalSettings(
                prompts=plan.preset.eval_prompts,
                step_counts=tuple(plan.eval_steps),
                samples_per_prompt=plan.eval_samples_per_prompt,
                batch_size=plan.preset.eval_batch_size,
                sampler=plan.preset.sampler,
                guidance_scale=plan.preset.guidance_scale,
                eta=plan.preset.eta,
                seed=seed,
            ),
            mixed_precision=mixed_precision,
            train_reward=plan.reward,
            out_dir=out,
            log=logger,
        )
        records += evaluate_base(settings, seed, eval_rewards, accelerator)
        for algo in plan.algos:
            records += run_algorithm(algo, plan.configs[algo], seed, settings, train_reward, eval_rewards, accelerator)
            if accelerator.is_main_process:
                write_jsonl(out / "records.jsonl", records)
    table = ""
    if accelerator.is_main_process:
        write_jsonl(out / "records.jsonl", records)
        table = write_report(out, reward=plan.reward, algos=plan.algos)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return table


def _make_logger(plan: Plan, accelerator):
    """Per-epoch training metrics to metrics.jsonl (and wandb when asked), main process only."""
    if not accelerator.is_main_process:
        return lambda row: None
    run = None
    if plan.args.wandb:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        run = wandb.init(project="stepzoo", name=plan.out_dir.name, dir=str(plan.out_dir), config=plan.config_json())
    path = plan.out_dir / "metrics.jsonl"

    def log(row: dict) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if run is not None:
            run.log({f"{row['algo']}/seed{row['seed']}/{k}": v for k, v in row.items() if isinstance(v, float)})

    return log


def main(argv: list[str] | None = None) -> int:
    from rewards.errors import RewardUnavailable
    from zoo.policy import ModelUnavailable

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        plan = make_plan(args, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    except (UsageError, RewardUnavailable, ModelUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = execute(plan)
    if table:
        print(table)
        print(f"\nresults in {plan.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
