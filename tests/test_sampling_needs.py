"""No work nobody reads: the sampler decodes and keeps only what its caller reads (issue 17).
SDPO's training epoch decodes no final image (it scores decoded x̂0), evaluation keeps no
per-step tensor and computes no log-prob, what is kept is bit-identical to sampling
everything, and reading what was not kept names the argument that keeps it."""

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

import benchmarks.evaluate
import zoo.sampling
from benchmarks.evaluate import EvalSettings, evaluate
from benchmarks.loop import TrainLoop
from benchmarks.rollout import reward_inputs, sample_and_score
from zoo.algorithm import Algorithm
from zoo.ddpo import DDPOConfig
from zoo.loading import load_policy
from zoo.policy import Policy
from zoo.registry import ALGORITHMS
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler
from zoo.sdpo import SDPOConfig
from zoo.trajectory import NotSampled

from helpers.policies import policy_with_random_adapter
from helpers.rewards import Brightness

PROMPTS = ["a cat", "a dog", "a fox", "a cow"]
PER_STEP = ("latents", "next_latents", "log_probs")


@pytest.fixture(scope="module")
def policy(tiny_pipeline_dir) -> Policy:
    return policy_with_random_adapter(tiny_pipeline_dir)


def count_decoded_images(monkeypatch, policy: Policy) -> list[int]:
    """Wraps `policy.decode`: the returned list gets the number of latents of each call."""
    decoded: list[int] = []
    real = policy.decode

    def counting(latents):
        decoded.append(latents.shape[0])
        return real(latents)

    monkeypatch.setattr(policy, "decode", counting)
    return decoded


def test_sdpos_epoch_decodes_the_scored_x0_and_no_final_image(policy, monkeypatch):
    """4 pairs of 3 steps, in sampling calls of 2 pairs: SDPO scores x̂0 at 3 steps of each
    of its 8 trajectories, so 24 images are decoded, not 24 + 8 final images. Its
    trajectories and scores are those of the same sampling with the final images decoded."""
    algorithm = SDPOConfig(num_steps=3).build()
    assert not algorithm.needs.final_images
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 1.0))
    loop = TrainLoop(sample_batch_size=4, overlap_rewards=False)
    decoded = count_decoded_images(monkeypatch, policy)
    traj, scores, failure = sample_and_score(algorithm, sampler, PROMPTS, torch.Generator().manual_seed(0),
                                             Brightness(), loop)
    assert failure is None and scores.shape == (4, 2, 3)
    assert sum(decoded) == 4 * 2 * 3
    with pytest.raises(NotSampled, match="final_images"):
        traj.images

    algorithm.needs = replace(algorithm.needs, final_images=True)
    decoded.clear()
    full, full_scores, _ = sample_and_score(algorithm, sampler, PROMPTS, torch.Generator().manual_seed(0),
                                            Brightness(), loop)
    assert sum(decoded) == 4 * 2 * 3 + 4 * 2
    assert torch.equal(scores, full_scores)
    for name in (*PER_STEP, "pred_x0", "timesteps"):
        assert torch.equal(getattr(traj, name), getattr(full, name)), name


def test_an_algorithm_that_scores_final_images_decodes_and_scores_each_once(policy, monkeypatch):
    """DDPO scores the final images: one decode per trajectory, and its scores are the
    reward of exactly the images that `sample` decodes with everything recorded."""
    algorithm = DDPOConfig(num_steps=3).build()
    assert algorithm.needs.final_images
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 2.0))
    decoded = count_decoded_images(monkeypatch, policy)
    traj, scores, _ = sample_and_score(algorithm, sampler, PROMPTS, torch.Generator().manual_seed(1), Brightness(),
                                       TrainLoop(sample_batch_size=None, overlap_rewards=False))
    assert decoded == [4]
    assert torch.equal(scores, Brightness().score(traj.images.flatten(0, 1), PROMPTS).view(4, 1))
    # The same draws: x_T, then the epoch's step noise, as `sample_and_score` takes them.
    generator = torch.Generator().manual_seed(1)
    initial = sampler.initial_noise(4, 1, False, generator)
    step_noise = torch.randn((4, 1, 3, *policy.latent_shape), generator=generator)
    alone = sampler.sample(PROMPTS, initial_noise=initial, step_noise=step_noise)
    assert torch.equal(traj.images, alone.images)


@pytest.mark.parametrize("kind,guidance", [("ddim", 2.0), ("lcm", 8.0)])
def test_what_is_kept_does_not_depend_on_what_else_is_kept(request, kind, guidance):
    """Leaving out the per-step tensors or the final images changes neither the noise drawn
    nor anything kept: bit-identical images, latents, log-probs and x̂0."""
    policy = load_policy(request.getfixturevalue(f"tiny_{'lcm_' if kind == 'lcm' else ''}pipeline_dir"))
    sampler = TrajectorySampler(policy, SamplerConfig(kind, 3, 1.0, guidance))

    def sample(**keep):
        return sampler.sample(PROMPTS[:2], group_size=2, generator=torch.Generator().manual_seed(2),
                              record_pred_x0=True, **keep)

    everything = sample()
    images_only = sample(record_transitions=False)
    no_images = sample(final_images=False)
    assert torch.equal(images_only.images, everything.images)
    assert torch.equal(images_only.pred_x0, everything.pred_x0)
    for name in (*PER_STEP, "pred_x0"):
        assert torch.equal(getattr(no_images, name), getattr(everything, name)), name
    assert all(images_only.__dict__[name] is None for name in PER_STEP)
    assert no_images.__dict__["images"] is None


def test_evaluation_keeps_no_per_step_tensor_and_computes_no_log_prob(policy, monkeypatch):
    """Evaluation reads only the images: its trajectories hold no latents, next latents or
    log-probs, no log-density is computed, and its rows and strips are bit-identical to an
    evaluation that samples everything (the sampler's defaults, as before)."""
    settings = EvalSettings(prompts=("a cat", "a dog", "a fox"), step_counts=(1, 2), samples_per_prompt=3,
                            batch_size=4, sampler="ddim", guidance_scale=2.0, eta=1.0, seed=0)
    accelerator = Accelerator(cpu=True)
    real_sample, real_log_prob = TrajectorySampler.sample, zoo.sampling.gaussian_log_prob
    sampled, log_prob_calls = [], []

    def recording_sample(self, *args, **kwargs):
        traj = real_sample(self, *args, **kwargs)
        sampled.append(traj)
        return traj

    def counting_log_prob(*args):
        log_prob_calls.append(1)
        return real_log_prob(*args)

    monkeypatch.setattr(TrajectorySampler, "sample", recording_sample)
    monkeypatch.setattr(zoo.sampling, "gaussian_log_prob", counting_log_prob)
    stats, strips = evaluate(policy, {"brightness": Brightness()}, settings, accelerator)
    assert len(sampled) == 6 and not log_prob_calls
    for traj in sampled:
        assert all(traj.__dict__[name] is None for name in PER_STEP)

    def sample_everything(self, *args, **kwargs):
        return real_sample(self, *args, **{**kwargs, "record_transitions": True})

    monkeypatch.setattr(TrajectorySampler, "sample", sample_everything)
    before, strips_before = evaluate(policy, {"brightness": Brightness()}, settings, accelerator)
    assert log_prob_calls
    assert before == stats
    assert strips.keys() == strips_before.keys() == {1, 2}
    assert all(torch.equal(strips[k], strips_before[k]) for k in strips)


def test_reading_what_was_not_kept_names_the_argument_that_keeps_it(policy):
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2, 1.0, 2.0))
    traj = sampler.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(3), record_transitions=False,
                          final_images=False)
    assert (traj.num_prompts, traj.group_size, traj.num_steps) == (2, 1, 2)
    for name in (*PER_STEP, "final_latents"):
        with pytest.raises(NotSampled, match=r"record_transitions=True"):
            getattr(traj, name)
    with pytest.raises(NotSampled, match=r"final_images=True.*SamplingNeeds\.final_images"):
        traj.images
    # The trainer scoring final images that its algorithm's needs did not ask for.
    with pytest.raises(NotSampled, match=r"SamplingNeeds\.final_images"):
        reward_inputs(DDPOConfig(num_steps=2).build(), traj, policy)
    with pytest.raises(ValueError, match="record_transitions=True"):
        sampler.sample(PROMPTS[:2], reference_log_probs=True, record_transitions=False)


@pytest.mark.parametrize("name", [n for n, config in ALGORITHMS.items() if isinstance(config().build(), Algorithm)])
def test_every_algorithm_asks_the_sampler_for_the_images_it_scores(name, policy):
    """The trainer's epoch of every log-prob algorithm scores its rewards: an algorithm that
    turned `needs.final_images` off while scoring final images would raise `NotSampled`."""
    algorithm = ALGORITHMS[name](num_steps=2).build()
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2, 1.0, 2.0))
    _, scores, failure = sample_and_score(algorithm, sampler, ["a cat"], torch.Generator().manual_seed(4), Brightness(),
                                          TrainLoop(overlap_rewards=False))
    assert failure is None and torch.isfinite(scores).all()
