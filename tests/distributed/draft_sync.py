"""Run under 2 processes: one DRaFT epoch (2 minibatches of 2 prompts per process, K = 2 of
3 steps, gradients accumulated over both) with plain SGD, once with the UNet unwrapped
(each process's own gradient) and once wrapped in DDP by accelerate (the gradient averaged
over processes); rank 0 saves both processes' LoRA updates of each run."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from benchmarks.epochs import reward_backprop_epoch
from zoo.draft import DRaFTConfig
from zoo.policy import Policy
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for helpers
from helpers.policies import policy_with_random_adapter  # noqa: E402
from helpers.rewards import Brightness  # noqa: E402


def lora_update(policy: Policy, before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.trainable_parameters(), before)])


def main(model: str, out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    policy = policy_with_random_adapter(model)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    config = DRaFTConfig(num_steps=3, grad_steps=2, train_batch_size=2, gradient_accumulation_steps=2,
                         max_grad_norm=None)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 2.0, "trailing"))
    prompts = [f"prompt {accelerator.process_index} {i}" for i in range(4)]
    updates = {}
    for synced in (False, True):
        with torch.no_grad():
            for p, b in zip(policy.trainable_parameters(), before):
                p.copy_(b)
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e4)
        if synced:
            policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)
        generator = torch.Generator().manual_seed(10 + accelerator.process_index)
        _, counts, failure = reward_backprop_epoch(config.build(), config, sampler, prompts, generator, Brightness(),
                                                   optimizer, accelerator, False)
        # Backward passes are counted on every process together.
        assert failure is None and counts == {"optimizer_updates": 1, "backward_passes": 2 * 2}, counts
        updates[synced] = gather_object([lora_update(policy, before)])
    if accelerator.is_main_process:
        torch.save({"local": torch.stack(updates[False]), "synced": torch.stack(updates[True])}, out_path)
    accelerator.wait_for_everyone()
    # Gloo's threads are joined here, not torn down at interpreter exit, where under load
    # they aborted a process ("terminate called without an active exception").
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
