import pytest
import torch

from zoo.tiny.arch import build_random_pipeline

# Tests run on 2 shared CPU cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A random-weight SD-shaped pipeline (DDIM, trailing spacing) saved in diffusers format."""
    return str(build_random_pipeline(tmp_path_factory.mktemp("tiny-ddim") / "pipe", seed=0))


@pytest.fixture(scope="session")
def tiny_lcm_pipeline_dir(tmp_path_factory) -> str:
    """The same with an LCM guidance-embedding UNet and an LCMScheduler."""
    return str(build_random_pipeline(tmp_path_factory.mktemp("tiny-lcm") / "pipe", seed=1, lcm=True))
