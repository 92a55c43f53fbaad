"""Registry, preflight errors, JPEG rewards, weighted sums and the executor (no models)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import NotDifferentiable, Reward
from rewards.catalog import REWARDS
from rewards.errors import MissingRewardWeights, RewardUnavailable, UnknownReward
from rewards.executor import RewardExecutor
from rewards.registry import load_reward
from rewards.spec import parse_reward_spec
from rewards.weights import check_reward, env_var

REPO = Path(__file__).resolve().parents[1]
WEIGHTED = [name for name, spec in REWARDS.items() if spec.artifacts]


@pytest.fixture
def empty_machine(tmp_path, monkeypatch):
    """No STEPZOO_* variables, an empty HF cache and an empty home directory."""
    for variable in list(os.environ):
        if variable.startswith("STEPZOO_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def noise_and_flat(size: int = 64) -> torch.Tensor:
    noise = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 3, size, size), 0.5)
    return torch.cat([noise, flat])  # (2, 3, size, size)


# --- parsing -------------------------------------------------------------------------


def test_parse_weighted_spec():
    assert parse_reward_spec("aesthetic:1,pickscore:0.5") == [("aesthetic", 1.0), ("pickscore", 0.5)]
    assert parse_reward_spec("hpsv2.1") == [("hpsv2.1", 1.0)]
    assert parse_reward_spec(" jpeg_compressibility:-2 ") == [("jpeg_compressibility", -2.0)]


def test_unknown_reward_names_flag_and_choices():
    with pytest.raises(UnknownReward) as caught:
        parse_reward_spec("aesthetic:1,pickscor:0.5")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "--reward" in message and "'pickscor'" in message and "\n" not in message
    assert all(name in message for name in REWARDS)


@pytest.mark.parametrize("spec", ["aesthetic:x", "aesthetic,aesthetic:2"])
def test_malformed_spec_is_one_line_error(spec):
    with pytest.raises(UnknownReward, match="--reward"):
        parse_reward_spec(spec)


def test_env_var_names():
    assert env_var("hpsv2.1") == "STEPZOO_HPSV2_1_PATH"
    assert env_var("tiny-clip") == "STEPZOO_TINY_CLIP_PATH"
    assert env_var("aesthetic", "clip") == "STEPZOO_AESTHETIC_CLIP_PATH"


def test_every_spec_documents_itself():
    for name, spec in REWARDS.items():
        assert spec.name == name
        assert spec.source and spec.inputs and spec.score_range and spec.packages
        for artifact in spec.artifacts:
            assert artifact.files and artifact.published and artifact.what


# --- missing weights -----------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTED)
def test_missing_weights_are_a_fast_line_with_the_fix_then_details(name, empty_machine):
    shipped = [artifact.default_path for artifact in REWARDS[name].artifacts if artifact.default_path is not None]
    if name.startswith("tiny-") and shipped and all(path.is_dir() for path in shipped):
        pytest.skip(f"the shipped {name} files exist")
    start = time.perf_counter()
    with pytest.raises(MissingRewardWeights) as caught:
        check_reward(name)
    assert time.perf_counter() - start < 0.5
    assert isinstance(caught.value, RewardUnavailable)
    message = str(caught.value)
    first, details = message.split("\n")  # what is missing and the fix, then details
    assert first.startswith(f"Reward '{name}'") and "fix: " in first and details.startswith("It needs")
    if any(artifact.hub_repo for artifact in REWARDS[name].artifacts):
        assert "fix: `hf download " in first
    for artifact in REWARDS[name].artifacts:
        assert artifact.files[0][0] in message  # the files
        assert artifact.published in message  # where they are published
    assert f"--reward-path {name}=PATH" in message and env_var(name) in message  # the fix
    if any(artifact.hub_repo for artifact in REWARDS[name].artifacts):
        assert str(empty_machine / "hf") in message


def test_preflight_imports_no_torch_and_prints_no_traceback(empty_machine):
    """The command a user sees: the fix's line and one paragraph on stderr, exit status 2, torch never imported."""
    code = (
        "import sys\n"
        "from rewards.__main__ import main\n"
        "status = main(['check', 'aesthetic:1,jpeg_compressibility:0.1'])\n"
        "assert 'torch' not in sys.modules, 'preflight imported torch'\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: Reward 'aesthetic'") and result.stderr.count("\n") == 2
    assert "sac+logos+ava1-l14-linearMSE.pth" in result.stderr and "STEPZOO_AESTHETIC_PATH" in result.stderr


def test_load_reward_fails_before_building_anything(empty_machine, monkeypatch):
    built = []
    spec = REWARDS["jpeg_compressibility"]
    monkeypatch.setitem(REWARDS, spec.name, dataclasses.replace(spec, build=lambda *args: built.append(args)))
    with pytest.raises(MissingRewardWeights, match="hpsv2"):
        load_reward("jpeg_compressibility:1,hpsv2:1")
    assert built == []


def test_wrong_env_path_is_reported_not_skipped(empty_machine, monkeypatch):
    monkeypatch.setenv("STEPZOO_HPSV2_PATH", str(empty_machine / "nowhere.pt"))
    with pytest.raises(MissingRewardWeights, match=r"STEPZOO_HPSV2_PATH points at .*nowhere.pt, which does not exist"):
        check_reward("hpsv2")


def test_lookup_order_flag_then_env_then_hub_cache(empty_machine, monkeypatch):
    snapshot = empty_machine / "hf" / "models--xswu--HPSv2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "HPS_v2_compressed.pt").write_bytes(b"x")
    (empty_machine / "hf" / "models--xswu--HPSv2" / "refs").mkdir()
    (empty_machine / "hf" / "models--xswu--HPSv2" / "refs" / "main").write_text("abc123")
    assert check_reward("hpsv2") == {"weights": snapshot / "HPS_v2_compressed.pt"}

    from_env = empty_machine / "env" / "HPS_v2_compressed.pt"
    from_env.parent.mkdir()
    from_env.write_bytes(b"x")
    monkeypatch.setenv("STEPZOO_HPSV2_PATH", str(from_env.parent))  # a folder holding the file
    assert check_reward("hpsv2") == {"weights": from_env}

    from_flag = empty_machine / "flag.pt"
    from_flag.write_bytes(b"x")
    assert check_reward("hpsv2", path=from_flag) == {"weights": from_flag}


# --- JPEG ----------------------------------------------------------------------------


def test_flat_image_is_more_compressible_than_noise():
    images = noise_and_flat()
    compress = load_reward("jpeg_compressibility").score(images, ["", ""])
    incompress = load_reward("jpeg_incompressibility").score(images, ["", ""])
    assert compress.dtype == torch.float32 and compress.shape == (2,)
    assert compress[1] > compress[0]  # flat beats noise
    assert incompress[0] > incompress[1]
    torch.testing.assert_close(compress, -incompress)


def test_jpeg_size_is_pil_quality_95_in_kilobytes():
    images = noise_and_flat()
    buffer = io.BytesIO()
    pixels = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=95)
    scores = load_reward("jpeg_incompressibility").score(images, ["", ""])
    assert scores[0].item() == pytest.approx(len(buffer.getvalue()) / 1000)


# --- weighted sums, counters, executor ----------------------------------------------


def test_weighted_sum_scores_and_counts_model_calls():
    images = noise_and_flat()
    total = load_reward("jpeg_compressibility:2,jpeg_incompressibility:0.5")
    size = load_reward("jpeg_incompressibility").score(images, ["", ""])
    torch.testing.assert_close(total.score(images, ["a", "b"]), -2 * size + 0.5 * size)
    total.score(images[:1], ["a"])
    assert total.calls == 4  # two score calls, each one call to each of the two rewards
    assert total.images_scored == 6


class Failing(Reward):
    name = "failing"

    def _score(self, images, prompts):
        raise RuntimeError("scorer broke")


def test_executor_returns_scores_and_propagates_errors():
    reward = load_reward("jpeg_incompressibility")
    images = noise_and_flat()
    expected = reward.score(images, ["", ""])
    with RewardExecutor(reward) as executor:
        pending = executor.submit(images, ["", ""])
        images.zero_()  # the caller reuses its buffer at once
        torch.testing.assert_close(pending.result(), expected)
    with RewardExecutor(Failing()) as executor:
        with pytest.raises(RuntimeError, match="scorer broke"):
            executor.submit(noise_and_flat(), ["", ""]).result()


def test_score_checks_shapes():
    reward = load_reward("jpeg_compressibility")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward.score(noise_and_flat(), ["only one"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward.score(torch.rand(3, 8, 8), ["x"])


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility", "tiny-aesthetic-gold",
                                  "tiny-align-gold"])
def test_rewards_without_a_gradient_refuse_to_score_with_one(name):
    """JPEG sizes go through PIL's encoder and the golds through thresholded pixel rules:
    no gradient reaches the image, and asking for one is an error naming the reward,
    before anything is scored or counted."""
    reward = load_reward(name)
    assert not REWARDS[name].differentiable and not reward.differentiable
    with pytest.raises(NotDifferentiable, match=f"{name} is not differentiable"):
        reward.score_with_grad(noise_and_flat().requires_grad_(True), ["a red circle", "a blue square"])
    assert reward.calls == 0 and reward.images_scored == 0
