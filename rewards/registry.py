"""Rewards from a `--reward` spec: `check_rewards`, the preflight of every term, and
`load_reward`, which builds each term after it (a registered reward from its weights, a
server's client, a plugin) and sums the members of a weighted spec.

What it combines: the catalog of registered rewards (rewards.catalog), the spec's
grammar (rewards.spec), the weights lookup and the preflight of one term
(rewards.weights), and plugin classes (rewards.plugins).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from rewards.catalog import REWARDS
from rewards.errors import RewardUnavailable
from rewards.plugins import plugin_class, uses_base_constructor
from rewards.spec import SERVER_NAME, parse_reward_spec
from rewards.weights import check_reward

if TYPE_CHECKING:
    import torch

    from rewards.base import Reward


def check_rewards(
    spec: str, paths: dict[str, str | Path] | None = None, flag: str = "--reward"
) -> dict[str, dict[str, Path]]:
    """Preflight of every reward of a `--reward` spec (given as `flag`): name -> (role -> path)."""
    return {name: check_reward(name, paths=paths, flag=flag) for name, _ in parse_reward_spec(spec, flag)}


def load_reward(
    spec: str,
    device: "torch.device | str" = "cpu",
    dtype: "torch.dtype | None" = None,
    paths: dict[str, str | Path] | None = None,
    flag: str = "--reward",
) -> "Reward":
    """Builds the reward of a `--reward` spec (given as `flag`), after `check_rewards`
    found everything.

    One name with weight 1 gives that reward; otherwise a WeightedSum of the members.
    Raises RewardUnavailable naming `flag` when a reward cannot be built (weights that
    do not load, a plugin's constructor that raises).
    """
    import torch

    from rewards.base import WeightedSum

    dtype = torch.float32 if dtype is None else dtype
    found = check_rewards(spec, paths, flag)
    terms = parse_reward_spec(spec, flag)
    members = [(_build(name, found[name], device, dtype, flag), weight) for name, weight in terms]
    if len(members) == 1 and members[0][1] == 1.0:
        return members[0][0]
    return WeightedSum(members)


def _build(
    name: str, found: dict[str, Path], device: "torch.device | str", dtype: "torch.dtype", flag: str
) -> "Reward":
    """One checked reward: a registered one from its weights, a server's client, or a plugin."""
    if re.fullmatch(SERVER_NAME, name):
        from rewards.http import HttpReward

        return HttpReward.from_env(name, device=device, dtype=dtype)
    # Loading runs third-party code on files the preflight only looked at: its failure is
    # reported as one line naming the reward, not as a traceback from inside a library.
    reward_class = None if name in REWARDS else plugin_class(name, flag)
    try:
        if reward_class is None:
            return REWARDS[name].build(REWARDS[name], found, device, dtype)
        if not uses_base_constructor(reward_class):
            return reward_class(name=name, device=device, dtype=dtype)
        reward = reward_class(device=device, dtype=dtype)
        reward.name = name
        return reward
    except RewardUnavailable:
        raise
    except Exception as error:
        why = f"{type(error).__name__}: {' '.join(str(error).split())}"
        if reward_class is None:
            where = ", ".join(str(path) for path in found.values()) or "no files"
            raise RewardUnavailable(
                f"{flag} {name}: its weights ({where}) do not load ({why}); replace them with an intact copy "
                "(`python -m rewards check NAME` shows where each is looked for)"
            ) from None
        raise RewardUnavailable(f"{flag} {name}: the plugin's constructor raised {why}; fix the plugin") from None
