"""The command line of `python -m benchmarks.run`: its flags (`RunArgs`) and their parsing.

Parsing takes the chosen preset's values as the flags' defaults (`preset_algo_configs`), or
with `--config` the settings a run's config.json records, reports every refusal as one
`UsageError` line naming the flag, and heads `--help` with the registries' names. It reads
argv and that one file and loads nothing; the plan (`benchmarks.plan`) checks what the
flags ask for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from benchmarks.ema import Ema
from benchmarks.portable import portable_model, recorded_model
from benchmarks.presets import DEFAULT_PRESET, PRESETS, Preset
from benchmarks.loop import TrainLoop
from zoo.policy import Performance
from rewards.catalog import REWARDS
from rewards.spec import REWARD_FORMS
from zoo.registry import ALGORITHMS


def _unchecked(config_cls: type) -> type:
    """`config_cls` without its `__post_init__` checks, to parse into: tyro reports a value
    that a config refuses in a multi-line box naming the dataclass, so parsing skips the
    checks and `checked_config` re-creates the real config, naming the flag in one line."""
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


PRESET_HELP = f"Model, prompts, sampler and budget: {', '.join(PRESETS)} (each described in benchmarks/presets.py)."
"""--preset's help, listing the registry so that a new preset is never left out."""


@dataclass(frozen=True)
class Cluster:
    """The engine that runs an invocation's jobs, at most --jobs at once (benchmarks/cluster.py)."""

    engine: Literal["processes", "ray", "slurm", "submitit-local"] = "processes"
    """processes: --jobs worker processes on this machine (or, at --jobs 1, this process); ray:
    Ray tasks; slurm: Slurm jobs through submitit; submitit-local: submitit's subprocesses on
    this machine (Slurm's path without a cluster). A remote engine needs --out on a
    filesystem its workers see."""
    cpus: int = 1
    """CPUs each job declares to Ray or Slurm (and its torch threads)."""
    gpus: int = 0
    """GPUs each job declares to Ray or Slurm (1 where the preset fits on one GPU)."""
    retries: int = 2
    """Times a job whose worker or node died (or that Slurm stopped) is submitted again; it
    resumes from its own checkpoint."""
    ray_address: str | None = None
    """A running Ray cluster ("auto", or HOST:PORT); default: a local instance of --jobs x
    --cluster.cpus CPUs."""
    slurm_partition: str | None = None
    """The Slurm partition (default: the cluster's)."""
    slurm_time_min: int = 24 * 60
    """Slurm's time limit per job, minutes; a job it stops is submitted again and resumes."""


@dataclass
class RunArgs:
    """stepzoo benchmark: RL fine-tuning algorithms compared at 1, 2, 4, 8 sampling steps."""

    algos: str | None = None
    """Comma-separated algorithms to train (listed above), or "all" for every registered one
    (default: the preset's `algos`, or all)."""
    reward: str | None = None
    """Training reward: a registry name (listed above), a plugin module.path:ClassName, a reward server
    http://HOST:PORT/NAME, or a weighted sum of them like aesthetic:1,pickscore:0.5 (default: the preset's)."""
    preset: Annotated[str, tyro.conf.arg(help=PRESET_HELP)] = DEFAULT_PRESET
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
    """Trajectories sampled per epoch by the run, shared by its processes (`accelerate
    launch --num_processes`), so the same command trains on the same budget on one GPU or
    eight (default: the preset's)."""
    groups_per_prompt: int | None = None
    """Groups sampled from each prompt drawn in an epoch, side by side: N draws groups / N
    prompts and N groups of each, so per-prompt stat trackers see N x group size rewards
    of a prompt per epoch. Must divide every algorithm's groups per epoch
    (default: the preset's; 1 draws each group's prompt on its own)."""
    eval_samples_per_prompt: int | None = None
    """Evaluation samples per held-out prompt and step count (default: the preset's)."""
    curve_samples_per_prompt: int | None = None
    """Samples per held-out prompt and step count of the evaluations before the last epoch,
    the curve's intermediate points (default: the preset's; the last epoch and the base
    model always get --eval-samples-per-prompt)."""
    out: str | None = None
    """Output folder (default: results/<preset>-<reward>-<time>; with --config, its folder)."""
    config: str | None = None
    """A run's config.json (results/NAME/config.json): every setting it records (preset, model,
    algorithms and their configs, seeds, reward, budget, evaluation, EMA) becomes its flag's
    default and --out its folder, so that `--config results/NAME/config.json --resume`
    continues the run without retyping them. A flag that contradicts a recorded setting is
    refused; the others (--jobs, --loop.*, --performance.*, --wandb, --reward-path,
    --max-bad-reward-batches, ...) are free, and so are --algos and --seeds with --extend
    (`--config RUN/config.json --extend --partial-seeds --algos ddpo --seeds 0,...,19`)."""
    resume: bool = False
    """Continue the run in --out from its last complete epoch."""
    overwrite: bool = False
    """Replace the run already in --out."""
    extend: bool = False
    """Add algorithms (those of --algos it does not hold) or seeds (those of --seeds it does
    not hold; --seeds must list its own too, and --algos every algorithm it holds, at its
    recorded settings, unless --partial-seeds) to the finished run in --out: they train and
    evaluate under its recorded settings, its recorded rows are reused, and the report is
    rewritten with every row."""
    partial_seeds: bool = False
    """With --extend: train the seeds of --seeds on the algorithms of --algos only; the run's
    other algorithms keep the seeds they hold, and the base is evaluated on every seed. For
    spending seeds where the intervals are widest (`benchmarks.verdict`'s `seeds for ±0.02`):
    each algorithm's gain over the base is paired by seed, so its interval needs its own seeds
    only; config.json records the seeds of each algorithm that lacks some of the run's."""
    redo: bool = False
    """With --extend: train the algorithms of --algos that the run in --out holds again, on
    every seed, at this checkout's settings for them, replacing their recorded rows, metrics,
    checkpoints and sample strips (after a fix changed what they compute); the other rows are
    reused as --extend reuses them."""
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
    cluster: Cluster = field(default_factory=Cluster)
    """Where the jobs run: this machine's worker processes (--jobs), Ray or Slurm; not part of
    the run's identity."""
    performance: Performance = field(default_factory=Performance)
    """Speed and memory switches (TF32, gradient checkpointing, torch.compile); not part of
    the run's identity, so a resumed run may change them."""
    loop: TrainLoop = field(default_factory=TrainLoop)
    """Sampling-call size, rewards overlapped with sampling, steps per backward pass of
    whole-trajectory losses; not part of the run's identity either."""
    finetune: Literal["lora", "full"] = "lora"
    """What trains: each algorithm's LoRA adapter (its --<algo>.lora-* settings), or "full":
    every weight of the denoiser (float32 master weights, autocast under mixed precision; the
    base weights kept on the CPU as the reference model of KL terms); trained weights go to
    model/<algo>_seed<seed>/ (a diffusers model folder) instead of lora/. Part of the run's
    identity."""
    fsdp: bool = False
    """Shard the fully fine-tuned denoiser, its gradients and its optimizer state over the
    processes (FSDP2; `accelerate launch --num_processes N`), for a model that does not fit one
    device with them; needs --finetune full, and minibatches that the processes share equally.
    The same numbers as DDP up to float rounding, and checkpoints hold whole tensors either
    way, so a resumed run may change it."""
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


RUN_FLAGS = {f.name for f in dataclasses.fields(RunArgs)}
"""The settings that are flags: a config.json key among them is that flag's recorded value."""


class UsageError(ValueError):
    """A bad input, reported as one line before any model is loaded."""


def comma_list(text: str, flag: str, cast=str) -> list:
    """The items of a comma-separated flag value, each cast; a bad item names `flag`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a comma-separated list of {cast.__name__}") from None


def peek_flag(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv before full parsing (a preset, or --config's run, sets other
    flags' defaults)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


RESUME_MAY_CHANGE = ("max_bad_reward_batches", "fsdp")
"""Recorded settings that a resumed run, or one given --config, may change: they decide when
a run stops or how its work is spread, not what it computes."""


def read_config(path: Path, flag: str) -> dict:
    """The settings that a run's config.json records; a file that cannot be read as them is
    a UsageError naming `flag`."""
    try:
        config = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(
            f"{flag}: {path} cannot be read ({error.strerror or error}); pass a run's config.json "
            "(results/NAME/config.json)"
        ) from None
    except ValueError:
        raise UsageError(f"{flag}: {path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise UsageError(f"{flag}: {path} holds no settings (a JSON object); pass a run's config.json")
    return config


def preset_algo_configs(preset: Preset, reward: str) -> Any:
    """Each algorithm's published config, with the preset's shared sampler, its paper's
    per-algorithm settings and those of `reward` applied (every key a field: `Preset`
    refuses others), its per-GPU minibatch made the run's by the paper's GPU count
    (`Preset.paper_gpus`)."""
    configs = {}
    for name, config_cls in ALGORITHMS.items():
        overrides = {
            **{field: getattr(preset, field) for field in SHARED_SAMPLER_FIELDS},
            **preset.algo_overrides.get(name, {}),
            **preset.reward_overrides.get(reward, {}).get(name, {}),
        }
        preset_config = dataclasses.replace(config_cls(), **overrides)
        preset_config = dataclasses.replace(
            preset_config, train_batch_size=preset_config.train_batch_size * preset.paper_gpus)
        configs[name] = UNCHECKED_CONFIGS[name](**init_values(preset_config))
    return AlgoConfigs(**configs)


def init_values(config: Any) -> dict[str, Any]:
    """A config's constructor arguments, by field name."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def checked_config(name: str, config: Any) -> Any:
    """The real config of algorithm `name` with the values parsed into `config`; a value it
    refuses becomes a UsageError naming the flag (the field the message starts with)."""
    config_cls = ALGORITHMS[name]
    try:
        return config_cls(**init_values(config))
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
    config = peek_flag(argv, "--config")
    if config:
        saved = read_config(Path(config), "--config")
        defaults = _recorded_defaults(Path(config), saved)
    else:
        preset_name = peek_flag(argv, "--preset") or DEFAULT_PRESET
        if preset_name not in PRESETS:
            raise UsageError(f"--preset: unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[preset_name]()
        reward = peek_flag(argv, "--reward") or preset.reward
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
    if config:
        _refuse_contradictions(args, defaults, saved, Path(config))
    configs = {name: checked_config(name, getattr(args.algo, name)) for name in ALGORITHMS}
    return dataclasses.replace(args, algo=AlgoConfigs(**configs))


def _recorded_defaults(path: Path, saved: dict) -> RunArgs:
    """The flags' defaults that the run recorded in `path` (`saved`) sets: each recorded
    setting that is a flag, its algorithm configs over its preset's, and --out its folder."""
    missing = [key for key in ("preset", "reward", "algorithm_configs") if key not in saved]
    if missing:
        raise UsageError(f"--config: {path} records no {', '.join(missing)}; pass a config.json that benchmarks.run wrote")
    if saved["preset"] not in PRESETS:
        raise UsageError(
            f"--config: {path} records preset {saved['preset']!r}, which this checkout lacks ({', '.join(PRESETS)})"
        )
    preset_configs = preset_algo_configs(PRESETS[saved["preset"]](), saved["reward"])
    unknown = sorted(saved["algorithm_configs"].keys() - ALGORITHMS.keys())
    if unknown:
        raise UsageError(
            f"--config: {path} records {', '.join(unknown)}, which this checkout does not register "
            f"({', '.join(ALGORITHMS)})"
        )
    recorded_configs = {
        name: _recorded_config(path, name, getattr(preset_configs, name), fields)
        for name, fields in saved["algorithm_configs"].items()
    }
    flags = {key: _flag_value(key, value) for key, value in saved.items() if key in RUN_FLAGS}
    return RunArgs(**flags, out=str(path.parent), config=str(path),
                   algo=dataclasses.replace(preset_configs, **recorded_configs))


def _flag_value(key: str, recorded: Any) -> Any:
    """A config.json setting as its flag's value: a list as the comma-separated text the flag
    takes, the model as the folder or hub id it names in this checkout, the EMA's fields as
    `Ema` (None: no EMA)."""
    if key == "model":
        return recorded_model(recorded)
    if key == "ema":
        return Ema(**recorded) if recorded else Ema()
    if isinstance(recorded, list):
        return ",".join(map(str, recorded))
    return recorded


def _recorded_config(path: Path, name: str, preset_config: Any, fields: dict) -> Any:
    """Algorithm `name`'s recorded config: `fields` over its preset's config (a field recorded
    before it existed keeps the preset's value), lists as the tuples the config holds."""
    unknown = sorted(fields.keys() - {f.name for f in dataclasses.fields(preset_config) if f.init})
    if unknown:
        raise UsageError(
            f"--config: {path} records {name}'s {', '.join(unknown)}, not a field of its config in this checkout; "
            "resume it with the checkout that made it"
        )
    return dataclasses.replace(preset_config, **{
        key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()
    })


def _refuse_contradictions(args: RunArgs, recorded: RunArgs, saved: dict, path: Path) -> None:
    """Refuses a flag given a value other than the setting that `path` records (`saved`, read
    as flags into `recorded`), naming the flag; the settings a resumed run may change are free."""
    def refuse(flag: str, given: Any, kept: Any) -> None:
        raise UsageError(
            f"{flag} {given}: --config {path} records {kept}; leave {flag} out, or leave --config out and pass "
            "every flag"
        )

    # An extension names the algorithms and seeds it adds; `extended` checks them against the run.
    free = {*RESUME_MAY_CHANGE, *(("algos", "seeds") if args.extend else ())}
    for key in sorted(saved.keys() & RUN_FLAGS - free):
        given, kept = getattr(args, key), getattr(recorded, key)
        flag = "--" + key.replace("_", "-")
        if key == "ema":
            for name in _differing_fields(given, kept):
                refuse(f"--ema.{name.replace('_', '-')}", getattr(given, name), getattr(kept, name))
        elif key == "model":
            if given is None or portable_model(given) != portable_model(kept):
                refuse(flag, given, kept)
        elif isinstance(saved[key], list) and isinstance(given, str):
            if comma_list(given, flag) != comma_list(kept, flag):
                refuse(flag, given, kept)
        elif given != kept:
            refuse(flag, given, kept)
    for name in sorted(saved["algorithm_configs"]):
        given, kept = getattr(args.algo, name), getattr(recorded.algo, name)
        for key in _differing_fields(given, kept):
            refuse(f"--{name}.{key.replace('_', '-')}", getattr(given, key), getattr(kept, key))
        if args.train_steps is not None and args.train_steps != kept.num_steps:
            refuse("--train-steps", args.train_steps, f"{name}'s num_steps {kept.num_steps}")


def _differing_fields(given: Any, kept: Any) -> list[str]:
    """The fields of dataclass `kept` whose value in `given` differs."""
    return [f.name for f in dataclasses.fields(kept) if f.init and getattr(given, f.name) != getattr(kept, f.name)]

def algo_flag(args: RunArgs, name: str, key: str) -> str:
    """The flag that set algorithm `name`'s config field `key` (--train-steps sets every num_steps)."""
    if key == "num_steps" and args.train_steps is not None:
        return "--train-steps"
    return f"--{name}.{key.replace('_', '-')}"

