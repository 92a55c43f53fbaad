"""The trainable policy: a diffusers denoiser (a Stable-Diffusion-shaped UNet here, an SD3-
or FLUX-shaped transformer in zoo/flow_policy.py) with a LoRA adapter.

Components load one by one from a hub id or a local folder (the layout that
`save_pretrained` writes), so any SD-shaped checkpoint works whatever pipeline class it
was saved with, and no safety checker or feature extractor is ever loaded. Only the LoRA
weights train; the frozen denoiser, VAE and text encoders sit in the chosen precision while
LoRA parameters stay float32 and every log-prob is computed in float32 (zoo.sampling).
The reference model is the same denoiser with its adapter disabled: no copy is made.

Speed and memory switches live in `Performance`; the optimizer only ever sees
`trainable_parameters()` (the LoRA weights), so its state is LoRA-sized whatever the model.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from zoo import hub
from zoo.hub import UNPINNED, HubFiles

MixedPrecision = Literal["no", "fp16", "bf16"]
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MODEL_PATH_ENV = "STEPZOO_MODEL_PATH"


class ModelUnavailable(RuntimeError):
    """The model's files are neither in a local folder nor in the Hugging Face cache, and
    cannot be downloaded (offline or no network)."""


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


PIPELINE_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "scheduler/scheduler_config.json",
)
"""What `Policy.from_pretrained` reads from a hub pipeline, and all that is downloaded: the
float32 safetensors of each component (loaded in the run's precision), not the fp16 or
.bin variants, single-file checkpoints, safety checker or feature extractor."""


FLOW_PIPELINE_FILES = (
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model-*-of-*.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/config.json",
    "text_encoder*/model.safetensors",
    "text_encoder*/model-*-of-*.safetensors",
    "text_encoder*/model.safetensors.index.json",
    "tokenizer*/*",
    "scheduler/scheduler_config.json",
)
"""`PIPELINE_FILES` of a flow-matching pipeline (SD3, FLUX): the transformer and the text
encoders in float32 safetensors, one file or shards with their index; never a repo's fp16
variants (`model.fp16*.safetensors`), single-file checkpoints or .bin copies."""

FLOW_REQUIRED = (
    ("model_index.json",),
    ("transformer/config.json",),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors.index.json"),
    ("vae/config.json",),
    ("vae/diffusion_pytorch_model.safetensors",),
    ("text_encoder/config.json",),
    ("text_encoder/model.safetensors", "text_encoder/model.safetensors.index.json"),
    ("tokenizer/*",),
    ("scheduler/scheduler_config.json",),
)
"""What a flow pipeline's download must hold, each entry one of its alternatives (a single
weights file or a shard index)."""

PIPELINE_FILE_SETS = {"epsilon": PIPELINE_FILES, "flow": FLOW_PIPELINE_FILES}
REQUIRED_FILES = {"epsilon": tuple((pattern,) for pattern in PIPELINE_FILES), "flow": FLOW_REQUIRED}


FLOW_PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")
"""model_index.json `_class_name`s of the flow-matching pipelines (`zoo.flow_policy`)."""


def resolve_model(model: str, revision: str = UNPINNED, family: str | None = None) -> str:
    """Return a loadable folder for `model`, or raise ModelUnavailable (or DownloadFailed).

    Looks at, in order: `model` as a local folder, the folder in $STEPZOO_MODEL_PATH
    when `model` is a hub id, then the Hugging Face cache at `revision`; a hub id that
    is not cached is downloaded (the `family`'s PIPELINE_FILES only) unless offline.
    `family` None reads it from the repo's model_index.json, fetched alone first (where
    that cannot be fetched, the error names the ε-prediction file set).
    """
    if Path(model).is_dir():
        if not any((Path(model) / denoiser).is_dir() for denoiser in ("unet", "transformer")):
            raise ModelUnavailable(
                f"--model {model}: the folder has no unet/ or transformer/ subfolder; point it at a "
                "diffusers pipeline folder (the layout `save_pretrained` writes: unet/ or transformer/, "
                "vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return model
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelUnavailable(f"--model {model}: no such folder; pass a diffusers pipeline folder or a hub id")
    override = os.environ.get(MODEL_PATH_ENV)
    if override and Path(override).is_dir():
        return override
    files = HubFiles(model, revision, PIPELINE_FILE_SETS[family or "epsilon"])
    try:
        if family is None:
            family = _hub_family(model, revision)
            files = HubFiles(model, revision, PIPELINE_FILE_SETS[family])
        required = REQUIRED_FILES[family]
        folder = hub.snapshot(files, lambda folder: not _missing_pipeline_files(folder, required))
    except hub.HubUnreachable as reason:
        raise ModelUnavailable(
            f"--model {model}: not in the Hugging Face cache and {reason}; fix: `{files.command()}`\n"
            f"The cache is {hub.cache_dir()}. Without network here, run that command on a machine with it "
            f"and copy the cache over, or pass --model /path/to/folder (or set {MODEL_PATH_ENV}) pointing at "
            "a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        ) from None
    missing = _missing_pipeline_files(folder, required)
    if missing:
        raise ModelUnavailable(
            f"--model {model}: the hub repo at revision {revision} has no {', '.join(missing)}; "
            "stepzoo loads diffusers pipelines with float32 safetensors weights"
        )
    return str(folder)


def _hub_family(model: str, revision: str) -> str:
    """"flow" or "epsilon", from the hub pipeline's model_index.json (cached like the rest)."""
    folder = hub.snapshot(HubFiles(model, revision, ("model_index.json",)), lambda f: (f / "model_index.json").is_file())
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    return "flow" if name in FLOW_PIPELINE_CLASSES else "epsilon"


def _missing_pipeline_files(folder: Path, required: tuple[tuple[str, ...], ...]) -> list[str]:
    return [" or ".join(choices) for choices in required if not any(any(folder.glob(c)) for c in choices)]


class Policy(abc.ABC):
    """A denoiser (`model`: UNet or transformer) with an optional LoRA adapter, its VAE and
    frozen text encoders. `Policy.from_pretrained` loads whichever family a folder holds:
    `UNetPolicy` (ε-prediction, Stable Diffusion shaped) or `zoo.flow_policy.FlowPolicy`
    (flow matching, SD3 and FLUX shaped). Subclasses load, encode prompts, predict and
    export the adapter; the adapter, reference, precision and decoding are shared here."""

    family: str
    """"epsilon" or "flow": which samplers the model takes (`zoo.sampling`)."""

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
        performance: Performance = Performance(),
    ):
        self.device = torch.device(device)
        self.performance = performance
        self.mixed_precision = mixed_precision
        self.weight_dtype = PRECISION_DTYPES[mixed_precision]
        self.model, self.vae = model, vae
        self.scheduler_config = dict(scheduler_config)
        for module in (model, vae, *text_encoders):
            module.requires_grad_(False)
            module.to(self.device)
            # Cast only when needed: diffusers warns on every `to(dtype)` call.
            if module.dtype != self.weight_dtype:
                module.to(dtype=self.weight_dtype)
            module.eval()
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
        # What runs the forward pass: the model itself, or the DDP wrapper around it that
        # the trainer installs so that gradients are averaged across processes.
        self.denoiser: torch.nn.Module = model

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: torch.device | str = "cpu",
        mixed_precision: MixedPrecision = "no",
        lora: LoraSettings | None = None,
        performance: Performance = Performance(),
        resolution: int | None = None,
    ) -> "Policy":
        """Load `model` (hub id or diffusers pipeline folder) as the family its folder holds:
        a transformer/ folder is a flow-matching model, a unet/ one an ε-prediction UNet.
        `resolution` (pixels, flow models only) replaces the pipeline's default image size."""
        source = resolve_model(model)
        options = dict(device=device, mixed_precision=mixed_precision, lora=lora, performance=performance)
        if model_family(source) == "flow":
            from zoo.flow_policy import FlowPolicy

            return FlowPolicy.load(source, resolution=resolution, **options)
        if resolution is not None:
            raise ValueError(f"resolution {resolution}: a UNet model samples at its own sample_size; pass None")
        return UNetPolicy.load(source, **options)

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, L, D) prompt embeddings, what the denoiser is conditioned on."""

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
    def reference(self) -> Iterator[None]:
        """Run the frozen base model: the LoRA adapter is disabled inside the block."""
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

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's key format, on the CPU (for checkpoints)."""
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable (LoRA) parameters by parameter name."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable (LoRA) parameters by parameter name, on their device:
        the weights of an old policy that `trainable_weights` runs."""
        return {name: p.detach().clone() for name, p in self.named_trainable_parameters().items()}

    @contextlib.contextmanager
    def trainable_weights(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run with the trainable parameters holding `state` (`trainable_state`'s keys),
        copied in place, and their own values restored after: another adapter's weights in
        the same modules, so no copy of the UNet is made and the optimizer and DDP keep
        their parameters."""
        params = self.named_trainable_parameters()
        if params.keys() != state.keys():
            raise ValueError("the old policy's weights do not fit this adapter (rank or target modules differ)")
        own = {name: p.detach().clone() for name, p in params.items()}
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


def model_family(folder: str | Path) -> str:
    """"flow" for a diffusers pipeline folder with a transformer/ (SD3, FLUX), else "epsilon"."""
    return "flow" if (Path(folder) / "transformer").is_dir() else "epsilon"


class UNetPolicy(Policy):
    """UNet + VAE + CLIP text encoder + tokenizer: ε-prediction, Stable Diffusion shaped."""

    family = "epsilon"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict,
        **options,
    ):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        super().__init__(unet, vae, (text_encoder,), scheduler_config, **options)

    @classmethod
    def load(cls, source: str, *, mixed_precision: MixedPrecision = "no", **options) -> "UNetPolicy":
        """From a local pipeline folder (`resolve_model`'s answer)."""
        kwargs = {"local_files_only": True}
        dtype = PRECISION_DTYPES[mixed_precision]
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, mixed_precision=mixed_precision, **options)

    def scheduler_for(self, kind: str, timestep_spacing: str | None = None) -> DDIMScheduler | LCMScheduler:
        """A fresh scheduler of the sampler's kind built from the model's own config, so
        its beta schedule is the model's; a DDIM `timestep_spacing` ("trailing", ...)
        replaces the config's, None keeps it. LCM's spacing is not a scheduler setting
        (diffusers' LCMScheduler ignores it): `zoo.sampling.make_schedule` applies it."""
        if kind == "ddim":
            spacing = {"timestep_spacing": timestep_spacing} if timestep_spacing is not None else {}
            return DDIMScheduler.from_config(self.scheduler_config, **spacing)
        return LCMScheduler.from_config(self.scheduler_config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, L, D) text-encoder hidden states, padded to the tokenizer's max length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        kind: str,
    ) -> torch.Tensor:
        """ε̂ (N,C,h,w) in float32 (float64 for a policy whose weights are), guided.

        DDIM: classifier-free guidance with the conditional and unconditional halves in
        one batched UNet call. LCM: when the UNet was distilled with a guidance embedding
        (`time_cond_proj_dim`), w = guidance - 1 is embedded and passed as
        `timestep_cond` (one pass); otherwise classifier-free guidance as for DDIM.
        """
        n = latents.shape[0]
        guidance_embedding = kind == "lcm" and self.unet.config.time_cond_proj_dim is not None
        use_cfg = guidance_scale > 1.0 and not guidance_embedding
        timestep_cond = None
        if guidance_embedding:
            w = torch.full((n,), guidance_scale - 1.0, device=self.device)
            # LCM's guidance embedding is the VDM sinusoid of 1000·w (sin half first).
            timestep_cond = get_timestep_embedding(
                w * 1000.0, self.unet.config.time_cond_proj_dim, flip_sin_to_cos=False, downscale_freq_shift=1
            ).to(self.weight_dtype)
        if use_cfg:
            uncond = self.uncond_embeds().expand(n, -1, -1)
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([uncond, prompt_embeds])
        with self._autocast():
            output = self.denoiser(
                latents.to(self.weight_dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(self.weight_dtype),
                timestep_cond=timestep_cond,
            ).sample
        return self._prediction(output, guidance_scale if use_cfg else None)

    # --- LoRA export ------------------------------------------------------------------

    lora_prefix = "unet"

    @property
    def lora_pipeline(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def peft_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_unet_state_dict_to_peft(state)
