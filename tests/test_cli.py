"""The runner's command line: `--help` lists every preset."""

import contextlib
import io

import pytest

from benchmarks.cli import parse_args
from benchmarks.presets import PRESETS


def test_help_lists_every_preset():
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        parse_args(["--help"])
    flat = " ".join(shown.getvalue().split())
    assert f"Model, prompts, sampler and budget: {', '.join(PRESETS)} " in flat
