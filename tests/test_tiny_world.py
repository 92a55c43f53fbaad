"""The tiny world: data generator, shipped artifacts, and a rebuild from another seed."""

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from zoo.tiny import CLIP, DEFAULT_GUIDANCE, FLOW_GUIDANCE, PIPELINE, PIPELINE_FLOW, data
from zoo.tiny.build import BuildConfig, SMOKE_OVERRIDES, build
from zoo.tiny.evaluate import Judge
from zoo.tiny.flow import T5_TOKENS

# ---------------------------------------------------------------- data


def test_render_is_a_function_of_the_generator():
    captions = data.all_captions()
    first = data.render(captions, torch.Generator().manual_seed(5))
    again = data.render(captions, torch.Generator().manual_seed(5))
    other = data.render(captions, torch.Generator().manual_seed(6))
    assert first.shape == (len(captions), 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1


def test_sample_batch_is_deterministic_and_uses_only_given_captions():
    train = data.train_captions()
    images, captions = data.sample_batch(32, train, torch.Generator().manual_seed(0))
    images_again, captions_again = data.sample_batch(32, train, torch.Generator().manual_seed(0))
    assert captions == captions_again and torch.equal(images, images_again)
    assert set(captions) <= set(train)


def test_heldout_split_is_disjoint_and_recombines_seen_parts():
    train, heldout = set(data.train_captions()), set(data.heldout_captions())
    assert not train & heldout
    assert train | heldout == set(data.all_captions())
    assert len(data.all_captions()) == len(data.COLOURS) * len(data.SHAPES) * len(data.BACKGROUNDS)
    assert len(data.COLOURS) >= 6 and {"circle", "square", "triangle"} < set(data.SHAPES)
    seen = [data.parse_caption(c) for c in train]
    for colour, shape, background in map(data.parse_caption, heldout):
        # Every word and every colour-shape pair of a held-out caption is seen in training.
        assert any(c == colour and s == shape for c, s, _ in seen)
        assert any(b == background for _, _, b in seen)


def test_shape_pixels_have_the_captioned_colour():
    captions = [data.caption(colour, "square", "black") for colour in data.COLOURS]
    images = data.render(captions, torch.Generator().manual_seed(0))
    for image, colour in zip(images, data.COLOURS):
        inside = image.sum(0) > 0.5  # (H, W): the background is at most 3 * 0.11
        assert inside.sum() >= 16  # the smallest square is 8.5 px wide
        drawn = image[:, inside].median(dim=1).values
        assert torch.allclose(drawn, torch.tensor(data.COLOURS[colour]), atol=data.COLOUR_JITTER + 1e-6)


# ---------------------------------------------------------------- shipped artifacts


@pytest.fixture(scope="module")
def judge():
    return Judge(CLIP, data.all_captions())


def test_judge_loads_and_recognises_renders(judge):
    captions = data.all_captions()
    images = data.render(captions, torch.Generator().manual_seed(123))
    reward, correct = judge.score(images, captions)
    assert torch.isfinite(reward).all()
    assert reward.abs().max() <= 1 + 1e-5
    assert correct.float().mean() >= 0.9


def test_shipped_pipeline_samples_finite_images_that_score(judge):
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert all(m.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    prompts = data.heldout_captions()[:4]
    images = pipe(
        prompts,
        num_inference_steps=2,
        guidance_scale=DEFAULT_GUIDANCE,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (4, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.isfinite(images).all()
    reward, _ = judge.score(images, prompts)
    assert torch.isfinite(reward).all()


def test_shipped_flow_pipeline_samples_finite_images_that_score(judge):
    """The flow model loads in plain diffusers (its text encoder's shards and links
    resolved), with an identity text projection, and samples images the judge scores."""
    pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE_FLOW, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(pipe.text_encoder.config.hidden_size))
    base = StableDiffusionPipeline.from_pretrained(PIPELINE)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, base.text_encoder.get_input_embeddings().weight)
    prompts = data.heldout_captions()[:4]
    images = pipe(prompts, num_inference_steps=2, guidance_scale=FLOW_GUIDANCE, generator=torch.Generator().manual_seed(0),
                  output_type="pt", max_sequence_length=T5_TOKENS, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE).images
    assert images.shape == (4, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    reward, _ = judge.score(images, prompts)
    assert torch.isfinite(reward).all()


def test_shipped_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in PIPELINE.parent.rglob("*") if p.is_file() and not p.is_symlink())
    assert total <= 40 * 2**20


# ---------------------------------------------------------------- rebuild


def test_smoke_build_from_another_seed_reloads(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    out = tmp_path / "assets"
    build(BuildConfig(out=out, seed=7, smoke=True, **SMOKE_OVERRIDES))
    assert json.loads((out / "build_info.json").read_text())["command"].endswith("--seed 7 --smoke")
    assert (out / "clip" / "vocab.json").is_symlink()
    for folder, scheduler in ((out / "pipeline", DDIMScheduler), (out / "pipeline-lcm", LCMScheduler)):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        assert isinstance(pipe.scheduler, scheduler)
        images = pipe(["a red circle on a white background"], num_inference_steps=1, output_type="pt").images
        assert torch.isfinite(images).all()
    flow = StableDiffusion3Pipeline.from_pretrained(out / "pipeline-flow", text_encoder_3=None, tokenizer_3=None)
    images = flow(["a red circle on a white background"], num_inference_steps=1, output_type="pt",
                  max_sequence_length=T5_TOKENS, height=data.IMAGE_SIZE, width=data.IMAGE_SIZE).images
    assert torch.isfinite(images).all()
    model, processor = CLIPModel.from_pretrained(out / "clip"), CLIPProcessor.from_pretrained(out / "clip")
    text = processor(text=data.all_captions(), padding="max_length", return_tensors="pt")
    assert torch.isfinite(model.get_text_features(**text).pooler_output).all()


def test_the_judge_shares_the_pipelines_vocabulary():
    """One CLIP BPE for the judge and the pipeline, stored once: the judge's files link to the
    tokenizer's, and both tokenize a caption alike."""
    from transformers import CLIPProcessor

    for name in ("vocab.json", "merges.txt"):
        assert (CLIP / name).is_symlink() and (CLIP / name).resolve() == (PIPELINE / "tokenizer" / name).resolve()
    caption = data.heldout_captions()[0]
    judge_ids = CLIPProcessor.from_pretrained(CLIP).tokenizer(caption).input_ids
    assert judge_ids == StableDiffusionPipeline.from_pretrained(PIPELINE).tokenizer(caption).input_ids
