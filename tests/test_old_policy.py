"""The runner's old policy of a forward-process algorithm (`zoo.algorithm.ForwardProcessAlgorithm`):
kept for the loss, moved by `next_old_policy` and checkpointed, and sampling the epoch only
when `samples_with_old_policy` says so (NFT's runs with it on: tests/test_algo_nft.py)."""

from dataclasses import dataclass

import torch
from accelerate import Accelerator

import benchmarks.train
from benchmarks.checkpoint import load_state
from benchmarks.train import checkpoint_path, run_algorithm
from zoo.nft import NFT, NFTConfig

from helpers.rewards import Brightness
from helpers.runs import micro_job


class LaggingNFT(NFT):
    """NFT whose old policy only lags for the loss: the epoch is sampled with the current weights."""

    samples_with_old_policy = False


@dataclass(frozen=True)
class LaggingNFTConfig(NFTConfig):
    def build(self) -> LaggingNFT:
        return LaggingNFT(self)


def test_an_old_policy_that_does_not_sample_still_lags_and_is_checkpointed(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`run_algorithm` for 2 epochs of 2 groups of 2 trajectories at K = 2, one group per
    minibatch (2 updates per epoch), old-policy decay rate 0.2: after epoch 1 (2 steps) the
    old policy is 0.4·(initial weights) + 0.6·(weights after epoch 1), as with NFT's rule,
    and is checkpointed; but epoch 2 is sampled with the weights after epoch 1 (the current
    ones), not with the old policy, which differs from them."""
    config = LaggingNFTConfig(num_steps=2, group_size=2, train_batch_size=1, gradient_accumulation_steps=1, eta=0.0,
                              learning_rate=3e-2, old_policy_decay_rate=0.2, lora_rank=4, lora_alpha=4.0)
    sampled_with: list[dict] = []
    real_sample = benchmarks.train.sample_and_score

    def sample_and_score(algorithm, sampler, *args):
        sampled_with.append(sampler.policy.trainable_state())
        return real_sample(algorithm, sampler, *args)

    first = {}
    real_save = benchmarks.train.save_state

    def save(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            first.update(state)

    monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
    monkeypatch.setattr(benchmarks.train, "save_state", save)
    run_algorithm("nft", config, 0, micro_job(tiny_pipeline_dir, tmp_path, 2), Brightness(),
                  {"brightness": Brightness()}, Accelerator(cpu=True))

    final = load_state(checkpoint_path(tmp_path, "nft", 0))
    initial, epoch2 = sampled_with
    trained = {name: first["lora"][name.replace(".default.", ".")] for name in initial}  # after epoch 1
    for name in initial:
        torch.testing.assert_close(first["old_policy"][name], 0.4 * initial[name] + 0.6 * trained[name])
        assert torch.equal(epoch2[name], trained[name])
    assert max(float((first["old_policy"][n] - trained[n]).abs().max()) for n in initial) > 1e-4  # old != current
    assert final["done"] and final["old_policy"].keys() == initial.keys()
