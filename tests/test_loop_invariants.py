"""Invariants of the training loop (benchmarks/train.py, benchmarks/evaluate.py) that the
end-to-end runs cannot see: which transition each `loss` call trains on, with which step
and advantage, in which order, under which accumulation; which image and prompt each
score belongs to; that a resume restores the stat tracker's history and that seeds and
epochs draw their own noise; that every row of a table is evaluated on the same noise and
summarised from its finite scores; and two formulas the loop relies on (the per-step
tracker's window, the DDIM density at 0 < eta < 1).

The replay tests drive `train_on_batch` with a stand-in sampler over a coded trajectory
(helpers.training): transition (p, g, k) of group p, member g, step k carries the code
c = 100 p + 10 g + k in its x_t (x_t' = c + 0.5, the prompt embedding p, the stored
log-prob -c / 1000), and the stand-in recomputes the log-prob from x_t, checking on the
way that x_t', the step index and the prompt embedding belong to the same transition. A
recording wrapper around the real algorithm then decodes what each `loss` call received.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import benchmarks.train
from benchmarks.checkpoint import load_state
from benchmarks.evaluate import EvalSettings, evaluate
from benchmarks.epochs import step_orders, train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.train import checkpoint_path, run_algorithm
from zoo.algorithm import EpochContext, ReplayAlgorithm
from zoo.ddpo import DDPO, DDPOConfig
from zoo.registry import ALGORITHMS

from helpers.policies import policy_with_random_adapter
from helpers.rewards import Brightness
from helpers.runs import micro_job
from helpers.training import (
    REF_OFFSET, CodedSampler, RecordingSGD, ReplayRecorder, clipped_gradient, coded_trajectory, decode,
)

NUM_PROMPTS, NUM_STEPS = 6, 4


class RecordingBrightness(Brightness):
    """Brightness that keeps every score it returned and every prompt it was given."""

    def __init__(self):
        super().__init__()
        self.returned: list[torch.Tensor] = []
        self.prompts: list[str] = []

    def _score(self, images, prompts):
        scores = super()._score(images, prompts)
        self.returned.append(scores.clone())
        self.prompts += prompts
        return scores


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


# ----------------------------------------------------------------------------------------
# Replay through train_on_batch on a coded trajectory


def replay(name: str, accelerator, needs: dict | None = None, **overrides) -> SimpleNamespace:
    """One `train_on_batch` of algorithm `name` (config `overrides`, `needs` fields replaced)
    over the coded trajectory: its config, the advantages, the recorded loss calls, the
    gradients the optimizer steps saw, and the epoch's metrics."""
    config = ALGORITHMS[name](num_steps=NUM_STEPS, **overrides)
    algorithm = config.build()
    algorithm.needs = dataclasses.replace(algorithm.needs, **(needs or {}))
    group_size = algorithm.needs.group_size
    traj = coded_trajectory(NUM_PROMPTS, group_size, NUM_STEPS, algorithm.needs.reference_log_probs)
    # Distinct per (group, member, step), inside every clamp, not all of one sign.
    advantages = torch.randn(NUM_PROMPTS, group_size, NUM_STEPS, generator=torch.Generator().manual_seed(7))
    if name == "d3po":  # preferences: +1 / -1 per pair
        advantages = advantages[:, :1].sign().expand(-1, 2, -1) * torch.tensor([1.0, -1.0])[None, :, None]
    sampler = CodedSampler()
    recorder = ReplayRecorder(algorithm, sampler.policy.trainable_parameters())
    optimizer = RecordingSGD(sampler.policy.trainable_parameters())
    result = train_on_batch(recorder, config, sampler, traj, advantages.clone(), optimizer, accelerator,
                          EpochContext(0, 1, torch.Generator().manual_seed(0)), TrainLoop(), False)
    metrics = result[0] if isinstance(result, tuple) else result  # (metrics, counts), or metrics alone
    return SimpleNamespace(config=config, advantages=advantages, calls=recorder.calls, grads=optimizer.grads,
                           metrics=metrics, trained=recorder.trained)


PAIR_ALGORITHMS = [name for name in ALGORITHMS if ALGORITHMS[name]().build().needs.group_size == 2]
REPLAYED_ALGORITHMS = [
    name for name, config in ALGORITHMS.items()
    if isinstance(algorithm := config().build(), ReplayAlgorithm)
]
"""The algorithms whose loss replays stored transitions (forward-process losses train on
noised final latents: tests/test_algo_nft.py checks their examples)."""


@pytest.mark.parametrize("name", ["sdpo", "d3po", "rebel"])
def test_both_members_of_a_pair_get_the_same_step_in_every_loss_call(name, accelerator):
    """Invariant (a): with `same_step_order_in_group` (SDPO, D3PO, REBEL), member 0 and
    member 1 of a group see their steps in one shuffled order, so every `loss` call pairs
    the two members at the same step k: SDPO's Δρ and D3PO's log r_w - log r_l subtract the
    two members' log-ratios at one step and weight them with member 0's λ^k. Breaking it
    (`step_orders` drawing one order per member) makes the pair compare different steps.
    Also: the two members are those of one group, each call's step index is the step of the
    transition it carries, and x_t, x_t', the prompt embedding and the stored log-probs all
    belong to that transition (the stand-in sampler checks them)."""
    assert ALGORITHMS[name]().build().needs.same_step_order_in_group
    calls = replay(name, accelerator).calls
    assert calls
    for call in calls:
        p, g, k = decode(call.old)
        assert torch.equal(call.step_index, k)
        assert torch.equal(call.step_index[:, 0], call.step_index[:, 1])
        assert torch.equal(p[:, 0], p[:, 1])
        assert torch.equal(g, torch.arange(2)[None, :, None].expand_as(g))
        torch.testing.assert_close(call.log_probs, call.old, rtol=0, atol=0)  # recomputed = stored at θ = 0
        if call.ref is not None:
            torch.testing.assert_close(call.ref, call.old - REF_OFFSET, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", REPLAYED_ALGORITHMS)
def test_every_transition_is_trained_once_per_inner_epoch_in_a_shuffled_order(name, accelerator):
    """Each inner epoch replays every (group, member, step) that the epoch trains exactly
    once (twice with two inner epochs) and no other: every step, or those `trained_steps`
    names (a window); groups in a shuffled order and each group's steps in its own shuffled
    order (ddpo-pytorch shuffles samples and permutes the time axis per sample): a loop
    that trained some transitions twice and others never, or always in the sampled order,
    would still run. A config whose group size is a field takes groups of 2 (the coded
    trajectory holds at most 10 members)."""
    group_field = {"group_size": 2} if "group_size" in {f.name for f in dataclasses.fields(ALGORITHMS[name])} else {}
    for inner_epochs in (1, 2):
        run = replay(name, accelerator, num_inner_epochs=inner_epochs, **group_field)
        calls = run.calls
        group_size = run.config.build().needs.group_size
        expected = torch.ones(NUM_PROMPTS, group_size, NUM_STEPS, dtype=torch.long)
        if run.trained is not None:
            expected = torch.zeros_like(expected).scatter_(2, run.trained, 1)
        seen = torch.zeros(NUM_PROMPTS, group_size, NUM_STEPS, dtype=torch.long)
        for call in calls:
            p, g, k = decode(call.old)
            seen.index_put_((p.flatten(), g.flatten(), k.flatten()), torch.ones(p.numel(), dtype=torch.long),
                            accumulate=True)
        assert torch.equal(seen, inner_epochs * expected)
    first_groups = torch.cat([decode(call.old)[0][:, 0, 0] for call in calls[: len(calls) // 2]])
    groups_in_order = list(dict.fromkeys(first_groups.tolist()))
    assert groups_in_order != sorted(groups_in_order), "groups are replayed in the sampled order"
    # Each group's steps in the order they are replayed: not all the same order.
    per_group: dict[int, list[int]] = {}
    for call in calls[: len(calls) // 2]:
        p, _, k = decode(call.old)
        for group, steps in zip(p[:, 0, 0].tolist(), k[:, 0].tolist()):
            per_group.setdefault(group, []).extend(steps)
    assert len({tuple(steps) for steps in per_group.values()}) > 1, "every group replays its steps in one order"


def test_members_get_their_own_step_orders_when_the_algorithm_does_not_pair_steps(accelerator):
    """The loop passes the algorithm's `same_step_order_in_group` on: with it off (here on
    REBEL, whose per-trajectory sums do not depend on the order) the two members of a
    group replay their steps in orders of their own."""
    calls = replay("rebel", accelerator, needs={"same_step_order_in_group": False}).calls
    assert any(not torch.equal(call.step_index[:, 0], call.step_index[:, 1]) for call in calls)


@pytest.mark.parametrize("steps_per_backward, forward_calls", [(4, 1), (8, 1), (3, 2 + 2)])
def test_whole_trajectory_losses_pay_the_extra_forward_pass_only_when_chunked(steps_per_backward, forward_calls):
    """`minibatch_losses`: a whole-trajectory loss (REBEL) over K = 4 steps with at most
    `steps_per_backward` steps per backward is one loss from one forward pass; only with
    fewer (3: chunks of 3 and 1) does it first take every step's log-prob without
    gradients (2 calls) and then each chunk's with them (2 calls)."""
    from benchmarks.loss_calls import gather_transitions, minibatch_losses

    sampler = CodedSampler()
    calls = []
    real_log_prob = sampler.log_prob
    sampler.log_prob = lambda *args: calls.append(args[0].shape[0]) or real_log_prob(*args)
    algorithm = ALGORITHMS["rebel"](num_steps=NUM_STEPS).build()
    traj = coded_trajectory(2, 2, NUM_STEPS, reference=False)
    transitions = gather_transitions(traj, torch.tensor([1, 0]), torch.arange(NUM_STEPS).expand(2, 2, NUM_STEPS))
    losses = list(minibatch_losses(algorithm, sampler, transitions, torch.zeros(2, 2, NUM_STEPS), steps_per_backward))
    assert len(losses) == math.ceil(NUM_STEPS / min(steps_per_backward, NUM_STEPS))
    assert len(calls) == forward_calls


def test_step_orders_are_permutations_shared_in_a_group_only_when_asked():
    """`step_orders`: each trajectory's row is a permutation of the K steps; with
    `same_in_group` the members of a group share their group's row, without it each member
    draws its own (the two settings are not the same)."""
    generator = torch.Generator().manual_seed(0)
    shared = step_orders(5, 2, 6, True, generator)
    own = step_orders(5, 2, 6, False, generator)
    for orders in (shared, own):
        assert orders.shape == (5, 2, 6)
        assert torch.equal(orders.sort(dim=-1).values, torch.arange(6).expand(5, 2, 6))
    assert torch.equal(shared[:, 0], shared[:, 1])
    assert not torch.equal(own[:, 0], own[:, 1])
    assert not torch.equal(shared[0, 0], shared[1, 0])  # groups are permuted independently


@pytest.mark.parametrize("name", ["sdpo", "ddpo", "d3po"])
def test_each_transition_is_trained_on_its_own_steps_advantage(name, accelerator):
    """Invariant (b): after groups are shuffled and steps permuted, the advantages a `loss`
    call receives are those of the transitions it trains on: `advantages[p, g, k]` for
    group p, member g, step k (`train_on_batch` indexes them with the minibatch's groups and
    `transitions.steps`). The advantages here differ per (group, member, step), as SDPO's
    per-step ones do, so indexing them by the position in the shuffled order, by the
    unshuffled group, or by another member fails."""
    run = replay(name, accelerator)
    advantages, calls = run.advantages, run.calls
    for call in calls:
        p, g, k = decode(call.old)
        torch.testing.assert_close(call.advantages, advantages[p, g, k], rtol=0, atol=0)


@pytest.mark.parametrize("name, steps_outer", [("sdpo", True), ("ddpo", False), ("d3po", False)])
def test_replay_order_steps_or_minibatches_outer(name, steps_outer, accelerator):
    """SDPO's reference trains position j of every minibatch's step orders before position
    j + 1 (`steps_in_outer_loop`): the first ⌈P/b⌉ calls then cover every group once. DDPO
    and D3PO (ddpo-pytorch's loop) replay all K steps of a minibatch before the next: the
    first K calls share one minibatch's groups."""
    run = replay(name, accelerator, train_batch_size=2)
    config, calls = run.config, run.calls
    assert config.steps_in_outer_loop == steps_outer
    minibatches = math.ceil(NUM_PROMPTS / config.train_batch_size)
    assert len(calls) == minibatches * NUM_STEPS
    groups = [frozenset(decode(call.old)[0][:, 0, 0].tolist()) for call in calls]
    if steps_outer:
        first = set().union(*groups[:minibatches])
        assert first == set(range(NUM_PROMPTS)) and sum(map(len, groups[:minibatches])) == NUM_PROMPTS
    else:
        assert len(set(groups[:NUM_STEPS])) == 1 and len(set(groups)) == minibatches


@pytest.mark.parametrize("name", ["sdpo", "ddpo", "d3po"])
@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_optimizer_steps_see_the_mean_gradient_of_their_loss_calls(name, max_grad_norm, accelerator):
    """Gradient accumulation: an optimizer step comes every `loss_calls_per_update` loss
    calls, and the gradient it applies is the sum of those calls' gradients divided by
    `loss_calls_per_update` (a mean over the update's calls), clipped to `max_grad_norm`
    when set, and nothing carried over from the previous update (zero_grad). (REBEL is left
    out: its accumulation is being redefined.)"""
    run = replay(name, accelerator, train_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=max_grad_norm)
    config, calls, grads = run.config, run.calls, run.grads
    per_update = config.loss_calls_per_update
    assert len(calls) % per_update == 0
    assert len(grads) == len(calls) // per_update >= 2
    for update, applied in enumerate(grads):
        window = calls[update * per_update : (update + 1) * per_update]
        expected = clipped_gradient(torch.stack([call.grad for call in window]).sum() / per_update, max_grad_norm)
        assert float(expected.abs()) > 1e-6
        torch.testing.assert_close(applied, expected, rtol=1e-5, atol=0)
    if max_grad_norm is not None:
        assert any(float(g.abs()) == pytest.approx(max_grad_norm, rel=1e-3) for g in grads)  # the clip acted


@pytest.mark.parametrize("name", ["sdpo", "ddpo"])
def test_epoch_metrics_are_means_over_loss_calls(name, accelerator):
    """The metrics an epoch logs are the means over its loss calls (here the loss itself),
    not sums or the last call's."""
    run = replay(name, accelerator)
    expected = sum(call.loss for call in run.calls) / len(run.calls)
    assert len({call.loss for call in run.calls}) > 1
    assert run.metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_a_non_finite_loss_before_finite_ones_stops_the_epoch(accelerator, monkeypatch):
    """A loss that is NaN in one early call and finite after it still stops the epoch with
    `TrainingDiverged`: the loop keeps the first non-finite loss it saw, not the latest."""
    from benchmarks.loop import TrainingDiverged

    real_loss = ReplayRecorder.loss

    def nan_on_second_call(self, inputs):
        loss, metrics = real_loss(self, inputs)
        if len(self.calls) == 2:
            loss = loss + math.nan * loss.detach()  # NaN value, finite gradient
        return loss, metrics

    monkeypatch.setattr(ReplayRecorder, "loss", nan_on_second_call)
    with pytest.raises(TrainingDiverged, match="nan"):
        replay("ddpo", accelerator)


def test_pairs_share_x_T_exactly_when_the_algorithm_asks(tiny_pipeline_dir):
    """`sample_and_score` starts both members of a group from one x_T for the algorithms
    whose `needs.shared_noise` says so (SDPO and D3PO compare two trajectories from the same
    start), and from independent ones otherwise (REBEL's y and y'); the step noise is
    every trajectory's own either way."""
    from benchmarks.rollout import sample_and_score
    from zoo.kernels import SamplerConfig
    from zoo.sampling import TrajectorySampler

    sampler = TrajectorySampler(policy_with_random_adapter(tiny_pipeline_dir), SamplerConfig("ddim", 1, 1.0, 1.0))
    for name in PAIR_ALGORITHMS:
        algorithm = ALGORITHMS[name](num_steps=1).build()
        traj, _, failure = sample_and_score(algorithm, sampler, ["a cat", "a dog"], torch.Generator().manual_seed(0),
                                            Brightness(), TrainLoop(sample_batch_size=2, overlap_rewards=False))
        assert failure is None
        x_T, x_next = traj.latents[:, :, 0], traj.next_latents[:, :, 0]
        shared = {"sdpo": True, "d3po": True, "rebel": False}[name]
        assert algorithm.needs.shared_noise == shared
        assert torch.equal(x_T[:, 0], x_T[:, 1]) == shared, name
        assert (x_T[:, 0] - x_T[:, 1]).abs().max() > 0.1 or shared
        assert (x_next[:, 0] - x_next[:, 1]).abs().min() > 0, name
        assert not torch.equal(x_T[0, 0], x_T[1, 0])


class IndexReward(Brightness):
    """Scores image i of its n-th call 1000 n + i, keeping every call's images and prompts."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, list[str]]] = []

    def _score(self, images, prompts):
        self.seen.append((images.clone(), list(prompts)))
        return 1000.0 * (len(self.seen) - 1) + torch.arange(images.shape[0], dtype=torch.float32)


@pytest.mark.parametrize("name", ["ddpo", "rebel", "sdpo"])
def test_each_scored_image_comes_with_its_own_prompt_and_its_score_lands_on_its_trajectory(
    name, tiny_pipeline_dir
):
    """`sample_and_score` hands the reward each image with the prompt of the trajectory it
    came from (a prompt-alignment reward scores image against caption), and puts each score
    back at that trajectory's (group, member[, scored step]): the final images for DDPO and
    REBEL, the decoded x̂0 of SDPO's first, anchor and last steps. Sampled in calls of two
    groups, so that scores are also placed across calls."""
    from benchmarks.rollout import sample_and_score
    from zoo.kernels import SamplerConfig
    from zoo.sampling import TrajectorySampler

    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 1.0))
    algorithm = ALGORITHMS[name](num_steps=3).build()
    group_size = algorithm.needs.group_size
    prompts = ["a cat", "a dog", "a fox"]
    reward = IndexReward()
    traj, scores, failure = sample_and_score(algorithm, sampler, prompts, torch.Generator().manual_seed(0), reward,
                                             TrainLoop(sample_batch_size=2 * group_size, overlap_rewards=False))
    assert failure is None and len(reward.seen) == 2
    steps = algorithm.reward_steps(traj)
    per_trajectory = 1 if steps is None else steps.shape[-1]
    with torch.no_grad():
        expected_images = traj.images if steps is None else policy.decode(
            traj.pred_x0[torch.arange(3)[:, None, None], torch.arange(group_size)[None, :, None], steps].flatten(0, 2)
        )
    expected_images = expected_images.reshape(3, group_size, per_trajectory, *expected_images.shape[-3:])
    for call, (images, call_prompts) in enumerate(reward.seen):
        for i, (image, prompt) in enumerate(zip(images, call_prompts)):
            group = 2 * call + i // (group_size * per_trajectory)
            member, scored = divmod(i % (group_size * per_trajectory), per_trajectory)
            assert prompt == prompts[group]
            torch.testing.assert_close(image, expected_images[group, member, scored], rtol=1e-5, atol=1e-6)
            position = (group, member) if steps is None else (group, member, scored)
            assert scores[position].item() == 1000 * call + i


def test_per_member_log_probs_equal_the_batched_ones(tiny_pipeline_dir):
    """`Transitions.log_probs(per_member=True)` (one UNet call per group member, the
    reference codes' way that benchmarks.perf times against) computes the same log-probs
    as the batched call, member by member."""
    from benchmarks.loss_calls import gather_transitions
    from zoo.kernels import SamplerConfig
    from zoo.sampling import TrajectorySampler

    sampler = TrajectorySampler(policy_with_random_adapter(tiny_pipeline_dir), SamplerConfig("ddim", 2, 1.0, 2.0))
    traj = sampler.sample(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(3))
    transitions = gather_transitions(traj, torch.tensor([1, 0]), torch.tensor([1, 0]).expand(2, 2, 2))
    with torch.no_grad():
        batched, per_member = transitions.log_probs(sampler), transitions.log_probs(sampler, per_member=True)
    torch.testing.assert_close(per_member, batched, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched, transitions.old_log_probs, rtol=0, atol=1e-5)
    assert (batched[:, 0] - batched[:, 1]).abs().max() > 1e-3  # the members can be told apart


def test_an_infinite_training_score_fails_the_epoch_like_nan(tiny_pipeline_dir):
    """A reward that returns +inf (an overflow) fails the epoch as NaN does: no scores, so
    nothing reaches the stat tracker, and the reason says how many scores were bad."""
    from benchmarks.rollout import sample_and_score
    from zoo.kernels import SamplerConfig
    from zoo.sampling import TrajectorySampler

    class InfOnSecond(Brightness):
        def _score(self, images, prompts):
            scores = super()._score(images, prompts).clone()
            scores[1] = math.inf
            return scores

    sampler = TrajectorySampler(policy_with_random_adapter(tiny_pipeline_dir), SamplerConfig("ddim", 1, 1.0, 1.0))
    _, scores, failure = sample_and_score(ALGORITHMS["ddpo"](num_steps=1).build(), sampler, ["a cat"] * 3,
                                          torch.Generator().manual_seed(0), InfOnSecond(), TrainLoop())
    assert scores is None and failure == "returned NaN or inf for 1 of 3 scores"


# ----------------------------------------------------------------------------------------
# Resume restores the stat tracker; seeds and epochs draw their own noise


RESUME_CONFIGS = {
    # One prompt, 4 trajectories (DDPO) or 2 pairs (SDPO) per epoch: epoch 1 leaves 4
    # returns per buffer (per prompt, or per (prompt, step)), under min_count 5, so it
    # normalises by the batch; epoch 2 pushes 4 more and normalises by its buffer, which
    # holds 2 of epoch 1's returns (buffer 6). Without epoch 1's history it would fall back.
    "ddpo": dict(num_steps=2, guidance_scale=1.0, train_batch_size=2, learning_rate=3e-2,
                 tracker_buffer_size=6, tracker_min_count=5),
    "sdpo": dict(num_steps=2, train_batch_size=1, gradient_accumulation_steps=1, learning_rate=3e-2,
                 tracker_buffer_size=6, tracker_min_count=5),
}


@pytest.mark.parametrize("algo", list(RESUME_CONFIGS))
def test_resume_restores_the_stat_trackers_history(algo, tiny_pipeline_dir, tmp_path, monkeypatch, accelerator):
    """Invariant (c): `--resume` restores the stat tracker (`tracker.load_state_dict` in
    `run_algorithm`). Two epochs straight, against one epoch, a stop right after its
    checkpoint, and a resumed second epoch, with tracker sizes chosen so that the second
    epoch's advantages come from a buffer that holds first-epoch returns (RESUME_CONFIGS).
    The runs must end with the same tracker state, LoRA weights, counters and records.
    (The kill tests never fill a buffer to min_count, so a resume that forgot the tracker
    passed them.) Also: the two epochs draw different noise (the generator is seeded by
    the epoch), the last epoch is evaluated although eval_every (3) does not divide the
    epochs, and the logged train_reward is the mean of the epoch's training scores."""
    config = ALGORITHMS[algo](**RESUME_CONFIGS[algo])
    drawn: dict[str, list[torch.Tensor]] = {"straight": [], "resumed": []}
    real_sample = benchmarks.train.sample_and_score
    logged: list[dict] = []
    train_reward = RecordingBrightness()

    def run(name: str) -> dict:
        out = tmp_path / name.split("-")[0]

        def sample_and_score(*args, **kwargs):
            traj, scores, failure = real_sample(*args, **kwargs)
            drawn[name.split("-")[0]].append(traj.latents[:, :, 0].clone())
            return traj, scores, failure

        monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
        straight_run = name == "straight"
        run_algorithm(algo, config, 0, micro_job(tiny_pipeline_dir, out, 2, ("a cat",), logged.append if straight_run else
                                            lambda row: None),
                      train_reward if straight_run else Brightness(), {"brightness": Brightness()}, accelerator)
        return load_state(checkpoint_path(out, algo, 0))

    straight = run("straight")
    # The logged train_reward is the mean of the epoch's training scores (one scoring call per epoch).
    assert [row["epoch"] for row in logged] == [1, 2] and len(train_reward.returned) == 2
    for row, scores in zip(logged, train_reward.returned):
        assert row["train_reward"] == pytest.approx(float(scores.double().mean()), rel=1e-6)
    real_save = benchmarks.train.save_state

    class Stop(Exception):
        pass

    def save_then_stop(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise Stop

    monkeypatch.setattr(benchmarks.train, "save_state", save_then_stop)
    with pytest.raises(Stop):
        run("resumed-first")
    monkeypatch.setattr(benchmarks.train, "save_state", real_save)
    first = load_state(checkpoint_path(tmp_path / "resumed", algo, 0))
    assert first["epoch"] == 1 and not first["done"]
    resumed = run("resumed-second")

    assert straight["done"] and resumed["done"]
    # The test can tell: epoch 2 normalised by buffers that hold epoch 1's returns.
    final, before = straight["tracker"]["buffers"]["a cat"], first["tracker"]["buffers"]["a cat"]
    for buffer, earlier in zip(final, before) if algo == "sdpo" else [(final, before)]:
        assert len(earlier) == 4 and len(buffer) == 6 and buffer[:2] == earlier[-2:]
    assert resumed["tracker"] == straight["tracker"]
    assert resumed["lora"].keys() == straight["lora"].keys()
    for key in straight["lora"]:
        assert torch.equal(resumed["lora"][key], straight["lora"][key]), key
    drop_time = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]  # noqa: E731
    # eval_every is 3: only the last epoch's evaluation, which every run must have.
    assert {row["epoch"] for row in straight["records"]} == {2}
    assert drop_time(resumed["records"]) == drop_time(straight["records"])
    assert {k: v for k, v in resumed["counters"].items() if k != "wall_time"} == \
        {k: v for k, v in straight["counters"].items() if k != "wall_time"}
    # Epochs draw their own noise; the resumed epoch drew the straight run's.
    assert len(drawn["straight"]) == 2 and len(drawn["resumed"]) == 2
    assert (drawn["straight"][0] - drawn["straight"][1]).abs().max() > 0.1
    assert torch.equal(drawn["resumed"][1], drawn["straight"][1])


def test_each_seed_draws_its_own_noise_and_every_algorithm_of_a_seed_starts_from_one_lora(
    tiny_pipeline_dir, tmp_path, monkeypatch, accelerator
):
    """`run_algorithm` seeds the LoRA initialisation by the seed alone, so DDPO and SDPO of
    one seed start from the same adapter (their rows differ by training only), and the
    epoch's generator by (seed, epoch), so another seed samples other trajectories.
    Each run is stopped at its first sampling call."""
    real_sample = benchmarks.train.sample_and_score
    seen = {}

    class Stop(Exception):
        pass

    for algo, seed in (("ddpo", 0), ("sdpo", 0), ("ddpo", 1)):
        def sample_and_score(algorithm, sampler, prompts, generator, reward, loop, shard, key=(algo, seed)):
            traj, _, _ = real_sample(algorithm, sampler, prompts, generator, reward, loop, shard)
            seen[key] = (sampler.policy.adapter_state(), traj.latents[:, 0, 0].clone())
            raise Stop

        monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
        torch.manual_seed(100 + len(seen))  # whatever the global RNG holds
        config = ALGORITHMS[algo](**RESUME_CONFIGS[algo])
        with pytest.raises(Stop):
            run_algorithm(algo, config, seed, micro_job(tiny_pipeline_dir, tmp_path / f"{algo}{seed}", 1, ("a cat",)),
                          Brightness(), {"brightness": Brightness()}, accelerator)
    (lora_d0, x_d0), (lora_s0, x_s0), (lora_d1, x_d1) = seen[("ddpo", 0)], seen[("sdpo", 0)], seen[("ddpo", 1)]
    assert lora_d0.keys() == lora_s0.keys() == lora_d1.keys()
    assert all(torch.equal(lora_d0[k], lora_s0[k]) for k in lora_d0)
    assert any(not torch.equal(lora_d0[k], lora_d1[k]) for k in lora_d0)
    assert (x_d0 - x_d1).abs().max() > 0.1


# ----------------------------------------------------------------------------------------
# Evaluation noise


def _eval_settings(step_counts: tuple[int, ...], seed: int = 0) -> EvalSettings:
    return EvalSettings(prompts=("a cat", "a dog", "a fox"), step_counts=step_counts, samples_per_prompt=3,
                        batch_size=4, sampler="ddim", guidance_scale=2.0, eta=1.0, seed=seed)


def test_every_row_is_evaluated_on_the_same_noise(tiny_pipeline_dir, accelerator):
    """Invariant (d): two policies with identical weights (two algorithms' rows after the
    same update, or the base row twice) get identical evaluation rows and sample strips,
    whatever happened to the global RNG in between (training draws from it), because each
    step count's noise comes from its own generator seeded by (evaluation seed, step count,
    process). A step count's row does not depend on which other step counts are evaluated
    with it; another evaluation seed gives other noise. The row's numbers are the finite
    scores' mean, population std and count."""
    first, second = policy_with_random_adapter(tiny_pipeline_dir), policy_with_random_adapter(tiny_pipeline_dir)
    reward = RecordingBrightness()
    stats, strips = evaluate(first, {"brightness": reward}, _eval_settings((1, 2)), accelerator)
    torch.manual_seed(12345)
    torch.randn(1000)
    again, strips_again = evaluate(second, {"brightness": Brightness()}, _eval_settings((1, 2)), accelerator)
    assert again == stats
    assert strips.keys() == strips_again.keys() == {1, 2}
    assert all(torch.equal(strips[k], strips_again[k]) for k in strips)

    alone, _ = evaluate(second, {"brightness": Brightness()}, _eval_settings((2,)), accelerator)
    assert alone[(2, "brightness")] == stats[(2, "brightness")]
    other_seed, _ = evaluate(second, {"brightness": Brightness()}, _eval_settings((1, 2), seed=1), accelerator)
    assert other_seed[(1, "brightness")]["mean"] != stats[(1, "brightness")]["mean"]

    # 9 images per step count in batches of 4, 4 and 1: three calls per step count; the
    # strip holds the first STRIP_IMAGES (8) of them.
    from benchmarks.evaluate import STRIP_IMAGES

    assert STRIP_IMAGES == 8 and all(strip.shape == (8, 3, 32, 32) for strip in strips.values())
    assert len(reward.returned) == 6
    for step_count, scores in ((1, reward.returned[:3]), (2, reward.returned[3:])):
        scores = torch.cat(scores).double()
        row = stats[(step_count, "brightness")]
        assert row["count"] == 9 and row["nonfinite"] == 0
        assert row["mean"] == pytest.approx(float(scores.mean()), rel=1e-12)
        assert row["std"] == pytest.approx(float(scores.std(correction=0)), rel=1e-12)
    assert stats[(1, "brightness")]["mean"] != stats[(2, "brightness")]["mean"]


def test_the_runner_evaluates_every_row_of_a_seed_with_the_same_settings_and_rewards(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    """Invariant (d) from the runner's side: `benchmarks.run` gives the base and every
    algorithm of a seed the same evaluation (the prompts, step counts, samples, sampler,
    guidance, eta, spacing and the seed that decides the noise: one `EvalSettings`) and the
    same reward objects, at every evaluation, so that the test above makes their cells
    comparable. An evaluation seed or prompt that depended on the algorithm fails here."""
    from benchmarks.run import main

    real_evaluate = benchmarks.train.evaluate
    calls = []

    def recording_evaluate(policy, rewards, settings, accelerator, where="evaluation"):
        calls.append((where, settings, list(rewards.items())))
        return real_evaluate(policy, rewards, settings, accelerator, where=where)

    monkeypatch.setattr(benchmarks.train, "evaluate", recording_evaluate)
    assert main(["--preset", "tiny", "--model", tiny_pipeline_dir, "--algos", "ddpo,rebel", "--reward", "jpeg_compressibility",
                 "--eval-rewards", "tiny-align-gold", "--epochs", "2", "--eval-every", "1",
                 "--trajectories-per-epoch", "8", "--eval-samples-per-prompt", "1", "--eval-steps", "1,2",
                 "--train-steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert [where for where, _, _ in calls] == [
        "base seed 0, epoch 0", "ddpo seed 0, epoch 1", "ddpo seed 0, epoch 2", "rebel seed 0, epoch 1",
        "rebel seed 0, epoch 2"]
    _, settings, rewards = calls[0]
    assert settings.seed == 0 and settings.step_counts == (1, 2) and settings.samples_per_prompt == 1
    assert [name for name, _ in rewards] == ["jpeg_compressibility", "tiny-align-gold"]
    for where, other_settings, other_rewards in calls[1:]:
        assert other_settings == settings, where
        assert [(name, id(reward)) for name, reward in other_rewards] == [(n, id(r)) for n, r in rewards], where


# ----------------------------------------------------------------------------------------
# Stat tracker eviction, and the DDIM density at 0 < eta < 1


@pytest.mark.parametrize("restored", [False, True], ids=["fresh", "restored"])
def test_per_step_buffers_keep_only_the_last_buffer_size_returns(restored):
    """Invariant (e): SDPO's per-(prompt, step) buffer is a window of the last
    `buffer_size` returns, as the per-prompt one is (also once restored from a checkpoint's
    state). buffer_size 3, min_count 3, one prompt, K = 2 (step 1's returns are ten times
    step 0's).

    Batch 1: [[1, 10], [2, 20]]: 2 < 3 values, each step falls back to its batch column:
      mean 1.5, std 0.5, A = [-0.5, 0.5] / (0.5 + 1e-6) (step 1: [-5, 5] / (5 + 1e-6)).
    Batch 2: [[3, 30], [5, 50]]: step 0 holds [1, 2, 3, 5] -> the last three [2, 3, 5]:
      mean 10/3, population std sqrt((16 + 1 + 25) / 27) = sqrt(14)/3, so
      A = [-1/3, 5/3] / (sqrt(14)/3 + 1e-6) (keeping all four: mean 2.75, A = [0.25, 2.25] / (std + 1e-6)).
    Batch 3: [[7, 70]]: [3, 5, 7], mean 5, std sqrt(8/3), A = 2 / (sqrt(8/3) + 1e-6).
    The per-prompt tracker gets step 0's column and must give step 0's numbers."""
    from zoo.stat_tracking import PerPromptStatTracker, PerPromptStepStatTracker

    def reload(tracker):
        if not restored:
            return tracker
        copy = type(tracker)(3, 3)
        copy.load_state_dict(tracker.state_dict())
        return copy

    eps = 1e-6
    second = torch.tensor([-1 / 3, 5 / 3], dtype=torch.float64) / (math.sqrt(14) / 3 + eps)
    third = torch.tensor([2.0], dtype=torch.float64) / (math.sqrt(8 / 3) + eps)
    batches = [[[1.0, 10.0], [2.0, 20.0]], [[3.0, 30.0], [5.0, 50.0]], [[7.0, 70.0]]]

    per_step, per_prompt = PerPromptStepStatTracker(3, 3), PerPromptStatTracker(3, 3)
    results, per_prompt_results = [], []
    for batch in batches:
        returns = torch.tensor(batch, dtype=torch.float64)
        prompts = ["a"] * len(batch)
        results.append(per_step.update(prompts, returns))
        per_prompt_results.append(per_prompt.update(prompts, returns[:, 0]))
        per_step, per_prompt = reload(per_step), reload(per_prompt)
    first = torch.tensor([[-0.5 / (0.5 + eps), -5 / (5 + eps)], [0.5 / (0.5 + eps), 5 / (5 + eps)]],
                         dtype=torch.float64)
    torch.testing.assert_close(results[0], first, rtol=1e-12, atol=0)
    second_step1 = torch.tensor([-10 / 3, 50 / 3], dtype=torch.float64) / (10 * math.sqrt(14) / 3 + eps)
    torch.testing.assert_close(results[1], torch.stack([second, second_step1], dim=1), rtol=1e-12, atol=0)
    third_step1 = torch.tensor([20.0], dtype=torch.float64) / (10 * math.sqrt(8 / 3) + eps)
    torch.testing.assert_close(results[2], torch.stack([third, third_step1], dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(per_prompt_results[1], second, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_prompt_results[2], third, rtol=1e-12, atol=0)
    assert per_step.state_dict()["buffers"] == {"a": [[3.0, 5.0, 7.0], [30.0, 50.0, 70.0]]}
    assert per_prompt.state_dict()["buffers"] == {"a": [3.0, 5.0, 7.0]}


def test_ddim_log_density_at_eta_one_half_by_hand():
    """Invariant (f): the DDIM transition's log-density at 0 < eta < 1, worked numbers.
    Published formula (DDIM, Song et al. 2021, eq. 16; docs/ALGORITHMS.md):
      x̂0 = (x_t - sqrt(1-ᾱ_t) ε̂) / sqrt(ᾱ_t)
      σ² = eta² (1-ᾱ_t')/(1-ᾱ_t) (1 - ᾱ_t/ᾱ_t')
      μ = sqrt(ᾱ_t') x̂0 + sqrt(1-ᾱ_t'-σ²) ε̂
      log p = mean over elements of -(x_t'-μ)²/(2σ²) - log σ - log(2π)/2.
    Sample 0: ᾱ_t = 0.36, ᾱ_t' = 0.64, x_t = (0.6, -1.2), ε̂ = (0.8, 0.4), eta 0.5:
      x̂0 = ((0.6 - 0.64)/0.6, (-1.2 - 0.32)/0.6) = (-1/15, -38/15);
      σ² = 0.25 · (0.36/0.64) · (1 - 0.5625) = 0.0615234375;
      μ = 0.8 x̂0 + sqrt(0.36 - 0.0615234375) ε̂.
    Sample 1: ᾱ_t = 0.5, ᾱ_t' = 0.9, x_t = (0.2, 0.3), ε̂ = (-0.5, 1.0):
      σ² = 0.25 · (0.1/0.5) · (1 - 5/9) = 1/45.
    At eta 1 σ² would be 4 times larger, and at eta 0.5 with σ instead of σ² in the
    direction term or eta left out the numbers differ far beyond the tolerance."""
    from zoo.kernels import ddim_transition, gaussian_log_prob

    eta = 0.5
    alpha_t, alpha_prev = [0.36, 0.5], [0.64, 0.9]
    x_t = [[0.6, -1.2], [0.2, 0.3]]
    eps = [[0.8, 0.4], [-0.5, 1.0]]
    x_next = [[0.1, -2.0], [0.5, 0.0]]
    expected_std, expected_mean, expected_log_prob = [], [], []
    for i in range(2):
        a, a_prev = alpha_t[i], alpha_prev[i]
        x0 = [(x - math.sqrt(1 - a) * e) / math.sqrt(a) for x, e in zip(x_t[i], eps[i])]
        variance = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        mean = [math.sqrt(a_prev) * x + math.sqrt(1 - a_prev - variance) * e for x, e in zip(x0, eps[i])]
        log_density = [-((y - m) ** 2) / (2 * variance) - 0.5 * math.log(variance) - 0.5 * math.log(2 * math.pi)
                       for y, m in zip(x_next[i], mean)]
        expected_std.append(math.sqrt(variance))
        expected_mean.append(mean)
        expected_log_prob.append(sum(log_density) / 2)
    assert expected_std[0] ** 2 == pytest.approx(0.0615234375, rel=1e-12)
    assert expected_std[1] ** 2 == pytest.approx(1 / 45, rel=1e-12)

    shape = (2, 2, 1, 1)  # (N, C, h, w)
    mean, std, pred_x0 = ddim_transition(
        torch.tensor(eps).view(shape), torch.tensor(x_t).view(shape),
        torch.tensor(alpha_t, dtype=torch.float64), torch.tensor(alpha_prev, dtype=torch.float64), eta,
    )
    torch.testing.assert_close(pred_x0[0].flatten(), torch.tensor([-1 / 15, -38 / 15]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(std, torch.tensor(expected_std), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.flatten(1), torch.tensor(expected_mean), rtol=1e-6, atol=1e-7)
    log_prob = gaussian_log_prob(torch.tensor(x_next).view(shape), mean, std)
    torch.testing.assert_close(log_prob, torch.tensor(expected_log_prob), rtol=1e-6, atol=1e-6)


def test_infinite_and_all_nan_evaluation_scores(tiny_pipeline_dir, accelerator):
    """Evaluation leaves every non-finite score out of a cell's mean (inf as well as NaN)
    and counts it; a cell with no finite score has mean NaN (not 0, which would read as a
    real reward), count 0 and std 0."""

    class InfOnFirst(RecordingBrightness):
        name = "inf-first"

        def _score(self, images, prompts):
            scores = super()._score(images, prompts).clone()
            scores[0] = math.inf
            return scores

    class AllNaN(Brightness):
        name = "all-nan"

        def _score(self, images, prompts):
            return torch.full((images.shape[0],), math.nan)

    settings = EvalSettings(prompts=("a cat",), step_counts=(1,), samples_per_prompt=3, batch_size=3,
                            sampler="ddim", guidance_scale=1.0, eta=1.0, seed=0)
    inf_first = InfOnFirst()
    stats, _ = evaluate(policy_with_random_adapter(tiny_pipeline_dir), {"inf-first": inf_first, "all-nan": AllNaN()},
                        settings, accelerator)
    finite = inf_first.returned[0][1:].double()
    assert stats[(1, "inf-first")] == {"mean": pytest.approx(float(finite.mean()), rel=1e-12),
                                       "std": pytest.approx(float(finite.std(correction=0)), rel=1e-12),
                                       "count": 2, "nonfinite": 1}
    cell = stats[(1, "all-nan")]
    assert math.isnan(cell["mean"]) and (cell["std"], cell["count"], cell["nonfinite"]) == (0.0, 0, 3)


def test_every_held_out_image_is_evaluated_once_across_processes(tiny_pipeline_dir, monkeypatch):
    """Evaluation splits the held-out (prompt, sample) list into contiguous shares, one per
    process, rounding the share up, so that every image is evaluated exactly once also when
    the list does not divide evenly (3 images on 2 processes: 2 + 1, not 1 + 1). Simulated:
    each rank's `evaluate` runs in turn with the gather left local."""
    import benchmarks.evaluate

    monkeypatch.setattr(benchmarks.evaluate, "gather_object", lambda local: local)
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    settings = EvalSettings(prompts=("a cat", "a dog", "a fox"), step_counts=(1,), samples_per_prompt=1, batch_size=4,
                            sampler="ddim", guidance_scale=1.0, eta=1.0, seed=0)
    scored: list[str] = []
    for rank in range(2):
        reward = RecordingBrightness()
        process = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)
        stats, _ = evaluate(policy, {"brightness": reward}, settings, process)
        scored += reward.prompts
        assert stats[(1, "brightness")]["count"] == [2, 1][rank]
    assert scored == ["a cat", "a dog", "a fox"]


def test_evaluation_never_draws_a_training_epochs_noise():
    """Evaluation at S steps used to be seeded exactly like training epoch S (the same
    arithmetic on seed, index and process), so the held-out samples reused the x_T the
    policy had just been trained on. The two seed sets are now disjoint in the 32 bits the
    generator reads (seeds 2^32 apart draw the same noise), and the epoch's first draws
    differ from the evaluation's."""
    from benchmarks.evaluate import evaluation_seed
    from benchmarks.rollout import epoch_seed

    train = {epoch_seed(s, e) % (1 << 32) for s in (0, 1, 2, 100, 5000) for e in range(1000)}
    evaluation = {evaluation_seed(s, k) % (1 << 32) for s in (0, 1, 2, 100, 5000) for k in range(1, 1001)}
    assert not train & evaluation
    epoch_noise = torch.randn(256, generator=torch.Generator().manual_seed(epoch_seed(0, 4)))
    eval_noise = torch.randn(256, generator=torch.Generator().manual_seed(evaluation_seed(0, 4)))
    assert not torch.allclose(epoch_noise, eval_noise)


class SteppedNoiseDDPO(DDPO):
    """DDPO whose epochs sample at per-step noise levels that move with training: (1, 0.5)
    in even epochs, (0.5, 1) in odd ones, recording the contexts it was asked in."""

    contexts: list[tuple[int, int]] = []

    def noise_levels(self, context: EpochContext, num_steps: int) -> torch.Tensor:
        SteppedNoiseDDPO.contexts.append((context.epoch, context.epochs))
        return torch.tensor([1.0, 0.5] if context.epoch % 2 == 0 else [0.5, 1.0])


@dataclasses.dataclass(frozen=True)
class SteppedNoiseDDPOConfig(DDPOConfig):
    def build(self) -> SteppedNoiseDDPO:
        return SteppedNoiseDDPO(self)


def test_the_epochs_noise_levels_are_chosen_before_sampling_and_replayed_with_it(
    tiny_pipeline_dir, tmp_path, monkeypatch, accelerator
):
    """Invariant (which noise): `run_algorithm` asks `noise_levels` with each epoch's context
    (epoch, the run's epochs) before the epoch samples, samples with those levels, and
    replays the epoch under the same kernel, so the stored log-probs and the replayed ones are
    the same Gaussian's: every ratio stays 1 and DDPO clips nothing."""
    SteppedNoiseDDPO.contexts = []
    real_sample, real_train = benchmarks.train.sample_and_score, benchmarks.train.train_on_batch
    sampled, trained = [], []

    def sample_and_score(algorithm, sampler, *args):
        sampled.append((len(SteppedNoiseDDPO.contexts), sampler.kernel.noise_levels.tolist()))
        return real_sample(algorithm, sampler, *args)

    def train_on_batch(algorithm, config, sampler, *args):
        trained.append(sampler.kernel.noise_levels.tolist())
        return real_train(algorithm, config, sampler, *args)

    monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
    monkeypatch.setattr(benchmarks.train, "train_on_batch", train_on_batch)
    logged = []
    # A learning rate too small to move a log-prob by the clip range: only a replay under
    # another kernel than the sampling one could make a ratio leave 1 ± 1e-4.
    config = SteppedNoiseDDPOConfig(num_steps=2, guidance_scale=1.0, train_batch_size=2, learning_rate=1e-12)
    run_algorithm("ddpo", config, 0, micro_job(tiny_pipeline_dir, tmp_path, 2, ("a cat",), logged.append),
                  Brightness(), {"brightness": Brightness()}, accelerator)
    assert SteppedNoiseDDPO.contexts == [(0, 2), (1, 2)]
    # Asked once per epoch, before that epoch sampled.
    assert sampled == [(1, [1.0, 0.5]), (2, [0.5, 1.0])]
    assert trained == [[1.0, 0.5], [0.5, 1.0]]
    assert [row["clipfrac"] for row in logged] == [0.0, 0.0]
