"""Stand-ins for what the training loop (`benchmarks.epochs.train_on_batch`) calls, and
wrappers that record what it passed.

The coded trajectory: transition (p, g, k) of group p, member g, step k carries the code
c = 100 p + 10 g + k in its x_t (x_t' = c + 0.5, the prompt embedding p, the stored
log-prob -c / 1000), and `CodedSampler` recomputes the log-prob from x_t, checking on the
way that x_t', the step index and the prompt embedding belong to the same transition.
`decode` turns the log-probs a `loss` call received back into the transitions they came
from (tests/test_loop_invariants.py uses it to check the loop's replay order).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from zoo.algorithm import ForwardLossInputs, ForwardProcessAlgorithm, LossInputs, ReplayAlgorithm
from zoo.trajectory import Trajectory

REF_OFFSET = 0.05
"""The coded trajectory's reference log-prob is the stored one minus this: inside D3PO's
clamp, so gradients flow."""


def coded_trajectory(num_prompts: int, group_size: int, num_steps: int, reference: bool) -> Trajectory:
    """The coded trajectory of `num_prompts` groups of `group_size` over `num_steps` steps
    (the module docstring), with reference log-probs when `reference`."""
    p = torch.arange(num_prompts)[:, None, None]
    g = torch.arange(group_size)[None, :, None]
    k = torch.arange(num_steps)[None, None, :]
    code = (100 * p + 10 * g + k).float()  # (P, G, K)
    latents = code[..., None, None, None].clone()  # (P, G, K, 1, 1, 1)
    log_probs = -code / 1000
    return Trajectory(
        prompts=[f"prompt {i}" for i in range(num_prompts)],
        prompt_embeds=torch.arange(num_prompts, dtype=torch.float32).view(num_prompts, 1, 1),
        timesteps=torch.arange(num_steps).flip(0).expand(num_prompts, group_size, num_steps).clone(),
        latents=latents,
        next_latents=latents + 0.5,
        log_probs=log_probs,
        images=torch.zeros(num_prompts, group_size, 3, 1, 1),
        ref_log_probs=log_probs - REF_OFFSET if reference else None,
    )


def decode(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored log-probs -c / 1000 -> (p, g, k) of the transitions they belong to."""
    code = torch.round(-log_probs.detach() * 1000).long()
    return code // 100, code // 10 % 10, code % 10


class CodedPolicy:
    """What `train_on_batch` asks of the policy: the trainable parameters, the (here
    unwrapped) denoiser for `no_sync`, and the guidance switch of replayed log-probs, which
    the coded log-prob has no guidance to apply to."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(()))
        self.denoiser = torch.nn.Linear(1, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.theta]

    def unconditional_detached(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class CodedSampler:
    """log p(x_t -> x_t') = -c / 1000 + θ cos(c), c read from x_t: the stored log-prob at
    θ = 0, with a gradient that differs per transition."""

    def __init__(self):
        self.policy = CodedPolicy()

    def log_prob(self, latents, step_index, next_latents, prompt_embeds) -> torch.Tensor:
        code = latents.flatten(1)[:, 0]
        assert torch.equal(step_index, (code % 10).long()), "step index of another transition"
        assert torch.equal(next_latents.flatten(1)[:, 0], code + 0.5), "x_t' of another transition"
        assert torch.equal(prompt_embeds.flatten(1)[:, 0], torch.div(code, 100, rounding_mode="floor")), \
            "prompt embedding of another group"
        return -code / 1000 + self.policy.theta * torch.cos(code)

    def log_prob_and_kl(
        self, latents, step_index, next_latents, prompt_embeds, kl_form="exact"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-prob above and a KL to the base model (θ = 0) of θ² / 2 per transition (of
        either form: the coded transitions have no step size)."""
        log_prob = self.log_prob(latents, step_index, next_latents, prompt_embeds)
        return log_prob, 0.5 * self.policy.theta**2 * torch.ones_like(log_prob)


class ReplayRecorder(ReplayAlgorithm):
    """A replay algorithm, recording each `loss` call's inputs and, given `params` (one
    parameter, as the coded policy's θ), the gradient of its loss with respect to it."""

    def __init__(self, algorithm: ReplayAlgorithm, params: list[torch.nn.Parameter] | None = None):
        self.algorithm, self.needs, self.params = algorithm, algorithm.needs, params
        self.calls: list[SimpleNamespace] = []
        self.trained: torch.Tensor | None = None

    def trained_steps(self, context, num_prompts, group_size):
        """The algorithm's, kept in `trained` ((P, G, S), or None for all K steps)."""
        self.trained = self.algorithm.trained_steps(context, num_prompts, group_size)
        return self.trained

    def new_tracker(self):
        return self.algorithm.new_tracker()

    def advantages(self, *args):
        return self.algorithm.advantages(*args)

    def loss(self, inputs: LossInputs):
        loss, metrics = self.algorithm.loss(inputs)
        grad = None
        if self.params is not None:
            (grad,) = torch.autograd.grad(loss, self.params, retain_graph=True)
        self.calls.append(SimpleNamespace(
            loss=float(loss.detach()), log_probs=inputs.log_probs.detach().clone(), old=inputs.old_log_probs.clone(),
            advantages=inputs.advantages.clone(), step_index=inputs.step_index.clone(),
            ref=None if inputs.ref_log_probs is None else inputs.ref_log_probs.clone(), grad=grad,
        ))
        return loss, metrics


class ForwardRecorder(ForwardProcessAlgorithm):
    """A forward-process algorithm, recording every `loss` call's inputs."""

    def __init__(self, algorithm: ForwardProcessAlgorithm):
        self.algorithm, self.needs = algorithm, algorithm.needs
        self.inputs: list[ForwardLossInputs] = []

    def loss(self, inputs: ForwardLossInputs):
        self.inputs.append(inputs)
        return self.algorithm.loss(inputs)

    def trained_steps(self, *args):
        return self.algorithm.trained_steps(*args)

    def new_tracker(self):
        return self.algorithm.new_tracker()

    def advantages(self, *args):
        return self.algorithm.advantages(*args)


class RecordingSGD(torch.optim.SGD):
    """Learning rate 0 (the log-probs stay the stored ones); records the gradient each step sees."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(self.param_groups[0]["params"][0].grad.clone())
        return super().step(closure)


class CountingAdamW(torch.optim.AdamW):
    """AdamW that counts its steps (`steps`)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def clipped_gradient(gradient: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """A one-element gradient as `clip_grad_norm_` leaves it: scaled by
    min(1, max_norm / (|gradient| + 1e-6)); unchanged without `max_norm`."""
    if max_norm is None:
        return gradient
    return gradient * min(1.0, max_norm / (float(gradient.abs()) + 1e-6))


def one_transition(log_ratio: float, advantage: float, old: float = -1.0) -> LossInputs:
    """A single transition (p = 1, G = 1, S = 1) whose log-prob carries a gradient."""
    log_probs = torch.tensor([[[old + log_ratio]]], requires_grad=True)
    return LossInputs(
        log_probs=log_probs,
        old_log_probs=torch.tensor([[[old]]]),
        advantages=torch.tensor([[[advantage]]]),
        step_index=torch.zeros(1, 1, 1, dtype=torch.long),
    )
