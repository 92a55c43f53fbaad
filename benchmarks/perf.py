"""Throughput and memory of every algorithm's sampling, training and reward on a preset's
real architecture with random weights (no download).

    python -m benchmarks.perf --preset sd-turbo --algos sdpo,ddpo        # a GPU, 512px
    python -m benchmarks.perf --preset sd-turbo --reduced --resolution 128 --steps 4
    python -m benchmarks.perf --preset sd3.5-medium --reduced           # flow matching, on a CPU
    python -m benchmarks.perf --preset tiny                               # the tiny world

Per algorithm, with its group size and sampling needs (x̂0 recording, reference
log-probs, final images decoded or not), in the preset's precision:
- sampling trajectories/s of one `TrajectorySampler.sample` call of `--batch-size`
  trajectories, and the same trajectories sampled the reference codes' way, one
  sampler call per group member (each pair member its own UNet pass);
- sampling and scoring `--sample-calls` such calls as the trainer does an epoch, with
  each call's rewards overlapped with the next call's sampling, against scoring serially;
- training transitions/s of one trainer minibatch (log-prob recompute with gradients,
  the algorithm's loss, backward in the trainer's chunks of steps, AdamW step), and the
  same with one log-prob call per group member;
- reward images/s of `--reward` on images of the preset's resolution;
- peak memory: CUDA's max allocated per phase, or the process's peak RSS on a CPU;
- the training step's FLOPs (torch's FLOP counter, checkpointing off so recomputation
  does not count) per second, and on a GPU its model FLOP utilisation against a dense
  matmul timed in the same run (bf16 8192³; float32 1024³ on a CPU);
- the end-to-end figure: seconds per epoch of the preset's configuration (64 trajectories
  on sd-turbo, the SDPO paper's) and hours for its run (100 epochs on sd-turbo), projected
  from the seconds per sampling call and per training call measured above and the calls
  the trainer makes per epoch; beside them the epoch at the FLOP limit (its counted
  sampling and training FLOPs over the matmul peak); with `--measure-epoch`, one real
  epoch through the trainer's own `sample_and_score` and `train_on_batch` as a check.
Rewards: any that needs no download, or aesthetic / pickscore built with random weights
at their published architectures (`--random-reward-weights`).
Prints a Markdown table and writes it with a JSON record under `--out`.

    python -m benchmarks.perf --preset sd-turbo --mixed-precision fp16 --measure-epoch sdpo \
        --measured-trajectories 16                                  # issue 17's table (a GPU)

Full fine-tuning (`--finetune full`: every weight of the denoiser trained, AdamW's moments
model-sized), sharded over the processes of an accelerate launch with `--fsdp` (as
`benchmarks.run`'s; memory is then each process's, the largest of them):

    accelerate launch --num_processes 2 -m benchmarks.perf --preset sd3.5-medium --reduced \
        --algos grpo --finetune full --fsdp --tag full-fsdp2
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel

from benchmarks import archs
from benchmarks.cli import checked_config, preset_algo_configs
from benchmarks.epochs import epoch_schedule, train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.loss_calls import (
    Transitions, forward_process_call, gather_transitions, micro_batched_losses, minibatch_losses,
)
from benchmarks.presets import PRESETS, Preset
from benchmarks.rollout import global_advantages, sample_and_score
from benchmarks.sharding import shard_denoiser
from rewards.base import Reward
from rewards.registry import load_reward
from zoo.algorithm import Algorithm, EpochContext, ForwardProcessAlgorithm, SamplingNeeds
from zoo.flow_policy import FlowPolicy
from zoo.kernels import SamplerConfig
from zoo.policy import LoraSettings, Performance, Policy, local_tensor
from zoo.registry import ALGORITHMS
from zoo.unet_policy import UNetPolicy
from zoo.sampling import TrajectorySampler
from zoo.trajectory import Trajectory
from zoo import strict_json

COLUMNS = (
    ("algo", "algo"),
    ("group", "G"),
    ("batch", "traj/call"),
    ("train_batch", "train groups"),
    ("steps", "K"),
    ("sample_traj_s", "sample traj/s"),
    ("sample_speedup", "× per-member"),
    ("epoch_traj_s", "sample+reward traj/s"),
    ("overlap_speedup", "× overlap"),
    ("overlap_score_diff", "overlap Δscore"),
    ("train_transitions_s", "train trans/s"),
    ("train_speedup", "× per-member"),
    ("ratio_drift", "ratio drift"),
    ("reward_images_s", "reward img/s"),
    ("sample_peak_gb", "sample peak GB"),
    ("train_peak_gb", "train peak GB"),
    ("trained_state_gb", "trained state GB"),
    ("train_tflops", "train TFLOP/s"),
    ("mfu", "MFU"),
    ("epoch_loss_calls", "loss calls/epoch"),
    ("epoch_s", "epoch s (projected)"),
    ("run_h", "run h (projected)"),
    ("flop_limit_s", "epoch s at FLOP limit"),
    ("measured_epoch_s", "epoch s (measured)"),
)
"""(JSON key, Markdown header) of each table column."""


@dataclass
class PerfArgs:
    """stepzoo throughput and memory on a preset's architecture with random weights."""

    preset: str = "tiny"
    """Architecture, sampler and precision: tiny, tiny-flow, sd-turbo, lcm, sd15, sd3.5-medium or flux-schnell
    (the last two at full size on a GPU only: T5-XXL alone is 19 GB in float32)."""
    algos: str = "all"
    """Comma-separated algorithms, or "all" (every one but reward back-propagation, DRaFT, which it does not time)."""
    batch_size: int | None = None
    """Trajectories per sampling call (default 8, the SDPO paper's sampling batch, or the
    smallest multiple of 8 that holds a whole group: 16 for GRPO and NFT on the flow presets)."""
    steps: int | None = None
    """Sampling steps K (default: the preset's; 50 for sd-turbo)."""
    resolution: int | None = None
    """Image side in pixels (default: 512 for the real models, 32 for tiny, 128 reduced)."""
    reduced: bool = False
    """Divide the real architecture's widths by 8 (CPU-sized, same code paths)."""
    device: str = "auto"
    """"cuda", "cpu" or "auto" (CUDA when available)."""
    mixed_precision: str | None = None
    """"no", "fp16" or "bf16" (default: the preset's on CUDA, "no" on a CPU)."""
    reward: str = "jpeg_compressibility"
    """Reward timed on the sampled images and the epochs' (one that needs no download, or
    aesthetic or pickscore with `--random-reward-weights`)."""
    random_reward_weights: bool = False
    """Build `--reward` (aesthetic or pickscore) with random weights in its published format:
    at its published architecture (CLIP ViT-L/14, ViT-H/14), or at the tiny checkpoints' on
    the tiny preset and with `--reduced`. A model reward's cost with no download, e.g. for
    × overlap."""
    train_batch_size: int | None = None
    """Groups per training minibatch (default: the preset's paper setting for each algorithm)."""
    sample_calls: int = 2
    """Sampling calls of `--batch-size` whose rewards are scored serially, or overlapped
    with the next call's sampling, as the trainer samples an epoch (best of `--repeats` each)."""
    epoch_trajectories: int | None = None
    """Trajectories of the projected epoch (default: the preset's trajectories per epoch; 64
    for sd-turbo, the SDPO paper's 32 pairs per GPU, sdpo config/config_sdpo.py:20-21)."""
    epochs: int | None = None
    """Epochs of the projected run (default: the preset's; 100 for sd-turbo, sdpo config/config_sdpo.py:15)."""
    measure_epoch: str = ""
    """Comma-separated algorithms (or "all") whose epoch is also run for real through the
    trainer's own `sample_and_score` and `train_on_batch`, on `--measured-trajectories`
    trajectories, and reported scaled to `--epoch-trajectories`."""
    measured_trajectories: int | None = None
    """Trajectories of the measured epoch (default: `--epoch-trajectories`); fewer time a
    fraction of the epoch in the same calls."""
    micro_batch: int | None = None
    """Groups per UNet call with gradients in the measured epoch, as the trainer's
    `--loop.micro-batch` (default the trainer's: on CUDA the largest that fits, joining the
    loss calls of an update; on a CPU one UNet call per loss call). The projection times
    one UNet call per loss call."""
    steps_per_backward: int = TrainLoop.steps_per_backward
    """Steps per backward pass of whole-trajectory losses (REBEL), as the trainer's flag."""
    gradient_checkpointing: bool = False
    """Checkpoint the UNet's blocks during training (less memory, ~1/3 more compute)."""
    compile_unet: bool = False
    """torch.compile the UNet (warm-up then includes compilation)."""
    tf32: bool = True
    """TF32 for the float32 matmuls left on CUDA."""
    baseline: bool = True
    """Also time the per-member way (the reference codes')."""
    repeats: int = 3
    """Timed repetitions after one warm-up; the median is reported."""
    seed: int = 0
    """Seed of the random weights, the prompts' order and the sampling noise."""
    tag: str = ""
    """Suffix of the output files' names, to keep several settings apart."""
    out: str = "results/perf"
    """Folder for <preset>[-reduced]-<device>[-<tag>].md and .json."""
    finetune: Literal["lora", "full"] = "lora"
    """What trains, as `benchmarks.run --finetune`: a LoRA adapter (the first algorithm's rank
    and targets, for every row) or every weight of the denoiser."""
    fsdp: bool = False
    """Shard the fully fine-tuned denoiser over the processes (`benchmarks.sharding`; one
    process, or those of `accelerate launch --num_processes N`), as `benchmarks.run --fsdp`."""


@dataclass(frozen=True)
class EpochPlan:
    """The epoch and run the figures project to, and the algorithms whose epoch is also measured."""

    trajectories: int
    epochs: int
    measured_algos: tuple[str, ...]
    measured_trajectories: int
    accelerator: Any
    """The `accelerate.Accelerator` the measured epochs train with (None when none is measured)."""


# --- setup ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_policy(
    args: PerfArgs, preset: Preset, device: torch.device, precision: str, lora: LoraSettings | None
) -> Policy:
    """The preset's architecture with random weights; `lora` None: fully fine-tuned."""
    performance = Performance(
        tf32=args.tf32, gradient_checkpointing=args.gradient_checkpointing, compile_unet=args.compile_unet
    )
    torch.manual_seed(args.seed)
    options = dict(device=device, mixed_precision=precision, lora=lora, full_finetune=lora is None,
                   performance=performance)
    if preset.sampler == "flow":
        return build_flow_policy(args, preset, options)
    if preset.name == "tiny":
        from zoo.tiny import arch

        resolution = args.resolution or 32
        lcm = preset.sampler == "lcm"
        unet = arch.make_unet(arch.TRAINED_ARCH, resolution // 2, lcm)
        vae = arch.make_vae(arch.TRAINED_ARCH, resolution)
        text_encoder = CLIPTextModel(arch.text_encoder_config(arch.TRAINED_ARCH))
        with tempfile.TemporaryDirectory() as folder:
            tokenizer = arch.build_tokenizer(folder)
        scheduler = (arch.make_lcm_scheduler() if lcm else arch.make_ddim_scheduler()).config
    else:
        configs = archs.load_configs(preset.name, reduced=args.reduced)
        resolution = args.resolution or (128 if args.reduced else 512)
        unet, vae, text_encoder, tokenizer = archs.build_components(configs, resolution, device)
        scheduler = configs["scheduler"]
    return UNetPolicy(unet, vae, text_encoder, tokenizer, scheduler, **options)


def build_flow_policy(args: PerfArgs, preset: Preset, options: dict) -> FlowPolicy:
    """A flow preset's pipeline with random weights: the tiny flow world's transformer at
    its shipped size (zoo/tiny/flow.py), or the real architecture of benchmarks/archs/,
    reduced or not (the whole pipeline built on the device, T5-XXL included)."""
    if preset.name == "tiny-flow":
        from zoo.tiny.arch import TRAINED_ARCH
        from zoo.tiny.flow import TRAINED_FLOW_ARCH, build_random_flow_pipeline

        resolution = args.resolution or 32
        with tempfile.TemporaryDirectory() as folder:
            source = build_random_flow_pipeline(Path(folder) / "pipeline", seed=args.seed, sample_size=resolution // 2,
                                                arch=TRAINED_FLOW_ARCH, text=TRAINED_ARCH)
            return FlowPolicy.load(str(source), resolution=resolution, **options)
    resolution = args.resolution or (128 if args.reduced else 512)
    pipeline = archs.build_flow_pipeline(archs.load_configs(preset.name, reduced=args.reduced), resolution,
                                         options["device"])
    return FlowPolicy(pipeline, resolution=resolution, **options)


def algorithm_config(name: str, preset: Preset, args: PerfArgs, num_steps: int):
    """The algorithm's config as the runner builds it for this preset trained on the
    preset's own reward (`benchmarks.cli.preset_algo_configs`: on sd-turbo every algorithm
    takes the SDPO paper's minibatch and accumulation for that reward, the minibatch the
    run's global one, all of it on this one device), at `num_steps`."""
    config = checked_config(name, getattr(preset_algo_configs(preset, preset.reward), name))
    overrides = {} if args.train_batch_size is None else {"train_batch_size": args.train_batch_size}
    try:
        return replace(config, **overrides, num_steps=num_steps)
    except ValueError as error:  # e.g. a training window longer than --steps (GRPO on the flow presets)
        raise SystemExit(f"--steps {num_steps}: {name}'s config on --preset {preset.name} refuses it: {error}") from None


# --- timing -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def trained_state_gb(policy: Policy, optimizer: torch.optim.Optimizer) -> float:
    """GB that this process holds of what training keeps across a step: the trained weights,
    one gradient each (freed between steps, held from backward to the optimizer step) and
    the optimizer's state; this process's shards of them when the denoiser is sharded. The
    tensors' own sizes, so a CPU's peak RSS (the libraries', the text encoders') does not
    hide them."""
    def size(tensor: torch.Tensor) -> int:
        held = local_tensor(tensor)
        return held.numel() * held.element_size()

    total = 0
    for param in policy.trainable_parameters():
        total += 2 * size(param)
        total += sum(size(v) for v in optimizer.state.get(param, {}).values() if isinstance(v, torch.Tensor))
    return total / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate measured here: the ceiling MFU is taken against."""
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * size**3 / seconds / 1e12


# --- one algorithm ----------------------------------------------------------------------


def training_batch(traj: Trajectory, groups: int, whole_trajectory: bool) -> Transitions:
    """The trainer's minibatch of the first `groups` groups: every step (whole-trajectory
    losses) or the middle one."""
    k = traj.num_steps
    chosen = torch.arange(k) if whole_trajectory else torch.tensor([k // 2])
    return gather_transitions(traj, torch.arange(groups), chosen.expand(groups, traj.group_size, -1))


def train_call(sampler, algorithm, optimizer, batch: Transitions, per_member: bool, steps_per_backward: int) -> None:
    """The trainer's minibatch: log-prob recompute (one UNet call, or one per group
    member), loss, backward (in chunks of steps for whole-trajectory losses), AdamW step."""
    shape = batch.steps.shape
    advantages = torch.linspace(-1, 1, batch.steps.numel(), device=batch.steps.device).view(shape)
    for loss, _, _ in minibatch_losses(algorithm, sampler, batch, advantages, steps_per_backward, per_member):
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def forward_train_call(sampler, algorithm, optimizer, traj: Trajectory, groups: int, old_policy, generator) -> None:
    """A forward-process algorithm's minibatch (NFT): the first `groups` groups' final
    latents noised to their middle step's timestep, predictions under the old policy
    (and the base) without gradients and under the current weights with them, loss,
    backward, AdamW step."""
    steps = torch.full((groups, traj.group_size, 1), traj.num_steps // 2)
    advantages = torch.linspace(-1, 1, steps.numel(), device=traj.latents.device).view(steps.shape)
    noise = torch.randn((groups, traj.group_size, *traj.final_latents.shape[2:]), generator=generator)
    call = forward_process_call(algorithm, sampler, traj, torch.arange(groups), steps, advantages, old_policy, noise)
    for loss, _, _ in micro_batched_losses([call], sampler, None, None):
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def epoch_loss_calls(config, needs: SamplingNeeds, groups: int, train_groups: int) -> int:
    """Loss calls of `benchmarks.epochs.train_on_batch` on an epoch of `groups` groups in
    minibatches of `train_groups`: the loop's own schedule (`epoch_schedule`)."""
    return epoch_schedule(replace(config, train_batch_size=train_groups), needs, groups).loss_calls


def project_epoch(
    sample_calls: int, sample_call_s: float, sample_call_flops: float,
    loss_calls: int, train_call_s: float, train_call_flops: float, peak_tflops: float,
) -> tuple[float, float]:
    """(seconds, seconds at the FLOP limit) of an epoch of `sample_calls` sampling calls,
    each scored as the trainer scores it, and `loss_calls` training calls: the measured
    seconds per call times the calls, and the counted FLOPs over the matmul peak."""
    seconds = sample_calls * sample_call_s + loss_calls * train_call_s
    flops = sample_calls * sample_call_flops + loss_calls * train_call_flops
    return seconds, flops / (peak_tflops * 1e12)


def measured_epoch_seconds(
    algorithm: Algorithm, config, sampler: TrajectorySampler, prompts: list[str], reward: Reward, loop: TrainLoop,
    accelerator, seed: int,
) -> float:
    """Seconds of one real epoch through the trainer's own code on one process: the
    groups of `prompts` sampled and scored (`sample_and_score`), their advantages, and
    `train_on_batch`, at learning rate 0 so that the weights stay those that sampled."""
    device = sampler.policy.device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(sampler.policy.trainable_parameters(), lr=0.0)
    _sync(device)
    started = time.perf_counter()
    traj, scores, failure = sample_and_score(algorithm, sampler, prompts, generator, reward, loop)
    if failure:
        raise RuntimeError(f"the reward {failure}")
    returns = algorithm.shape_rewards(traj, scores)
    advantages = global_advantages(algorithm, prompts, returns, algorithm.new_tracker(), accelerator)
    context = EpochContext(0, 1, generator)
    train_on_batch(algorithm, config, sampler, traj, advantages, optimizer, accelerator, context, loop, False)
    _sync(device)
    return time.perf_counter() - started


def measure_algorithm(
    row: dict, name: str, args: PerfArgs, preset: Preset, policy: Policy, reward: Reward, num_steps: int,
    matmul_peak: float, epoch: EpochPlan,
) -> None:
    """Fills `row` phase by phase, so that a phase that runs out of memory keeps the
    figures of the phases before it."""
    device = policy.device
    config = algorithm_config(name, preset, args, num_steps)
    algorithm = config.build()
    needs = algorithm.needs
    batch = sampling_batch(args, needs.group_size)
    groups = batch // needs.group_size
    # A minibatch can hold no more groups than one sampling call made.
    train_groups = min(config.train_batch_size, groups)
    prompts = [preset.train_prompts[i % len(preset.train_prompts)] for i in range(groups)]
    sampler = TrajectorySampler(policy, SamplerConfig(config.sampler, num_steps, config.eta, config.guidance_scale,
                                                     flow_sde=config.flow_sde))
    generator = torch.Generator().manual_seed(args.seed)

    def sample(group_size: int, shared_noise: bool, final_images: bool = needs.final_images) -> Trajectory:
        return sampler.sample(
            prompts, group_size=group_size, shared_noise=shared_noise, generator=generator,
            record_pred_x0=needs.record_pred_x0, reference_log_probs=needs.reference_log_probs,
            final_images=final_images,
        )

    def scored_calls(prompts: list[str], overlap: bool) -> torch.Tensor:
        """Scores of the groups of `prompts` sampled and scored as the trainer does."""
        loop = TrainLoop(sample_batch_size=batch, overlap_rewards=overlap)
        noise = torch.Generator().manual_seed(args.seed)
        _, scores, failure = sample_and_score(algorithm, sampler, prompts, noise, reward, loop)
        if failure:
            raise RuntimeError(f"--reward {args.reward} {failure}")
        return scores

    row.update(group=needs.group_size, batch=batch, train_batch=train_groups, steps=num_steps)
    # With one member per group the per-member way is the batched way itself.
    baseline = args.baseline and needs.group_size > 1
    reset_peak(device)
    # The warm-up call: one sampling call scored as the trainer scores it (decoding the
    # images its reward reads), its FLOPs counted.
    counter = FlopCounterMode(display=False)
    with counter:
        scored_calls(prompts, overlap=False)
    row["sample_call_tflop"] = counter.get_total_flops() / 1e12
    seconds = timed(lambda: sample(needs.group_size, needs.shared_noise), device, args.repeats, warm_up=False)
    row["sample_peak_gb"] = peak_gb(device)
    row["sample_traj_s"] = batch / seconds
    if baseline:
        per_member = timed(lambda: [sample(1, False) for _ in range(needs.group_size)], device, args.repeats)
        row["sample_speedup"] = per_member / seconds

    # Sampling is warm by now; the two ways alternate, best of `repeats` each, so that neither
    # gets the first run's allocations. Their trajectories are the same, and so must
    # their scores be wherever (which thread, which CUDA stream) they were computed.
    epoch_prompts = prompts * args.sample_calls
    times, epoch_scores = {True: [], False: []}, {}

    def scored_epoch(overlap: bool) -> None:
        epoch_scores[overlap] = scored_calls(epoch_prompts, overlap)

    for overlap in (True, False) * args.repeats:
        times[overlap].append(timed(partial(scored_epoch, overlap), device, 1, warm_up=False))
    overlapped = min(times[True])
    row["epoch_traj_s"] = batch * args.sample_calls / overlapped
    row["overlap_speedup"] = min(times[False]) / overlapped
    row["overlap_score_diff"] = float((epoch_scores[True] - epoch_scores[False]).abs().max())
    # The trainer overlaps on CUDA only (`TrainLoop.overlap_rewards`).
    row["sample_call_s"] = min(times[device.type == "cuda"]) / args.sample_calls

    # Final images whether or not the algorithm reads them: the reward's rate on the
    # preset's images, comparable across algorithms.
    traj = sample(needs.group_size, needs.shared_noise, final_images=True)
    images = traj.images.flatten(0, 1)
    reward_prompts = [p for p in traj.prompts for _ in range(needs.group_size)]
    row["reward_images_s"] = images.shape[0] / timed(lambda: reward.score(images, reward_prompts), device, args.repeats)

    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    step = args.steps_per_backward
    if isinstance(algorithm, ForwardProcessAlgorithm):
        # Noised final latents of the first groups, one (x0, t) example per trajectory.
        transitions = train_groups * needs.group_size
        train = partial(forward_train_call, sampler, algorithm, optimizer, traj, train_groups,
                        policy.trainable_state(), generator)
        train_per_member = None
    else:
        tb = training_batch(traj, train_groups, needs.whole_trajectory_loss)
        transitions = tb.steps.numel()
        # Re-scored as the trainer's first minibatch is, under the weights that sampled: the
        # ratio must be 1 up to rounding in any precision.
        rescored = tb.log_probs(sampler).detach()
        row["ratio_drift"] = float((rescored - tb.old_log_probs).exp().sub(1).abs().max())
        train = partial(train_call, sampler, algorithm, optimizer, tb, False, step)
        train_per_member = partial(train_call, sampler, algorithm, optimizer, tb, True, step)
    reset_peak(device)
    seconds = row["train_call_s"] = timed(train, device, args.repeats)
    row["train_peak_gb"] = peak_gb(device)
    row["trained_state_gb"] = trained_state_gb(policy, optimizer)
    row["train_transitions_s"] = transitions / seconds
    # Not in full fine-tuning: the per-member way keeps every member's graph until one
    # backward pass, and the reference (GRPO's KL) is the base weights copied into the
    # parameters, which autograd then refuses.
    if baseline and train_per_member is not None and args.finetune == "lora":
        row["train_speedup"] = timed(train_per_member, device, args.repeats) / seconds
    row["train_call_tflop"] = training_flops(policy, train) / 1e12
    row["train_tflops"] = row["train_call_tflop"] / seconds
    row["mfu"] = row["train_tflops"] / matmul_peak

    epoch_groups = epoch.trajectories // needs.group_size
    row["epoch_sample_calls"] = math.ceil(epoch_groups / groups)
    row["epoch_loss_calls"] = epoch_loss_calls(config, needs, epoch_groups, train_groups)
    row["epoch_s"], row["flop_limit_s"] = project_epoch(
        row["epoch_sample_calls"], row["sample_call_s"], row["sample_call_tflop"] * 1e12,
        row["epoch_loss_calls"], seconds, row["train_call_tflop"] * 1e12, matmul_peak,
    )
    row["run_h"] = row["epoch_s"] * epoch.epochs / 3600
    if name in epoch.measured_algos:
        measured_prompts = [preset.train_prompts[i % len(preset.train_prompts)]
                            for i in range(epoch.measured_trajectories // needs.group_size)]
        loop = TrainLoop(sample_batch_size=batch, steps_per_backward=step, micro_batch=args.micro_batch)
        measured = measured_epoch_seconds(algorithm, replace(config, train_batch_size=train_groups), sampler,
                                          measured_prompts, reward, loop, epoch.accelerator, args.seed)
        row["measured_s"] = measured
        row["measured_epoch_s"] = measured * epoch.trajectories / epoch.measured_trajectories


def training_flops(policy: Policy, step: Callable[[], None]) -> int:
    """FLOPs of one training call as the model defines them: activation recomputation
    by gradient checkpointing is switched off while counting."""
    checkpointing = policy.model.is_gradient_checkpointing
    if checkpointing:
        policy.model.disable_gradient_checkpointing()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    if checkpointing:
        policy.model.enable_gradient_checkpointing()
    return counter.get_total_flops()


# --- output -----------------------------------------------------------------------------


def _cell(key: str, value) -> str:
    if value is None:
        return "–"
    if isinstance(value, str) or isinstance(value, int):
        return str(value)
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key.endswith("speedup"):
        return f"{value:.2f}×"
    return f"{value:.3g}"


def command_line(args, module: str = "benchmarks.perf") -> str:
    """The command that reproduces `args`, a tyro dataclass of `module`'s (the flags whose
    values differ from the dataclass's defaults)."""
    flags = []
    for key, value in asdict(args).items():
        if value != getattr(type(args), key):
            flag = "--" + key.replace("_", "-")
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join([f"python -m {module}", *flags])


def _trained(record: dict) -> str:
    """What trained, in words: a record made before full fine-tuning existed trained LoRA."""
    parameters = record.get("trained_parameters")
    count = f"{parameters / 1e6:.3g}M parameters" if parameters else "parameters not recorded"
    if record.get("finetune", "lora") == "lora":
        return f"a LoRA adapter ({count})"
    processes = record.get("processes", 1)
    sharding = (f"sharded over {processes} processes (FSDP2; memory is one process's)" if record["args"].get("fsdp")
                else f"on each of {processes} processes" if processes > 1 else "in one process")
    return f"every weight of the denoiser ({count}), {sharding}"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [
        f"# stepzoo perf: {record['setting']}",
        "",
        f"`{record['command']}`",
        "",
        f"- device: {env['device_name']} · torch {env['torch']} · precision {record['precision']} · "
        f"resolution {record['resolution']}px · options {record['performance']}",
        f"- matmul peak measured here: {record['matmul_peak_tflops']:.3g} TFLOP/s ({record['matmul_dtype']}); "
        f"MFU = training FLOPs/s over it",
        f"- trained: {_trained(record)}",
        f"- reward: {record['reward']}; peak memory: "
        + ("CUDA max allocated per phase" if env["device_type"] == "cuda" else "process peak RSS (cumulative)"),
        "- trained state GB: this process's trained weights, a gradient for each and the optimizer's state "
        "(its shards when sharded), summed from the tensors' sizes",
        "- ratio drift: max over the first training minibatch of |exp(logp re-scored − logp sampled) − 1|, "
        "under the weights that sampled",
        "- × per-member: time of the reference codes' way (one sampler / log-prob call per group member) "
        "over stepzoo's one batched call",
        f"- sample+reward: {record['args']['sample_calls']} sampling calls scored as the trainer scores an epoch (best of {record['args']['repeats']}); "
        "× overlap: time with rewards scored after each call over time with them scored while the next call samples; "
        "overlap Δscore: max |difference| of the two ways' scores of the same trajectories",
        "- train TFLOP/s counts the FLOPs executed; a whole-trajectory loss over more than "
        f"{record['args']['steps_per_backward']} steps includes its extra forward pass without gradients",
        f"- epoch s (projected): an epoch of {record['epoch_trajectories']} trajectories, sampled in calls of traj/call "
        "(each scored as the trainer scores it, rewards overlapped on CUDA only) and trained in loss calls/epoch "
        "minibatches of train groups, one UNet call each, at the seconds per call measured above; run h: "
        f"{record['epochs']} such epochs; epoch s at FLOP limit: the epoch's counted FLOPs (sampling with its "
        "decoding and reward, training) over the matmul peak",
        "- epoch s (measured): "
        + (f"one real epoch of {record['measured_trajectories']} trajectories through the trainer's "
           f"sample_and_score and train_on_batch (micro-batch {record['args']['micro_batch'] or 'the trainer default'}), "
           f"scaled to {record['epoch_trajectories']}"
           if record["measured_trajectories"] else "not asked (--measure-epoch)"),
        "",
        "| " + " | ".join(header for _, header in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in record["rows"]:
        cells = [_cell(key, row.get(key)) for key, _ in COLUMNS]
        if "error" in row:
            cells[0] += f" ({row['error']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def image_side(policy: Policy, preset: str) -> int:
    """Pixels: a flow policy's resolution, the tiny UNet's (its VAE downsamples once) or the
    real VAE's sample size (`archs.build_components` sets it to the resolution)."""
    if policy.prediction == "velocity":
        return policy.resolution
    return 2 * policy.latent_shape[1] if preset == "tiny" else policy.vae.config.sample_size


def sampling_batch(args: PerfArgs, group_size: int) -> int:
    """Trajectories per sampling call: `--batch-size`, or 8 raised to hold whole groups."""
    return args.batch_size or math.lcm(8, group_size)


def check_sizes(names: list[str], preset: Preset, args: PerfArgs, num_steps: int, trajectories: int) -> None:
    """Every sampling call, projected epoch and measured epoch holds whole groups of every
    algorithm, or a SystemExit naming the flag, before any model is built."""
    for name in names:
        group_size = algorithm_config(name, preset, args, num_steps).build().needs.group_size
        sizes = {"--batch-size": sampling_batch(args, group_size), "--epoch-trajectories": trajectories}
        if args.measured_trajectories is not None:
            sizes["--measured-trajectories"] = args.measured_trajectories
        for flag, size in sizes.items():
            if size < group_size or size % group_size:
                raise SystemExit(f"{flag} {size} is not a multiple of {name}'s group size {group_size}")


def main(args: PerfArgs) -> dict:
    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    # The phases below time log-prob training; reward back-propagation (DRaFT) trains as it
    # samples, through `benchmarks.epochs.reward_backprop_epoch`, which they do not measure.
    timed_algos = [n for n, config in ALGORITHMS.items() if isinstance(config().build(), Algorithm)]
    names = timed_algos if args.algos == "all" else [a.strip() for a in args.algos.split(",")]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"--algos: unknown {', '.join(unknown)}; known: {', '.join(ALGORITHMS)}")
    untimed = [n for n in names if n not in timed_algos]
    if untimed:
        raise SystemExit(f"--algos: {', '.join(untimed)} back-propagates the reward through sampling, which this "
                         f"benchmark does not time; choose from {', '.join(timed_algos)}")
    if args.reduced and args.preset not in archs.PRESET_ARCHS:
        raise SystemExit(f"--reduced applies to the real architectures ({', '.join(archs.PRESET_ARCHS)}), "
                         f"not {args.preset}")
    if args.random_reward_weights and args.reward not in archs.REWARD_ARCHS:
        raise SystemExit(f"--random-reward-weights builds {' or '.join(archs.REWARD_ARCHS)}, not --reward {args.reward}")
    if args.fsdp and args.finetune != "full":
        raise SystemExit("--fsdp shards a fully fine-tuned denoiser: pass --finetune full as well")
    measured = tuple(names if args.measure_epoch == "all" else [a.strip() for a in args.measure_epoch.split(",") if a.strip()])
    if set(measured) - set(names):
        raise SystemExit(f"--measure-epoch: {', '.join(sorted(set(measured) - set(names)))} not among --algos {args.algos}")
    device = resolve_device(args.device)
    if args.preset in archs.FLOW_ARCHS and not args.reduced and device.type != "cuda":
        raise SystemExit(f"--preset {args.preset} at full size builds T5-XXL's encoder (4.8B parameters, 19 GB in "
                         "float32) beside its transformer: run it on a GPU, or pass --reduced")
    preset = PRESETS[args.preset]()
    precision = args.mixed_precision or (preset.mixed_precision if device.type == "cuda" else "no")
    num_steps = args.steps or preset.num_steps
    trajectories = args.epoch_trajectories or preset.trajectories_per_epoch
    check_sizes(names, preset, args, num_steps, trajectories)

    # One LoRA shape for every algorithm of the run, so that rows compare algorithms and
    # not adapters: the rank of the first algorithm's config for this preset.
    first = algorithm_config(names[0], preset, args, num_steps)
    lora = LoraSettings(first.lora_rank, first.lora_alpha, tuple(first.lora_target_modules))
    policy = build_policy(args, preset, device, precision, None if args.finetune == "full" else lora)
    with tempfile.TemporaryDirectory() as folder:
        paths = None
        if args.random_reward_weights:
            tiny = args.reduced or args.preset == "tiny"
            paths = archs.save_random_reward(args.reward, Path(folder), reduced=tiny, device=device)
        reward = load_reward(args.reward, device=device, paths=paths)
    accelerator = None
    if measured or args.fsdp:
        from accelerate import Accelerator

        # Nothing prepared: the policy casts and autocasts by itself, and a sharded
        # denoiser reduces its own gradients.
        accelerator = Accelerator(cpu=device.type == "cpu")
    if args.fsdp:
        shard_denoiser(policy, accelerator)
    policy.keep_reference()
    main_process = accelerator is None or accelerator.is_main_process
    epoch = EpochPlan(trajectories, args.epochs or preset.epochs, measured,
                      args.measured_trajectories or trajectories, accelerator)
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_tflops(device, matmul_dtype)

    setting = f"{args.preset}{'-reduced' if args.reduced else ''}-{device.type}{'-' + args.tag if args.tag else ''}"
    record = {
        "setting": setting,
        "command": command_line(args),
        "args": asdict(args),
        "precision": precision,
        "resolution": image_side(policy, args.preset),
        "performance": asdict(policy.performance),
        "finetune": args.finetune,
        "processes": 1 if accelerator is None else accelerator.num_processes,
        "trained_parameters": sum(p.numel() for p in policy.trainable_parameters()),
        "reward": args.reward + (" (random weights)" if args.random_reward_weights else ""),
        "epoch_trajectories": epoch.trajectories,
        "epochs": epoch.epochs,
        "measured_trajectories": epoch.measured_trajectories if measured else None,
        "matmul_peak_tflops": peak,
        "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
        "environment": {
            "device_type": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = {"algo": name}
        try:
            measure_algorithm(row, name, args, preset, policy, reward, num_steps, peak, epoch)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        record["rows"].append(row)
        if not main_process:
            continue
        print(" ".join(f"{k}={_cell(k, v)}" for k, v in row.items()), flush=True)
        # Written after every algorithm, so a run stopped by a time limit keeps its rows.
        (out / f"{setting}.md").write_text(markdown(record))
        (out / f"{setting}.json").write_text(strict_json.dumps(record, indent=2) + "\n")
    if main_process:
        print(markdown(record))
    return record


if __name__ == "__main__":
    main(tyro.cli(PerfArgs))
