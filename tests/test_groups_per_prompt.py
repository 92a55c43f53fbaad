"""Several groups per prompt per epoch (`--groups-per-prompt`, issue 13): the prompt draw,
its wiring through the training loop and the runner, and what it is for, a per-prompt
stat tracker on its own statistics after one epoch."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import benchmarks.train
from benchmarks.cli import parse_args
from benchmarks.evaluate import EvalSettings
from benchmarks.plan import make_plan
from benchmarks.presets import tiny
from benchmarks.rollout import draw_prompt_ids, global_advantages
from benchmarks.train import JobSettings, run_algorithm
from zoo.registry import ALGORITHMS
from zoo.stat_tracking import STD_EPS

TRAIN_PROMPTS = tiny().train_prompts  # the tiny world's 40
GROUPS = 16


def test_four_groups_per_prompt_draw_four_distinct_prompts_four_times_each():
    """16 groups, N = 4: 4 distinct prompts (without replacement, 4 <= 40), each in 4
    adjacent positions, and different epochs' generators draw different prompts."""
    draws = []
    for seed in range(20):
        ids = draw_prompt_ids(len(TRAIN_PROMPTS), GROUPS, 4, torch.Generator().manual_seed(seed))
        assert ids.shape == (GROUPS,)
        blocks = ids.view(4, 4)
        assert (blocks == blocks[:, :1]).all()  # adjacent
        assert len(set(blocks[:, 0].tolist())) == 4  # distinct
        assert set(Counter(ids.tolist()).values()) == {4}
        draws.append(tuple(blocks[:, 0].tolist()))
    assert len(set(draws)) > 15


def test_more_blocks_than_prompts_draw_with_replacement():
    """groups / N > number of prompts (16 / 2 = 8 blocks from 3 prompts): blocks of 2 still,
    prompts drawn with replacement, so some prompt fills several blocks."""
    ids = draw_prompt_ids(3, GROUPS, 2, torch.Generator().manual_seed(0))
    blocks = ids.view(8, 2)
    assert (blocks == blocks[:, :1]).all()
    assert set(ids.tolist()) <= {0, 1, 2} and len(set(blocks[:, 0].tolist())) < 8


def test_one_group_per_prompt_draws_as_before():
    """N = 1 is the draw the loop made before the flag existed (`torch.randint(len(prompts),
    (groups,), generator=generator)`): the same prompts and the same generator state after
    it, so the epoch's noise that follows is unchanged too."""
    for seed in [0, 1, 1_000_003 * 2 + 1_009 * 7]:
        new, old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ids = draw_prompt_ids(len(TRAIN_PROMPTS), GROUPS, 1, new)
        assert torch.equal(ids, torch.randint(len(TRAIN_PROMPTS), (GROUPS,), generator=old))
        assert torch.equal(new.get_state(), old.get_state())


class _Drawn(Exception):
    """Stops `run_algorithm` at its first sampling call."""


@pytest.mark.parametrize("groups_per_prompt", [1, 4])
def test_run_algorithm_samples_the_drawn_prompts(groups_per_prompt, tiny_pipeline_dir, tmp_path, monkeypatch):
    """The loop's first epoch (seed 3) hands the sampler the prompts that
    `draw_prompt_ids` draws from the epoch's generator, with JobSettings.groups_per_prompt:
    at N = 1 exactly the original `torch.randint` draw."""
    seen = []

    def sample_and_score(algorithm, sampler, prompts, generator, reward, loop, shard):
        seen.append(list(prompts))
        raise _Drawn

    monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
    settings = JobSettings(
        model=tiny_pipeline_dir, epochs=1, trajectories_per_epoch=GROUPS, train_prompts=TRAIN_PROMPTS, eval_every=1,
        eval=EvalSettings(prompts=("a fox",), step_counts=(1,), samples_per_prompt=1, batch_size=1,
                          sampler="ddim", guidance_scale=1.0, eta=1.0, seed=0),
        mixed_precision="no", train_reward="brightness", out_dir=tmp_path, groups_per_prompt=groups_per_prompt,
    )
    with pytest.raises(_Drawn):
        run_algorithm("ddpo", ALGORITHMS["ddpo"](num_steps=2), 3, settings, SimpleNamespace(images_scored=0), {},
                      Accelerator(cpu=True))

    generator = torch.Generator().manual_seed(1_000_003 * 3 + 1_009 * 0)  # seed 3, epoch 0
    if groups_per_prompt == 1:
        expected = torch.randint(len(TRAIN_PROMPTS), (GROUPS,), generator=generator)
    else:
        expected = draw_prompt_ids(len(TRAIN_PROMPTS), GROUPS, groups_per_prompt, generator)
        assert set(Counter(expected.tolist()).values()) == {groups_per_prompt}
    assert seen == [[TRAIN_PROMPTS[i] for i in expected.tolist()]]


# (algorithm, N): 16 groups of N x G = 8 trajectories per prompt: DDPO 2 prompts x 8,
# REBEL and SDPO 4 prompts x 4 pairs.
PER_PROMPT = [("ddpo", 8), ("rebel", 4), ("sdpo", 4)]


def _normalised(values: torch.Tensor) -> torch.Tensor:
    """(n, S): each column minus its mean over rows, over its population std + eps."""
    return (values - values.mean(0)) / (values.std(0, correction=0) + STD_EPS)


@pytest.mark.parametrize("algo,groups_per_prompt", PER_PROMPT)
def test_stat_tracker_uses_per_prompt_statistics_after_one_epoch(algo, groups_per_prompt):
    """A per-prompt tracker with min_count 8 (buffer 16), one epoch through the loop's
    `global_advantages`: with N x G = 8 every drawn prompt's buffer holds 8 rewards, so
    its advantages are its own rewards normalised by their own mean and std (per step for
    SDPO); with N = 1 (16 groups from 40 prompts: at most a few each) every prompt falls
    back to the whole batch's statistics."""
    config = ALGORITHMS[algo](num_steps=4, tracker_buffer_size=16, tracker_min_count=8)
    algorithm = config.build()
    group_size = algorithm.needs.group_size
    assert groups_per_prompt * group_size == 8
    accelerator = Accelerator(cpu=True)
    generator = torch.Generator().manual_seed(0)
    shape = (GROUPS, group_size, 4) if algo == "sdpo" else (GROUPS, group_size)

    def advantages(n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Prompts, (P, G, S) returns (S = 1 but for SDPO) and (P, G, S) advantages."""
        prompts = [TRAIN_PROMPTS[i] for i in draw_prompt_ids(len(TRAIN_PROMPTS), GROUPS, n, generator).tolist()]
        returns = torch.randn(shape, generator=generator, dtype=torch.float64)
        result = global_advantages(algorithm, prompts, returns, algorithm.new_tracker(), accelerator)
        steps = returns.shape[2] if returns.dim() == 3 else 1
        returns = returns.view(GROUPS, group_size, steps)
        return prompts, returns, result[:, :, :steps]

    prompts, returns, result = advantages(groups_per_prompt)
    assert len(set(prompts)) == GROUPS // groups_per_prompt
    for prompt in set(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        own = _normalised(returns[rows].flatten(0, 1)).view(len(rows), group_size, -1)
        torch.testing.assert_close(result[rows], own)
        assert result[rows].mean().abs() < 1e-9  # centred on the prompt's own mean

    prompts, returns, result = advantages(1)
    assert max(Counter(prompts).values()) < 8 // group_size
    batch = _normalised(returns.flatten(0, 1)).view_as(returns)
    torch.testing.assert_close(result, batch)


def _plan(tmp_path, *extra: str):
    return make_plan(parse_args(["--preset", "tiny", "--reward", "jpeg_compressibility", "--out", str(tmp_path / "run"),
                                 *extra]))


def test_runner_records_groups_per_prompt_and_resumes_runs_recorded_before_it(tmp_path):
    """The tiny preset's 64 trajectories are 64 DDPO groups and 32 pairs: N = 2 divides
    both, goes into config.json and to every job; the preset's own is 4. A run whose
    config.json predates the setting (no groups_per_prompt) drew one group per prompt: it
    resumes at N = 1, not at the preset's 4."""
    plan = _plan(tmp_path, "--groups-per-prompt", "2")
    assert plan.groups_per_prompt == 2 and plan.config_json()["groups_per_prompt"] == 2
    assert _plan(tmp_path).config_json()["groups_per_prompt"] == tiny().groups_per_prompt == 4

    out = tmp_path / "run"
    out.mkdir()
    old = {k: v for k, v in _plan(tmp_path).config_json().items() if k != "groups_per_prompt"}
    (out / "config.json").write_text(json.dumps(old))
    assert _plan(tmp_path, "--resume").groups_per_prompt == 1
    with pytest.raises(ValueError, match="--groups-per-prompt 1 there, 4 here"):
        _plan(tmp_path, "--resume", "--groups-per-prompt", "4")


@pytest.mark.parametrize("algo", ["ddpo", "rebel", "sdpo"])
def test_tiny_preset_baselines_are_per_prompt_from_the_first_epoch(algo):
    """The tiny preset's protocol (issue 13): its groups per prompt and each tracker's
    min_count make every advantage of every epoch, the first included, a prompt's own
    statistics, never the batch fallback. With one group per prompt and min_count 16
    (the previous protocol) 83% of DDPO's advantages over 10 epochs and 75% of the pair
    algorithms' were batch-normalised (measured with this draw)."""
    preset = tiny()
    config = getattr(parse_args(["--preset", "tiny", "--reward", preset.reward]).algo, algo)
    algorithm = config.build()
    tracker = algorithm.new_tracker()
    group_size = algorithm.needs.group_size
    groups = preset.trajectories_per_epoch // group_size
    for epoch in range(preset.epochs):
        generator = torch.Generator().manual_seed(benchmarks.train.epoch_seed(0, epoch))
        ids = draw_prompt_ids(len(TRAIN_PROMPTS), groups, preset.groups_per_prompt, generator).tolist()
        prompts = [TRAIN_PROMPTS[i] for i in ids] * group_size
        rewards = torch.randn(len(prompts), config.num_steps) if algo == "sdpo" else torch.randn(len(prompts))
        tracker.update(prompts, rewards)
        for prompt in set(prompts):
            buffers = tracker.buffers[prompt]
            sizes = [len(b) for b in buffers] if algo == "sdpo" else [len(buffers)]
            assert min(sizes) >= tracker.min_count, (epoch, prompt, sizes, tracker.min_count)
