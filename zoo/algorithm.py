"""The interface every alignment algorithm implements, in three kinds.

An algorithm is tensor math only: it never sees the model, accelerate, files or loggers.
The runner (benchmarks/) drives it each epoch, telling it where training stands
(`EpochContext`: the epoch, the run's epochs, the epoch's generator).

Replay algorithms (`ReplayAlgorithm`: DDPO, REBEL, D3PO, SDPO, GRPO) read the sampler's
transition log-probs:

1. the runner asks for the epoch's per-step noise levels (`noise_levels`, before anything
   is drawn; None samples every step at the config's eta) and samples `needs.group_size`
   trajectories per prompt as `needs` asks (shared x_T or not, x̂0 recorded or not,
   reference log-probs or not, final images decoded or not);
2. decodes and scores the images that `reward_steps` names (terminal images by default,
   which `needs.final_images` must then ask for);
3. `shape_rewards` turns those scores into per-trajectory returns, locally;
4. gathers prompts and returns from every process and calls `advantages` on the global
   batch (identical on every process), then keeps its own slice;
5. for each minibatch and chunk of the steps that `trained_steps` names (all K by
   default), recomputes log-probs under the current weights (and, if `needs` asks, the
   KL to the frozen base model) and calls `loss`, which returns (loss, metrics).

Forward-process algorithms (`ForwardProcessAlgorithm`: DiffusionNFT) replace step 5 and
read no log-probs. When `needs_old_policy`, the runner keeps an old policy, a copy of the
adapter weights, which starts as the current weights, samples the epoch with it (step 1;
with the current weights instead when `samples_with_old_policy` is off), and after the
epoch's updates is replaced by `next_old_policy(old, current, optimizer_updates)`; it is
checkpointed with the run. `advantages` turns the rewards into
per-trajectory weights as usual (NFT: optimality probabilities). Step 5 becomes: for each
minibatch and position j of every trajectory's shuffled step order, the runner noises each
trajectory's final clean latent x0 (`Trajectory.final_latents`) to the timestep t of step j
with fresh noise ε, x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, predicts ε at x_t without
classifier-free guidance under the old policy's weights (no gradient; with
`needs_old_policy`), under the frozen base model when `needs.reference_prediction` asks (no
gradient), and under the current weights (with gradient), and calls `loss` with
`ForwardLossInputs`. Flow models are noised on their own path, x_σ = (1-σ)·x0 + σ·ε, and
predict the velocity ε - x0 (`ForwardLossInputs` is written for both). One backward pass
per call, so `loss_calls_per_update` keeps its default (accumulation x K).

Reward back-propagation (`RewardBackpropAlgorithm`: DRaFT, AlignProp; zoo/draft.py) is the
third kind: no log-probs, advantages or stat tracker. For each minibatch the runner
(`benchmarks.epochs.reward_backprop_epoch`) samples with the current weights, the steps
before the last `grad_steps()` without gradients and those with them, decodes, scores with
the reward's graph kept, and back-propagates `loss(rewards)`.

Each algorithm's config subclasses `TrainingConfig`, which holds the fields the runner reads
from every config, and whose `build()` makes the algorithm.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from zoo.kernels import FLOW_SDES, FlowSDE, KLForm, takes_flow_sde
from zoo.stat_tracking import NoStatTracker
from zoo.trajectory import Trajectory


@dataclass(frozen=True)
class SamplingNeeds:
    group_size: int
    """Trajectories sampled per prompt: 1 (DDPO), 2 (pair methods)."""
    shared_noise: bool
    """Whether the members of a group start from the same x_T."""
    record_pred_x0: bool = False
    """Whether the sampler keeps x̂0 at every step (SDPO's dense rewards need it)."""
    reference_log_probs: bool = False
    """Whether the loss needs log-probs under the frozen base model (adapter disabled)."""
    final_images: bool = True
    """Whether the sampler decodes each trajectory's final latent into `Trajectory.images`:
    the images scored when `reward_steps` returns None. An algorithm whose `reward_steps`
    always names steps (SDPO scores decoded x̂0) turns it off, which saves the VAE decode of
    every final image."""
    whole_trajectory_loss: bool = False
    """Whether one loss term spans all K steps of a trajectory (REBEL's sequence ratio),
    so the runner must pass every step of a minibatch to one `loss` call. (Its backward
    may still run in chunks of steps, with the exact gradient: see
    `benchmarks.loss_calls.minibatch_losses`.)"""
    same_step_order_in_group: bool = True
    """Whether the members of a group see their steps in the same shuffled order."""
    kl_to_reference: bool = False
    """Whether each `loss` call needs the KL of every trained transition's Gaussian under the
    current weights to the frozen base model's (adapter disabled): one more UNet call per
    loss call, without gradients (GRPO's β > 0). Per-step losses only."""
    kl_form: KLForm = "exact"
    """With `kl_to_reference`: the exact Gaussian KL, or Flow-GRPO's, the exact one times the
    flow step's size σ - σ' (`TrajectorySampler.log_prob_and_kl`; flow samplers only)."""
    detach_unconditional: bool = False
    """Whether the replayed log-probs' classifier-free guidance detaches the unconditional
    prediction (`Policy.unconditional_detached`: same value, gradient through the
    conditional half only), as flow_grpo's training log-prob does. No effect without
    guidance."""
    reference_prediction: bool = False
    """For a `ForwardProcessAlgorithm`: whether `loss` also needs the frozen base model's
    prediction (adapter disabled) at each x_t."""

    def __post_init__(self) -> None:
        if self.kl_to_reference and self.whole_trajectory_loss:
            raise ValueError(
                "kl_to_reference is computed per loss call, and a whole-trajectory loss split into chunks of "
                "steps would see only its chunk's KL: ask for one or the other."
            )


@dataclass
class LossInputs:
    """One minibatch of transitions: p groups, G members, S steps of each trajectory."""

    log_probs: torch.Tensor  # (p, G, S) under the current weights, carries the gradient
    old_log_probs: torch.Tensor  # (p, G, S) recorded at sampling time
    advantages: torch.Tensor  # (p, G, S)
    step_index: torch.Tensor  # (p, G, S) long, k = 0 for the first (noisiest) step
    ref_log_probs: torch.Tensor | None = None  # (p, G, S) under the frozen base model
    # (p, G, S) KL(current || base) of each transition's Gaussian, averaged over the latent's
    # elements, carrying the gradient (`needs.kl_to_reference`; `zoo.kernels.gaussian_kl`)
    kl_to_reference: torch.Tensor | None = None


@dataclass
class ForwardLossInputs:
    """One minibatch of forward-process examples (`ForwardProcessAlgorithm`): p groups of
    G trajectories, each trajectory's final clean latent x0 noised to one timestep t of the
    sampler's schedule (`TrajectorySampler.forward_process`): x_t = sqrt(ᾱ_t)·x0 +
    sqrt(1-ᾱ_t)·ε for ε-prediction models, x_σ = (1-σ)·x0 + σ·ε for flow models.
    Predictions are the model's (ε̂, or the velocity v̂) at (x_t, t, the trajectory's
    prompt) without classifier-free guidance, in float32. Both parametrisations are linear
    in the prediction: x̂0 - x0 = -x0_scale·(prediction - target)."""

    prediction: torch.Tensor  # (p, G, C, h, w) under the current weights, carries the gradient
    old_prediction: torch.Tensor | None  # (p, G, C, h, w) under the old policy's weights, no gradient
    # (`ForwardProcessAlgorithm.needs_old_policy`; None without)
    target: torch.Tensor  # (p, G, C, h, w) the exact prediction at x_t: ε, or ε - x0 (flow)
    x0_scale: torch.Tensor  # (p, G) x̂0's error per unit of prediction error: sqrt((1-ᾱ_t)/ᾱ_t), or σ
    advantages: torch.Tensor  # (p, G) `advantages` of each trajectory at the step that chose t
    ref_prediction: torch.Tensor | None = None  # (p, G, C, h, w) under the frozen base model, no gradient


@dataclass(frozen=True)
class EpochContext:
    """Where training stands when an epoch starts, as an algorithm's per-epoch choices
    (`noise_levels`, `trained_steps`) read it."""

    epoch: int
    """The epoch about to be trained, 0 for the first."""
    epochs: int
    """The run's epochs."""
    generator: torch.Generator
    """The epoch's generator (seeded by seed and epoch, the same on every process): every
    draw of the epoch comes from it, in the order the runner makes them, for the global
    batch (each process keeps its shard of what is drawn per group)."""

    @property
    def progress(self) -> float:
        """The fraction of the run's epochs done before this one, in [0, 1)."""
        return self.epoch / self.epochs


class Algorithm(abc.ABC):
    """Base class of the algorithms that score sampled trajectories and weight them by
    advantages (`ReplayAlgorithm`, `ForwardProcessAlgorithm`): subclasses set `needs` and
    implement `new_tracker`, `advantages` and `loss`."""

    needs: SamplingNeeds

    def noise_levels(self, context: EpochContext, num_steps: int) -> torch.Tensor | None:
        """(K,) float noise levels the epoch's trajectories are sampled at, decided before
        anything is sampled (0: the ODE at that step, which has no log-prob, so it must not
        be trained by a replay loss); None samples every step at the config's eta. Any
        draw comes first from `context.generator`."""
        return None

    def trained_steps(self, context: EpochContext, num_prompts: int, group_size: int) -> torch.Tensor | None:
        """(P, G, S) long: the step indices of each trajectory that the epoch trains (S the
        config's `trained_steps_per_trajectory`, the same for every trajectory), drawn from
        `context.generator` after sampling and advantages; None trains all K steps. The
        other steps are sampled but never trained."""
        return None

    def reward_steps(self, traj: Trajectory) -> torch.Tensor | None:
        """(P, G, M) step indices whose decoded x̂0 is scored, or None to score the final
        images only (one reward call per trajectory; `needs.final_images` must be on)."""
        return None

    def shape_rewards(self, traj: Trajectory, scores: torch.Tensor) -> torch.Tensor:
        """Per-trajectory returns from the scores of `reward_steps`, computed locally.

        scores: (P, G) for final images, or (P, G, M) for `reward_steps`.
        Returns (P, G) terminal or (P, G, K) per-step returns.
        """
        return scores

    @abc.abstractmethod
    def new_tracker(self) -> Any:
        """A fresh statistics tracker (its `state_dict` is saved with checkpoints)."""

    @abc.abstractmethod
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: Any) -> torch.Tensor:
        """(P, G, K) advantages for the global batch; updates `tracker`. No gradient."""


class ReplayAlgorithm(Algorithm):
    """An algorithm whose loss replays stored transitions, reading their log-probs under
    the current weights (step 5 of the module docstring)."""

    @abc.abstractmethod
    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss for one minibatch and detached scalar metrics to log."""


class ForwardProcessAlgorithm(Algorithm):
    """An algorithm whose loss trains on each trajectory's final clean latent noised again
    by the forward process (the module docstring), reading no log-probs."""

    needs_old_policy: bool = True
    """Whether the runner keeps an old policy that samples the epoch and whose prediction
    `loss` reads (`ForwardLossInputs.old_prediction`), moved by `next_old_policy`; False
    samples with the current weights and makes no old prediction."""
    samples_with_old_policy: bool = True
    """With `needs_old_policy`: whether the old policy also samples the epoch (NFT); False
    samples with the current weights and keeps the old policy for `loss` alone (a lagging
    average of the weights that the loss holds the current ones near)."""

    @abc.abstractmethod
    def loss(self, inputs: ForwardLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss for one minibatch and detached scalar metrics to log."""

    def next_old_policy(
        self, old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], optimizer_updates: int
    ) -> dict[str, torch.Tensor]:
        """With `needs_old_policy`: the old policy's adapter weights for the next epoch, from
        this epoch's old and current weights (name -> tensor) once `optimizer_updates`
        optimizer steps have been taken in all. No gradient."""
        raise NotImplementedError(f"{type(self).__name__} keeps no old policy (needs_old_policy is off)")


class RewardBackpropAlgorithm(abc.ABC):
    """Base class of algorithms that back-propagate a differentiable reward's gradient
    through the last sampling steps into the LoRA: subclasses set `needs` (the group size
    and `whole_trajectory_loss`, one loss call per minibatch, are what the runner reads)
    and implement `grad_steps` and `loss`."""

    needs: SamplingNeeds

    def new_tracker(self) -> NoStatTracker:
        """No reward statistics: the loss is the reward itself."""
        return NoStatTracker()

    @abc.abstractmethod
    def grad_steps(self, generator: torch.Generator) -> int:
        """How many of the last sampling steps the next minibatch back-propagates through
        (1 to K); any randomness is drawn from `generator`, the epoch's."""

    @abc.abstractmethod
    def loss(self, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rewards (B,) of one minibatch, carrying the graph back to the LoRA -> scalar loss
        and detached scalar metrics to log."""


FieldRule = tuple[str, str, Callable[[Any], bool]]
"""(field, rule, predicate): a value the predicate rejects is refused with the sentence
"<field> <rule> (got <value>)."."""


def check_field_rules(config: Any, rules: tuple[FieldRule, ...]) -> None:
    """Raises ValueError, naming the field, for the first value that breaks its rule."""
    for name, rule, holds in rules:
        value = getattr(config, name)
        if not holds(value):
            raise ValueError(f"{name} {rule} (got {value!r}).")


def ppo_clip_loss(
    inputs: LossInputs, clip_range: float, adv_clip_max: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's per-step PPO-clip term, which GRPO shares: ratio = exp(logp - old_logp),
    A_c = clamp(A, ±adv_clip_max), mean(max(-A_c·ratio, -A_c·clamp(ratio, 1 ± clip_range))),
    with the reference's metrics approx_kl = 0.5·mean((logp - old_logp)²) and clipfrac =
    mean(|ratio - 1| > clip_range)."""
    log_ratio = inputs.log_probs - inputs.old_log_probs
    ratio = torch.exp(log_ratio)
    advantages = inputs.advantages.clamp(-adv_clip_max, adv_clip_max)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    metrics = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
    }
    return loss, metrics


def check_tracker_sizes(config: Any, statistics: str) -> None:
    """Refuses a stat tracker whose buffer can never hold `tracker_min_count` values, since
    its `statistics` ("per-prompt", "per-step") would then never replace the batch's."""
    if config.tracker_min_count > config.tracker_buffer_size:
        raise ValueError(
            f"tracker_min_count ({config.tracker_min_count}) exceeds tracker_buffer_size "
            f"({config.tracker_buffer_size}), so {statistics} statistics would never be used."
        )


_TRAINING_RULES: tuple[FieldRule, ...] = (
    ("learning_rate", "must be positive", lambda v: v > 0),
    ("adam_beta1", "must lie in [0, 1)", lambda v: 0 <= v < 1),
    ("adam_beta2", "must lie in [0, 1)", lambda v: 0 <= v < 1),
    ("adam_epsilon", "must be positive", lambda v: v > 0),
    ("weight_decay", "must be non-negative", lambda v: v >= 0),
    ("max_grad_norm", "must be positive, or None for no clipping", lambda v: v is None or v > 0),
    ("train_batch_size", "must be at least 1", lambda v: v >= 1),
    ("gradient_accumulation_steps", "must be at least 1", lambda v: v >= 1),
    ("num_inner_epochs", "must be at least 1", lambda v: v >= 1),
    ("lora_rank", "must be at least 1", lambda v: v >= 1),
    ("lora_alpha", "must be positive", lambda v: v > 0),
    ("num_steps", "must be at least 1", lambda v: v >= 1),
    ("guidance_scale", "must be at least 1 (1 means no guidance)", lambda v: v >= 1),
    ("flow_sde", f"must be one of {', '.join(FLOW_SDES)}", lambda v: v in FLOW_SDES),
)
"""The values of the shared fields that every `TrainingConfig` refuses."""


@dataclass(frozen=True)
class TrainingConfig(abc.ABC):
    """The fields the runner reads from every algorithm's config: optimizer, minibatches,
    LoRA adapter and the sampler whose transitions are trained on.

    Defaults are ddpo-pytorch's `config/base.py`, which the D3PO and SDPO reference code
    forked. An algorithm's config subclasses this, re-declares a field only where its
    reference publishes another default, adds its own fields, extends `__post_init__` with
    its own rules, and implements `build`.
    """

    learning_rate: float = 3e-4
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value before each optimizer step; None disables clipping."""
    train_batch_size: int = 1
    """Groups per minibatch, per process; a group is one prompt's `needs.group_size` trajectories (one, or a pair)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step; each minibatch contributes all of its K steps (see `loss_calls_per_update`)."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    lora_rank: int = 4
    """LoRA rank of the UNet adapter."""
    lora_alpha: float = 4.0
    """LoRA alpha (the adapter's scale is alpha / rank)."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules that receive a LoRA adapter."""
    sampler: Literal["ddim", "lcm", "flow"] = "ddim"
    """Sampler whose transitions are trained on."""
    num_steps: int = 50
    """Sampling steps K during training."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale, at sampling and when recomputing log-probs (1 = no guidance)."""
    eta: float = 1.0
    """DDIM eta when `sampler` is ddim, the SDE's noise level when it is flow (positive for losses that read log-probs: eta = 0 has no log-density); unused by LCM."""
    flow_sde: FlowSDE = "flow-grpo"
    """The flow sampler's SDE, Flow-GRPO's or DanceGRPO's (`zoo.kernels.SamplerConfig.flow_sde`; their published eta: 0.7, 0.3); other samplers take only flow-grpo."""

    def __post_init__(self) -> None:
        # inf passes every "must be positive" rule and NaN reads as a value: refused for
        # every float field, the subclasses' own included, before any rule reads them.
        for config_field in dataclasses.fields(self):
            value = getattr(self, config_field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{config_field.name} must be a finite number (got {value!r}).")
        check_field_rules(self, _TRAINING_RULES)
        if not takes_flow_sde(self.sampler, self.flow_sde):
            raise ValueError(f"flow_sde {self.flow_sde} is an SDE of the flow sampler, not of {self.sampler}.")
        if self.sampler in ("ddim", "flow") and self.eta < 0:
            raise ValueError(f"eta must be non-negative (got {self.eta}).")
        if self.sampler in ("ddim", "flow") and self.eta == 0 and self.reads_log_probs:
            raise ValueError(
                f"eta must be positive for training: the {self.sampler} sampler with eta = {self.eta} has no log-density."
            )

    @property
    def trained_steps_per_trajectory(self) -> int:
        """Steps of each trajectory that are trained: all K, unless the algorithm trains a
        window of them (`Algorithm.trained_steps`, which must return this many)."""
        return self.num_steps

    @property
    def reads_log_probs(self) -> bool:
        """Whether the loss reads the sampler's transition log-probs, so that deterministic
        DDIM (eta = 0, no density) cannot train it; forward-process losses (zoo/nft.py) and
        reward back-propagation (zoo/draft.py) read none."""
        return True

    @property
    def loss_calls_per_update(self) -> int:
        """`loss` calls (backward passes) between optimizer steps: gradient_accumulation_steps
        x K, as ddpo-pytorch's accelerator counts them (every step of every accumulated
        minibatch; every trained step, for an algorithm that trains a window)."""
        return self.gradient_accumulation_steps * self.trained_steps_per_trajectory

    @property
    def steps_in_outer_loop(self) -> bool:
        """Whether step j of every minibatch is trained before step j + 1; by default every
        step of a minibatch is trained before the next minibatch, as in ddpo-pytorch."""
        return False

    @abc.abstractmethod
    def build(self) -> Algorithm:
        """The algorithm these hyperparameters configure."""
