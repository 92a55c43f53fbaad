"""The trainable policy: a family adapter around a diffusers denoiser, trained through a LoRA
adapter or in full.

A family adapter declares what its denoiser predicts and on which noise schedule: the
ε-prediction UNet (`zoo.unet_policy`: DDIM and LCM kernels on the ᾱ schedule) and the
velocity-prediction transformer (`zoo.flow_policy`: the flow SDEs on the σ schedule). The
samplers and losses see only `Policy.kernel` and `Policy.predict`, never a family's name;
`zoo.loading.load_policy` picks the adapter from a model's files.

With a LoRA adapter only its weights train; the frozen denoiser, VAE and text encoders sit
in the chosen precision while LoRA parameters stay float32 and every log-prob is computed in
float32 (zoo.kernels). The reference model is the same denoiser with its adapter disabled:
no copy is made. In full fine-tuning (`full_finetune`) every weight of the denoiser trains,
held in float32 (the master weights; mixed precision computes under autocast), and the
reference is the base weights kept on the CPU (`keep_reference`) and copied in for each
reference call: no second copy on the device, and 1/N of one per process when the denoiser
is sharded over N processes (FSDP, `benchmarks.sharding`).

The weights that train are seen through `trainable_tensors()`: each parameter, or this
process's shard of it when the denoiser is sharded (a DTensor's local tensor, sharing its
storage). Old policies, the EMA and the reference are dicts of such local tensors, swapped in
place (`trainable_weights`); `gathered` and `scattered` turn them into whole CPU tensors for
checkpoints and back.

Speed and memory switches live in `Performance`; the optimizer only ever sees
`trainable_parameters()`, so with LoRA its state is LoRA-sized whatever the model.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import torch
from diffusers import AutoencoderKL
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from zoo.kernels import Kernel, SamplerConfig, SamplerConfigError

MixedPrecision = Literal["no", "fp16", "bf16"]
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FULL_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
"""The weights file of a diffusers model folder (what `from_pretrained` reads)."""


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this process holds: a sharded parameter's (DTensor's) local shard,
    which shares its storage, so that writing into it writes the parameter; else `param`."""
    return param.to_local() if isinstance(param, DTensor) else param

@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    """LoRA rank r of every adapted projection."""
    alpha: float = 4.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet attention projections that get an adapter (DDPO's and SDPO's choice)."""

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            init_lora_weights="gaussian",
            target_modules=list(self.target_modules),
        )


@dataclass(frozen=True)
class Performance:
    """Speed and memory switches of the UNet; none of them changes what is computed
    beyond floating-point rounding. The defaults suit any device: TF32 acts on CUDA only,
    and checkpointing and compilation are opt-in (see each field)."""

    tf32: bool = True
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (Ampere and
    later). A process-wide torch setting; it only touches the float32 work left under
    mixed precision, never the float32 log-prob arithmetic (element-wise, no matmul)."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's block activations during backward instead of storing them:
    roughly a third more UNet compute for a fraction of the activation memory. Worth it
    when the training minibatch would not fit otherwise (512px SD-sized UNets)."""
    compile_unet: bool = False
    """Compile the UNet's forward with torch.compile (inductor). Pays a compilation of a
    minute or more per new input shape and adapter mode, so it helps long GPU runs only."""
    compile_mode: str | None = None
    """torch.compile mode; None is torch's default. "reduce-overhead" and "max-autotune"
    replay CUDA graphs, whose outputs are static buffers that the next call overwrites:
    every prediction is then copied out of them (`Policy.static_outputs`), since the
    sampler and the losses keep predictions across UNet calls."""


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that replay CUDA graphs."""


def enable_tf32() -> None:
    """TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class Policy(abc.ABC):
    """A denoiser (`model`: UNet or transformer) with an optional LoRA adapter, its VAE and
    frozen text encoders. Each family's adapter (`zoo.unet_policy.UNetPolicy`,
    `zoo.flow_policy.FlowPolicy`) loads, encodes prompts, predicts, builds its kernels and
    exports the adapter; the adapter, reference, precision and decoding are shared here."""

    prediction: ClassVar[str]
    """What the denoiser predicts: "epsilon" (the noise) or "velocity" (ε - x0)."""
    samplers: ClassVar[tuple[str, ...]]
    """The `SamplerConfig.kind`s whose kernels this family builds."""
    suggested_sampler: ClassVar[str]
    """The sampler to name when another family's is asked for."""
    description: ClassVar[str]
    """The family in words, for errors."""

    def __init__(
        self,
        model: torch.nn.Module,
        vae: AutoencoderKL,
        text_encoders: tuple[torch.nn.Module, ...],
        scheduler_config: dict,
        *,
        device: torch.device | str = "cpu",
        mixed_precision: MixedPrecision = "no",
        lora: LoraSettings | None = None,
        full_finetune: bool = False,
        performance: Performance = Performance(),
    ):
        if lora is not None and full_finetune:
            raise ValueError("a policy trains either a LoRA adapter or every weight (full_finetune), not both")
        self.device = torch.device(device)
        self.performance = performance
        self.mixed_precision = mixed_precision
        self.weight_dtype = PRECISION_DTYPES[mixed_precision]
        self.model, self.vae = model, vae
        self.scheduler_config = dict(scheduler_config)
        for module in (model, vae, *text_encoders):
            module.requires_grad_(False)
            module.to(self.device)
            # Cast only when needed: diffusers warns on every `to(dtype)` call. Fully
            # fine-tuned weights stay float32: the optimizer's master weights.
            if module.dtype != self.weight_dtype and not (full_finetune and module is model):
                module.to(dtype=self.weight_dtype)
            module.eval()
        self.full_finetune = full_finetune
        if full_finetune:
            model.requires_grad_(True)
        self._reference_weights: dict[str, torch.Tensor] | None = None
        self.collective_forward = False
        """Whether every forward pass of the denoiser is a collective of all processes (a
        sharded denoiser gathers its weights), so that every process must make the same calls."""
        self.lora = lora
        if lora is not None:
            model.add_adapter(lora.peft_config())
            # Adapter weights train in float32 whatever the frozen weights' precision.
            cast_training_params(model, dtype=torch.float32)
            if mixed_precision != "no":
                # peft casts each adapter's input to float32 (its weights' dtype), which
                # autocast casts straight back: two activation-sized copies per adapted
                # layer, forward and backward, for bit-identical results.
                for module in model.modules():
                    if isinstance(module, BaseTunerLayer):
                        module.cast_input_dtype_enabled = False
        if performance.tf32 and self.device.type == "cuda":
            enable_tf32()
        if performance.gradient_checkpointing:
            # diffusers checkpoints non-reentrantly, so gradients reach the LoRA weights
            # even though the checkpointed blocks' inputs need no gradient themselves.
            model.enable_gradient_checkpointing()
        if performance.compile_unet:
            # In place: the module, its parameter names and peft's adapter switches stay
            # as they are; only the call goes through the compiled graph.
            model.compile(mode=performance.compile_mode)
        self.static_outputs = performance.compile_unet and performance.compile_mode in CUDA_GRAPH_MODES
        """Whether the denoiser's outputs are static buffers (CUDA graphs) that its next
        call overwrites, so that each prediction is copied out (`_prediction`)."""
        self._uncond_embeds: torch.Tensor | None = None
        self._unconditional_detached = False
        # What runs the forward pass: the model itself, or the DDP wrapper around it that
        # the trainer installs so that gradients are averaged across processes.
        self.denoiser: torch.nn.Module = model

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, L, D) prompt embeddings, what the denoiser is conditioned on."""

    def kernel(self, config: SamplerConfig) -> Kernel:
        """The transition kernel of `config` at its K steps on this model's noise schedule,
        its constants on the policy's device; refuses a sampler of another family."""
        if config.kind not in self.samplers:
            raise SamplerConfigError(
                f"--sampler {config.kind} needs {_family_needed(config.kind)}, and the model is {self.description}: "
                f"pass --sampler {self.suggested_sampler} (or a preset of that family)"
            )
        return self.build_kernel(config).to(self.device)

    @abc.abstractmethod
    def build_kernel(self, config: SamplerConfig) -> Kernel:
        """`kernel`'s answer on the CPU, for a sampler kind this family takes."""

    @abc.abstractmethod
    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float,
        guidance_embedding: bool = False,
    ) -> torch.Tensor:
        """The denoiser's prediction (`prediction`) at (x_t, t) (N,C,h,w), guided, in float32
        (float64 for a policy whose weights are). `guidance_embedding`: the kernel's wish
        that a model distilled with a guidance embedding get the scale that way (LCM)."""

    lora_prefix: str
    """The denoiser's key prefix in a diffusers LoRA file ("unet", "transformer")."""

    @property
    @abc.abstractmethod
    def lora_pipeline(self) -> type:
        """The diffusers pipeline class whose `save_lora_weights` writes this model's adapter."""

    @abc.abstractmethod
    def peft_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA file's denoiser weights (prefix removed) in peft's key format."""

    def save_lora(self, folder: str | Path) -> Path:
        """Write the adapter so that a plain diffusers pipeline can `load_lora_weights` it."""
        if self.lora is None:
            raise ValueError("this policy has no LoRA adapter to save")
        metadata = {"r": self.lora.rank, "lora_alpha": self.lora.alpha, "target_modules": list(self.lora.target_modules)}
        self.lora_pipeline.save_lora_weights(
            folder,
            **{f"{self.lora_prefix}_lora_layers": self.lora_state_dict(),
               f"{self.lora_prefix}_lora_adapter_metadata": metadata},
            weight_name=LORA_WEIGHT_NAME,
        )
        return Path(folder) / LORA_WEIGHT_NAME

    def load_lora(self, folder: str | Path) -> None:
        """Load adapter weights written by `save_lora` into this policy's adapter."""
        if self.lora is None:
            raise ValueError("this policy has no LoRA adapter to load into")
        state = load_file(str(Path(folder) / LORA_WEIGHT_NAME))
        prefix = self.lora_prefix + "."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(self.model, self.peft_keys(own))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{folder}: LoRA weights do not fit this model: unexpected keys {unexpected[:3]}")
        cast_training_params(self.model, dtype=torch.float32)

    def uncond_embeds(self) -> torch.Tensor:
        """(1, L, D) embedding of the empty caption, computed once."""
        if self._uncond_embeds is None:
            self._uncond_embeds = self.encode_prompts([""])
        return self._uncond_embeds

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def _prediction(self, output: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
        """The denoiser's output in float32 (float64 for a policy whose weights are); with a
        `guidance_scale`, its unconditional and conditional halves combined by classifier-free
        guidance. Copied out of a CUDA graph's static buffer when it would otherwise be that
        buffer: a half-precision output was copied by the cast already, and guidance makes a
        new tensor; the callers' predictions outlive the next call (NFT's old-policy one)."""
        prediction = output.to(torch.promote_types(self.weight_dtype, torch.float32))
        if guidance_scale is not None:
            uncond, cond = prediction.chunk(2)
            if self._unconditional_detached:
                uncond = uncond.detach()
            return uncond + guidance_scale * (cond - uncond)
        if prediction is output and self.static_outputs:
            prediction = output.clone()
        return prediction

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N,C,h,w) -> images (N,3,H,W) float32 in [0, 1] (float64 for a policy whose
        weights are)."""
        return self.decode_with_grad(latents)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode`, keeping the autograd graph back to `latents` (reward back-propagation
        through the VAE decoder; its own weights are frozen)."""
        config = self.vae.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
        images = self.vae.decode(latents.to(self.weight_dtype)).sample
        images = images.to(torch.promote_types(self.weight_dtype, torch.float32))
        return (images / 2 + 0.5).clamp(0, 1)

    @contextlib.contextmanager
    def unconditional_detached(self) -> Iterator[None]:
        """Inside the block, classifier-free guidance detaches the unconditional prediction:
        the guided prediction's value is unchanged and its gradient reaches the adapter
        through the conditional half alone (guidance x its gradient), as flow_grpo's training
        log-prob computes it (yifan123/flow_grpo ac4c86e, scripts/train_sd3.py:189-190)."""
        self._unconditional_detached = True
        try:
            yield
        finally:
            self._unconditional_detached = False

    def keep_reference(self) -> None:
        """In full fine-tuning, keep the weights as they are now (the base, this process's
        shards once sharded) on the CPU, as the reference model's; with LoRA the reference is
        the adapter disabled and nothing is kept."""
        if self.full_finetune:
            self._reference_weights = {
                name: t.detach().to("cpu", copy=True) for name, t in self.trainable_tensors().items()
            }

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the frozen base model: the LoRA adapter disabled inside the block, or in full
        fine-tuning the base weights kept by `keep_reference` copied in (so, as for any
        `trainable_weights` block, not between a forward pass with gradients and its backward)."""
        if self.full_finetune:
            if self._reference_weights is None:
                raise RuntimeError("full fine-tuning runs the reference model only after keep_reference()")
            with self.trainable_weights(self._reference_weights):
                yield
            return
        if self.lora is None:
            yield
            return
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name, as the tensors this process holds (`local_tensor`)."""
        return {name: local_tensor(p) for name, p in self.named_trainable_parameters().items()}

    def gathered(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (local tensors by trainable parameter name) as whole tensors on the CPU: a
        collective when the denoiser is sharded, which every process must call."""
        params = self.named_trainable_parameters()
        whole = {}
        with torch.no_grad():
            for name, tensor in state.items():
                param = params[name]
                if isinstance(param, DTensor):
                    tensor = DTensor.from_local(tensor.detach(), param.device_mesh, param.placements,
                                                shape=param.shape, stride=param.stride()).full_tensor()
                whole[name] = tensor.detach().cpu().clone()
        return whole

    def scattered(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors by trainable parameter name (`gathered`'s) as this process's local
        tensors on the policy's device."""
        params = self.named_trainable_parameters()
        local = {}
        for name, tensor in state.items():
            param, tensor = params[name], tensor.to(self.device)
            if isinstance(param, DTensor):
                # Every process holds the whole tensor: each keeps its shard, with no message.
                tensor = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local[name] = tensor
        return local

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What training changes, as whole tensors on the CPU (for checkpoints): the adapter
        in peft's key format, or in full fine-tuning every weight of the denoiser by
        parameter name (gathered: every process must call it when sharded)."""
        if self.full_finetune:
            return self.gathered(self.trainable_tensors())
        return self.adapter_state()

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `trained_state`'s weights; keys must match exactly."""
        if not self.full_finetune:
            self.load_adapter_state(state)
            return
        own = self.trainable_tensors()
        if own.keys() != state.keys():
            raise ValueError("the checkpoint's weights do not fit this model (another model, or a LoRA checkpoint)")
        with torch.no_grad():
            for name, tensor in self.scattered(state).items():
                own[name].copy_(tensor)

    def save_weights(self, folder: str | Path, write: bool) -> Path | None:
        """Export what was trained, for diffusers: the LoRA file (`save_lora`), or in full
        fine-tuning the denoiser as a model folder (`from_pretrained`). A collective when the
        denoiser is sharded: every process calls it, the one with `write` writes."""
        if self.lora is not None:
            return self.save_lora(folder) if write else None
        state = self.trained_state()
        if not write:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_config(folder)
        # The rest of the state is buffers (a positional embedding): never sharded, never trained.
        buffers = {name: t.detach().cpu() for name, t in self.model.state_dict().items() if name not in state}
        save_file({name: tensor.contiguous() for name, tensor in {**buffers, **state}.items()},
                  folder / FULL_WEIGHT_NAME)
        return folder / FULL_WEIGHT_NAME

    def load_weights(self, folder: str | Path) -> None:
        """Load what `save_weights` wrote: the LoRA file into this policy's adapter, or (a
        policy without one) the fine-tuned denoiser's model folder into its weights."""
        if self.lora is not None:
            self.load_lora(folder)
            return
        path = Path(folder) / FULL_WEIGHT_NAME
        if not path.is_file():
            raise ValueError(f"{folder}: no {FULL_WEIGHT_NAME}; a LoRA folder loads into a policy with its adapter")
        state = load_file(str(path))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: these weights do not fit this model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's key format, on the CPU (for checkpoints)."""
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters (the LoRA weights, or all of the denoiser's) by parameter name."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors (`trainable_tensors`) by parameter name, on their
        device: the weights of an old policy that `trainable_weights` runs."""
        return {name: t.detach().clone() for name, t in self.trainable_tensors().items()}

    @contextlib.contextmanager
    def trainable_weights(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with the trainable tensors holding `state` (`trainable_state`'s keys), copied
        in place, and their own values restored after: another adapter's weights in the same
        modules, so no copy of the UNet is made and the optimizer and DDP keep their
        parameters. The own values wait on the device `state` lies on (the CPU, for a
        reference kept there: no second copy of a fully trained model on the device)."""
        params = self.trainable_tensors()
        if params.keys() != state.keys():
            raise ValueError("the old policy's weights do not fit this adapter (rank or target modules differ)")
        own = {name: p.detach().to(state[name].device, copy=True) for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(own[name])

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights saved by `adapter_state`; keys must match exactly."""
        own = get_peft_model_state_dict(self.model)
        if set(own) != set(state):
            raise ValueError("the checkpoint's LoRA does not fit this model (rank or target modules differ)")
        set_peft_model_state_dict(self.model, state)
        cast_training_params(self.model, dtype=torch.float32)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in diffusers' LoRA key format (what `load_lora_weights` reads)."""
        peft_state = get_peft_model_state_dict(self.model)
        return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()}


def _family_needed(kind: str) -> str:
    return "a flow-matching model (SD3, FLUX)" if kind == "flow" else "an ε-prediction UNet model"
