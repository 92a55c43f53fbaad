"""Plugin rewards, `--reward module.path:ClassName`: loading, the checks' messages, and
plugins inside weighted sums. The plugins are modules written to tmp_path."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from rewards.errors import MissingRewardPackages, UnknownReward
from rewards.base import NotDifferentiable
from rewards.registry import check_rewards, load_reward
from rewards.spec import gold_rewards, non_differentiable_rewards, parse_reward_spec
from rewards.weights import check_reward

PLUGIN = '''
import torch

from rewards.base import Reward


class Brightness(Reward):
    """Mean pixel value times `gain`; counts its constructions to show the checks build nothing."""

    built = 0

    def __init__(self, name, device="cpu", dtype=torch.float32, gain=2.0):
        super().__init__(device, dtype)
        self.name = name
        self.gain = gain
        Brightness.built += 1

    def _score(self, images, prompts):
        return self.gain * images.mean(dim=(1, 2, 3))


class Unfinished(Reward):
    def __init__(self, name, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.name = name


class Positional(Reward):
    def __init__(self, threshold, device="cpu"):
        super().__init__(device)

    def _score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class NotAReward:
    def __init__(self, name, device="cpu", dtype=torch.float32):
        self.name = name

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def helper():
    pass
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The module `my_plugins.scores` (PLUGIN) importable from tmp_path."""
    package = tmp_path / "my_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_plugins.scores"
    for name in ["my_plugins", "my_plugins.scores"]:
        sys.modules.pop(name, None)


def images() -> torch.Tensor:
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def test_plugin_is_loaded_by_spec_and_scores(plugin):
    reward = load_reward(f"{plugin}:Brightness")
    assert type(reward).__name__ == "Brightness" and type(reward).__module__ == plugin
    assert reward.name == f"{plugin}:Brightness"
    batch = images()
    torch.testing.assert_close(reward.score(batch, ["a", "b", "c"]), 2.0 * batch.mean(dim=(1, 2, 3)))
    assert reward.calls == 1 and reward.images_scored == 3


def test_plugin_is_built_with_name_device_and_dtype(plugin):
    reward = load_reward(f"{plugin}:Brightness", device="meta", dtype=torch.float16)
    assert reward.device == torch.device("meta") and reward.dtype == torch.float16


def test_check_imports_but_builds_nothing(plugin):
    assert check_reward(f"{plugin}:Brightness") == {}
    assert sys.modules[plugin].Brightness.built == 0


def test_weighted_sum_of_registered_reward_and_plugin(plugin):
    spec = f"jpeg_compressibility:1,{plugin}:Brightness:0.5"
    assert parse_reward_spec(spec) == [("jpeg_compressibility", 1.0), (f"{plugin}:Brightness", 0.5)]
    batch = images()
    jpeg = load_reward("jpeg_compressibility").score(batch, [""] * 3)
    total = load_reward(spec)
    torch.testing.assert_close(total.score(batch, [""] * 3), jpeg + 0.5 * 2.0 * batch.mean(dim=(1, 2, 3)))
    assert total.calls == 2  # one call to each member


def test_plugin_with_weight_one_and_no_gold(plugin):
    assert parse_reward_spec(f"{plugin}:Brightness:1") == [(f"{plugin}:Brightness", 1.0)]
    assert gold_rewards(f"tiny-align:1,{plugin}:Brightness:2") == ["tiny-align-gold"]


def test_missing_module_names_module_flag_and_fix(plugin):
    with pytest.raises(MissingRewardPackages) as caught:
        check_rewards("jpeg_compressibility,no_such_pkg.rewards:Sharp:0.5")
    message = str(caught.value)
    assert "--reward no_such_pkg.rewards:Sharp" in message and "'no_such_pkg.rewards'" in message
    assert "pip install" in message and "PYTHONPATH" in message and "\n" not in message


def test_missing_class_names_class_module_and_what_it_has(plugin):
    with pytest.raises(UnknownReward) as caught:
        load_reward(f"{plugin}:Brightnes")
    message = str(caught.value)
    assert f"--reward {plugin}:Brightnes" in message and "'Brightnes'" in message and f"'{plugin}'" in message
    assert message.endswith("its Reward subclasses are Brightness, Positional.")
    assert "scores.py" in message


@pytest.mark.parametrize(
    "attribute, complaint",
    [
        ("NotAReward", "not a subclass of rewards.base.Reward"),
        ("helper", "not a subclass of rewards.base.Reward"),
        ("torch", "not a subclass of rewards.base.Reward"),
        ("Unfinished", "leaves _score unimplemented"),
        ("Positional", "cannot be built as Positional(name=..., device=..., dtype=...)"),
    ],
)
def test_plugin_that_breaks_the_contract_is_refused_before_building(plugin, attribute, complaint):
    with pytest.raises(UnknownReward) as caught:
        load_reward(f"jpeg_compressibility,{plugin}:{attribute}")
    assert complaint in str(caught.value) and f"--reward {plugin}:{attribute}" in str(caught.value)


@pytest.mark.parametrize("spec", ["hpsv2:x", "my_plugins.scores:Brightness:x", "3d.module:Cls", "mod:Cls:1:2"])
def test_malformed_plugin_terms_are_refused_while_parsing(spec):
    with pytest.raises(UnknownReward, match="--reward"):
        parse_reward_spec(spec)


def test_unknown_name_lists_the_plugin_and_server_forms():
    with pytest.raises(UnknownReward) as caught:
        parse_reward_spec("aesthetik")
    assert "module.path:ClassName" in str(caught.value) and "http://HOST:PORT/NAME" in str(caught.value)


# --- command lines -------------------------------------------------------------------


def test_benchmark_refuses_a_broken_plugin_before_loading_anything(plugin, capsys, tmp_path):
    from benchmarks.run import main

    out = str(tmp_path / "run")
    assert main(["--reward", "no_such_pkg.rewards:Sharp", "--out", out]) == 2
    assert main(["--eval-rewards", f"{plugin}:helper", "--out", out]) == 2
    assert not (tmp_path / "run").exists()
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("error: --reward no_such_pkg.rewards:Sharp: the plugin module 'no_such_pkg.rewards'")
    assert second.startswith(f"error: --eval-rewards {plugin}:helper: 'helper'") and "not a subclass" in second


SMALL_PLUGINS = '''
import torch

from rewards.base import Reward


class Smallest(Reward):
    """What a user writes first, as the built-in rewards look: a name and `_score`."""

    name = "smallest"

    def _score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class Explodes(Reward):
    def __init__(self, name, device="cpu", dtype=torch.float32):
        raise RuntimeError("no GPU with 80 GB here")

    def _score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))
'''


@pytest.fixture
def small_plugins(plugin, tmp_path):
    """The module `my_plugins.small` (SMALL_PLUGINS) next to `my_plugins.scores`."""
    (tmp_path / "my_plugins" / "small.py").write_text(textwrap.dedent(SMALL_PLUGINS))
    yield "my_plugins.small"
    sys.modules.pop("my_plugins.small", None)


def test_the_smallest_plugin_is_built_with_the_base_constructor_and_named_by_its_term(small_plugins):
    """A subclass that only sets `name` and defines `_score` passes the check and is built
    as Smallest(device=..., dtype=...), then named by its term (issue 29, case 9)."""
    spec = f"{small_plugins}:Smallest"
    assert check_reward(spec) == {}
    reward = load_reward(spec, device="meta", dtype=torch.float16)
    assert type(reward).__name__ == "Smallest" and reward.name == spec
    assert reward.device == torch.device("meta") and reward.dtype == torch.float16
    summed = load_reward(f"jpeg_compressibility,{spec}:0.5")
    assert [member.name for member, _ in summed.members] == ["jpeg_compressibility", spec]
    batch = images()
    torch.testing.assert_close(load_reward(spec).score(batch, ["a", "b", "c"]), batch.mean(dim=(1, 2, 3)))


def test_a_plugin_whose_constructor_raises_stops_the_run_in_one_line_before_the_model_loads(
    small_plugins, capsys, tmp_path, tiny_pipeline_dir, monkeypatch
):
    """The constructor runs only when the run loads its rewards: it raises, and the run
    ends with exit code 2 and one line naming the flag and the error, before the diffusion
    model loads and before the output folder is made (issue 29, case 4)."""
    from benchmarks.run import main
    from zoo.unet_policy import UNetPolicy

    def no_model(*args, **kwargs):
        raise AssertionError("the diffusion model was loaded")

    monkeypatch.setattr(UNetPolicy, "load", no_model)
    out = tmp_path / "run"
    args = ["--model", tiny_pipeline_dir, "--reward", "jpeg_compressibility", "--algos", "ddpo", "--out", str(out)]
    assert main(args + ["--eval-rewards", f"{small_plugins}:Explodes"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"error: --eval-rewards {small_plugins}:Explodes: the plugin's constructor raised "
                                    "RuntimeError: no GPU with 80 GB here; fix the plugin")
    assert not out.exists()


def test_reward_weights_that_do_not_load_stop_the_run_in_one_line(capsys, tmp_path, tiny_pipeline_dir, monkeypatch):
    """A weights folder whose JSON files parse but whose weights do not load: one line
    naming the flag and the folder, exit code 2, nothing written (issue 29, case 4)."""
    import shutil

    from benchmarks.run import main
    from rewards.catalog import REWARDS

    clip = tmp_path / "clip"
    shutil.copytree(REWARDS["tiny-clip"].artifacts[0].default_path, clip)
    (clip / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "run"
    assert main(["--model", tiny_pipeline_dir, "--reward", "tiny-clip", "--reward-path", f"tiny-clip={clip}",
                 "--algos", "ddpo", "--eval-rewards", "", "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --reward tiny-clip: its weights ({clip}) do not load (")
    assert not out.exists()


def test_help_lists_algorithms_rewards_and_the_other_forms(capsys):
    from benchmarks.run import main
    from rewards.__main__ import main as rewards_main
    from rewards.catalog import REWARDS
    from zoo.registry import ALGORITHMS

    texts = []
    for command in [main, rewards_main]:
        with pytest.raises(SystemExit) as stop:
            command(["--help"])
        assert stop.value.code == 0
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert all(name in text for name in REWARDS)
        assert "module.path:ClassName" in text and "http://HOST:PORT/NAME" in text
    assert f"Algorithms (--algos): {', '.join(ALGORITHMS)}." in texts[0]


def test_result_folder_of_a_plugin_or_server_reward_is_one_folder():
    from benchmarks.plan import folder_label

    assert folder_label("aesthetic:1,pickscore:0.5") == "aesthetic1+pickscore0.5"
    assert folder_label("http://127.0.0.1:8000/jpeg_compressibility:0.5,my.mod:Cls") == (
        "http-127.0.0.18000-jpeg_compressibility0.5+my.modCls"
    )


SMOOTH_PLUGIN = '''
from my_plugins.scores import Brightness


class SmoothBrightness(Brightness):
    """Brightness, declared differentiable (it is torch from the pixels to the score)."""

    differentiable = True


class Dimness(SmoothBrightness):
    def _score(self, images, prompts):
        return -super()._score(images, prompts)
'''


@pytest.fixture
def smooth_plugin(plugin, tmp_path):
    """The module `my_plugins.smooth` (SMOOTH_PLUGIN): differentiable plugin rewards."""
    (tmp_path / "my_plugins" / "smooth.py").write_text(textwrap.dedent(SMOOTH_PLUGIN))
    yield "my_plugins.smooth"
    sys.modules.pop("my_plugins.smooth", None)


def test_differentiability_is_read_from_the_plugin_class_and_the_registry(plugin, smooth_plugin):
    """A plugin is differentiable when its class says so; a server never is; a weighted
    sum names each member that is not, and builds nothing to find out."""
    from my_plugins.scores import Brightness

    built = Brightness.built
    assert non_differentiable_rewards(f"{smooth_plugin}:SmoothBrightness") == []
    assert non_differentiable_rewards(f"{plugin}:Brightness") == [f"{plugin}:Brightness"]
    spec = f"tiny-aesthetic:1,{smooth_plugin}:Dimness:2,jpeg_compressibility:0.1,http://localhost:9/aesthetic"
    assert non_differentiable_rewards(spec) == ["jpeg_compressibility", "http://localhost:9/aesthetic"]
    assert Brightness.built == built


def test_weighted_sum_of_differentiable_rewards_keeps_the_graph(smooth_plugin):
    """2 * SmoothBrightness + 0.5 * Dimness = 2 * 2 mean - 0.5 * 2 mean = 3 * mean(images)
    (gain 2): the gradient of the first image's score is 3 / (3 * 8 * 8) = 0.015625 at every
    pixel, and none reaches the other images. Counted like `score`: one call per member."""
    total = load_reward(f"{smooth_plugin}:SmoothBrightness:2,{smooth_plugin}:Dimness:0.5")
    assert total.differentiable
    batch = images().requires_grad_(True)
    scores = total.score_with_grad(batch, ["a", "b", "c"])
    torch.testing.assert_close(scores, 3 * batch.detach().mean(dim=(1, 2, 3)))
    scores[0].backward()
    torch.testing.assert_close(batch.grad[0], torch.full((3, 8, 8), 3 / 192))
    assert batch.grad[1:].abs().max() == 0
    assert total.calls == 2 and total.images_scored == 6


def test_a_weighted_sum_with_one_non_differentiable_member_refuses_gradients(smooth_plugin):
    total = load_reward(f"{smooth_plugin}:SmoothBrightness:1,jpeg_compressibility:1")
    assert not total.differentiable
    with pytest.raises(NotDifferentiable, match="jpeg_compressibility"):
        total.score_with_grad(images(), ["a", "b", "c"])
