"""Few-step ("turbo") students of the tiny world's models, distilled from the base models.

sd-turbo, SD3.5-Large-Turbo and FLUX.1-schnell are distilled to sample in 1 to 4 steps
without classifier-free guidance; the tiny world's base models are multi-step models
(results/tiny-world/README.md). Each student here starts as its teacher's copy, is sampled
without guidance (one network call per step) and is trained by one of these methods,
compared by measurement (`python -m zoo.tiny.compare_turbo`):

- `endpoint` (both families): the teacher's probability-flow ODE, solved with
  classifier-free guidance from a starting point to the end, is the target of the
  student's one-call clean estimate x̂0 at that point (Luhman & Luhman 2021, arXiv
  2101.02388, from pure noise; below the top noise level it is the consistency function's
  definition, the ODE's endpoint, computed by solving instead of bootstrapping). The
  starting points are pure noise at the top level and noised renders at the levels the
  few-step samplers visit, so that a sampler that re-noises its x̂0 (DDIM with eta 1,
  Flow-GRPO's SDE) lands where the student was trained.
- `consistency` (UNet): latent consistency distillation (Luo et al. 2023, arXiv
  2310.04378; the objective of `zoo.tiny.build.distill_lcm`) with the guidance fixed at the
  teacher's and no guidance input: the student pulls its output at x_t towards an EMA
  target's output one teacher DDIM step later.
- `reflow` (flow): rectified flow's reflow (Liu et al. 2022, arXiv 2209.03003; InstaFlow,
  arXiv 2309.06380): the velocity model is retrained on straight paths between noise and
  the teacher's ODE sample from that noise, so that few Euler steps follow them.

Pairs (start, level, caption, teacher endpoint) are drawn once, then regressed on; the
student shipped is the EMA of its weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from zoo.tiny import data
from zoo.tiny.optim import ema_update, warmup_lr

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Pairs:
    """The distillation data: for each example, the student's input and the teacher's answer."""

    start: torch.Tensor
    """(N, C, H, W) latents at their noise level: where the student is asked for x̂0."""
    level: torch.Tensor
    """(N,) noise level: a DDPM timestep (UNet) or a flow σ."""
    caption: torch.Tensor
    """(N,) index into `data.train_captions()`."""
    target: torch.Tensor
    """(N, C, H, W) the guided teacher ODE's endpoint from (start, level)."""


def trailing_timesteps(steps: int) -> torch.Tensor:
    """DDIMScheduler's "trailing" timesteps for `steps` steps (999, ...), the UNet sampler's."""
    return (torch.arange(NUM_TRAIN_TIMESTEPS, 0, -NUM_TRAIN_TIMESTEPS / steps).round() - 1).long()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def guided(predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
           level: torch.Tensor, rows: torch.Tensor, empty_row: int, guidance: float) -> torch.Tensor:
    """Classifier-free guidance over `predict(x, level, caption rows)`, both branches in one call."""
    both = predict(torch.cat([x, x]), torch.cat([level, level]), torch.cat([rows, torch.full_like(rows, empty_row)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def unet_teacher_solve(predict, x_t: torch.Tensor, t_start: int, rows: torch.Tensor, empty_row: int,
                       alphas_cumprod: torch.Tensor, guidance: float, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with guidance from (x_t, t_start) to t = 0 in `steps` evenly
    spaced steps; the last step's x̂0 (B, C, H, W). `predict(x, t, rows)` is the teacher's ε̂."""
    grid = torch.linspace(t_start, 0, steps + 1).round().long().tolist()
    x = x_t
    for t, t_next in zip(grid[:-1], grid[1:]):
        alpha = alphas_cumprod[t]
        eps = guided(predict, x, torch.full((x.shape[0],), t), rows, empty_row, guidance)
        x0 = x0_from_eps(x, eps, alpha)
        alpha_next = alphas_cumprod[t_next]
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps
    return x0


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's time shift σ = shift·s / (1 + (shift - 1)·s)."""
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return sigma / (shift - (shift - 1) * sigma)


@torch.no_grad()
def flow_teacher_solve(predict, x: torch.Tensor, sigma_start: float, rows: torch.Tensor, empty_row: int,
                       guidance: float, steps: int, shift: float) -> torch.Tensor:
    """The Euler ODE with guidance from (x, σ_start) to σ = 0 in `steps` steps, evenly spaced
    before the shift as the model's scheduler spaces them. `predict(x, σ, rows)` is v̂."""
    sigmas = shift_sigma(torch.linspace(unshift_sigma(torch.tensor(sigma_start), shift).item(), 0, steps + 1), shift)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = guided(predict, x, torch.full((x.shape[0],), sigma), rows, empty_row, guidance)
        x = x + (sigma_next - sigma) * v
    return x


def flow_sampler_sigmas(scheduler, step_counts: tuple[int, ...]) -> list[float]:
    """The σ at which the Euler sampler (and Flow-GRPO's SDE) calls the model at each step
    count, below 1 and above the final near-zero step: what `scheduler` (a
    FlowMatchEulerDiscreteScheduler, left as it was) sets for those step counts."""
    scheduler = copy.deepcopy(scheduler)
    sigmas = set()
    for steps in step_counts:
        scheduler.set_timesteps(steps)
        sigmas |= {round(s, 4) for s in scheduler.sigmas.tolist() if 0.01 < s < 1.0}
    return sorted(sigmas, reverse=True)


@torch.no_grad()
def make_pairs(
    plan: list[tuple[float, int]],
    *,
    is_top: Callable[[float], bool],
    noised: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    solve: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    batch: int,
    generator: torch.Generator,
    log: Callable[[str], None] = print,
) -> Pairs:
    """`plan`: (noise level, examples) pairs. At the top level the start is pure noise, as
    every sampler starts; below it, a render of a train caption noised to the level by
    `noised(latents, noise, level)`. `solve(start, level, caption rows)` is the teacher."""
    captions = data.train_captions()
    index = {c: i for i, c in enumerate(captions)}
    starts, levels, rows, targets = [], [], [], []
    started = time.time()
    for level, count in plan:
        for first in range(0, count, batch):
            n = min(batch, count - first)
            images, batch_captions = data.sample_batch(n, captions, generator)
            caption_rows = torch.tensor([index[c] for c in batch_captions])
            latents = encode(images, generator)
            noise = torch.randn(latents.shape, generator=generator)
            start = noise if is_top(level) else noised(latents, noise, level)
            starts.append(start)
            levels.append(torch.full((n,), float(level)))
            rows.append(caption_rows)
            targets.append(solve(start, level, caption_rows))
        log(f"[pairs] level {level:g}: {count} examples, {time.time() - started:.0f}s")
    return Pairs(torch.cat(starts), torch.cat(levels), torch.cat(rows), torch.cat(targets))


def regress(
    student: torch.nn.Module,
    pairs: Pairs,
    loss_of: Callable[[torch.nn.Module, Pairs, torch.Generator], torch.Tensor],
    *,
    steps: int,
    batch: int,
    lr: float,
    ema_decay: float,
    generator: torch.Generator,
    stage: str,
    log,
) -> torch.nn.Module:
    """AdamW on `loss_of(student, minibatch, generator)` over random minibatches of `pairs`;
    returns the EMA of the student (decay warmed up as in diffusers' EMAModel)."""
    student.train().requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    count = pairs.level.shape[0]
    started = time.time()
    for step in range(steps):
        warmup_lr(optimizer, step, lr)
        chosen = torch.randint(count, (batch,), generator=generator)
        minibatch = Pairs(pairs.start[chosen], pairs.level[chosen], pairs.caption[chosen], pairs.target[chosen])
        loss = loss_of(student, minibatch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, student, min(ema_decay, (1 + step) / (10 + step)))
        log(stage, step, steps, loss.item(), started)
    return ema.eval()


def unet_endpoint_loss(alphas_cumprod: torch.Tensor, hidden: torch.Tensor):
    """‖x̂0(start, t) - teacher endpoint‖², x̂0 from the student's ε̂; `hidden` (captions, L, D)."""

    def loss_of(student, batch: Pairs, generator) -> torch.Tensor:
        t = batch.level.long()
        eps = student(batch.start, t, hidden[batch.caption]).sample
        return (x0_from_eps(batch.start, eps, alphas_cumprod[t].view(-1, 1, 1, 1)) - batch.target).pow(2).mean()

    return loss_of


def flow_endpoint_loss(predict):
    """‖x - σ·v̂(x, σ) - teacher endpoint‖²; `predict(model, x, σ, rows)` is v̂."""

    def loss_of(student, batch: Pairs, generator) -> torch.Tensor:
        sigma = batch.level
        x0 = batch.start - sigma.view(-1, 1, 1, 1) * predict(student, batch.start, sigma, batch.caption)
        return (x0 - batch.target).pow(2).mean()

    return loss_of


def reflow_loss(predict, shift: float):
    """Rectified-flow loss on the straight path from the noise `start` (σ = 1) to the teacher's
    endpoint: x_σ = (1-σ)·endpoint + σ·noise, target v = noise - endpoint, σ drawn uniformly
    before the shift (where the shifted scheduler places its steps)."""

    def loss_of(student, batch: Pairs, generator) -> torch.Tensor:
        sigma = shift_sigma(torch.rand(batch.level.shape[0], generator=generator), shift)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * batch.target + s * batch.start
        return (predict(student, x, sigma, batch.caption) - (batch.start - batch.target)).pow(2).mean()

    return loss_of


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out of LCMScheduler (its defaults): the consistency function equals its input
    at t = 0."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def distill_unet_consistency(
    teacher, hidden: torch.Tensor, empty_row: int, alphas_cumprod: torch.Tensor, encode, *, steps: int, batch: int,
    lr: float, skip: int, guidance: float, target_decay: float, generator: torch.Generator, log,
):
    """Latent consistency distillation without a guidance input: a train caption's render is
    noised to t on the grid of `skip`; the teacher, guided at `guidance`, takes one DDIM step
    to t - skip; the student's consistency output at (x_t, t) is pulled (pseudo-Huber, as the
    LCM paper) towards the EMA target's at (x_{t-skip}, t - skip). Returns the target network,
    which LCM ships."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    grid = torch.arange(skip - 1, NUM_TRAIN_TIMESTEPS, skip)
    captions = data.train_captions()
    index = {c: i for i, c in enumerate(captions)}

    def consistency(net, x, t, rows):
        x0 = x0_from_eps(x, net(x, t, hidden[rows]).sample, alphas_cumprod[t].view(-1, 1, 1, 1))
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x + c_out * x0

    def teacher_eps(x, t, rows):
        return teacher(x, t, hidden[rows]).sample

    started = time.time()
    for step in range(steps):
        warmup_lr(optimizer, step, lr)
        images, batch_captions = data.sample_batch(batch, captions, generator)
        rows = torch.tensor([index[c] for c in batch_captions])
        latents = encode(images, generator)
        t = grid[torch.randint(len(grid), (batch,), generator=generator)]
        t_prev = (t - skip).clamp(min=0)
        alpha, alpha_prev = alphas_cumprod[t].view(-1, 1, 1, 1), alphas_cumprod[t_prev].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * latents + (1 - alpha).sqrt() * torch.randn(latents.shape, generator=generator)
        with torch.no_grad():
            eps = guided(teacher_eps, x_t, t, rows, empty_row, guidance)
            x_prev = alpha_prev.sqrt() * x0_from_eps(x_t, eps, alpha) + (1 - alpha_prev).sqrt() * eps
            goal = consistency(target, x_prev, t_prev, rows)
        prediction = consistency(student, x_t, t, rows)
        loss = ((prediction - goal).pow(2) + 1e-6).sqrt().mean() - 1e-3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema_update(target, student, target_decay)
        log("turbo", step, steps, loss.item(), started)
    return target.eval()


def endpoint_plan(levels: list[float], top: float, per_level: int, top_factor: int) -> list[tuple[float, int]]:
    """Examples per noise level: `per_level` each, `top_factor` times as many at the top level,
    which every step count's first call (and the whole 1-step sample) depends on."""
    return [(level, per_level * (top_factor if level == top else 1)) for level in levels]


def teacher_steps_for(fraction: float, full_steps: int) -> int:
    """Teacher steps for a solve over `fraction` of the path: `full_steps` for the whole path."""
    return max(1, math.ceil(full_steps * fraction - 1e-9))
