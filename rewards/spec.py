"""The grammar of `--reward` and `--reward-path`, and what a `--reward` spec tells
without loading anything: its golds, and its members that are not differentiable.

A spec is one term or a weighted sum of terms (`aesthetic:1,pickscore:0.5`). A term is
- a registered name (`rewards.catalog.REWARDS`),
- a plugin, `module.path:ClassName`: any importable subclass of `rewards.base.Reward`
  (its contract and check are in rewards.plugins),
- a reward server, `http://HOST:PORT/NAME` (or https), as `python -m rewards.serve NAME`
  prints it: scored by `rewards.http.HttpReward`; the preflight asks the server's health
  endpoint, so a dead server is reported before training starts.
Registered names come first: `hpsv2:2` is hpsv2 with weight 2, never a plugin.

`--reward-path NAME=PATH` gives a reward's weights, `--reward-path NAME:ROLE=PATH` its
other artifacts (`path_key`); rewards.weights says where they are looked for otherwise.
"""

from __future__ import annotations

import math
import re

from rewards.catalog import GOLD_OF, PRIMARY, REWARDS
from rewards.errors import UnknownReward
from rewards.plugins import plugin_class


PLUGIN_NAME = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"
"""A plugin reward, `module.path:ClassName`."""
SERVER_NAME = r"https?://[^/\s,]+/[^\s,:]+"
"""A reward server, `http://HOST:PORT/NAME`: the path is required (and has no `:`), so a
`:weight` after it is never mistaken for the port."""
_EXTERNAL_TERM = re.compile(rf"(?P<name>{SERVER_NAME}|{PLUGIN_NAME})(?::(?P<weight>[^:]*))?")

REWARD_FORMS = (
    "a plugin class module.path:ClassName (a rewards.base.Reward subclass on the Python path), "
    "or a reward server http://HOST:PORT/NAME (started with python -m rewards.serve NAME)"
)
"""The non-registered forms of a `--reward` term, for help texts and errors."""


def path_key(name: str, role: str = PRIMARY) -> str:
    """The key of `paths` (and of `--reward-path KEY=PATH`) for a reward's artifact."""
    return name if role == PRIMARY else f"{name}:{role}"


def _name_and_weight(term: str) -> tuple[str, str] | None:
    """A term's reward name and weight text ('' when absent), or None if it is no reward."""
    name, _, weight_text = term.partition(":")
    if name in REWARDS:
        return name, weight_text
    match = _EXTERNAL_TERM.fullmatch(term)
    return (match["name"], match["weight"] or "") if match else None


def parse_reward_spec(spec: str, flag: str = "--reward") -> list[tuple[str, float]]:
    """'aesthetic:1,pickscore:0.5' -> [('aesthetic', 1.0), ('pickscore', 0.5)]; a missing
    weight is 1. A term may also be a plugin or a server (module docstring), weighted the
    same way: 'tiny-align:1,mypkg.rewards:Sharpness:0.5'. A weight must be a finite number
    other than 0 (a negative one minimises its reward). Imports nothing. Raises
    UnknownReward (a ValueError) naming `flag` (the option the spec came from) and the
    choices."""
    choices = ", ".join(REWARDS)
    terms = []
    for term in spec.split(","):
        term = term.strip()
        parsed = _name_and_weight(term)
        if parsed is None:
            unknown = term if "://" in term else term.partition(":")[0]
            raise UnknownReward(
                f"{flag}: unknown reward {unknown!r} in {spec!r}; choose from {choices}, "
                f"{REWARD_FORMS} (a weighted sum is written aesthetic:1,pickscore:0.5)"
            )
        name, weight_text = parsed
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise UnknownReward(f"{flag}: weight {weight_text!r} of {name!r} in {spec!r} is not a number") from None
        # A weight of 0 trains on a constant and NaN or inf scores nothing: refused, not run.
        if weight == 0 or not math.isfinite(weight):
            raise UnknownReward(
                f"{flag}: weight {weight_text} of {name!r} in {spec!r} "
                f"{'leaves it out of every score' if weight == 0 else 'makes every score NaN or inf'}; give a finite "
                f"non-zero weight (negative to minimise {name}), or leave the term out"
            )
        if name in dict(terms):
            raise UnknownReward(f"{flag}: {name!r} appears twice in {spec!r}")
        terms.append((name, weight))
    return terms


def parse_reward_paths(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """--reward-path items ('aesthetic=/a.pth', 'aesthetic:clip=/clip') as {key: path};
    every key must name a reward's weights (`path_key`). Raises UnknownReward."""
    keys = [path_key(name, artifact.role) for name, spec in REWARDS.items() for artifact in spec.artifacts]
    paths = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise UnknownReward(f"--reward-path: expected NAME=PATH or NAME:ROLE=PATH, got {item!r}")
        if key not in keys:
            raise UnknownReward(f"--reward-path: {key!r} names no reward's weights; choose from {', '.join(keys)}")
        paths[key] = path
    return paths


def non_differentiable_rewards(spec: str) -> list[str]:
    """The rewards of a `--reward` spec (its members, for a weighted sum) that are not
    differentiable, in the spec's order, without loading any: a registered one by its
    `RewardSpec.differentiable`, a plugin by its class's `differentiable` (the module is
    imported), a server never (its images travel as 8-bit, rewards/http.py). Raises
    UnknownReward."""
    blocked = []
    for name, _ in parse_reward_spec(spec):
        if name in REWARDS:
            differentiable = REWARDS[name].differentiable
        elif re.fullmatch(SERVER_NAME, name):
            differentiable = False
        else:
            differentiable = plugin_class(name).differentiable
        if not differentiable:
            blocked.append(name)
    return blocked


def gold_rewards(spec: str) -> list[str]:
    """The golds of the rewards of a `--reward` spec (of each member of a weighted sum), in
    the spec's order, each once; [] when none is a proxy. Raises UnknownReward."""
    golds = (GOLD_OF.get(name) for name, _ in parse_reward_spec(spec))
    return list(dict.fromkeys(gold for gold in golds if gold is not None))
