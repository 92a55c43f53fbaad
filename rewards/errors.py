"""Errors a user can act on: each message is one paragraph that says what to do.

They are raised with `from None` so that a command line that catches
`RewardUnavailable` prints one paragraph, not a chain of tracebacks.
"""

from __future__ import annotations


class RewardUnavailable(RuntimeError):
    """A reward cannot be used on this machine (weights or packages are missing)."""


class MissingRewardWeights(RewardUnavailable):
    """The weights of a reward were found neither at the flag, the env var, nor the HF cache."""


class DamagedRewardWeights(RewardUnavailable):
    """A reward's weights folder was found, but a file in it does not parse."""


class MissingRewardPackages(RewardUnavailable):
    """A Python package a reward needs is not importable."""


class UnknownReward(ValueError):
    """A `--reward` spec names a reward that is not in the registry, or is malformed."""


class RewardServerError(RewardUnavailable):
    """A reward server (`--reward http://...`) was unreachable, too slow, or answered wrongly."""
