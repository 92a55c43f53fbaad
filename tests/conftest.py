import pytest
import torch

from zoo.tiny.arch import build_random_pipeline

# One torch thread: when the 2 cores are shared with other jobs, two threads slow every
# kernel down many times over (threads spin waiting for each other; measured here), one
# thread only loses its share of the CPU.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test reaches the real hub: a missing model or reward weights are refused, as
    offline, instead of downloaded (tests/test_hub_download.py serves a local hub)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A random-weight SD-shaped pipeline (DDIM, trailing spacing) saved in diffusers format."""
    return str(build_random_pipeline(tmp_path_factory.mktemp("tiny-ddim") / "pipe", seed=0))


@pytest.fixture(scope="session")
def tiny_lcm_pipeline_dir(tmp_path_factory) -> str:
    """The same with an LCM guidance-embedding UNet and an LCMScheduler."""
    return str(build_random_pipeline(tmp_path_factory.mktemp("tiny-lcm") / "pipe", seed=1, lcm=True))


@pytest.fixture(scope="session")
def tiny_flow_pipeline_dir(tmp_path_factory) -> str:
    """A random-weight SD3-shaped flow-matching pipeline (zoo/tiny/flow.py)."""
    from zoo.tiny.flow import build_random_flow_pipeline

    return str(build_random_flow_pipeline(tmp_path_factory.mktemp("tiny-flow") / "pipe", seed=0))
