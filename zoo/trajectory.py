"""The batch that flows from the sampler to the algorithms.

Shapes use P prompts, G trajectories per prompt (the group: 1 for DDPO, 2 for pair
methods), K sampling steps and a latent of C x h x w. Groups are a tensor dimension, so
"trajectory a / trajectory b" is index 0 / 1 of dim 1, never a pair of variables.

The sampler keeps only what its caller reads (`TrajectorySampler.sample`): the per-step
transitions (`latents`, `next_latents`, `log_probs`) unless `record_transitions=False`
(evaluation reads only images), the decoded final `images` unless `final_images=False`
(SDPO scores decoded x̂0 instead). A field it did not keep is None, and reading it raises
`NotSampled`, which names the argument to ask for it with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class NotSampled(ValueError):
    """A `Trajectory` field was read that its sampling call was not asked to keep."""


class _KeptIfAsked:
    """A `Trajectory` field that the sampler keeps only when asked: None when it was not
    kept, and reading it then raises `NotSampled` naming `ask` (how to ask for it), instead
    of failing later on None. The value lives in the instance's __dict__ under the field's
    name, where `Trajectory.cat` reads it without raising."""

    def __init__(self, ask: str):
        self.ask = ask

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, traj: "Trajectory | None", owner: type | None = None) -> torch.Tensor | None:
        if traj is None:  # the class attribute: dataclass reads it as the field's default
            return None
        value = traj.__dict__[self.name]
        if value is None:
            raise NotSampled(f"Trajectory.{self.name} was not kept by the sampler: {self.ask}")
        return value

    def __set__(self, traj: "Trajectory", value: torch.Tensor | None) -> None:
        traj.__dict__[self.name] = value


_TRANSITIONS = "sample with record_transitions=True (the default; evaluation turns it off)."


# No generated repr: it would read every field, raising on those not kept.
@dataclass(repr=False)
class Trajectory:
    prompts: list[str]  # P captions, one per group
    prompt_embeds: torch.Tensor  # (P, L, D) text-encoder states of the captions
    timesteps: torch.Tensor  # (P, G, K) long, the t of each transition x_t -> x_{t'}
    # (P, G, K, C, h, w) x_t, the state each transition starts from
    latents: torch.Tensor | None = _KeptIfAsked(_TRANSITIONS)
    # (P, G, K, C, h, w) x_{t'}, the sampled next state
    next_latents: torch.Tensor | None = _KeptIfAsked(_TRANSITIONS)
    # (P, G, K) float32 log-density of each transition, mean over C*h*w (NaN at DDIM eta 0)
    log_probs: torch.Tensor | None = _KeptIfAsked(_TRANSITIONS)
    # (P, G, 3, H, W) float32 in [0, 1], decoded from the final latent
    images: torch.Tensor | None = _KeptIfAsked(
        "sample with final_images=True (the default); an algorithm asks with SamplingNeeds.final_images."
    )
    pred_x0: torch.Tensor | None = None  # (P, G, K, C, h, w) x̂0 predicted at each step, if recorded
    ref_log_probs: torch.Tensor | None = None  # (P, G, K) float32 under the frozen base, if asked

    @property
    def num_prompts(self) -> int:
        return self.timesteps.shape[0]

    @property
    def group_size(self) -> int:
        return self.timesteps.shape[1]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[2]

    @property
    def final_latents(self) -> torch.Tensor:
        """(P, G, C, h, w) the clean sample x_0 each trajectory ends in (what `images` decodes)."""
        return self.next_latents[:, :, -1]

    @classmethod
    def cat(cls, parts: list["Trajectory"]) -> "Trajectory":
        """The batch of every part's groups, in order (parts sampled in several calls)."""
        if len(parts) == 1:
            return parts[0]
        update = {}
        for f in fields(cls):
            values = [part.__dict__[f.name] for part in parts]
            if f.name == "prompts":
                update[f.name] = [prompt for value in values for prompt in value]
            elif values[0] is None:
                update[f.name] = None
            else:
                update[f.name] = torch.cat(values)
        return cls(**update)
