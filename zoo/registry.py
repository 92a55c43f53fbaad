"""Algorithm name -> config dataclass. The runner parses the config with tyro and calls
`config.build()` for the `zoo.algorithm.Algorithm`.

Adding an algorithm: write `zoo/<name>.py` (a config subclassing `zoo.algorithm.TrainingConfig`
with `build()`), add one line here, add
`tests/test_algo_<name>.py` with its worked numbers.
"""

from zoo.algorithm import TrainingConfig
from zoo.awm import AWMConfig
from zoo.d3po import D3POConfig
from zoo.ddpo import DDPOConfig
from zoo.draft import DRaFTConfig
from zoo.grpo import GRPOConfig
from zoo.mixgrpo import MixGRPOConfig
from zoo.nft import NFTConfig
from zoo.rebel import REBELConfig
from zoo.sdpo import SDPOConfig

ALGORITHMS: dict[str, type[TrainingConfig]] = {
    "ddpo": DDPOConfig,
    "rebel": REBELConfig,
    "d3po": D3POConfig,
    "sdpo": SDPOConfig,
    "grpo": GRPOConfig,
    "draft": DRaFTConfig,
    "nft": NFTConfig,
    "awm": AWMConfig,
    "mixgrpo": MixGRPOConfig,
}
