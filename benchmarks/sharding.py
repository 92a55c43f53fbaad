"""Full fine-tuning sharded over the processes (`--fsdp`): FSDP2, torch's `fully_shard`.

Each process holds 1/N of the denoiser's weights, of their gradients and of the optimizer's
state; every forward pass gathers a block's weights just before the block runs and frees
them after (`reshard_after_forward`), and every backward pass reduce-scatters the gradients.
So a model whose weights, gradients and AdamW moments do not fit one device trains over
several (a 12B FLUX transformer in float32 is 48 GB of weights, 192 GB with its gradients and the
two AdamW moments; over 8 GPUs, 24 GB per GPU before activations).

Why torch's `fully_shard` and not accelerate's FSDP plugin: accelerate (1.15) shards only on
accelerators; on CPU processes it builds DDP whatever the plugin says (`AcceleratorState`
sets DistributedType.FSDP only for GPU-like devices), and the CPU is where the project tests.
accelerate launches the processes and owns the process group here; the sharding is the
same call accelerate's FSDP2 makes (`fully_shard` on each block the model's
`_no_split_modules` names, then on the root), on any device.

What changes in the training loop, all because each forward and backward pass is now a
collective that every process must make the same number of times:
- the epoch's trajectories are gathered on every process after sampling (`gathered_batch`),
  and each process trains an equal part of every global minibatch (`MinibatchShard`),
  instead of the groups it sampled: equal parts make equal UNet calls;
- evaluations pad the processes' shares to the same number of sampling calls
  (`benchmarks.evaluate`);
- checkpoints hold whole tensors, gathered (`Policy.gathered`, `gathered_optimizer_state`),
  in the form an unsharded run writes, so that a run may resume with or without `--fsdp`.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from zoo.policy import Policy
from zoo.trajectory import Trajectory


def shard_denoiser(policy: Policy, accelerator: Accelerator) -> None:
    """Shard the policy's denoiser over the accelerator's processes, in place: one FSDP unit
    per block that the model keeps whole (`_no_split_modules`: a transformer block, a UNet's
    resnet and attention blocks), and the root for the rest."""
    model = policy.model
    if not torch.distributed.is_initialized():
        # One process started without a launcher: a group of one, so that the same code runs
        # (sharding over one process changes no number and saves no memory).
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = tuple(getattr(model, "_no_split_modules", None) or ())
    # Innermost first: a block inside another block (a UNet's up block) gets its own unit.
    units = [module for module in model.modules() if type(module).__name__ in blocks and module is not model]
    for module in reversed(units):
        fully_shard(module, mesh=mesh)
    # Explicitly True: the root's default keeps its weights gathered after a forward pass,
    # and weights copied into the shards while gathered (an old policy, the reference)
    # would not reach the next forward pass.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    policy.collective_forward = True


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with each sharded state tensor (an AdamW moment) gathered
    whole onto the CPU: an unsharded optimizer's state as it is, a sharded one's in the same
    form. A collective when sharded."""
    state = optimizer.state_dict()
    with torch.no_grad():
        state["state"] = {
            index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                    for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `gathered_optimizer_state`'s state into an optimizer, sharded or not: for a
    sharded parameter, each whole tensor of its shape becomes this process's shard of it."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                    entry[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def gathered_batch(
    traj: Trajectory, advantages: torch.Tensor, accelerator: Accelerator
) -> tuple[Trajectory, torch.Tensor]:
    """Every process's trajectories and advantages (equal shares), joined in rank order on
    every process: the global batch, as `MinibatchShard` trains it."""
    joined = {}
    for field in fields(Trajectory):
        value = traj.__dict__[field.name]
        if field.name == "prompts":
            joined[field.name] = gather_object(list(value))
        else:
            joined[field.name] = None if value is None else accelerator.gather(value.contiguous())
    return Trajectory(**joined), accelerator.gather(advantages.contiguous())
