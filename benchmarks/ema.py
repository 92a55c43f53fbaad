"""An exponential moving average (EMA) of the trained LoRA weights, as Flow-GRPO keeps one.

Reference: yifan123/flow_grpo at ac4c86e (its latest commit), `flow_grpo/ema.py`
(`EMAModuleWrapper`) and `scripts/train_sd3.py`, which keeps one in every SD3.5 configuration
of `config/grpo.py` (`train.ema = True`, e.g. :208 in `pickscore_sd3_4gpu`; off by default,
`config/base.py:95`):

- it starts from the trainable parameters when the adapter is made (`ema.py:17`, built at
  `train_sd3.py:445` right after `get_peft_model`), the LoRA initialisation;
- after optimizer update n (n counted from 1: `global_step` is incremented at
  `train_sd3.py:952` before `ema.step` at :954-955), it moves only when
  (n + 1) % update_interval == 0 (`ema.py:45`), by
  ema <- ema + (1 - d_n)(weights - ema) (`ema.py:49`), with the warmed-up decay
  d_n = min((1 + n) / (10 + n), decay) (`ema.py:33-37`);
- decay 0.9 and update_interval 8 (`train_sd3.py:445`);
- every evaluation swaps the EMA in and the trained weights back after
  (`train_sd3.py:218-219, 315-316`), and the saved LoRA is the EMA (:328-332); training
  and its sampling go on from the trained weights.

Deviation: flow_grpo calls `ema.step` once per training minibatch (the loop at
`train_sd3.py:846`), with the count of optimizer updates so far; with gradients accumulated
over A minibatches, every n is passed A times on the same weights, so each move is applied
A times (A = 4 in its 4-GPU PickScore configuration, `config/grpo.py:198, 203`): an
effective decay of d_n^A. Here the EMA moves once per optimizer update, so `decay` is the
decay of one move. flow_grpo's checkpoints hold the LoRA only (the EMA's, :323-332) and
its script has no resume; here the EMA and its update count are saved with each
checkpoint and restored on `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from zoo.tiny.optim import ema_update_tensors


@dataclass(frozen=True)
class Ema:
    """An EMA of the trained LoRA weights (`--ema.*`). It changes what a run reports, so
    config.json records it and a resumed run must keep it."""

    decay: float | None = None
    """Decay of each move of the EMA, between 0 and 1; None: no EMA (the default). Flow-GRPO
    keeps one at 0.9 (yifan123/flow_grpo ac4c86e, scripts/train_sd3.py:445). In the first
    updates the decay is warmed up, min((1 + n) / (10 + n), decay) after update n
    (flow_grpo/ema.py:33-37)."""
    update_interval: int = 8
    """The EMA moves after optimizer update n when (n + 1) is a multiple of this, as flow_grpo's
    update_step_interval (8: scripts/train_sd3.py:445; the test: flow_grpo/ema.py:45)."""
    evaluate: bool = True
    """Evaluate on the EMA weights, swapped in for each evaluation and the trained ones put
    back after, and write the EMA to lora/, as flow_grpo does (scripts/train_sd3.py:218-219,
    328-332). False: evaluate and write the trained weights; the EMA is still kept in the
    checkpoint."""

    @property
    def on(self) -> bool:
        return self.decay is not None

    def decay_after(self, updates: int) -> float:
        """The decay of a move after optimizer update `updates` (from 1), warmed up."""
        return min((1 + updates) / (10 + updates), self.decay)

    def moves_after(self, updates: int) -> bool:
        return (updates + 1) % self.update_interval == 0


def _cpu_copies(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: w.detach().cpu().clone() for name, w in weights.items()}


class WeightsEma:
    """The EMA of trainable tensors (a policy's LoRA or whole denoiser, this process's shards
    of it when sharded: `Policy.trainable_tensors`), by parameter name and on their devices,
    and the optimizer updates it has seen."""

    def __init__(self, settings: Ema, params: dict[str, torch.Tensor], state: dict | None = None):
        """Starts from the parameters' current values, or from `state_dict()`'s `state`."""
        self.settings = settings
        self.params = params
        if state is None:
            self.weights = {name: p.detach().clone() for name, p in params.items()}
            self.updates = 0
        else:
            if state["weights"].keys() != params.keys():
                raise ValueError("the checkpoint's EMA does not fit this adapter (rank or target modules differ)")
            self.weights = {name: state["weights"][name].to(p.device) for name, p in params.items()}
            self.updates = state["updates"]

    def update(self) -> None:
        """Count one optimizer update and move the EMA towards the weights when it is due."""
        self.updates += 1
        if self.settings.moves_after(self.updates):
            ema_update_tensors(
                self.weights.values(), (self.params[name] for name in self.weights),
                self.settings.decay_after(self.updates),
            )

    def state_dict(self, gathered: Callable[[dict], dict] = _cpu_copies) -> dict:
        """A copy of the EMA on the CPU and its update count, for a checkpoint; `gathered`
        makes whole tensors of shards (`Policy.gathered`, a collective)."""
        return {"weights": gathered(self.weights), "updates": self.updates}
