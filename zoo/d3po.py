"""D3PO: per-step DPO on pairs of trajectories from the same x_T, against the frozen base.

Paper: Yang, Tao, Lyu, Ge, Chen, Shen, Wu, Li, "Using Human Feedback to Fine-tune Diffusion
Models without Any Reward Model", CVPR 2024 (arXiv 2311.13231).
Reference code: yk7333/d3po (`scripts/train_with_rm.py`, the reward-model variant;
`config/base.py`).

Implementation details:
1. Sampling: DDIM, eta = 1, K = 20, classifier-free guidance 5; each prompt is sampled twice
   from the same x_T (member 1 starts from member 0's initial latent).
2. Preference from the two final-image rewards: the higher reward wins (+1), the other
   loses (-1); equal rewards give no preference. `advantages` returns these signs, broadcast
   over steps, so they travel through the runner like any advantage. No stat tracker.
3. Training order: shuffle pairs, permute steps with one permutation per pair (both members
   see the same step order), and for each minibatch and step j one `loss` call.
4. Loss per (pair, step): log r_g = clamp(logp_θ(g, k) - logp_ref(g, k), log(1 - ε), log(1 + ε)),
   loss = -logsigmoid(β · (log r_w - log r_l)), averaged over the decided pairs.
   logp_ref is the base model's (the LoRA adapter disabled; never a copy of the UNet).
5. Gradient accumulation spans every step of a minibatch (`gradient_accumulation_steps` x K
   backward passes per update, as the reference's accelerator is configured).
6. Metrics: loss, tie_fraction, preference_accuracy (share of decided pairs whose logit is
   positive, a logit of 0 counting one half), ratio_clipfrac (log-ratios outside the clamp), kl_to_reference
   = 0.5 * mean((logp - logp_ref)^2).
7. Optimizer: AdamW, lr 3e-5, weight decay 1e-4, grad-norm clip 1.0; LoRA rank 4 (scale 1)
   on attention q, k, v, out. β = 0.1, ε = 0.1.

Deliberate deviations:
- The reference clamps exp(logp - logp_ref) to [1 - ε, 1 + ε] and takes its log; clamping
  the log-ratio to [log(1 - ε), log(1 + ε)] is the same function with the same gradient
  (zero outside), but never forms exp of a large log-ratio, whose backward is 0 · inf = NaN.
- The reference takes -log(sigmoid(x)), which is -inf once sigmoid underflows; this uses
  logsigmoid.
- The reference keeps tied pairs in the mean as constant log 2 terms, which dilutes the
  gradient of the decided pairs; ties are masked out here (a minibatch of ties gives loss 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo.algorithm import LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules
from zoo.stat_tracking import NoStatTracker

_FIELD_RULES = (
    ("beta", "must be positive", lambda v: v > 0),
    ("ratio_clip", "must lie in (0, 1)", lambda v: 0 < v < 1),
)
"""(field, rule, predicate): the values of its own fields that `D3POConfig` refuses."""


@dataclass(frozen=True)
class D3POConfig(TrainingConfig):
    """D3PO's hyperparameters; defaults are yk7333/d3po's `config/base.py`, a fork of
    ddpo-pytorch's (shared fields are re-declared where it changed `TrainingConfig`'s)."""

    learning_rate: float = 3e-5
    """AdamW learning rate (yk7333/d3po's)."""
    num_steps: int = 20
    """Sampling steps K during training (yk7333/d3po's)."""
    beta: float = 0.1
    """β: the DPO temperature multiplying the winner's minus the loser's log-ratio."""
    ratio_clip: float = 0.1
    """ε: each policy/reference ratio is clamped to [1 - ε, 1 + ε]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)

    def build(self) -> "D3PO":
        return D3PO(self)


class D3PO(ReplayAlgorithm):
    def __init__(self, config: D3POConfig):
        self.config = config
        self.needs = SamplingNeeds(group_size=2, shared_noise=True, reference_log_probs=True)

    def new_tracker(self) -> NoStatTracker:
        return NoStatTracker()

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: NoStatTracker) -> torch.Tensor:
        """returns: (P, 2) final-image rewards -> (P, 2, K) preferences: +1 winner, -1 loser,
        0 for both members of a tie."""
        if returns.dim() != 2 or returns.shape[1] != 2:
            raise ValueError(f"D3PO compares pairs: expected returns of shape (P, 2), got {tuple(returns.shape)}.")
        first_wins = torch.sign(returns[:, 0] - returns[:, 1])  # (P,)
        preference = torch.stack([first_wins, -first_wins], dim=1)  # (P, 2)
        return preference[:, :, None].expand(-1, -1, self.config.num_steps).clone()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if inputs.ref_log_probs is None:
            raise ValueError("D3PO's loss needs ref_log_probs: log-probs under the base model, adapter disabled.")
        c = self.config
        raw_log_ratio = inputs.log_probs - inputs.ref_log_probs  # (p, 2, S)
        low, high = math.log(1.0 - c.ratio_clip), math.log(1.0 + c.ratio_clip)
        log_ratio = raw_log_ratio.clamp(low, high)
        preference = inputs.advantages  # (p, 2, S): +1 winner, -1 loser, 0 tie
        logits = c.beta * (preference * log_ratio).sum(dim=1)  # (p, S) = β (log r_w - log r_l)
        decided = (preference[:, 0] != 0).to(logits.dtype)  # (p, S)
        num_decided = decided.sum().clamp(min=1.0)
        loss = (-F.logsigmoid(logits) * decided).sum() / num_decided
        detached = raw_log_ratio.detach()
        metrics = {
            "loss": loss.detach(),
            "tie_fraction": 1.0 - decided.mean(),
            # A pair the model does not separate (logit 0: both ratios clamped to the same
            # bound, or an untrained adapter) counts as a coin flip, not as wrong.
            "preference_accuracy": ((torch.sign(logits.detach()) + 1) / 2 * decided).sum() / num_decided,
            "ratio_clipfrac": ((detached < low) | (detached > high)).float().mean(),
            "kl_to_reference": 0.5 * (detached**2).mean(),
        }
        return loss, metrics
