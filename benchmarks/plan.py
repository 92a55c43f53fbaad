"""A run's plan: every input checked and every default resolved, nothing loaded.

`make_plan` turns the parsed flags (`benchmarks.cli.RunArgs`) into a `Plan`: the preset's
defaults filled in, names, sizes and budgets checked against each other (the epoch
schedule: `epoch_budget`), the rewards' weights and the base model found (missing ones
downloaded into the Hugging Face cache, unless offline), the model's scheduler config
read, and the output folder checked against the run it may hold (`benchmarks.run_folder`).
It writes nothing else; a bad input is a `UsageError` naming the flag, raised before any
model loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cli import RunArgs, UsageError, algo_flag, comma_list, init_values, preset_algo_configs
from benchmarks.ema import Ema
from benchmarks.epochs import epoch_schedule
from benchmarks.evaluate import EvalSettings
from benchmarks.loop import TrainLoop
from benchmarks.portable import portable_model
from benchmarks.presets import PRESETS, Preset
from benchmarks.run_folder import RESUME_DEFAULTS, check_out_dir, extended
from zoo.algorithm import RewardBackpropAlgorithm
from zoo.loading import model_family
from rewards.catalog import GOLD_OF
from zoo.registry import ALGORITHMS


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
    model_source: str
    """The local folder `model` loads from (`resolve_model`'s answer)."""
    epochs: int
    eval_every: int
    trajectories_per_epoch: int
    groups_per_prompt: int
    eval_samples_per_prompt: int
    curve_samples_per_prompt: int
    eval_split: str
    out_dir: Path
    configs: dict[str, Any]
    """The configs of the algorithms this invocation trains."""
    loop: TrainLoop
    recorded_configs: dict[str, dict] = field(default_factory=dict)
    """An extension's reused algorithms' configs, as the extended run's config.json holds them."""
    algo_seeds: dict[str, list[int]] = field(default_factory=dict)
    """The seeds of each algorithm that trains on fewer than `seeds` (an extension with
    --partial-seeds); the others, and the base, have every seed."""
    redone: tuple[str, ...] = ()
    """An extension's recorded algorithms trained again (`--redo`): their recorded rows are dropped."""
    num_processes: int = 1
    """Processes that share each run (`accelerate launch --num_processes`): each samples and
    trains its equal part of `trajectories_per_epoch` (`benchmarks.epochs.Shard`); config.json
    records it, for a run's numbers equal another count's only up to the order of float sums."""
    notes: list[str] = field(default_factory=list)
    """What the user should know before the run starts (an algorithm left out), one line each."""

    def seeds_of(self, name: str) -> list[int]:
        """The seeds that `name` (an algorithm, or the base) has in this run."""
        return self.algo_seeds.get(name, self.seeds)

    @property
    def eval_prompts(self) -> tuple[str, ...]:
        """The reported evaluation's prompts: the validation prompts of a run evaluated on them
        only (a tuning run), else the test prompts."""
        return self.preset.val_prompts if self.eval_split == "validation" else self.preset.eval_prompts

    def config_json(self) -> dict:
        return {
            "preset": self.preset.name,
            "model": portable_model(self.model),
            "algos": self.algos,
            "seeds": self.seeds,
            **({"algo_seeds": self.algo_seeds} if self.algo_seeds else {}),
            "eval_steps": self.eval_steps,
            "reward": self.reward,
            "eval_rewards": self.eval_rewards,
            "epochs": self.epochs,
            "eval_every": self.eval_every,
            "trajectories_per_epoch": self.trajectories_per_epoch,
            "groups_per_prompt": self.groups_per_prompt,
            "eval_samples_per_prompt": self.eval_samples_per_prompt,
            "curve_samples_per_prompt": self.curve_samples_per_prompt,
            "train_prompts": list(self.preset.train_prompts),
            "eval_split": self.eval_split,
            "eval_prompts": list(self.eval_prompts),
            **({"val_prompts": list(self.preset.val_prompts)} if self.eval_split == "both" else {}),
            "mixed_precision": self.preset.mixed_precision,
            "timestep_spacing": self.preset.timestep_spacing,
            "max_bad_reward_batches": self.args.max_bad_reward_batches,
            "num_processes": self.num_processes,
            "ema": dataclasses.asdict(self.args.ema) if self.args.ema.on else None,
            "finetune": self.args.finetune,
            "fsdp": self.args.fsdp,
            "algorithm_configs": {name: self._algorithm_config(name) for name in self.algos},
        }

    def _algorithm_config(self, name: str) -> dict:
        """`name`'s config as config.json records it: trained here, or reused as recorded."""
        return dataclasses.asdict(self.configs[name]) if name in self.configs else self.recorded_configs[name]

    def eval_settings(self, seed: int, split: str | None = None) -> EvalSettings:
        """The evaluation of every checkpoint of `seed` (on `split`'s prompts; default: the
        reported ones): the preset's sampler, guidance, eta
        and timestep spacing at each of `eval_steps`; a flow preset evaluates on the ODE
        (noise level 0), as Flow-GRPO does (yifan123/flow_grpo ac4c86e,
        scripts/train_sd3.py:258), while it trains on the SDE."""
        split = split or ("validation" if self.eval_split == "validation" else "test")
        return EvalSettings(
            prompts=self.preset.val_prompts if split == "validation" else self.preset.eval_prompts,
            split=split,
            step_counts=tuple(self.eval_steps),
            samples_per_prompt=self.eval_samples_per_prompt,
            batch_size=self.preset.eval_batch_size,
            sampler=self.preset.sampler,
            guidance_scale=self.preset.guidance_scale,
            eta=0.0 if self.preset.sampler == "flow" else self.preset.eta,
            seed=seed,
            timestep_spacing=self.preset.timestep_spacing,
        )


def folder_label(reward: str) -> str:
    """A `--reward` spec as one folder name: 'aesthetic:1,pickscore:0.5' -> 'aesthetic1+pickscore0.5';
    a server's URL loses its slashes, which would nest folders."""
    return re.sub(r"[^\w.+-]+", "-", reward.replace(":", "").replace(",", "+"))


def make_plan(args: RunArgs, num_processes: int = 1) -> Plan:
    """Check every input and resolve defaults, downloading a model or reward weights that
    are not cached; raises UsageError, RewardUnavailable / ModelUnavailable (offline: a
    line naming the fix, then details) or DownloadFailed before any model loads."""
    from benchmarks.tracking import require_wandb
    from rewards.registry import check_rewards
    from rewards.spec import gold_rewards, parse_reward_paths, parse_reward_spec
    from zoo.hub import UNPINNED
    from zoo.loading import resolve_model

    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (worker processes), got {args.jobs}")
    if args.jobs > 1 and num_processes > 1:
        raise UsageError(
            f"--jobs {args.jobs}: under accelerate launch ({num_processes} processes) every run is spread over "
            "the processes already; leave --jobs out, or run without accelerate launch to train the runs side by side"
        )
    _check_cluster(args, num_processes)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if args.extend and (args.resume or args.overwrite):
        raise UsageError(
            f"--extend and {'--resume' if args.resume else '--overwrite'} contradict each other: --extend adds "
            "algorithms or seeds to a finished run, --resume continues an interrupted one, --overwrite replaces one; "
            "pass one of them"
        )
    if args.redo and not args.extend:
        raise UsageError("--redo replaces algorithms' rows in a finished run: pass it with --extend --out RUN --algos ...")
    if args.partial_seeds and not args.extend:
        raise UsageError("--partial-seeds adds seeds to some algorithms of a finished run: pass it with --extend "
                         "--out RUN --algos ... --seeds ...")
    if args.wandb:
        require_wandb()
    if args.offline:
        # The environment variable, so that every library and process of the run sees it.
        os.environ["HF_HUB_OFFLINE"] = "1"

    preset = PRESETS[args.preset]()
    if args.algos is None:
        algos = list(preset.algos or ALGORITHMS)
    else:
        algos = list(ALGORITHMS) if args.algos == "all" else comma_list(args.algos, "--algos")
    if "all" in algos:
        raise UsageError(
            f"--algos {args.algos}: all stands alone (every algorithm); pass --algos all, or list the algorithms "
            f"to train from {', '.join(ALGORITHMS)}"
        )
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown or not algos:
        raise UsageError(f"--algos: unknown algorithm {', '.join(unknown) or '(none)'}; choose from {', '.join(ALGORITHMS)}")
    repeated = sorted({a for a in algos if algos.count(a) > 1})
    if repeated:
        raise UsageError(
            f"--algos: {', '.join(repeated)} listed more than once; each algorithm trains once per seed "
            "(use --seeds for repeats)"
        )
    seeds = comma_list(args.seeds, "--seeds", int)
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    eval_steps = comma_list(args.eval_steps, "--eval-steps", int)
    if not eval_steps or any(k < 1 for k in eval_steps):
        raise UsageError(f"--eval-steps: step counts must be at least 1, got {args.eval_steps!r}")
    for flag, values, why in [("--seeds", seeds, "a seed run twice gives the same row twice"),
                              ("--eval-steps", eval_steps, "a step count is one column of the table")]:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UsageError(
                f"{flag}: {', '.join(map(str, repeated))} listed more than once ({why}); list each once"
            )
    reward = args.reward or preset.reward
    terms = parse_reward_spec(reward)
    algos, notes = _algos_for_reward(args, algos, reward)
    notes += _reward_notes(reward, terms)
    if args.eval_rewards is None:
        eval_rewards = [name for name in preset.eval_rewards if name != reward]
    else:
        eval_rewards = comma_list(args.eval_rewards, "--eval-rewards")
    for name in eval_rewards:
        parse_reward_spec(name, "--eval-rewards")
    # A proxy's gold is what tells a real gain from hacking the proxy, so it is scored
    # whatever --eval-rewards says, ahead of the others.
    golds = [g for g in gold_rewards(reward) if g != reward]
    eval_rewards = golds + [name for name in eval_rewards if name not in golds]
    reward_paths = parse_reward_paths(args.reward_path)
    epochs = args.epochs if args.epochs is not None else preset.epochs_for(reward)
    eval_every = args.eval_every if args.eval_every is not None else preset.eval_every_for(reward)
    # `is not None`, not `or`: a 0 is refused below, never read as "the preset's".
    trajectories = (args.trajectories_per_epoch if args.trajectories_per_epoch is not None
                    else preset.trajectories_per_epoch)
    groups_per_prompt = args.groups_per_prompt if args.groups_per_prompt is not None else preset.groups_per_prompt
    saved_config = Path(args.out) / "config.json" if args.out else None
    algo_seeds = {}
    if (args.resume or args.extend) and saved_config and saved_config.is_file():
        try:
            saved = json.loads(saved_config.read_text())
        except ValueError:
            saved = None  # check_out_dir reports the broken file
        if saved is not None and args.groups_per_prompt is None:
            # A resumed or extended run keeps the draw it started with, whatever the preset says now.
            groups_per_prompt = saved.get("groups_per_prompt", RESUME_DEFAULTS["groups_per_prompt"])
        if saved is not None and args.resume:
            # An extension with --partial-seeds that was interrupted resumes the seeds it planned.
            algo_seeds = {name: seeds for name, seeds in saved.get("algo_seeds", {}).items() if name in algos}
    eval_samples = (args.eval_samples_per_prompt if args.eval_samples_per_prompt is not None
                    else preset.eval_samples_per_prompt)
    curve_samples = (args.curve_samples_per_prompt if args.curve_samples_per_prompt is not None
                     else preset.curve_samples_per_prompt or eval_samples)
    eval_split = args.eval_split or preset.eval_split
    for flag, value in [("--epochs", epochs), ("--eval-every", eval_every), ("--trajectories-per-epoch", trajectories),
                        ("--groups-per-prompt", groups_per_prompt), ("--eval-samples-per-prompt", eval_samples),
                        ("--curve-samples-per-prompt", curve_samples)]:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.max_bad_reward_batches < 0:
        raise UsageError(f"--max-bad-reward-batches must be at least 0, got {args.max_bad_reward_batches}")
    untrained = _untrained_algo_fields(args, preset, reward, algos)
    configs = {name: getattr(args.algo, name) for name in algos}
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise UsageError(f"--train-steps must be at least 1, got {args.train_steps}")
        try:
            configs = {name: dataclasses.replace(cfg, num_steps=args.train_steps) for name, cfg in configs.items()}
        except ValueError as refused:
            raise UsageError(f"--train-steps {args.train_steps}: {refused} Pass more steps, or the field it names.") from None
    if args.fsdp and args.finetune != "full":
        raise UsageError("--fsdp shards a fully fine-tuned denoiser: pass --finetune full as well (a LoRA adapter's "
                         "weights are small; its runs share the model across processes with DDP)")
    for name, cfg in configs.items():
        check_batch_sizes(name, cfg, trajectories, num_processes, split_minibatches=args.fsdp)
        _check_groups_per_prompt(name, cfg, trajectories, groups_per_prompt)
    loop = _check_loop(args.loop, preset, configs)
    _check_ema(args.ema)
    check_rewards(reward, reward_paths)
    for name in eval_rewards:
        check_rewards(name, reward_paths, "--eval-rewards")
    model = args.model or preset.model
    family = "flow" if preset.sampler == "flow" else "epsilon"
    model_source = resolve_model(model, preset.model_revision if model == preset.model else UNPINNED, family)
    _check_family(args, preset, configs, model, model_source)
    schedule = _schedule_length(model, model_source)
    too_many = [k for k in eval_steps if k > schedule]
    if too_many:
        raise UsageError(
            f"--eval-steps {args.eval_steps}: more steps than the {schedule} timesteps of {model}'s training schedule"
        )
    for name, cfg in configs.items():
        if cfg.num_steps > schedule:
            raise UsageError(
                f"{algo_flag(args, name, 'num_steps')} {cfg.num_steps} exceeds the {schedule} timesteps of "
                f"{model}'s training schedule"
            )
    out_dir = Path(args.out) if args.out else Path("results") / f"{preset.name}-{folder_label(reward)}-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = Plan(args, preset, algos, seeds, eval_steps, reward, eval_rewards, reward_paths, model,
                model_source, epochs, eval_every, trajectories, groups_per_prompt, eval_samples, curve_samples,
                eval_split, out_dir, configs, loop, algo_seeds=algo_seeds, num_processes=num_processes, notes=notes)
    check_out_dir(plan)
    if args.extend:
        plan = extended(plan, untrained)
        # The extended run's recorded algorithms were checked against config.json there.
        untrained = {name: keys for name, keys in untrained.items() if name not in plan.algos}
    if untrained:
        plan.notes.append(_untrained_note(untrained, algos))
    return plan


def _check_cluster(args: RunArgs, num_processes: int) -> None:
    """Refuse a `--cluster.*` setting that cannot run, before anything loads."""
    cluster = args.cluster
    if cluster.engine == "processes":
        if cluster.gpus or cluster.ray_address or cluster.slurm_partition:
            raise UsageError(
                "--cluster.gpus, --cluster.ray-address and --cluster.slurm-partition declare jobs to Ray or Slurm; "
                "pass --cluster.engine ray or slurm (--jobs N on this machine gives each worker one GPU)"
            )
        return
    if num_processes > 1:
        raise UsageError(
            f"--cluster.engine {cluster.engine}: under accelerate launch ({num_processes} processes) every run is "
            "spread over the processes already; run the driver as a plain python process"
        )
    if cluster.cpus < 1 or cluster.gpus < 0 or cluster.retries < 0 or cluster.slurm_time_min < 1:
        raise UsageError("--cluster.cpus and --cluster.slurm-time-min must be at least 1, --cluster.gpus and "
                         "--cluster.retries at least 0")
    package, install = ("ray", "pip install 'ray>=2.40'") if cluster.engine == "ray" else ("submitit", "pip install submitit")
    if importlib.util.find_spec(package) is None:
        raise UsageError(f"--cluster.engine {cluster.engine}: {package} is not installed; {install}")


def _reward_notes(reward: str, terms: list[tuple[str, float]]) -> list[str]:
    """What a training reward does that the user may not expect, one line each: a negative
    weight minimises its reward, and a gold is what the other rewards are judged by."""
    notes = [
        f"--reward {reward}: the weight {weight:g} of {name} is negative, so training minimises {name}; the tables "
        "report the weighted sum (higher is better)"
        for name, weight in terms if weight < 0
    ]
    proxies = {gold: proxy for proxy, gold in GOLD_OF.items()}
    notes += [
        f"--reward {reward}: {name} is the evaluation-only gold of {proxies[name]}; training on it gives an upper "
        "bound, with no held-out judge left to catch reward hacking"
        for name, _ in terms if name in proxies
    ]
    return notes


def _untrained_algo_fields(args: RunArgs, preset: Preset, reward: str, algos: list[str]) -> dict[str, list[str]]:
    """The config fields set by per-algorithm flags (`--ddpo.learning-rate`) of algorithms
    not in `algos`, by algorithm. A flag is found by its value differing from the preset's
    (one that repeats the preset's value changes nothing)."""
    defaults = preset_algo_configs(preset, reward)
    fields = {}
    for name in ALGORITHMS:
        if name not in algos:
            given, default = init_values(getattr(args.algo, name)), init_values(getattr(defaults, name))
            fields[name] = [key for key in given if given[key] != default[key]]
    return {name: keys for name, keys in fields.items() if keys}


def _untrained_note(untrained: dict[str, list[str]], algos: list[str]) -> str:
    """The note on flags of algorithms a run does not train: they are ignored, said in a
    line rather than refused, since a script may pass one set of flags to runs of
    different --algos."""
    flags = [f"--{name}.{key.replace('_', '-')}" for name, keys in untrained.items() for key in keys]
    return f"{', '.join(flags)}: for algorithms that --algos {','.join(algos)} leaves out; ignored"



def _check_loop(loop: TrainLoop, preset: Preset, configs: dict[str, Any]) -> TrainLoop:
    """`loop` with the preset's sampling-call size filled in; refuses sizes that cannot be."""
    sample_batch = loop.sample_batch_size if loop.sample_batch_size is not None else preset.sample_batch_size
    if sample_batch < 1:
        raise UsageError(f"--loop.sample-batch-size must be at least 1, got {sample_batch}")
    for name, cfg in configs.items():
        group_size = cfg.build().needs.group_size
        if sample_batch % group_size:
            raise UsageError(
                f"--loop.sample-batch-size {sample_batch} is not a multiple of {name}'s group size {group_size}"
            )
    if loop.steps_per_backward < 1:
        raise UsageError(f"--loop.steps-per-backward must be at least 1, got {loop.steps_per_backward}")
    if loop.micro_batch is not None and loop.micro_batch < 1:
        raise UsageError(
            f"--loop.micro-batch must be at least 1 (groups per UNet call), got {loop.micro_batch}; "
            "leave it out for one UNet call per loss call"
        )
    return dataclasses.replace(loop, sample_batch_size=sample_batch)


def _check_ema(ema: Ema) -> None:
    """Refuses a decay outside [0, 1], an update interval below 1, and EMA flags without
    --ema.decay (which would be ignored)."""
    if not ema.on:
        given = [f"--ema.{'no-' if getattr(ema, f.name) is False else ''}{f.name.replace('_', '-')}"
                 for f in dataclasses.fields(Ema) if getattr(ema, f.name) != f.default]
        if given:
            raise UsageError(
                f"{', '.join(given)}: no EMA is kept without --ema.decay; pass --ema.decay (Flow-GRPO's: 0.9)"
            )
        return
    if not 0 <= ema.decay <= 1:
        raise UsageError(f"--ema.decay must be between 0 and 1, got {ema.decay}")
    if ema.update_interval < 1:
        raise UsageError(f"--ema.update-interval must be at least 1 (optimizer updates), got {ema.update_interval}")


def _algos_for_reward(args: RunArgs, algos: list[str], reward: str) -> tuple[list[str], list[str]]:
    """(`algos`, notes) for a training reward without a gradient, which the algorithms that
    back-propagate it (`RewardBackpropAlgorithm`: DRaFT) cannot train on: named in --algos,
    they are refused; with --algos all, they are left out, and a note says so. Reads the
    registry only (nothing loads)."""
    from rewards.catalog import REWARDS
    from rewards.spec import non_differentiable_rewards
    from zoo.algorithm import RewardBackpropAlgorithm

    backprop = [name for name in algos if isinstance(getattr(args.algo, name).build(), RewardBackpropAlgorithm)]
    blocked = non_differentiable_rewards(reward) if backprop else []
    if not blocked:
        return algos, []
    names = ", ".join(backprop)
    why = f"{', '.join(blocked)} {'is' if len(blocked) == 1 else 'are'} not differentiable"
    if args.algos in (None, "all"):
        kept = [name for name in algos if name not in backprop]
        return kept, [f"--algos {args.algos or 'default'} leaves out {names}: --reward {reward}: {why}"]
    usable = ", ".join(name for name, spec in REWARDS.items() if spec.differentiable)
    raise UsageError(
        f"--reward {reward}: {why}, and {names} back-propagates the reward's gradient into the model; train {names} "
        f"on a differentiable reward ({usable}, or a plugin whose class sets differentiable = True), or leave "
        f"{names} out of --algos"
    )


def _check_family(args, preset: Preset, configs: dict[str, Any], model: str, source: str) -> None:
    """A flow-matching model takes the flow sampler and an ε-prediction UNet the others:
    a mismatch is refused here, before any model loads."""
    flow_model = model_family(source) == "flow"
    kind = "a flow-matching model (transformer/)" if flow_model else "an ε-prediction UNet model (unet/)"
    fix = "--preset tiny-flow or another flow preset" if flow_model else "a UNet preset such as --preset tiny"
    if (preset.sampler == "flow") != flow_model:
        raise UsageError(f"--model {model}: {kind}, which the {preset.name} preset's {preset.sampler} sampler cannot sample; pass {fix}")
    for name, cfg in configs.items():
        if (cfg.sampler == "flow") != flow_model:
            raise UsageError(
                f"{algo_flag(args, name, 'sampler')} {cfg.sampler}: --model {model} is {kind}; pass "
                f"{algo_flag(args, name, 'sampler')} {'flow' if flow_model else 'ddim'}"
            )


def _schedule_length(model: str, source: str) -> int:
    """The number of training timesteps in the model's scheduler config, read without
    loading the model; `source` is `resolve_model`'s answer (a folder)."""
    config = Path(source) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise UsageError(f"--model {model}: scheduler/scheduler_config.json is missing; a diffusers pipeline has one")
    return int(json.loads(config.read_text()).get("num_train_timesteps", 1000))


def epoch_budget(cfg: Any, trajectories: int) -> dict[str, int]:
    """The loss calls (backward passes without chunking) and optimizer updates of an epoch of
    `trajectories` trajectories under algorithm config `cfg`: the training
    loop's own schedule (`benchmarks.epochs.epoch_schedule`), so the budget columns and the
    checks count what the loop runs. Assumes the sizes divide as `make_plan` checks
    (`check_batch_sizes`)."""
    needs = cfg.build().needs
    schedule = epoch_schedule(cfg, needs, trajectories // needs.group_size)
    return {"loss_calls": schedule.loss_calls, "optimizer_updates": schedule.optimizer_updates}


def check_batch_sizes(name: str, cfg: Any, trajectories: int, num_processes: int,
                      split_minibatches: bool = False) -> None:
    """Refuses, with a UsageError naming the flag, sizes that do not divide algorithm
    `name`'s epoch of `trajectories` trajectories under config `cfg`: whole groups, whole
    minibatches of groups, whole optimizer updates of loss calls, and an equal share of the
    groups for each of `num_processes` (of each minibatch, for reward back-propagation,
    which samples the minibatch as it trains, and under `split_minibatches`: `--fsdp`,
    `benchmarks.epochs.MinibatchShard`)."""
    algorithm = cfg.build()
    group_size = algorithm.needs.group_size
    if trajectories % group_size:
        raise UsageError(
            f"--trajectories-per-epoch {trajectories} is not divisible by {name}'s group size {group_size}"
        )
    groups = trajectories // group_size
    if groups % cfg.train_batch_size:
        raise UsageError(
            f"--{name}.train-batch-size {cfg.train_batch_size} does not divide the {groups} groups "
            f"per epoch (--trajectories-per-epoch {trajectories} / group size {group_size})"
        )
    calls = epoch_budget(cfg, trajectories)["loss_calls"]
    if calls % cfg.loss_calls_per_update:
        raise UsageError(
            f"--{name}.gradient-accumulation-steps {cfg.gradient_accumulation_steps} makes an optimizer step every "
            f"{cfg.loss_calls_per_update} loss calls, which does not divide the {calls} calls of an epoch "
            f"({groups} groups / --{name}.train-batch-size {cfg.train_batch_size}), so an epoch "
            "would end mid-update"
        )
    processes = f"the {num_processes} processes (accelerate launch --num_processes {num_processes})"
    if groups % num_processes:
        raise UsageError(
            f"--trajectories-per-epoch {trajectories} makes {groups} groups of {name} ({group_size} each), which "
            f"{processes} cannot share equally: pass a multiple of {group_size * num_processes}"
        )
    if isinstance(algorithm, RewardBackpropAlgorithm) and cfg.train_batch_size % num_processes:
        raise UsageError(
            f"--{name}.train-batch-size {cfg.train_batch_size}: {processes} each sample an equal part of every "
            f"minibatch as they train on it; pass a multiple of {num_processes}"
        )
    if split_minibatches and cfg.train_batch_size % num_processes:
        raise UsageError(
            f"--{name}.train-batch-size {cfg.train_batch_size}: under --fsdp {processes} each train an equal part "
            f"of every minibatch; pass a multiple of {num_processes}"
        )


def _check_groups_per_prompt(name: str, cfg: Any, trajectories: int, groups_per_prompt: int) -> None:
    """Every prompt drawn in an epoch gets the same number of groups: refuses an N that
    does not divide the algorithm's groups per epoch."""
    group_size = cfg.build().needs.group_size
    groups = trajectories // group_size
    if groups % groups_per_prompt:
        raise UsageError(
            f"--groups-per-prompt {groups_per_prompt} does not divide {name}'s {groups} groups per "
            f"epoch (--trajectories-per-epoch {trajectories} / group size {group_size})"
        )


