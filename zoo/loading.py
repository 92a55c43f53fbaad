"""Where a model's files come from, and which family's adapter loads them.

`resolve_model` finds a diffusers pipeline folder (local, $STEPZOO_MODEL_PATH, the Hugging
Face cache) or downloads the files its family reads, and nothing else; `load_policy` loads
it as the family its folder holds: a unet/ folder is an ε-prediction UNet
(`zoo.unet_policy`), a transformer/ folder a flow-matching model (`zoo.flow_policy`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zoo import hub
from zoo.flow_policy import PIPELINES, FlowPolicy
from zoo.hub import UNPINNED, HubFiles
from zoo.policy import LoraSettings, MixedPrecision, Performance, Policy
from zoo.unet_policy import UNetPolicy

MODEL_PATH_ENV = "STEPZOO_MODEL_PATH"


class ModelUnavailable(RuntimeError):
    """The model's files are neither in a local folder nor in the Hugging Face cache, and
    cannot be downloaded (offline or no network)."""


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
"""What `load_policy` reads from a hub pipeline, and all that is downloaded: the
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
    return "flow" if name in PIPELINES else "epsilon"


def _missing_pipeline_files(folder: Path, required: tuple[tuple[str, ...], ...]) -> list[str]:
    return [" or ".join(choices) for choices in required if not any(any(folder.glob(c)) for c in choices)]


def model_family(folder: str | Path) -> str:
    """"flow" for a diffusers pipeline folder with a transformer/ (SD3, FLUX), else "epsilon"."""
    return "flow" if (Path(folder) / "transformer").is_dir() else "epsilon"


def load_policy(
    model: str,
    *,
    device="cpu",
    mixed_precision: MixedPrecision = "no",
    lora: LoraSettings | None = None,
    full_finetune: bool = False,
    performance: Performance = Performance(),
    resolution: int | None = None,
) -> Policy:
    """Load `model` (hub id or diffusers pipeline folder) as the family its folder holds:
    a transformer/ folder is a flow-matching model, a unet/ one an ε-prediction UNet.
    `resolution` (pixels, flow models only) replaces the pipeline's default image size.
    `lora` or `full_finetune`: what trains (`Policy`); neither: a frozen policy."""
    source = resolve_model(model)
    options = dict(device=device, mixed_precision=mixed_precision, lora=lora, full_finetune=full_finetune,
                   performance=performance)
    if model_family(source) == "flow":
        return FlowPolicy.load(source, resolution=resolution, **options)
    if resolution is not None:
        raise ValueError(f"resolution {resolution}: a UNet model samples at its own sample_size; pass None")
    return UNetPolicy.load(source, **options)
