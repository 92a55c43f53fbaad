"""Mixed precision and the speed switches change no result beyond rounding.

The ratio test runs the real code paths: the trainer's sampling (`sample_and_score`, one
group per sampling call, rewards overlapped) under a half-precision policy, then the
trainer's own epoch (`benchmarks.train.train_on_batch`: minibatches of a different size than
the sampling batch, shuffled steps, gradients on, REBEL's whole trajectories in chunks of
steps over a pass without gradients, backward), with a zero learning rate so that the
weights stay those that sampled. Every ratio the loss sees
must then be 1. Drift here is what other implementations show in bf16, where sampling and
training run the model in different batch layouts or precisions.
"""

from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.rollout import sample_and_score
from rewards.registry import load_reward
from zoo.algorithm import EpochContext
from zoo.loading import load_policy
from zoo.policy import LoraSettings, Performance, Policy
from zoo.registry import ALGORITHMS
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.training import ReplayRecorder

PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a white background",
]
NUM_STEPS = 3


def _fp16_runs_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))
    except RuntimeError:
        return False
    return True


def _policy(folder: str, precision: str, performance: Performance = Performance()) -> Policy:
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    policy = load_policy(folder, mixed_precision=precision, lora=LoraSettings(), performance=performance)
    # A fresh adapter is zero (lora_B = 0); a trained one is not, and its path must be
    # re-scored exactly too.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in policy.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return policy


# (algorithm, CFG scale): training minibatches of one group differ in size from the
# sampling batch (3 prompts x group); REBEL puts all K steps of a minibatch in one UNet
# call, DDPO and D3PO run classifier-free guidance, D3PO records reference log-probs.
CASES = {"sdpo": 1.0, "ddpo": 4.0, "rebel": 1.0, "d3po": 4.0}
PRECISIONS = [
    pytest.param("bf16", id="bf16"),
    pytest.param(
        "fp16", id="fp16",
        marks=pytest.mark.skipif(not _fp16_runs_on_cpu(), reason="this torch has no float16 CPU autocast kernels"),
    ),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("algo", list(CASES))
def test_trainer_rescores_half_precision_samples_with_ratio_one(tiny_pipeline_dir, algo, precision):
    guidance = CASES[algo]
    config = replace(ALGORITHMS[algo](), num_steps=NUM_STEPS, guidance_scale=guidance, train_batch_size=1)
    recorder = ReplayRecorder(config.build())
    needs = recorder.needs
    policy = _policy(tiny_pipeline_dir, precision)
    sampler = TrajectorySampler(policy, SamplerConfig(config.sampler, config.num_steps, config.eta, guidance))
    generator = torch.Generator().manual_seed(0)
    loop = TrainLoop(sample_batch_size=needs.group_size, overlap_rewards=True, steps_per_backward=2)
    traj, _, failure = sample_and_score(
        recorder.algorithm, sampler, PROMPTS, generator, load_reward("jpeg_compressibility"), loop
    )
    assert failure is None
    advantages = torch.randn(traj.log_probs.shape, generator=generator)
    # lr 0: AdamW's update and its decoupled weight decay are both exact no-ops.
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    accelerator = Accelerator(cpu=True)
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)
    context = EpochContext(0, 1, generator)
    train_on_batch(recorder, config, sampler, traj, advantages, optimizer, accelerator, context, loop, False)

    # log p_current - log p_sampled of every transition the trainer handed to the loss.
    log_ratios = torch.cat([(call.log_probs - call.old).flatten() for call in recorder.calls])
    # Every transition re-scored once per loss call it is part of: REBEL's 3 steps in
    # chunks of 2 make two calls per minibatch, each seeing all 3 steps.
    calls_per_minibatch = 2 if needs.whole_trajectory_loss else 1
    assert log_ratios.numel() == traj.log_probs.numel() * calls_per_minibatch
    drift = float((log_ratios.exp() - 1).abs().max())
    print(f"{algo} {precision}: max |ratio - 1| = {drift:.3g} over {log_ratios.numel()} transitions")
    assert drift <= 1e-3


def test_rescoring_in_another_precision_drifts_past_the_bound(tiny_pipeline_dir):
    """The control: samples of a bf16 policy re-scored by the float32 one (a sampler and a
    trainer that disagree on precision, as in the implementations that drift) move the
    ratio by more than 1e-3, so the bound above can fail."""
    samplers = {
        precision: TrajectorySampler(_policy(tiny_pipeline_dir, precision), SamplerConfig("ddim", NUM_STEPS))
        for precision in ("bf16", "no")
    }
    traj = samplers["bf16"].sample(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(0))
    p, g, k = traj.log_probs.shape
    embeds = traj.prompt_embeds.repeat_interleave(g, dim=0)
    drift = 0.0
    with torch.no_grad():
        for step in range(k):
            rescored = samplers["no"].log_prob(
                traj.latents[:, :, step].flatten(0, 1), torch.full((p * g,), step),
                traj.next_latents[:, :, step].flatten(0, 1), embeds,
            )
            drift = max(drift, float((rescored - traj.log_probs[:, :, step].flatten()).exp().sub(1).abs().max()))
    assert drift > 1e-3


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_pipeline_dir):
    grads = []
    for checkpointing in (False, True):
        policy = _policy(tiny_pipeline_dir, "no", Performance(gradient_checkpointing=checkpointing))
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
        eps = policy.predict(x, torch.tensor([999, 500]), policy.encode_prompts(PROMPTS[:2]), 4.0)
        eps.square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert policy.unet.is_gradient_checkpointing
    for plain, checkpointed in zip(*grads):
        assert plain.abs().max() > 0
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_optimizer_state_holds_lora_weights_only(tiny_pipeline_dir):
    policy = _policy(tiny_pipeline_dir, "bf16")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    x = torch.randn(2, *policy.latent_shape)
    policy.predict(x, torch.tensor([999, 500]), policy.encode_prompts(PROMPTS[:2]), 1.0).mean().backward()
    optimizer.step()
    lora = {id(p) for n, p in policy.unet.named_parameters() if "lora_" in n}
    assert {id(p) for p in optimizer.state} == lora
    state_elements = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    lora_elements = sum(p.numel() for n, p in policy.unet.named_parameters() if "lora_" in n)
    unet_elements = sum(p.numel() for p in policy.unet.parameters())
    assert state_elements == 2 * lora_elements  # Adam's two moments, float32
    assert all(t.dtype == torch.float32 for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert lora_elements < 0.1 * unet_elements


def test_compiled_unet_predicts_what_the_eager_one_does(tiny_pipeline_dir, monkeypatch):
    """The plumbing of `compile_unet` (in-place compile, peft adapters, the reference
    switch), traced by dynamo with its eager backend so that the test compiles no C++."""
    compile_eagerly = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **_: compile_eagerly(fn, backend="eager"))
    torch._dynamo.reset()
    eager = _policy(tiny_pipeline_dir, "no")
    compiled = _policy(tiny_pipeline_dir, "no", Performance(compile_unet=True))
    assert compiled.unet._compiled_call_impl is not None
    x = torch.randn(2, *eager.latent_shape, generator=torch.Generator().manual_seed(2))
    embeds = eager.encode_prompts(PROMPTS[:2])
    t = torch.tensor([999, 500])
    outputs = {}
    with torch.no_grad():
        for name, policy in (("eager", eager), ("compiled", compiled)):
            outputs[name] = policy.predict(x, t, embeds, 1.0)
            with policy.reference():
                outputs[name + "-ref"] = policy.predict(x, t, embeds, 1.0)
    torch.testing.assert_close(outputs["compiled"], outputs["eager"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["compiled-ref"], outputs["eager-ref"], rtol=1e-5, atol=1e-6)
    assert (outputs["eager"] - outputs["eager-ref"]).abs().max() > 1e-4
