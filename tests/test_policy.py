"""Loading, LoRA training state, reference model and LoRA export of the policy."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from zoo.loading import ModelUnavailable, load_policy, resolve_model
from zoo.policy import LORA_WEIGHT_NAME, LoraSettings, Policy

from helpers.policies import policy_with_random_adapter


def _unet_output(unet, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    ctx = torch.randn(2, 16, cfg.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 500]), encoder_hidden_states=ctx).sample


def _train_one_step(policy: Policy) -> None:
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    embeds = policy.encode_prompts(["a red circle", "a blue square"])
    eps = policy.predict(x, torch.tensor([999, 500]), embeds, 1.0)
    eps.square().mean().backward()
    optimizer.step()


def test_only_lora_parameters_train_in_float32(tiny_pipeline_dir):
    policy = load_policy(tiny_pipeline_dir, lora=LoraSettings(rank=4, alpha=8))
    params = policy.trainable_parameters()
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert params and all("lora" in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for p in policy.vae.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())


def test_reference_disables_the_adapter_without_a_copy(tiny_pipeline_dir):
    base = load_policy(tiny_pipeline_dir)
    policy = load_policy(tiny_pipeline_dir, lora=LoraSettings(rank=4, alpha=8))
    _train_one_step(policy)
    trained = _unet_output(policy.unet)
    with policy.reference():
        reference = _unet_output(policy.unet)
    torch.testing.assert_close(reference, _unet_output(base.unet), rtol=0, atol=1e-6)
    assert (trained - reference).abs().max() > 1e-4
    torch.testing.assert_close(_unet_output(policy.unet), trained, rtol=0, atol=0)  # adapter back on


def test_saved_lora_loads_into_a_plain_diffusers_pipeline(tiny_pipeline_dir, tmp_path):
    policy = load_policy(tiny_pipeline_dir, lora=LoraSettings(rank=4, alpha=8))
    _train_one_step(policy)
    path = policy.save_lora(tmp_path / "lora")
    assert path.name == LORA_WEIGHT_NAME

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    before = _unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path / "lora")
    after = _unet_output(pipe.unet)
    expected = _unet_output(policy.unet)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)

    resumed = load_policy(tiny_pipeline_dir, lora=LoraSettings(rank=4, alpha=8))
    resumed.load_lora(tmp_path / "lora")
    torch.testing.assert_close(_unet_output(resumed.unet), expected, rtol=0, atol=0)


def test_missing_model_names_the_flag_and_the_fix(tmp_path):
    with pytest.raises(ModelUnavailable, match="--model stabilityai/sd-turbo: .*HF_HUB_OFFLINE.*fix: `hf download"):
        resolve_model("stabilityai/sd-turbo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="no unet/ or transformer/ subfolder"):
        resolve_model(str(tmp_path / "empty"))


def test_bf16_weights_keep_float32_log_prob_path(tiny_pipeline_dir):
    policy = load_policy(tiny_pipeline_dir, mixed_precision="bf16", lora=LoraSettings())
    assert policy.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    x = torch.randn(2, *policy.latent_shape)
    eps = policy.predict(x, torch.tensor([999, 999]), policy.encode_prompts(["a", "b"]), 2.0)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_half_precision_adapters_skip_the_float32_round_trip_bit_identically(tiny_pipeline_dir):
    """peft would cast each adapter's input to float32 and autocast straight back; the
    policy turns that off under mixed precision, which must change no bit of the output
    or of the adapter gradients."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    policy = policy_with_random_adapter(tiny_pipeline_dir, mixed_precision="bf16")
    adapters = [m for m in policy.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert adapters and not any(m.cast_input_dtype_enabled for m in adapters)
    x = torch.randn(2, *policy.latent_shape)
    embeds = policy.encode_prompts(["a", "b"])

    def output_and_grads():
        for param in policy.trainable_parameters():
            param.grad = None
        eps = policy.predict(x, torch.tensor([999, 500]), embeds, 2.0)
        eps.square().mean().backward()
        return eps.detach(), [p.grad.clone() for p in policy.trainable_parameters()]

    eps, grads = output_and_grads()
    for module in adapters:
        module.cast_input_dtype_enabled = True
    eps_cast, grads_cast = output_and_grads()
    assert torch.equal(eps, eps_cast)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))
