"""`python -m rewards check SPEC [--reward-path KEY=PATH ...]`: the preflight as a command.

Prints where each reward's weights were found, or the reason it cannot be
loaded (exit status 2, no traceback). It loads no model.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from rewards.catalog import REWARDS
from rewards.errors import RewardUnavailable
from rewards.registry import check_rewards
from rewards.spec import REWARD_FORMS, parse_reward_paths
from zoo.hub import DownloadFailed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards",
        description=__doc__.splitlines()[0],
        # Filled here, not by argparse, which would break names like tiny-align at the hyphen.
        epilog=textwrap.fill(f"Rewards: {', '.join(REWARDS)}; or {REWARD_FORMS}.", break_on_hyphens=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["check"])
    parser.add_argument("reward", help="a --reward spec, e.g. aesthetic, aesthetic:1,pickscore:0.5 or mypkg.mod:MyReward")
    parser.add_argument("--reward-path", action="append", default=[], metavar="NAME[:ROLE]=PATH")
    args = parser.parse_args(argv)
    try:
        found = check_rewards(args.reward, parse_reward_paths(args.reward_path))
    except (RewardUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DownloadFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, artifacts in found.items():
        where = ", ".join(f"{role}: {path}" for role, path in artifacts.items()) or "no weights needed"
        print(f"{name}: ok ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
