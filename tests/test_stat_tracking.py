"""The stat trackers against hand-computed statistics: fallback, push-then-read, eviction."""

import json
import math

import pytest
import torch

from zoo.stat_tracking import NoStatTracker, PerPromptStatTracker, PerPromptStepStatTracker

EPS = 1e-6


def test_per_prompt_fallback_then_own_buffer_then_eviction():
    """buffer_size 4, min_count 3.

    Batch 1: prompts [a, a, b], rewards [1, 3, 8]. After pushing, a holds 2 and b holds 1
    reward, both under min_count, so both use the whole batch: mean 4, population std
    sqrt((9 + 1 + 16) / 3) = sqrt(26/3); A = [-3, -1, 4] / (sqrt(26/3) + 1e-6).

    Batch 2: [a, a], [5, 7]. Pushing first gives a = [1, 3, 5, 7] (4 >= 3): mean 4, std
    sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5); A = [1, 3] / (sqrt(5) + 1e-6). (Reading before
    pushing would have used the batch [5, 7] instead and given [-1, 1].)

    Batch 3: [a], [9]. The deque drops its oldest value: [3, 5, 7, 9], mean 6, std sqrt(5);
    A = 3 / (sqrt(5) + 1e-6).
    """
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 8.0]))
    torch.testing.assert_close(first, torch.tensor([-3.0, -1.0, 4.0]) / (math.sqrt(26 / 3) + EPS))
    second = tracker.update(["a", "a"], torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(second, torch.tensor([1.0, 3.0]) / (math.sqrt(5) + EPS))
    third = tracker.update(["a"], torch.tensor([9.0]))
    torch.testing.assert_close(third, torch.tensor([3.0]) / (math.sqrt(5) + EPS))
    assert tracker.state_dict()["buffers"] == {"a": [3.0, 5.0, 7.0, 9.0], "b": [8.0]}


def test_per_prompt_keeps_dtype_and_device():
    rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert PerPromptStatTracker(2, 2).update(["a", "b"], rewards).dtype == torch.float64


def test_per_step_fallback_uses_that_steps_whole_batch_then_own_buffer():
    """buffer_size 4, min_count 3, K = 2; rows in member-major order [a, b, a, b].

    Batch 1: returns [[1, 10], [2, 20], [3, 30], [6, 60]]. Every (prompt, step) holds 2 < 3
    values, so each step uses its own column over all rows:
      step 0: [1, 2, 3, 6], mean 3, std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5);
      step 1: ten times that: mean 30, std 10 sqrt(3.5).
    Batch 2: prompt a twice, returns [[5, 50], [7, 70]]. a's step 0 deque is [1, 3, 5, 7]:
      mean 4, std sqrt(5), A = [1, 3] / (sqrt(5) + 1e-6); step 1: [10, 30, 50, 70], mean 40,
      std 10 sqrt(5), A = [10, 30] / (10 sqrt(5) + 1e-6).
    """
    tracker = PerPromptStepStatTracker(buffer_size=4, min_count=3)
    returns = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0]])
    first = tracker.update(["a", "b", "a", "b"], returns)
    expected = torch.stack(
        [
            torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (math.sqrt(3.5) + EPS),
            torch.tensor([-20.0, -10.0, 0.0, 30.0]) / (10 * math.sqrt(3.5) + EPS),
        ],
        dim=1,
    )
    torch.testing.assert_close(first, expected)
    second = tracker.update(["a", "a"], torch.tensor([[5.0, 50.0], [7.0, 70.0]]))
    expected = torch.stack(
        [torch.tensor([1.0, 3.0]) / (math.sqrt(5) + EPS), torch.tensor([10.0, 30.0]) / (10 * math.sqrt(5) + EPS)],
        dim=1,
    )
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize(
    "make, batches",
    [
        (
            lambda: PerPromptStatTracker(3, 2),
            [(["a", "b", "a"], torch.tensor([1.0, 2.0, 4.0])), (["a", "b"], torch.tensor([0.5, 3.0]))],
        ),
        (
            lambda: PerPromptStepStatTracker(3, 2),
            [(["a", "b", "a"], torch.rand(3, 4)), (["a", "b"], torch.rand(2, 4))],
        ),
    ],
    ids=["per_prompt", "per_prompt_step"],
)
def test_state_dict_round_trips_through_json(make, batches):
    """A tracker restored from a JSON copy of its state continues exactly like the original."""
    original = make()
    original.update(*batches[0])
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    torch.testing.assert_close(restored.update(*batches[1]), original.update(*batches[1]))


def test_loading_a_state_of_other_sizes_is_refused():
    state = PerPromptStatTracker(16, 16).state_dict()
    with pytest.raises(ValueError, match="buffer_size=16"):
        PerPromptStatTracker(32, 16).load_state_dict(state)


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStepStatTracker(buffer_size=8, min_count=16)


def test_no_stat_tracker_has_empty_state():
    tracker = NoStatTracker()
    tracker.load_state_dict(tracker.state_dict())
    assert tracker.state_dict() == {}


@pytest.mark.parametrize("tracker_class", [PerPromptStatTracker, PerPromptStepStatTracker])
def test_min_count_up_to_buffer_size_is_accepted_one_more_is_refused(tracker_class):
    """A buffer of 4 can reach min_count 4 (DDPO's 16/16 is this case) but never 5."""
    tracker_class(buffer_size=4, min_count=4)
    with pytest.raises(ValueError, match=r"min_count \(5\) exceeds buffer_size \(4\)"):
        tracker_class(buffer_size=4, min_count=5)


@pytest.mark.parametrize("tracker_class", [PerPromptStatTracker, PerPromptStepStatTracker])
def test_loading_a_state_of_another_min_count_is_refused(tracker_class):
    """Resuming with the same buffer size but another min_count would silently switch
    prompts between batch and own statistics at other epochs: refused, naming both."""
    state = tracker_class(16, 16).state_dict()
    with pytest.raises(ValueError, match="min_count=16.*min_count=8"):
        tracker_class(16, 8).load_state_dict(state)
