"""Plugin rewards, the `--reward` term `module.path:ClassName`, and the check of their
contract.

A plugin is any importable subclass of `rewards.base.Reward` that implements `_score`
(and `_modules` if it holds networks). A class that keeps `Reward`'s constructor (the
smallest plugin: `name` and `_score`) is built as `ClassName(device=..., dtype=...)` and
its `name` set to the term; one with its own constructor is built as
`ClassName(name=<the term>, device=..., dtype=...)`, sets `self.name = name`, calls
`super().__init__(device, dtype)` and finds its own weights. The check imports the
module (and torch with it) and inspects the class; it builds nothing (`rewards.registry`
builds it).
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING

from rewards.errors import MissingRewardPackages, UnknownReward

if TYPE_CHECKING:
    from rewards.base import Reward


def plugin_class(name: str, flag: str = "--reward") -> type["Reward"]:
    """The class of a plugin reward `module.path:ClassName`, checked against the contract
    (module docstring) without building it. Raises MissingRewardPackages when the module
    does not import, UnknownReward when the class is missing or breaks the contract; both
    name `flag`, the option that named the plugin."""
    from rewards.base import Reward

    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MissingRewardPackages(
            f"{flag} {name}: the plugin module {module_name!r} cannot be imported ({type(error).__name__}: "
            f"{error}); install the package that provides it (pip install ...) or add the folder that holds "
            f"it to PYTHONPATH."
        ) from None
    where = f"the module {module_name!r} ({getattr(module, '__file__', None) or 'no file'})"
    found = getattr(module, class_name, None)
    if found is None:
        defined = [
            key for key, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Reward) and not inspect.isabstract(value)
        ]
        raise UnknownReward(
            f"{flag} {name}: {where} has no attribute {class_name!r}; its Reward subclasses are "
            f"{', '.join(defined) or 'none'}."
        )
    if not (isinstance(found, type) and issubclass(found, Reward)):
        raise UnknownReward(
            f"{flag} {name}: {class_name!r} in {where} is {found!r}, not a subclass of rewards.base.Reward; "
            "a plugin reward subclasses it and implements _score."
        )
    if inspect.isabstract(found):
        raise UnknownReward(
            f"{flag} {name}: {class_name} in {where} leaves {', '.join(sorted(found.__abstractmethods__))} "
            "unimplemented."
        )
    if uses_base_constructor(found):
        return found
    try:
        inspect.signature(found).bind(name=name, device="cpu", dtype=None)
    except TypeError as error:
        raise UnknownReward(
            f"{flag} {name}: {class_name} in {where} cannot be built as {class_name}(name=..., device=..., "
            f"dtype=...) ({error}); give its constructor those keyword arguments."
        ) from None
    return found


def uses_base_constructor(reward_class: type["Reward"]) -> bool:
    """Whether a plugin class keeps `Reward.__init__`, as the smallest plugin does (it sets
    `name` and defines `_score`, like the built-in rewards): it is built with that
    constructor and then named by its term (`rewards.registry._build`)."""
    from rewards.base import Reward

    return reward_class.__init__ is Reward.__init__
