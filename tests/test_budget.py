"""What each algorithm's epoch costs: the optimizer updates and backward passes that
`benchmarks.plan.epoch_budget` declares are the ones the training loop takes, REBEL steps
the optimizer once per `gradient_accumulation_steps` minibatches (rlcm's latest commit),
and the tiny preset gives every algorithm the same updates per epoch."""

from dataclasses import fields, replace

import pytest
import torch
from accelerate import Accelerator

from benchmarks.cli import checked_config, preset_algo_configs
from benchmarks.plan import epoch_budget
from benchmarks.presets import tiny
from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from zoo.algorithm import Algorithm, EpochContext
from zoo.registry import ALGORITHMS
from zoo.rebel import REBELConfig
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.training import CountingAdamW


def test_rebel_steps_the_optimizer_once_per_accumulated_minibatches_at_k4():
    """rlcm b8330ed (`scripts/main.py` lines 43-48) multiplies accumulation by K for PPO
    only. 64 trajectories = 32 pairs; batch 2 -> 16 minibatches of one whole-trajectory
    loss call each; accumulation 1 -> 16 updates (815ef1b's x K gave 16 / 4 = 4)."""
    config = REBELConfig(sampler="ddim", num_steps=4, train_batch_size=2, gradient_accumulation_steps=1)
    assert config.loss_calls_per_update == 1
    assert epoch_budget(config, 64) == {"loss_calls": 16, "optimizer_updates": 16}
    assert epoch_budget(replace(config, gradient_accumulation_steps=4), 64)["optimizer_updates"] == 4


def test_tiny_preset_gives_every_algorithm_eight_updates_of_32_transitions_per_epoch():
    """64 trajectories at K = 4 are 256 transitions; 8 updates each average 32 of them, for
    every algorithm (SDPO's per-step updates included)."""
    preset = tiny()
    configs = preset_algo_configs(preset, preset.reward)
    for name in ALGORITHMS:
        config = checked_config(name, getattr(configs, name))
        budget = epoch_budget(config, preset.trajectories_per_epoch)
        assert budget["optimizer_updates"] == 8, name
        assert preset.trajectories_per_epoch * config.num_steps // budget["optimizer_updates"] == 32


@pytest.mark.parametrize("name", [n for n, config in ALGORITHMS.items() if isinstance(config().build(), Algorithm)])
def test_the_loop_takes_the_declared_updates_and_counts_backward_passes(tiny_pipeline_dir, name):
    """8 trajectories at K = 4, batch 2 groups, accumulation 2: the optimizer steps exactly
    `epoch_budget`'s updates, and the loop reports them with its backward passes (REBEL's
    4-step losses in chunks of 2 steps: two backward passes per minibatch). A config whose
    group size is a field (GRPO's 8, NFT's 24 by default) takes groups of 2. Reward
    back-propagation's epoch (DRaFT) is checked the same way in tests/test_algo_draft.py."""
    group_field = {"group_size": 2} if "group_size" in {f.name for f in fields(ALGORITHMS[name])} else {}
    config = replace(ALGORITHMS[name](), sampler="ddim", num_steps=4, guidance_scale=1.0, train_batch_size=2,
                     gradient_accumulation_steps=2, **group_field)
    algorithm = config.build()
    group_size = algorithm.needs.group_size
    trajectories = 8
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 4, 1.0, 1.0))
    generator = torch.Generator().manual_seed(0)
    traj = sampler.sample(["a cat"] * (trajectories // group_size), group_size=group_size, generator=generator,
                          record_pred_x0=algorithm.needs.record_pred_x0,
                          reference_log_probs=algorithm.needs.reference_log_probs)
    advantages = torch.randn(traj.log_probs.shape, generator=generator)
    optimizer = CountingAdamW(policy.trainable_parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)
    _, counts = train_on_batch(algorithm, config, sampler, traj, advantages, optimizer, accelerator,
                             EpochContext(0, 1, generator), TrainLoop(steps_per_backward=2), False)

    budget = epoch_budget(config, trajectories)
    assert budget["optimizer_updates"] >= 1
    assert optimizer.optimizer.steps == counts["optimizer_updates"] == budget["optimizer_updates"]
    chunks = 2 if algorithm.needs.whole_trajectory_loss else 1
    assert counts["backward_passes"] == budget["loss_calls"] * chunks


def test_a_shard_holds_its_equal_slice_and_weights_a_minibatch_by_its_share():
    """Worked numbers: 8 groups over 2 processes; process 1 holds groups 4-7. Of the global
    minibatch (1, 5, 6), it trains 5 and 6 at weight 2 x 2/3 (DDP halves the sum of the
    two processes' gradients: 4/3 x mean of its two + 2/3 x process 0's one, halved, is the
    mean of the three); process 0 trains group 1 at 2/3. One process: all of it at 1."""
    from benchmarks.epochs import Shard

    shard = Shard(1, 8, 2)
    assert shard.size == 4
    minibatch = torch.tensor([1, 5, 6])
    assert shard.held(minibatch).tolist() == [False, True, True]
    assert shard.weight(2, 3) == pytest.approx(4 / 3)
    assert Shard(0, 8, 2).weight(1, 3) == pytest.approx(2 / 3)
    assert Shard(0, 8).weight(3, 3) == 1.0 and Shard(0, 8).held(minibatch).all()


@pytest.mark.parametrize("name, trajectories, batch, message", [
    ("ddpo", 12, 2, r"--trajectories-per-epoch 12 makes 12 groups of ddpo \(1 each\), which the 8 processes "
                    r"\(accelerate launch --num_processes 8\) cannot share equally: pass a multiple of 8"),
    ("draft", 16, 2, r"--draft.train-batch-size 2: the 8 processes .* pass a multiple of 8"),
])
def test_a_world_size_that_cannot_share_the_budget_is_refused_naming_the_flag(name, trajectories, batch, message):
    from benchmarks.cli import UsageError
    from benchmarks.plan import check_batch_sizes

    config = replace(ALGORITHMS[name](), sampler="ddim", num_steps=2, train_batch_size=batch,
                     gradient_accumulation_steps=1)
    check_batch_sizes(name, config, trajectories, 1)  # one process takes any size that divides
    with pytest.raises(UsageError, match=message):
        check_batch_sizes(name, config, trajectories, 8)
