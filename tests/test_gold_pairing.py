"""Proxies and their golds (issue 13): the registry's declared pairs, and the runner
scoring a proxy training reward's gold at every evaluation without being asked. The
report's hacking marks are tested in tests/test_report.py."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.cli import parse_args
from benchmarks.plan import make_plan
from rewards.catalog import GOLD_OF, REWARDS
from rewards.spec import gold_rewards


@pytest.fixture(autouse=True)
def shipped_weights_only(monkeypatch):
    """Rewards are found where the repository ships them, not through the environment."""
    for name in [k for k in os.environ if k.startswith("STEPZOO_")]:
        monkeypatch.delenv(name)


def _plan(tmp_path, *flags: str):
    """The tiny preset's plan with `flags`; nothing is loaded."""
    return make_plan(parse_args(["--preset", "tiny", *flags, "--out", str(tmp_path / "run")]))


def test_declared_pairs():
    """Each tiny proxy names its gold; a gold is a registered, evaluation-only reward and no
    proxy itself; rewards without a gold (JPEG, tiny-clip) declare none; a weighted sum's
    golds are its members', in order."""
    assert GOLD_OF == {"tiny-aesthetic": "tiny-aesthetic-gold", "tiny-align": "tiny-align-gold"}
    for gold in GOLD_OF.values():
        assert gold in REWARDS and REWARDS[gold].gold is None and gold not in GOLD_OF
        assert "EVALUATION ONLY" in REWARDS[gold].source
    assert gold_rewards("jpeg_compressibility") == [] and gold_rewards("tiny-clip") == []
    assert gold_rewards("tiny-align:1,jpeg_compressibility:0.5,tiny-aesthetic:2") == [
        "tiny-align-gold", "tiny-aesthetic-gold"]


def test_training_on_a_proxy_evaluates_its_gold(tmp_path):
    """--reward tiny-aesthetic: tiny-aesthetic-gold joins the preset's watched rewards
    (first) and config.json; --eval-rewards adds others, "" leaves the gold alone, and
    naming the gold there does not score it twice."""
    plan = _plan(tmp_path, "--reward", "tiny-aesthetic")
    assert plan.eval_rewards == ["tiny-aesthetic-gold", "tiny-align-gold"]
    assert json.loads(json.dumps(plan.config_json()))["eval_rewards"] == ["tiny-aesthetic-gold", "tiny-align-gold"]
    assert _plan(tmp_path, "--reward", "tiny-aesthetic", "--eval-rewards", "").eval_rewards == ["tiny-aesthetic-gold"]
    named = _plan(tmp_path, "--reward", "tiny-aesthetic", "--eval-rewards", "tiny-align,tiny-aesthetic-gold")
    assert named.eval_rewards == ["tiny-aesthetic-gold", "tiny-align"]
    # The training reward's gold leads even where the preset lists another gold first.
    assert _plan(tmp_path, "--reward", "tiny-align").eval_rewards == ["tiny-align-gold", "tiny-aesthetic-gold"]


def test_a_weighted_sum_evaluates_its_members_golds(tmp_path):
    plan = _plan(tmp_path, "--reward", "tiny-aesthetic:1,tiny-align:0.5", "--eval-rewards", "")
    assert plan.eval_rewards == ["tiny-aesthetic-gold", "tiny-align-gold"]


def test_a_reward_without_gold_adds_nothing(tmp_path):
    """The JPEG task: the preset's watched golds only, or what --eval-rewards says."""
    assert _plan(tmp_path, "--reward", "jpeg_compressibility").eval_rewards == ["tiny-aesthetic-gold", "tiny-align-gold"]
    assert _plan(tmp_path, "--reward", "jpeg_compressibility", "--eval-rewards", "").eval_rewards == []
