"""The recipe of one (algorithm, seed) run: a fixed epoch budget from the base model.

One epoch is:

1. the algorithm's per-epoch choices, from where training stands (`EpochContext`): the
   noise level of each sampling step, decided before anything is sampled;
2. the rollout (`benchmarks.rollout`): the run's `trajectories_per_epoch` trajectories
   (groups of the size the algorithm asks for, `groups_per_prompt` groups of each prompt
   drawn), their prompts and noise drawn with a generator seeded by (seed, epoch) on every
   process alike; each process samples its equal `Shard` of the groups, scores the images
   the algorithm names, and gathers prompts and returns so that advantages and stat
   tracking see the global batch;
3. the updates (`benchmarks.epochs`): the epoch's loss calls on global minibatches, each
   process training the groups it holds, cut and joined into UNet calls
   by `benchmarks.loss_calls`; a forward-process algorithm trains against the old policy
   it sampled with, which moves after the epoch by the algorithm's rule and is
   checkpointed; reward back-propagation (DRaFT) samples and trains at once;
4. evaluation when due (on the EMA of the weights with `--ema.decay`, `benchmarks.ema`,
   moved after every optimizer update), then one atomic checkpoint (LoRA, optimizer,
   tracker, counters, records, the EMA), so a kill loses at most the epoch in flight.

What trains is a LoRA adapter, or with `finetune` "full" every weight of the denoiser; with
`fsdp` those are sharded over the processes (`benchmarks.sharding`): the epoch's batch is
then gathered after sampling and each process trains an equal part of every minibatch.
Checkpoints hold whole tensors either way.

It trains or evaluates one job on the Accelerator it is given and writes only that job's
files (its checkpoint, `benchmarks.checkpoint`; its LoRA and sample strips); the Accelerator
of a serial run, the run folder's shared files (config.json, records.jsonl, metrics.jsonl,
the report) and the loggers are the runner's (`benchmarks.run`; the `--jobs` workers build
their Accelerators in `benchmarks.jobs`). Algorithms stay pure tensor math (zoo.algorithm).

Faults: a reward that raises or returns NaN/inf skips that epoch's update (nothing reaches
the stat tracker) with a counted warning, and stops the run at the first such epoch
beyond `max_bad_reward_batches`; a non-finite loss or adapter weight stops the run
before anything is checkpointed. Either way the run ends with `RunStopped`, and the
checkpoint on disk is the last good epoch's. A reward that fails at an evaluation costs
that evaluation's cells (scored as missing, `benchmarks.evaluate`), not the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from benchmarks.checkpoint import WriteFailed, kill_point, load_state, save_state
from benchmarks.ema import Ema, WeightsEma
from benchmarks.epochs import MinibatchShard, Shard, reward_backprop_epoch, train_on_batch
from benchmarks.evaluate import EvalSettings, evaluate, save_strip
from benchmarks.loop import RewardFailures, RunStopped, TrainingDiverged, TrainLoop
from benchmarks.rollout import draw_prompt_ids, epoch_seed, global_advantages, sample_and_score
from benchmarks.sharding import gathered_batch, gathered_optimizer_state, load_optimizer_state, shard_denoiser
from rewards.base import Reward
from zoo.algorithm import EpochContext, ForwardProcessAlgorithm, RewardBackpropAlgorithm
from zoo.kernels import SamplerConfig
from zoo.loading import load_policy
from zoo.policy import LoraSettings, Performance, Policy
from zoo.sampling import TrajectorySampler

BASE = "base"
"""The name of the untrained model's rows."""


def ignore(_: Any) -> None:
    """The default of `JobSettings`' hooks: a module-level function, not a lambda, so that
    settings pickle into a worker process (`benchmarks.jobs`)."""


@dataclass
class JobSettings:
    """Everything one (algorithm, seed) run needs besides the algorithm's own config."""

    model: str
    epochs: int
    trajectories_per_epoch: int
    train_prompts: tuple[str, ...]
    eval_every: int
    eval: EvalSettings
    """The reported evaluation, made after the last epoch and at every `eval_every`."""
    mixed_precision: str
    train_reward: str
    out_dir: Path
    log: Callable[[dict], None] = ignore
    """Called on the main process with each epoch's training metrics."""
    log_evaluations: Callable[[list[dict]], None] = ignore
    """Called on the main process with each evaluation's records as it is made."""
    progress_bars: bool = True
    """Progress bars of the epochs and training passes on the main process; off in the
    worker processes of `--jobs`, whose driver reports each job in one line instead."""
    max_bad_reward_batches: int = 3
    """Epochs whose reward failed that are skipped (no update) before the run stops."""
    performance: Performance = field(default_factory=Performance)
    loop: TrainLoop = field(default_factory=TrainLoop)
    ema: Ema = field(default_factory=Ema)
    groups_per_prompt: int = 1
    """Groups sampled from each prompt drawn per epoch (`draw_prompt_ids`)."""
    resolution: int | None = None
    """Image side of a flow-matching model (`Preset.resolution`)."""
    selection_eval: EvalSettings | None = None
    """A second evaluation made beside `eval` at every point (the validation prompts), on
    which a report chooses the epoch it reports `eval` at (the peak of the curve), so that
    the choice never sees the reported prompts."""
    curve_samples_per_prompt: int | None = None
    """Samples per prompt of the evaluations before the last epoch (the curve's intermediate
    points; both evaluations'); None: as many as the final one."""
    finetune: str = "lora"
    """What trains: "lora" (each algorithm's adapter) or "full" (every weight of the denoiser)."""
    fsdp: bool = False
    """Shard the fully fine-tuned denoiser over the processes (`benchmarks.sharding`)."""

    def evaluations(self, epoch: int) -> list[EvalSettings]:
        """The evaluations made after training epoch `epoch`: the full ones at the last, the
        curve's (`curve_samples_per_prompt`) before it."""
        full = [self.eval] if self.selection_eval is None else [self.eval, self.selection_eval]
        if epoch == self.epochs or not self.curve_scores_other_images():
            return full
        return [dataclasses.replace(e, samples_per_prompt=self.curve_samples_per_prompt) for e in full]

    def curve_scores_other_images(self) -> bool:
        """Whether the curve's intermediate points score other images than the last epoch's."""
        return (self.curve_samples_per_prompt not in (None, self.eval.samples_per_prompt)
                and self.eval_every < self.epochs)

    def base_evaluations(self) -> list[EvalSettings]:
        """The base model's evaluations: the full ones, and the curve's too when its points
        score other images, so that every trained point has the base on its own images (the
        same noise: a paired gain) as well as the final table's."""
        full = self.evaluations(self.epochs)
        return full + (self.evaluations(self.eval_every) if self.curve_scores_other_images() else [])


def _fresh_counters() -> dict:
    """The budget a row has spent before training, as its records report it."""
    return {"samples_seen": 0, "optimizer_updates": 0, "backward_passes": 0, "reward_calls": 0, "wall_time": 0.0}


def checkpoint_path(out_dir: Path, algo: str, seed: int) -> Path:
    return out_dir / "checkpoints" / f"{algo}_seed{seed}.pt"


def trained_weights_folder(out_dir: Path, algo: str, seed: int, finetune: str) -> Path:
    """Where a run writes the weights it trained (`Policy.save_weights`): the LoRA under
    lora/, a fully fine-tuned denoiser under model/."""
    return out_dir / ("model" if finetune == "full" else "lora") / f"{algo}_seed{seed}"


def _records(algo: str, seed: int, epoch: int, counters: dict, stats: dict, evaluation: EvalSettings) -> list[dict]:
    return [
        {
            "algo": algo,
            "seed": seed,
            "epoch": epoch,
            "split": evaluation.split,
            "samples_per_prompt": evaluation.samples_per_prompt,
            "eval_steps": step_count,
            "reward": reward_name,
            **values,
            "samples_seen": counters["samples_seen"],
            "optimizer_updates": counters["optimizer_updates"],
            "backward_passes": counters["backward_passes"],
            "reward_calls": counters["reward_calls"],
            "reward_images": counters["reward_calls"],
            "wall_time": round(counters["wall_time"], 3),
        }
        for (step_count, reward_name), values in stats.items()
    ]


def _evaluate_and_record(
    policy, rewards, settings: JobSettings, accelerator, algo, seed, epoch, counters, save_strips: bool,
    evaluations: list[EvalSettings] | None = None,
) -> list[dict]:
    """Records of `evaluations` (default: those after training epoch `epoch`)."""
    records = []
    for evaluation in settings.evaluations(epoch) if evaluations is None else evaluations:
        where = f"{algo} seed {seed}, epoch {epoch}"
        if settings.selection_eval is not None:
            where += f", {evaluation.split} prompts"
        stats, strips = evaluate(policy, rewards, evaluation, accelerator, where=where)
        # The strips show the reported evaluation's prompts.
        if save_strips and accelerator.is_main_process and evaluation is settings.eval:
            (settings.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            for step_count, images in strips.items():
                save_strip(images, settings.out_dir / "samples" / f"{algo}_seed{seed}_steps{step_count}.png")
        records += _records(algo, seed, epoch, counters, stats, evaluation)
    if accelerator.is_main_process:
        settings.log_evaluations(records)
    return records


def _save_on_main(accelerator: Accelerator, path: Path, state: dict) -> None:
    """The main process writes the checkpoint; if that fails, every process stops (the
    main one with the `WriteFailed` naming the path), instead of the others waiting for
    the main one at the next collective."""
    failure = None
    if accelerator.is_main_process:
        try:
            save_state(path, state)
        except WriteFailed as error:
            failure = error
    failed = accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device))
    if failure is not None:
        raise failure
    if bool(failed.any()):
        raise RunStopped(f"the main process could not write {path}")


def evaluate_base(settings: JobSettings, seed: int, rewards: dict[str, Reward], accelerator: Accelerator) -> list[dict]:
    """Rows of the untrained model (epoch 0), computed once per seed and checkpointed; a
    checkpoint of an older run that lacks some of `settings.base_evaluations()` (the
    curve's) gets them added."""
    path = checkpoint_path(settings.out_dir, BASE, seed)
    state = load_state(path)
    kept = state["records"] if state is not None else []
    missing = missing_base_evaluations(settings, kept)
    if not missing:
        return kept
    policy = load_policy(
        settings.model, device=accelerator.device, mixed_precision=settings.mixed_precision,
        performance=settings.performance, resolution=settings.resolution,
    )
    counters = _fresh_counters()
    records = kept + _evaluate_and_record(policy, rewards, settings, accelerator, BASE, seed, 0, counters,
                                          save_strips=True, evaluations=missing)
    _save_on_main(accelerator, path, {"records": records, "done": True})
    return records


def missing_base_evaluations(settings: JobSettings, rows: list[dict]) -> list[EvalSettings]:
    """The base evaluations of `settings` that `rows` (the base's records of one seed) lack.
    Rows written before records named their images per prompt are of the full evaluation."""
    made = {(row.get("split", settings.eval.split), row.get("samples_per_prompt", settings.eval.samples_per_prompt))
            for row in rows}
    return [e for e in settings.base_evaluations() if (e.split, e.samples_per_prompt) not in made]


def training_sampler_config(config: Any, settings: JobSettings) -> SamplerConfig:
    """The sampler `config` trains with: its kind, K, eta, guidance and flow SDE, with the preset's
    timestep spacing when it samples with the preset's kind (the evaluation's); a config
    that samples with another kind keeps the scheduler config's own spacing."""
    spacing = settings.eval.timestep_spacing if config.sampler == settings.eval.sampler else None
    return SamplerConfig(config.sampler, config.num_steps, config.eta, config.guidance_scale, spacing, config.flow_sde)


def _evaluated_weights(policy: Policy, ema: WeightsEma | None) -> contextlib.AbstractContextManager:
    """Run with the weights that evaluations see and lora/ holds: the EMA, swapped in and
    the trained weights put back after, when `--ema.evaluate` (so training goes on from the
    trained weights); else the trained weights as they are."""
    if ema is not None and ema.settings.evaluate:
        return policy.trainable_weights(ema.weights)
    return contextlib.nullcontext()


def run_algorithm(
    algo: str,
    config: Any,
    seed: int,
    settings: JobSettings,
    train_reward: Reward,
    eval_rewards: dict[str, Reward],
    accelerator: Accelerator,
) -> list[dict]:
    """Train `algo` from the base for `settings.epochs` epochs (resuming from its
    checkpoint if one exists) and return its evaluation records. The evaluations and the
    final lora/<algo>_seed<seed>/ (model/<algo>_seed<seed>/ in full fine-tuning) are of the
    trained weights, or of their EMA under `settings.ema` with `evaluate` (`benchmarks.ema`)."""
    path = checkpoint_path(settings.out_dir, algo, seed)
    state = load_state(path)
    if state is not None and state.get("done"):
        return state["records"]

    algorithm = config.build()
    needs = algorithm.needs
    torch.manual_seed(seed)  # the LoRA initialisation, identical for every algorithm of a seed
    full = settings.finetune == "full"
    lora = None if full else LoraSettings(config.lora_rank, config.lora_alpha, tuple(config.lora_target_modules))
    policy = load_policy(
        settings.model, device=accelerator.device, mixed_precision=settings.mixed_precision, lora=lora,
        full_finetune=full, performance=settings.performance, resolution=settings.resolution,
    )
    if settings.fsdp:
        shard_denoiser(policy, accelerator)
    policy.keep_reference()
    sampler = TrajectorySampler(policy, training_sampler_config(config, settings))
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    tracker = algorithm.new_tracker()
    counters = {**_fresh_counters(), "bad_reward_batches": 0}
    records: list[dict] = []
    start_epoch = 0
    weights_key = "weights" if full else "lora"
    if state is not None:
        policy.load_trained_state(state[weights_key])
        load_optimizer_state(optimizer, state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        counters.update(state["counters"])
        records = list(state["records"])
        start_epoch = state["epoch"]
    # A forward-process algorithm's old policy: the adapter weights it trains against (and
    # samples with, unless it samples with the current ones), the current ones at the start,
    # checkpointed as they are.
    old_policy = None
    if isinstance(algorithm, ForwardProcessAlgorithm) and algorithm.needs_old_policy:
        old_policy = policy.trainable_state() if state is None else policy.scattered(state["old_policy"])
    samples_with_old_policy = old_policy is not None and algorithm.samples_with_old_policy
    ema = None
    if settings.ema.on:
        ema = WeightsEma(settings.ema, policy.trainable_tensors(), None if state is None else {
            "weights": policy.scattered(state["ema"]["weights"]), "updates": state["ema"]["updates"]})
    if settings.fsdp:  # sharded in place: the sharded model reduces its own gradients
        optimizer = accelerator.prepare(optimizer)
    else:
        policy.denoiser, optimizer = accelerator.prepare(policy.model, optimizer)

    loop = settings.loop
    group_size = needs.group_size
    groups = settings.trajectories_per_epoch // group_size  # the run's, shared by its processes
    shard = Shard.of(groups, accelerator)
    # Under FSDP every process trains an equal part of each minibatch of the gathered batch.
    train_shard = MinibatchShard(shard.rank, shard.total, shard.world) if settings.fsdp else shard
    show = accelerator.is_main_process
    bars = show and settings.progress_bars
    epochs = tqdm(range(start_epoch, settings.epochs), desc=f"{algo} seed {seed}", disable=not bars,
                  initial=start_epoch, total=settings.epochs)
    for epoch in epochs:
        done = epoch + 1
        where = f"{algo} seed {seed}, epoch {done}"
        last_good = f"{path} holds epoch {epoch}, the last good one" if epoch else f"no {algo} epoch was checkpointed"
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        context = EpochContext(epoch, settings.epochs, generator)
        epoch_sampler = sampler
        if not isinstance(algorithm, RewardBackpropAlgorithm):
            levels = algorithm.noise_levels(context, sampler.config.num_steps)
            # The epoch's transitions are replayed under the kernel that sampled them.
            epoch_sampler = sampler if levels is None else sampler.with_noise_levels(levels)
        prompt_ids = draw_prompt_ids(len(settings.train_prompts), groups, settings.groups_per_prompt, generator)
        prompts = [settings.train_prompts[i] for i in prompt_ids.tolist()]  # the global batch's
        images_before = train_reward.images_scored
        if isinstance(algorithm, RewardBackpropAlgorithm):
            kill_point(f"train:{algo}:{done}")
            metrics, counts, failure = reward_backprop_epoch(
                algorithm, config, sampler, prompts, generator, train_reward, optimizer, accelerator, bars,
                loop.micro_batch, ema, shard,
            )
            counters["optimizer_updates"] += counts["optimizer_updates"]
            counters["backward_passes"] += counts["backward_passes"]
        else:
            with policy.trainable_weights(old_policy) if samples_with_old_policy else contextlib.nullcontext():
                traj, scores, failure = sample_and_score(
                    algorithm, epoch_sampler, prompts, generator, train_reward, loop, shard
                )
        # Every process skips an epoch that failed anywhere, so that the stat trackers and
        # the DDP all-reduces stay in step; nothing of it reaches the tracker.
        failures = gather_object([failure] if failure else [])
        if failures:
            counters["bad_reward_batches"] += 1
            count, limit = counters["bad_reward_batches"], settings.max_bad_reward_batches
            what = f"{where}: the reward {settings.train_reward} {failures[0]}"
            if count > limit:
                raise RewardFailures(
                    f"{what}; that is {count} failed reward batches, more than --max-bad-reward-batches {limit} "
                    f"allows; {last_good}"
                )
            if show:
                tqdm.write(f"warning: {what}; skipping this epoch's update ({count} of at most {limit})",
                           file=sys.stderr)
            metrics = {"bad_reward_batches": float(count)}
        elif not isinstance(algorithm, RewardBackpropAlgorithm):
            returns = algorithm.shape_rewards(traj, scores)
            advantages = global_advantages(algorithm, traj.prompts, returns, tracker, accelerator)
            if settings.fsdp:
                traj, advantages = gathered_batch(traj, advantages, accelerator)
            kill_point(f"train:{algo}:{done}")
            try:
                metrics, counts = train_on_batch(
                    algorithm, config, epoch_sampler, traj, advantages, optimizer, accelerator, context, loop, bars,
                    old_policy, ema, train_shard,
                )
                # Found once per run: later epochs train at the micro-batch the first one chose.
                loop = dataclasses.replace(loop, micro_batch=counts.get("micro_batch", loop.micro_batch))
            except TrainingDiverged as error:
                raise TrainingDiverged(f"{where}: {error}; {last_good}") from None
            metrics["train_reward"] = float(accelerator.gather(scores.float().mean().reshape(1)).mean())
            # Every process takes the same updates (DDP); backward passes are counted on all.
            counters["optimizer_updates"] += counts["optimizer_updates"]
            counters["backward_passes"] += counts["backward_passes"]
            if old_policy is not None:
                old_policy = algorithm.next_old_policy(
                    old_policy, policy.trainable_state(), counters["optimizer_updates"]
                )

        local_calls = torch.tensor([train_reward.images_scored - images_before], device=accelerator.device)
        counters["reward_calls"] += int(accelerator.gather(local_calls).sum())
        counters["samples_seen"] += settings.trajectories_per_epoch
        counters["wall_time"] += time.perf_counter() - started
        trained = policy.trained_state()
        if not all(torch.isfinite(weights).all() for weights in trained.values()):
            what = "weights" if full else "LoRA weights"
            raise TrainingDiverged(f"{where}: the {what} became NaN or inf (try a lower learning rate); {last_good}")
        if done % settings.eval_every == 0 or done == settings.epochs:
            kill_point(f"evaluate:{algo}:{done}")
            with _evaluated_weights(policy, ema):
                records += _evaluate_and_record(
                    policy, eval_rewards, settings, accelerator, algo, seed, done, counters,
                    save_strips=done == settings.epochs,
                )
        if bars:
            epochs.set_postfix(reward=f"{metrics.get('train_reward', math.nan):.4f}",
                               loss=f"{metrics.get('loss', math.nan):.2e}")
        if show:
            settings.log({"algo": algo, "seed": seed, "epoch": done, **metrics})
        _save_on_main(accelerator, path, {
            "epoch": done,
            "done": done == settings.epochs,
            weights_key: trained,
            "optimizer": gathered_optimizer_state(optimizer),
            "tracker": tracker.state_dict(),
            "counters": counters,
            "records": records,
            **({} if old_policy is None else {"old_policy": policy.gathered(old_policy)}),
            **({} if ema is None else {"ema": ema.state_dict(policy.gathered)}),
        })

    with _evaluated_weights(policy, ema):
        policy.save_weights(trained_weights_folder(settings.out_dir, algo, seed, settings.finetune),
                            write=accelerator.is_main_process)
    return records
