"""The training loop's switches and the ways it stops, shared by every part of it
(`benchmarks.rollout`, `benchmarks.epochs`, `benchmarks.train`) and by the runner that
reports them (`benchmarks.run`)."""

from __future__ import annotations

from dataclasses import dataclass


class RunStopped(RuntimeError):
    """The run cannot go on; the checkpoint on disk is the last good epoch's."""


class TrainingDiverged(RunStopped):
    """The loss or the adapter weights became NaN or infinite."""


class RewardFailures(RunStopped):
    """The training reward failed (raised, or returned NaN/inf) in more epochs than allowed."""


@dataclass(frozen=True)
class TrainLoop:
    """Speed and memory switches of the training loop. Like `Performance`, none of them
    changes what is computed beyond floating-point rounding, so a resumed run may change
    them: an epoch's noise is drawn before it is split into sampling calls. Rounding is not
    nothing over a long run, though: a different `micro_batch` puts DDPO and SDPO 0.03-0.09
    of the gold apart after 40 epochs (results/perf/make-bench-cpu.md), the spread of
    another seed, so a run whose records must equal another's keeps its switches."""

    sample_batch_size: int | None = None
    """Trajectories per sampling call, a multiple of each algorithm's group size (default:
    the preset's). Smaller calls bound the sampler's memory and let rewards overlap."""
    overlap_rewards: bool | None = None
    """Score each sampling call's images in a background thread (on CUDA, its own stream)
    while the next call samples. None: on CUDA only; on a CPU the reward and the sampler
    compete for the same cores."""
    steps_per_backward: int = 8
    """Losses over whole trajectories (REBEL) recompute at most this many steps of a
    minibatch per backward pass, so their memory does not grow with K. With fewer than K,
    one extra forward pass without gradients first gives every step's log-prob, and each
    chunk's backward gets the whole loss's exact gradient (the other steps enter as
    constants)."""
    micro_batch: int | None = None
    """Groups per UNet call with gradients when training (a group is one prompt's
    trajectories: one, a pair, G). The algorithm's minibatch (`train_batch_size` groups)
    and accumulation define what one update averages over; this only decides how that
    work reaches the UNet. Larger than the minibatch: the loss calls of one optimizer
    update are joined into calls of up to this many groups (fewer, larger kernels; each
    loss call's loss is still computed on its own). Smaller: a minibatch's loss call is
    cut into pieces of this many groups, after one extra forward pass without gradients
    over the whole call, and each piece's backward gets the whole loss's exact gradient
    (the other groups enter as constants). None: on a CPU, one UNet call per loss call;
    on CUDA, the largest that fits (`fitting_micro_batch`): the first loss call of the
    run is trained alone while its memory is measured, and the choice, logged, holds for
    the rest of the run. Reward
    back-propagation (DRaFT) samples through the UNet in its minibatch: this cuts it (with
    the extra pass) but does not join minibatches."""
