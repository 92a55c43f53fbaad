"""The tiny architectures build offline and reload through the real diffusers loaders."""

import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline
from open_clip.tokenizer import SimpleTokenizer

from zoo.tiny.arch import CLIP_VOCAB_SIZE, TOKENIZER_MAX_LENGTH, build_random_pipeline, build_tokenizer

CAPTIONS = [
    "a red circle on a white background",
    "a purple hexagon on a black background",
    "",
]


def test_tokenizer_ids_match_open_clip(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    reference = SimpleTokenizer(context_length=TOKENIZER_MAX_LENGTH)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    for caption in CAPTIONS:
        ours = tokenizer(caption, padding="max_length", max_length=TOKENIZER_MAX_LENGTH).input_ids
        theirs = reference([caption])[0].tolist()
        # open_clip pads with id 0, Stable Diffusion's tokenizer with <|endoftext|>:
        # compare up to and including the first end-of-text.
        length = theirs.index(tokenizer.eos_token_id) + 1
        assert ours[:length] == theirs[:length]
        assert set(ours[length:]) <= {tokenizer.pad_token_id}


def _sample(pipe, steps):
    return pipe(
        [CAPTIONS[0]] * 2,
        num_inference_steps=steps,
        guidance_scale=4.0,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_random_pipeline_reloads(tmp_path):
    folder = build_random_pipeline(tmp_path / "ddim", seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.tokenizer.model_max_length == TOKENIZER_MAX_LENGTH
    reference = SimpleTokenizer(context_length=TOKENIZER_MAX_LENGTH)
    ids = pipe.tokenizer(CAPTIONS[0], padding="max_length", max_length=TOKENIZER_MAX_LENGTH).input_ids
    assert ids[:9] == reference([CAPTIONS[0]])[0].tolist()[:9]
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    images = _sample(pipe, 2)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


def test_random_lcm_pipeline_reloads(tmp_path):
    folder = build_random_pipeline(tmp_path / "lcm", lcm=True)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim is not None
    assert torch.isfinite(_sample(pipe, 2)).all()


def test_same_seed_same_weights(tmp_path):
    first = StableDiffusionPipeline.from_pretrained(build_random_pipeline(tmp_path / "a", seed=1))
    second = StableDiffusionPipeline.from_pretrained(build_random_pipeline(tmp_path / "b", seed=1))
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
