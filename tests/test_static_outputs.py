"""CUDA graphs (torch.compile "reduce-overhead") return static buffers that the next replay
overwrites. The policy copies its predictions out of them (`Policy.static_outputs`), so
the sampler's trajectories and the predictions a loss keeps across UNet calls are those
of an ordinary UNet. Simulated on the CPU by a denoiser that returns one buffer."""

from types import SimpleNamespace

import torch

from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter


class OneBuffer(torch.nn.Module):
    """The UNet, returning every output in the same tensor, as a replayed CUDA graph does."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.buffer: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        sample = self.unet(*args, **kwargs).sample
        if self.buffer is None or self.buffer.shape != sample.shape:
            self.buffer = torch.empty_like(sample)
        self.buffer.copy_(sample)
        return SimpleNamespace(sample=self.buffer)


def _predictions(policy, guidance: float) -> list[torch.Tensor]:
    """Two predictions kept across UNet calls, as NFT keeps its old policy's."""
    generator = torch.Generator().manual_seed(0)
    embeds = policy.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        return [policy.predict(torch.randn(2, *policy.latent_shape, generator=generator),
                                     torch.tensor([999, 500]), embeds, guidance) for _ in range(2)]


def test_kept_predictions_survive_the_next_call_of_a_graph(tiny_pipeline_dir):
    """Without guidance the float32 prediction is the UNet's output itself: under a static
    buffer the first one would be overwritten by the second (shown with the copy off);
    with `static_outputs` both equal an ordinary UNet's."""
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    expected = _predictions(policy, 1.0)
    policy.denoiser = OneBuffer(policy.unet)
    policy.static_outputs = False
    first, second = _predictions(policy, 1.0)
    assert torch.equal(first, second) and not torch.equal(first, expected[0])
    policy.static_outputs = True
    for got, want in zip(_predictions(policy, 1.0), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_trajectories_sampled_from_a_graph_are_the_ordinary_ones(tiny_pipeline_dir):
    """Sampling with x̂0 recorded, with and without guidance, through a static buffer: every
    kept tensor equals the ordinary UNet's."""
    for guidance in (1.0, 3.0):
        trajectories = []
        for static in (False, True):
            policy = policy_with_random_adapter(tiny_pipeline_dir)
            if static:
                policy.denoiser, policy.static_outputs = OneBuffer(policy.unet), True
            sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, guidance, "trailing"))
            trajectories.append(sampler.sample(["a red circle"], group_size=2, record_pred_x0=True,
                                               generator=torch.Generator().manual_seed(1)))
        ordinary, replayed = trajectories
        for name in ("latents", "next_latents", "log_probs", "pred_x0", "images"):
            torch.testing.assert_close(getattr(replayed, name), getattr(ordinary, name), rtol=0, atol=0)
