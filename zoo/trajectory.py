"""The batch that flows from the sampler to the algorithms.

Shapes use P prompts, G trajectories per prompt (the group: 1 for DDPO, 2 for pair
methods), K sampling steps and a latent of C x h x w. Groups are a tensor dimension, so
"trajectory a / trajectory b" is index 0 / 1 of dim 1, never a pair of variables.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Trajectory:
    prompts: list[str]  # P captions, one per group
    prompt_embeds: torch.Tensor  # (P, L, D) text-encoder states of the captions
    timesteps: torch.Tensor  # (P, G, K) long, the t of each transition x_t -> x_{t'}
    latents: torch.Tensor  # (P, G, K, C, h, w) x_t, the state each transition starts from
    next_latents: torch.Tensor  # (P, G, K, C, h, w) x_{t'}, the sampled next state
    log_probs: torch.Tensor  # (P, G, K) float32 log-density of each transition, mean over C*h*w (NaN at DDIM eta 0)
    images: torch.Tensor  # (P, G, 3, H, W) float32 in [0, 1], decoded from the final latent
    pred_x0: torch.Tensor | None = None  # (P, G, K, C, h, w) x̂0 predicted at each step, if recorded
    ref_log_probs: torch.Tensor | None = None  # (P, G, K) float32 under the frozen base, if asked

    @property
    def num_prompts(self) -> int:
        return self.log_probs.shape[0]

    @property
    def group_size(self) -> int:
        return self.log_probs.shape[1]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[2]

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
            values = [getattr(part, f.name) for part in parts]
            if f.name == "prompts":
                update[f.name] = [prompt for value in values for prompt in value]
            elif values[0] is None:
                update[f.name] = None
            else:
                update[f.name] = torch.cat(values)
        return cls(**update)
