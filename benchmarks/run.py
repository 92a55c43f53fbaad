"""Train every algorithm from the same base under the same budget and tabulate held-out
reward against the number of sampling steps.

    python -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore
    accelerate launch --num_processes 8 -m benchmarks.run --algos sdpo,ddpo,rebel --reward pickscore

Every input is checked before any model loads (names, weights, sizes, the output
folder); a bad one ends the run with one line naming the flag and exit code 2. A run
that cannot go on (a diverged loss, a failing reward, a full disk) ends with one line
and exit code 1, its last good checkpoint intact for `--resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from benchmarks.ema import Ema
from benchmarks.evaluate import EvalSettings
from benchmarks.portable import portable_model, recorded_model
from benchmarks.presets import DEFAULT_PRESET, PRESETS, SD_TURBO_REWARD_SETTINGS, Preset
from benchmarks.loop import TrainLoop
from benchmarks.train import BASE
from zoo.loading import model_family
from zoo.policy import Performance
from rewards.catalog import GOLD_OF, REWARDS
from rewards.spec import REWARD_FORMS
from zoo.registry import ALGORITHMS
from zoo import strict_json


def _unchecked(config_cls: type) -> type:
    """`config_cls` without its `__post_init__` checks, to parse into: tyro reports a value
    that a config refuses in a multi-line box naming the dataclass, so parsing skips the
    checks and `_checked` re-creates the real config, naming the flag in one line."""
    return type(
        config_cls.__name__,
        (config_cls,),
        {"__post_init__": lambda self: None, "__doc__": config_cls.__doc__, "__module__": config_cls.__module__},
    )


UNCHECKED_CONFIGS = {name: _unchecked(config_cls) for name, config_cls in ALGORITHMS.items()}

AlgoConfigs = make_dataclass(
    "AlgoConfigs",
    [(name, config_cls, field(default_factory=config_cls)) for name, config_cls in UNCHECKED_CONFIGS.items()],
    frozen=True,
)
AlgoConfigs.__doc__ = "Per-algorithm hyperparameters (defaults: the published ones, then the preset's)."
# tyro parses into the unchecked classes; `parse_args` returns the real, checked configs.

# The sampler fields that a preset sets for every algorithm alike, so that all of them
# train on the same trajectories distribution and budget.
SHARED_SAMPLER_FIELDS = ("sampler", "num_steps", "guidance_scale", "eta", "flow_sde")


@dataclass
class RunArgs:
    """stepzoo benchmark: RL fine-tuning algorithms compared at 1, 2, 4, 8 sampling steps."""

    algos: str | None = None
    """Comma-separated algorithms to train (listed above), or "all" for every registered one
    (default: the preset's `algos`, or all)."""
    reward: str | None = None
    """Training reward: a registry name (listed above), a plugin module.path:ClassName, a reward server
    http://HOST:PORT/NAME, or a weighted sum of them like aesthetic:1,pickscore:0.5 (default: the preset's)."""
    preset: str = DEFAULT_PRESET
    """Model, prompts, sampler and budget: tiny-turbo (the default: the tiny world's few-step
    UNet), tiny-flow-turbo, tiny, tiny-flow (embedded, CPU), sd-turbo (SDPO), lcm (RLCM), sd15
    (DDPO), sd3.5-medium (Flow-GRPO), flux-schnell."""
    model: str | None = None
    """Base model: a hub id (downloaded on first use into the Hugging Face cache) or a local
    diffusers folder (default: the preset's)."""
    offline: bool = False
    """Download nothing, as HF_HUB_OFFLINE=1 does: a model or reward weights missing from the
    Hugging Face cache stop the run before anything loads, naming the command that fetches them."""
    epochs: int | None = None
    """Training epochs per algorithm and seed (default: the preset's)."""
    train_steps: int | None = None
    """Sampling steps K during training, for every algorithm (default: the preset's)."""
    eval_split: Literal["test", "validation", "both"] | None = None
    """Held-out prompts to evaluate on: the preset's test prompts (the reported tables), its
    validation prompts (what `benchmarks.tune` selects hyperparameters on), or both at every
    evaluation, the tables reporting the test prompts at epochs chosen on the validation
    prompts (the curve's peak; default: the preset's)."""
    eval_steps: str = "1,2,4,8"
    """Comma-separated sampling step counts at which held-out reward is measured."""
    eval_every: int | None = None
    """Evaluate every this many epochs (and always after the last; default: the preset's)."""
    seeds: str = "0"
    """Comma-separated seeds; several give a mean and a spread per table cell."""
    eval_rewards: str | None = None
    """Comma-separated extra rewards (names, plugins or servers, as in --reward) scored at
    evaluation only, to catch reward hacking (default: the preset's; "" for none). The gold of a proxy training reward (e.g.
    tiny-aesthetic-gold for tiny-aesthetic) is scored as well, whatever this says."""
    trajectories_per_epoch: int | None = None
    """Trajectories sampled per epoch on each process (default: the preset's)."""
    groups_per_prompt: int | None = None
    """Groups sampled from each prompt drawn in an epoch, side by side: N draws groups / N
    prompts and N groups of each, so per-prompt stat trackers see N x group size rewards
    of a prompt per epoch. Must divide every algorithm's groups per process per epoch
    (default: the preset's; 1 draws each group's prompt on its own)."""
    eval_samples_per_prompt: int | None = None
    """Evaluation samples per held-out prompt and step count (default: the preset's)."""
    curve_samples_per_prompt: int | None = None
    """Samples per held-out prompt and step count of the evaluations before the last epoch,
    the curve's intermediate points (default: the preset's; the last epoch and the base
    model always get --eval-samples-per-prompt)."""
    out: str | None = None
    """Output folder (default: results/<preset>-<reward>-<time>)."""
    resume: bool = False
    """Continue the run in --out from its last complete epoch."""
    overwrite: bool = False
    """Replace the run already in --out."""
    extend: bool = False
    """Add algorithms (those of --algos it does not hold) or seeds (those of --seeds it does
    not hold; --seeds must list its own too, and --algos every algorithm it holds, at its
    recorded settings) to the finished run in --out: they train and evaluate under its
    recorded settings, its recorded rows are reused, and the report is rewritten with every row."""
    max_bad_reward_batches: int = 3
    """Epochs whose training reward raised or returned NaN/inf that are skipped (no update) before the run stops."""
    wandb: bool = False
    """Log metrics, evaluations, the sample grid and the tables to Weights & Biases
    (offline unless WANDB_MODE says otherwise; see benchmarks/tracking.py)."""
    wandb_project: str = "stepzoo"
    """The Weights & Biases project of --wandb."""
    reward_path: tuple[str, ...] = ()
    """Weights locations as NAME=PATH (e.g. pickscore=/models/PickScore_v1); see each reward's error for keys."""
    jobs: int = 1
    """Worker processes that run this invocation's independent jobs side by side (each seed's
    base evaluation, each (algorithm, seed) training run), one torch thread each, and one GPU
    each where there are GPUs (round-robin over the visible ones: use it where the preset fits
    on one GPU). The records equal a serial run's; one line per job started and finished
    replaces the progress bars. 1: every job in this process, one after another."""
    performance: Performance = field(default_factory=Performance)
    """Speed and memory switches (TF32, gradient checkpointing, torch.compile); not part of
    the run's identity, so a resumed run may change them."""
    loop: TrainLoop = field(default_factory=TrainLoop)
    """Sampling-call size, rewards overlapped with sampling, steps per backward pass of
    whole-trajectory losses; not part of the run's identity either."""
    ema: Ema = field(default_factory=Ema)
    """An exponential moving average of the trained LoRA weights, as Flow-GRPO keeps one
    (off unless --ema.decay is given), evaluated and saved in place of the trained weights
    unless --ema.no-evaluate; part of the run's identity (config.json), unlike the two above."""
    algo: Annotated[AlgoConfigs, tyro.conf.arg(name="")] = field(default_factory=AlgoConfigs)


HELP_DESCRIPTION = (
    f"{RunArgs.__doc__}\n\n"
    f"Algorithms (--algos): {', '.join(ALGORITHMS)}.\n\n"
    f"Rewards (--reward, --eval-rewards): {', '.join(REWARDS)}; or {REWARD_FORMS}."
)
"""The head of --help: the registries' names, so that choosing needs no source reading."""


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
            **{field: getattr(preset, field) for field in SHARED_SAMPLER_FIELDS},
            **preset.algo_overrides.get(name, {}),
            **preset.reward_overrides.get(reward, {}).get(name, {}),
        }
        if preset.name == "sd-turbo" and reward in SD_TURBO_REWARD_SETTINGS:
            lr, batch, accumulation, _ = SD_TURBO_REWARD_SETTINGS[reward]
            overrides.update(learning_rate=lr, train_batch_size=batch, gradient_accumulation_steps=accumulation)
        known = {f.name for f in dataclasses.fields(config_cls)}
        preset_config = dataclasses.replace(config_cls(), **{k: v for k, v in overrides.items() if k in known})
        configs[name] = UNCHECKED_CONFIGS[name](**_init_values(preset_config))
    return AlgoConfigs(**configs)


def _init_values(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _checked(name: str, config: Any) -> Any:
    """The real config of algorithm `name` with the values parsed into `config`; a value it
    refuses becomes a UsageError naming the flag (the field the message starts with)."""
    config_cls = ALGORITHMS[name]
    try:
        return config_cls(**_init_values(config))
    except ValueError as error:
        fields = {f.name for f in dataclasses.fields(config_cls)}
        named = [word for word in re.findall(r"\w+", str(error)) if word in fields]
        flag = f"--{name}.{named[0].replace('_', '-')}" if named else f"--{name}.*"
        raise UsageError(f"{flag}: {error}") from None


def _one_line(tyro_error: str) -> str:
    """tyro's error box as one line: the text of the box's first section."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", tyro_error)
    rows = [line.strip().strip("│").strip() for line in text.splitlines() if line.strip().startswith("│")]
    first = []
    for row in rows:
        if row and not row.strip("─"):
            break
        first.append(row)
    line = " ".join(" ".join(first or text.split()).split())
    return line.removeprefix("Error parsing ")


def parse_args(argv: list[str]) -> RunArgs:
    preset_name = _peek(argv, "--preset") or DEFAULT_PRESET
    if preset_name not in PRESETS:
        raise UsageError(f"--preset: unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]()
    reward = _peek(argv, "--reward") or preset.reward
    defaults = RunArgs(preset=preset_name, algo=preset_algo_configs(preset, reward))
    # tyro prints a multi-line box and exits; the box is kept to be reported in one line.
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            args = tyro.cli(RunArgs, args=argv, default=defaults, description=HELP_DESCRIPTION)
    except SystemExit as stop:
        if stop.code:
            raise UsageError(_one_line(box.getvalue())) from None
        raise
    except ValueError as error:
        raise UsageError(str(error)) from None
    sys.stderr.write(box.getvalue())
    configs = {name: _checked(name, getattr(args.algo, name)) for name in ALGORITHMS}
    return dataclasses.replace(args, algo=AlgoConfigs(**configs))


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
    notes: list[str] = field(default_factory=list)
    """What the user should know before the run starts (an algorithm left out), one line each."""

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
            "ema": dataclasses.asdict(self.args.ema) if self.args.ema.on else None,
            "algorithm_configs": {
                **self.recorded_configs, **{name: dataclasses.asdict(cfg) for name, cfg in self.configs.items()}
            },
        }

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
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one of them")
    if args.extend and (args.resume or args.overwrite):
        raise UsageError(
            f"--extend and {'--resume' if args.resume else '--overwrite'} contradict each other: --extend adds "
            "algorithms or seeds to a finished run, --resume continues an interrupted one, --overwrite replaces one; "
            "pass one of them"
        )
    if args.wandb:
        require_wandb()
    if args.offline:
        # The environment variable, so that every library and process of the run sees it.
        os.environ["HF_HUB_OFFLINE"] = "1"

    preset = PRESETS[args.preset]()
    if args.algos is None:
        algos = list(preset.algos or ALGORITHMS)
    else:
        algos = list(ALGORITHMS) if args.algos == "all" else _split(args.algos, "--algos")
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
    seeds = _split(args.seeds, "--seeds", int)
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    eval_steps = _split(args.eval_steps, "--eval-steps", int)
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
        eval_rewards = _split(args.eval_rewards, "--eval-rewards")
    for name in eval_rewards:
        parse_reward_spec(name, "--eval-rewards")
    # A proxy's gold is what tells a real gain from hacking the proxy, so it is scored
    # whatever --eval-rewards says, ahead of the others.
    golds = [g for g in gold_rewards(reward) if g != reward]
    eval_rewards = golds + [name for name in eval_rewards if name not in golds]
    reward_paths = parse_reward_paths(args.reward_path)
    epochs = args.epochs if args.epochs is not None else preset.epochs
    if preset.name == "sd-turbo" and args.epochs is None and reward in SD_TURBO_REWARD_SETTINGS:
        epochs = SD_TURBO_REWARD_SETTINGS[reward][3]
    eval_every = args.eval_every if args.eval_every is not None else preset.eval_every
    # `is not None`, not `or`: a 0 is refused below, never read as "the preset's".
    trajectories = (args.trajectories_per_epoch if args.trajectories_per_epoch is not None
                    else preset.trajectories_per_epoch)
    groups_per_prompt = args.groups_per_prompt if args.groups_per_prompt is not None else preset.groups_per_prompt
    saved_config = Path(args.out) / "config.json" if args.out else None
    if (args.resume or args.extend) and args.groups_per_prompt is None and saved_config and saved_config.is_file():
        # A resumed or extended run keeps the draw it started with, whatever the preset says now.
        try:
            saved = json.loads(saved_config.read_text())
            groups_per_prompt = saved.get("groups_per_prompt", RESUME_DEFAULTS["groups_per_prompt"])
        except ValueError:
            pass  # _check_out_dir reports the broken file
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
    for name, cfg in configs.items():
        _check_batch_sizes(name, cfg, trajectories, num_processes)
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
                f"{_algo_flag(args, name, 'num_steps')} {cfg.num_steps} exceeds the {schedule} timesteps of "
                f"{model}'s training schedule"
            )
    out_dir = Path(args.out) if args.out else Path("results") / f"{preset.name}-{folder_label(reward)}-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = Plan(args, preset, algos, seeds, eval_steps, reward, eval_rewards, reward_paths, model,
                model_source, epochs, eval_every, trajectories, groups_per_prompt, eval_samples, curve_samples,
                eval_split, out_dir, configs, loop, notes=notes)
    _check_out_dir(plan)
    if args.extend:
        plan = _extended(plan, untrained)
        # The extended run's recorded algorithms were checked against config.json there.
        untrained = {name: keys for name, keys in untrained.items() if name not in plan.algos}
    if untrained:
        plan.notes.append(_untrained_note(untrained, algos))
    return plan


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
            given, default = _init_values(getattr(args.algo, name)), _init_values(getattr(defaults, name))
            fields[name] = [key for key in given if given[key] != default[key]]
    return {name: keys for name, keys in fields.items() if keys}


def _untrained_note(untrained: dict[str, list[str]], algos: list[str]) -> str:
    """The note on flags of algorithms a run does not train: they are ignored, said in a
    line rather than refused, since a script may pass one set of flags to runs of
    different --algos."""
    flags = [f"--{name}.{key.replace('_', '-')}" for name, keys in untrained.items() for key in keys]
    return f"{', '.join(flags)}: for algorithms that --algos {','.join(algos)} leaves out; ignored"


def _algo_flag(args: RunArgs, name: str, key: str) -> str:
    """The flag that set algorithm `name`'s config field `key` (--train-steps sets every num_steps)."""
    if key == "num_steps" and args.train_steps is not None:
        return "--train-steps"
    return f"--{name}.{key.replace('_', '-')}"


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
                f"{_algo_flag(args, name, 'sampler')} {cfg.sampler}: --model {model} is {kind}; pass "
                f"{_algo_flag(args, name, 'sampler')} {'flow' if flow_model else 'ddim'}"
            )


def _schedule_length(model: str, source: str) -> int:
    """The number of training timesteps in the model's scheduler config, read without
    loading the model; `source` is `resolve_model`'s answer (a folder)."""
    config = Path(source) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise UsageError(f"--model {model}: scheduler/scheduler_config.json is missing; a diffusers pipeline has one")
    return int(json.loads(config.read_text()).get("num_train_timesteps", 1000))


def epoch_budget(cfg: Any, trajectories: int) -> dict[str, int]:
    """The loss calls (backward passes without chunking) and optimizer updates that one
    epoch of `trajectories` trajectories per process makes under `cfg`, as the training
    loop makes them. Assumes `_check_batch_sizes` holds."""
    needs = cfg.build().needs
    minibatches = trajectories // needs.group_size // cfg.train_batch_size * cfg.num_inner_epochs
    calls = minibatches * (1 if needs.whole_trajectory_loss else cfg.trained_steps_per_trajectory)
    return {"loss_calls": calls, "optimizer_updates": calls // cfg.loss_calls_per_update}


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
    calls = epoch_budget(cfg, trajectories)["loss_calls"]
    if calls % cfg.loss_calls_per_update:
        raise UsageError(
            f"--{name}.gradient-accumulation-steps {cfg.gradient_accumulation_steps} makes an optimizer step every "
            f"{cfg.loss_calls_per_update} loss calls, which does not divide the {calls} calls of an epoch "
            f"({groups} groups per process / --{name}.train-batch-size {cfg.train_batch_size}), so an epoch "
            "would end mid-update"
        )


def _check_groups_per_prompt(name: str, cfg: Any, trajectories: int, groups_per_prompt: int) -> None:
    """Every prompt drawn in an epoch gets the same number of groups: refuses an N that
    does not divide the algorithm's groups per process per epoch."""
    group_size = cfg.build().needs.group_size
    groups = trajectories // group_size
    if groups % groups_per_prompt:
        raise UsageError(
            f"--groups-per-prompt {groups_per_prompt} does not divide {name}'s {groups} groups per process per "
            f"epoch (--trajectories-per-epoch {trajectories} / group size {group_size})"
        )


RESUME_MAY_CHANGE = ("max_bad_reward_batches",)
"""Settings that a resumed run may change: they decide when a run stops, not what it computes."""
RESUME_DEFAULTS = {"groups_per_prompt": 1, "ema": None}
"""Settings recorded in config.json since a later version, with the value that runs
recorded before them had, so that those runs can still be resumed."""
RESUME_DEFAULTS_FROM = {"curve_samples_per_prompt": "eval_samples_per_prompt"}
"""The same for settings whose earlier value was another setting's: before the curve's points
could use fewer samples, every evaluation used the final one's."""
ALGORITHM_CONFIG_DEFAULTS = {"flow_sde": "flow-grpo"}
"""The same for the fields of each recorded algorithm config (config.json "algorithm_configs")."""


EXTENSION_ADDS = ("algos", "algorithm_configs", "seeds")
"""Settings that an extension adds to (its new algorithms and seeds); it must match the rest."""


def _read_config(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UsageError(f"{flag}: {path} is not valid JSON") from None


def _recorded_setting(config: dict, key: str) -> Any:
    """A setting of a config.json as this checkout reads it: the model as the folder or hub
    id it names here (a relative folder is the same in every clone), each algorithm config
    with the fields it was recorded without."""
    value = config.get(key, config.get(RESUME_DEFAULTS_FROM.get(key), RESUME_DEFAULTS.get(key)))
    if key == "algorithm_configs":
        return {name: {**ALGORITHM_CONFIG_DEFAULTS, **fields} for name, fields in value.items()}
    return recorded_model(value) if key == "model" and isinstance(value, str) else value


def _changed_settings(saved: dict, plan: Plan, may_change: tuple[str, ...]) -> list[str]:
    """The keys of config.json whose recorded value differs from `plan`'s."""
    current = json.loads(strict_json.dumps(plan.config_json()))
    return sorted(k for k in saved.keys() | current.keys()
                  if k not in may_change and _recorded_setting(saved, k) != _recorded_setting(current, k))


def _check_writable(out: Path) -> None:
    """Refuses an --out that cannot be made or written (a read-only file system, /proc, a
    path under a file), probed by making and removing a folder in its nearest existing
    ancestor, so that a run never trains only to fail at its first write."""
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no folder can be made under it; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".stepzoo-probe-", dir=existing))
    except OSError as error:
        raise UsageError(
            f"--out {out}: no folder can be made in {existing} ({error.strerror or error}); choose a writable --out"
        ) from None


def _check_out_dir(plan: Plan) -> None:
    out = plan.out_dir
    config_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    _check_writable(out)
    if not config_path.exists():
        if plan.args.resume:
            raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
        if plan.args.extend:
            raise UsageError(
                f"--extend: {out} holds no run to extend (no config.json); leave --extend out to start one there"
            )
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(
                f"--out {out} is a folder with other files and no stepzoo run; choose a new or empty folder"
            )
        return
    if plan.args.resume:
        changed = _changed_settings(_read_config(config_path, "--resume"), plan, RESUME_MAY_CHANGE)
        if changed:
            raise UsageError(f"--resume: the run in {out} was started with other settings ({', '.join(changed)})")
        return
    if not plan.args.overwrite and not plan.args.extend:
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it, --extend to add algorithms or seeds to it "
            "or --overwrite to replace it"
        )


def _setting_flag(key: str) -> str:
    """The flag that sets a config.json key, or what decides it (the prompts: the preset)."""
    if key in {f.name for f in dataclasses.fields(RunArgs)}:
        return "--" + key.replace("_", "-")
    return f"--preset's {key.replace('_', ' ')}"


def _difference(key: str, saved: Any, current: Any, width: int = 60) -> str:
    """One setting that differs, with both values when they are short (not prompt lists)."""
    there, here = (",".join(map(str, v)) if isinstance(v, list) else str(v) for v in (saved, current))
    if max(len(there), len(here)) > width:
        return f"{_setting_flag(key)}: not the same"
    return f"{_setting_flag(key)} {there} there, {here} here"


def recorded_rows(out: Path) -> dict[tuple[str, int], list[dict]]:
    """The rows of `out`/records.jsonl by (algo, seed), as written. `execute` writes an
    (algo, seed)'s rows only once it has finished, so each entry is final."""
    path = out / "records.jsonl"
    rows: dict[tuple[str, int], list[dict]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault((row["algo"], row["seed"]), []).append(row)
    return rows


def _extended(plan: Plan, untrained: dict[str, list[str]]) -> Plan:
    """`plan` with the finished run in its --out ahead of its own algorithms and seeds:
    new algorithms train on every seed, every algorithm trains on the new seeds; refuses
    what would make the new rows incomparable with the recorded ones, and a flag of a
    recorded algorithm it does not train (`untrained`: algorithm -> fields its flags set)
    that differs from the recorded value, which could only be ignored."""
    out, config_path = plan.out_dir, plan.out_dir / "config.json"
    saved = _read_config(config_path, "--extend")
    recorded_algos, recorded_seeds = saved["algos"], saved["seeds"]
    algorithm_configs = _recorded_setting(saved, "algorithm_configs")
    present = [name for name in plan.algos if name in recorded_algos]
    new_seeds = [seed for seed in plan.seeds if seed not in recorded_seeds]
    dropped_seeds = [seed for seed in recorded_seeds if seed not in plan.seeds]
    if dropped_seeds:
        raise UsageError(
            f"--extend --seeds: {out} holds seeds {','.join(map(str, recorded_seeds))} ({config_path}); list them "
            f"all in --seeds (with the seeds to add), e.g. --seeds {','.join(map(str, [*recorded_seeds, *new_seeds]))}"
        )
    if present and not new_seeds:
        raise UsageError(
            f"--extend --algos: {out} already holds {', '.join(present)} ({config_path} lists "
            f"{', '.join(recorded_algos)}); leave {'it' if len(present) == 1 else 'them'} out of --algos, "
            "add seeds with --seeds, or pass --resume instead to finish an interrupted run, or --overwrite to redo "
            "the whole folder"
        )
    missing = [name for name in recorded_algos if name not in plan.algos]
    if new_seeds and missing:
        raise UsageError(
            f"--extend --seeds {','.join(map(str, new_seeds))}: every algorithm of {out} trains on the new seeds; "
            f"list {', '.join(missing)} in --algos too (at the settings {config_path} records)"
        )
    for name in recorded_algos:
        for key in untrained.get(name, []):
            value = json.loads(strict_json.dumps(getattr(getattr(plan.args.algo, name), key)))
            if value != algorithm_configs[name].get(key):
                flag = f"--{name}.{key.replace('_', '-')}"
                raise UsageError(
                    f"{flag} {value}: --extend trains {', '.join(plan.algos)}, not {name}, whose rows in {out} are "
                    f"reused as recorded, with {key} {algorithm_configs[name].get(key)} ({config_path}); leave the "
                    f"flag out (or add {name} to --algos with new --seeds)"
                )
    changed = _changed_settings(saved, plan, (*RESUME_MAY_CHANGE, *EXTENSION_ADDS))
    if changed:
        current = plan.config_json()
        differences = "; ".join(
            _difference(key, saved.get(key, RESUME_DEFAULTS.get(key)), current.get(key)) for key in changed
        )
        raise UsageError(
            f"--extend: the run in {out} was made with other settings ({differences}); its base and algorithm "
            f"rows are reused, so every setting but --algos, --seeds and the per-algorithm flags must be as "
            f"{config_path} records it: pass its values, or choose another --out for a new run"
        )
    for name in present:
        recorded_config = algorithm_configs[name]
        current_config = json.loads(strict_json.dumps(dataclasses.asdict(plan.configs[name])))
        for key in sorted(recorded_config.keys() | current_config.keys()):
            if recorded_config.get(key) != current_config.get(key):
                flag = _algo_flag(plan.args, name, key)
                raise UsageError(
                    f"{flag} {current_config.get(key)}: {name} in {out} trained with {key} "
                    f"{recorded_config.get(key)} ({config_path}), and its new seeds must train as its recorded ones "
                    f"did; pass {flag} {recorded_config.get(key)}"
                )
    for name, cfg in plan.configs.items():
        for recorded, recorded_config in algorithm_configs.items():
            for key in SHARED_SAMPLER_FIELDS:
                if key in recorded_config and getattr(cfg, key) != recorded_config[key]:
                    flag = _algo_flag(plan.args, name, key)
                    raise UsageError(
                        f"{flag} {getattr(cfg, key)}: {recorded} in {out} trained with {key} {recorded_config[key]} "
                        f"({config_path}), and every algorithm of a run trains with the same sampler; pass "
                        f"{flag} {recorded_config[key]}"
                    )
    finished = recorded_rows(out)
    unfinished = [f"{name} seed {seed}" for seed in recorded_seeds for name in [BASE, *recorded_algos]
                  if (name, seed) not in finished]
    if unfinished:
        raise UsageError(
            f"--extend: {out / 'records.jsonl'} has no rows of {', '.join(unfinished)}, so the run is unfinished; "
            "finish it with its own flags and --resume, then extend it"
        )
    added = [name for name in plan.algos if name not in recorded_algos]
    return dataclasses.replace(
        plan,
        algos=[*recorded_algos, *added],
        seeds=[*recorded_seeds, *new_seeds],
        configs={name: plan.configs[name] for name in [*present, *added]},
        recorded_configs={name: c for name, c in algorithm_configs.items() if name not in present},
    )


def execute(plan: Plan) -> str:
    """Run the plan: base evaluation and training per seed and algorithm (in --jobs worker
    processes when it says more than 1), then the report."""
    if plan.args.jobs > 1:
        return execute_in_workers([plan])[0]
    import torch
    from accelerate import Accelerator

    from benchmarks.checkpoint import write_jsonl
    from benchmarks.jobs import JobEvents, SerialExecutor
    from benchmarks.report import write_report
    from rewards.registry import load_reward

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=plan.preset.mixed_precision if on_gpu else "no")
    # The rewards first: one that cannot be built (RewardUnavailable) stops the run before
    # anything is written or any diffusion model loads.
    train_reward = load_reward(plan.reward, device=accelerator.device, paths=plan.reward_paths)
    eval_rewards = {plan.reward: train_reward}
    for name in plan.eval_rewards:
        eval_rewards[name] = load_reward(name, device=accelerator.device, paths=plan.reward_paths,
                                         flag="--eval-rewards")
    if accelerator.is_main_process:
        _start_folder(plan)
    accelerator.wait_for_everyone()

    tracker = None
    if plan.args.wandb and accelerator.is_main_process:
        from benchmarks.tracking import Tracker

        tracker = Tracker(plan.out_dir, plan.args.wandb_project)
    logger = _make_logger(plan, accelerator.is_main_process, tracker)
    # Rows already finished are reused as recorded: an extension's base and algorithm
    # rows, and a resumed run's whose checkpoints were not kept (committed results).
    rows = recorded_rows(plan.out_dir)
    events = JobEvents(metrics=lambda job, row: logger(row),
                       evaluations=lambda job, records: tracker.log_evaluations(records) if tracker else None)
    jobs = plan_jobs(plan, rows, plan.preset.mixed_precision if on_gpu else "no")
    for job, job_rows in SerialExecutor(accelerator, eval_rewards).run(jobs, events):
        rows[job.algo, job.seed] = job_rows
        if job.algo != BASE and accelerator.is_main_process:
            write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows))
    table = ""
    if accelerator.is_main_process:
        write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows))
        table = write_report(plan.out_dir, reward=plan.reward, algos=plan.algos)
        if tracker:
            tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return table


def execute_in_workers(plans: list[Plan]) -> list[str]:
    """Run the plans' jobs together in `--jobs` worker processes (`benchmarks.jobs.ProcessExecutor`),
    this process the only writer of each run folder's shared files; returns each plan's table.
    Every plan's records equal a serial run's, since each job computes what it would there."""
    import torch

    from benchmarks.checkpoint import write_jsonl
    from benchmarks.jobs import JobEvents, JobProgress, ProcessExecutor, load_rewards
    from benchmarks.report import write_report

    mixed_precision = plans[0].preset.mixed_precision if torch.cuda.is_available() else "no"
    folders = {plan.out_dir: plan for plan in plans}
    rows = {plan.out_dir: recorded_rows(plan.out_dir) for plan in plans}
    jobs = [job for plan in plans for job in plan_jobs(plan, rows[plan.out_dir], mixed_precision)]
    # The rewards are built here once, only to refuse one that cannot be (RewardUnavailable)
    # before anything is written; the workers build their own.
    checked = set()
    for job in jobs:
        if job.rewards not in checked:
            load_rewards(job, "cpu")
            checked.add(job.rewards)
    trackers, loggers = {}, {}
    for plan in plans:
        _start_folder(plan)
        if plan.args.wandb:
            from benchmarks.tracking import Tracker

            trackers[plan.out_dir] = Tracker(plan.out_dir, plan.args.wandb_project)
        loggers[plan.out_dir] = _make_logger(plan, True, trackers.get(plan.out_dir), in_plan_order=True)

    several = len(plans) > 1
    progress = JobProgress(len(jobs), lambda job: f"{job.settings.out_dir.name}: {job.name}" if several else job.name)

    def evaluations(job, records) -> None:
        if job.settings.out_dir in trackers:
            trackers[job.settings.out_dir].log_evaluations(records)

    events = JobEvents(started=progress.started, metrics=lambda job, row: loggers[job.settings.out_dir](row),
                       evaluations=evaluations)
    executor = ProcessExecutor(plans[0].args.jobs)
    if jobs:
        print(f"{len(jobs)} jobs in {min(executor.workers, len(jobs))} worker processes, "
              f"{executor.threads_per_worker} torch thread each", file=sys.stderr, flush=True)
    for job, job_rows in executor.run(jobs, events):
        progress.finished(job)
        out = job.settings.out_dir
        rows[out][job.algo, job.seed] = job_rows
        write_jsonl(out / "records.jsonl", _in_plan_order(folders[out], rows[out]))
    tables = []
    for plan in plans:
        write_jsonl(plan.out_dir / "records.jsonl", _in_plan_order(plan, rows[plan.out_dir]))
        tables.append(write_report(plan.out_dir, reward=plan.reward, algos=plan.algos))
        if plan.out_dir in trackers:
            trackers[plan.out_dir].finish()
    return tables


def _start_folder(plan: Plan) -> None:
    """The run folder with the plan's config.json (main process only)."""
    import shutil

    from benchmarks.checkpoint import write_text

    out = plan.out_dir
    # Only a folder that holds a run is ever deleted (`_check_out_dir` refused others).
    if plan.args.overwrite and (out / "config.json").exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", strict_json.dumps(plan.config_json(), indent=2) + "\n")


def plan_jobs(plan: Plan, rows: dict[tuple[str, int], list[dict]], mixed_precision: str) -> list:
    """The plan's jobs whose rows `rows` lacks, in the order a serial run takes them: per
    seed, the base evaluation, then each algorithm."""
    from benchmarks.jobs import Job
    from benchmarks.train import JobSettings

    jobs = []
    for seed in plan.seeds:
        settings = JobSettings(
            model=plan.model_source,
            epochs=plan.epochs,
            trajectories_per_epoch=plan.trajectories_per_epoch,
            groups_per_prompt=plan.groups_per_prompt,
            resolution=plan.preset.resolution,
            train_prompts=plan.preset.train_prompts,
            eval_every=plan.eval_every,
            eval=plan.eval_settings(seed),
            selection_eval=plan.eval_settings(seed, "validation") if plan.eval_split == "both" else None,
            curve_samples_per_prompt=plan.curve_samples_per_prompt,
            mixed_precision=mixed_precision,
            train_reward=plan.reward,
            out_dir=plan.out_dir,
            max_bad_reward_batches=plan.args.max_bad_reward_batches,
            performance=plan.args.performance,
            loop=plan.loop,
            ema=plan.args.ema,
        )
        for name in [BASE, *plan.algos]:
            if (name, seed) not in rows:
                jobs.append(Job(name, seed, settings, None if name == BASE else plan.configs[name],
                                tuple(plan.eval_rewards), tuple(sorted(plan.reward_paths.items()))))
    return jobs


def _in_plan_order(plan: Plan, rows: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Every finished row, per seed: base, then the algorithms in the plan's order."""
    return [row for seed in plan.seeds for name in [BASE, *plan.algos] for row in rows.get((name, seed), [])]


def _make_logger(plan: Plan, main_process: bool, tracker, in_plan_order: bool = False):
    """Per-epoch training metrics to metrics.jsonl (and wandb when asked), main process only.
    `in_plan_order`: the rows sorted as a serial run logs them (per seed, base then the
    algorithms, epochs in order), for jobs that log side by side."""
    if not main_process:
        return lambda row: None
    from benchmarks.checkpoint import write_jsonl

    path = plan.out_dir / "metrics.jsonl"
    # A resumed run logs again the epochs after its last checkpoint: rows are keyed by
    # epoch, so the new row replaces the interrupted run's and each epoch appears once.
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["algo"], row["seed"], row["epoch"]] = row

    order = {(name, seed): i for i, (seed, name) in enumerate((s, n) for s in plan.seeds for n in [BASE, *plan.algos])}

    def log(row: dict) -> None:
        rows[row["algo"], row["seed"], row["epoch"]] = row
        kept = sorted(rows, key=lambda key: (order.get(key[:2], len(order)), key[2])) if in_plan_order else rows
        write_jsonl(path, [rows[key] for key in kept])
        if tracker:
            tracker.log_metrics(row)

    return log


def _main_process_first(num_processes: int) -> contextlib.AbstractContextManager:
    """Under `accelerate launch`, the main process plans (and downloads) first and the
    others then find everything in the cache; a single process just plans."""
    if num_processes == 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    # The state `execute`'s Accelerator then shares: the same device choice as there.
    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.checkpoint import CorruptCheckpoint, WriteFailed
    from benchmarks.loop import RunStopped
    from rewards.errors import RewardUnavailable
    from zoo.hub import DownloadFailed
    from zoo.loading import ModelUnavailable

    argv = sys.argv[1:] if argv is None else argv
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(argv)
        with _main_process_first(num_processes):
            plan = make_plan(args, num_processes=num_processes)
    except (UsageError, RewardUnavailable, ModelUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DownloadFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        table = execute(plan)
    except RewardUnavailable as error:  # a reward that cannot be built: a bad input, found as it loads
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RunStopped, WriteFailed, CorruptCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if table:
        print(table)
        print(f"\nresults in {plan.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
