"""The tiny world: a shapes-and-colours text-to-image model and CLIP judge, trained by
`python -m zoo.tiny.build` and shipped under zoo/tiny/assets/ in diffusers/transformers
folder formats (see results/tiny-world/README.md for how they were made and how good
they are)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
PIPELINE = ASSETS / "pipeline"
"""The base model: StableDiffusionPipeline folder, DDIMScheduler with trailing spacing."""
PIPELINE_LCM = ASSETS / "pipeline-lcm"
"""The LCM-distilled model: same VAE/text encoder/tokenizer, LCMScheduler. Built by
`python -m zoo.tiny.build`, not shipped (the few-step students are)."""
PIPELINE_FLOW = ASSETS / "pipeline-flow"
"""The flow-matching model: StableDiffusion3Pipeline folder (zoo/tiny/flow.py), sharing the
base pipeline's VAE, text encoder and tokenizer."""
PIPELINE_TURBO = ASSETS / "pipeline-turbo"
"""The base UNet distilled to sample in 1 to 8 steps without guidance (zoo/tiny/turbo.py):
StableDiffusionPipeline folder, DDIMScheduler with trailing spacing, sharing the base
pipeline's VAE, text encoder and tokenizer."""
PIPELINE_FLOW_TURBO = ASSETS / "pipeline-flow-turbo"
"""The flow model distilled likewise: StableDiffusion3Pipeline folder (its transformer only)."""
CLIP = ASSETS / "clip"
"""The judge behind the `tiny-clip` reward: CLIPModel + CLIPProcessor folder."""

DEFAULT_GUIDANCE = 4.0
"""Classifier-free guidance scale to sample the tiny model with (DDIM and LCM): the prompt
fidelity at 8 steps is measured at this scale in results/tiny-world/README.md."""

FLOW_GUIDANCE = 4.0
"""Classifier-free guidance scale of the flow model (results/tiny-world/README.md)."""

TURBO_GUIDANCE = 1.0
"""The few-step students sample without classifier-free guidance (one network call per step),
as sd-turbo and FLUX.1-schnell do: they learned their teachers' guided outputs."""
