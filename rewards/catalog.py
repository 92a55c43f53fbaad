"""The catalog of registered rewards: for each name, what the reward is (`RewardSpec`:
its source, inputs, score range, differentiability, and its gold when it is a proxy), what
it needs (packages and weight files or folders, `Artifact`) and how it is built from the
paths the preflight found (`rewards.weights.check_reward`). `GOLD_OF` pairs each proxy
with its gold.

Importing it imports no torch and no model: each builder imports its reward's module
when it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from zoo.hub import UNPINNED, HubFiles

if TYPE_CHECKING:
    import torch

    from rewards.base import Reward

PRIMARY = "weights"
"""Role of the artifact a plain `--reward-path NAME=PATH` points at."""

CLIP_FOLDER_FILES = (
    ("config.json",),
    ("model.safetensors", "pytorch_model.bin"),
    ("preprocessor_config.json", "processor_config.json"),
    ("tokenizer.json", "vocab.json"),
)
"""A transformers CLIPModel folder with its processor: one file from each group."""
CLIP_TOKENIZER_COMPANIONS = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
"""What a CLIP processor reads besides tokenizer.json and preprocessor_config.json."""


@dataclass(frozen=True)
class Artifact:
    """One file or folder that a reward loads."""

    role: str
    """PRIMARY for the path `--reward-path NAME=PATH` sets; otherwise the ROLE in NAME:ROLE."""
    what: str
    """What it is, for error messages."""
    files: tuple[tuple[str, ...], ...]
    """Files needed, one from each group. A file artifact has one group of one name."""
    folder: bool
    """Whether the artifact is a folder (transformers style) or a single file."""
    published: str
    """Where the authors publish it (URL)."""
    hub_repo: str | None = None
    """Hugging Face repo id searched in the hub cache and downloaded from, if it is published there."""
    hub_revision: str = UNPINNED
    """The revision of `hub_repo` that is downloaded and loaded."""
    hub_companions: tuple[str, ...] = ()
    """Files of `hub_repo` that loading reads besides `files` (tokenizer and processor files)."""

    def hub_files(self, groups: tuple[tuple[str, ...], ...] | None = None) -> HubFiles:
        """What is downloaded from `hub_repo`: the companions and the first name of each group
        of `files`; with `groups`, every name of those groups instead (for a repo that
        publishes another of the accepted names)."""
        if groups is None:
            return HubFiles(self.hub_repo, self.hub_revision, self.hub_companions + tuple(g[0] for g in self.files))
        return HubFiles(self.hub_repo, self.hub_revision, tuple(name for group in groups for name in group))
    default_path: Path | None = None
    """A local location searched before the hub cache (`~` expanded when searched)."""


@dataclass(frozen=True)
class RewardSpec:
    """A catalog entry: what the reward is and what it needs."""

    name: str
    source: str
    """Paper and reference code."""
    inputs: str
    """Resolution and normalisation the model expects (done on tensors by the reward)."""
    score_range: str
    packages: tuple[str, ...]
    """Top-level modules that must be importable."""
    extra: str | None
    """The pip extra of this project that brings those packages, if not the core install."""
    artifacts: tuple[Artifact, ...]
    build: Callable[[RewardSpec, dict[str, Path], "torch.device | str", "torch.dtype"], "Reward"]
    """Builds the reward from the paths `rewards.weights.check_reward` found (role -> path)."""
    gold: str | None = None
    """The registry name of this reward's gold, when it is a proxy: the score it
    approximates, evaluated next to it and never trained on (`GOLD_OF`)."""
    differentiable: bool = False
    """Whether the reward it builds is differentiable (`rewards.base.Reward.differentiable`,
    which tests/test_rewards_models.py checks it against), known here before anything
    loads so that a reward back-propagation algorithm (zoo/draft.py) refuses the others."""


def _build_aesthetic(spec, found, device, dtype):
    from rewards.aesthetic import AestheticScore

    return AestheticScore(spec.name, found[PRIMARY], found["clip"], device=device, dtype=dtype)


def _build_imagereward(spec, found, device, dtype):
    from rewards.imagereward import ImageRewardScore

    folder = found[PRIMARY]
    return ImageRewardScore(
        spec.name, folder / "ImageReward.pt", folder / "med_config.json", found["tokenizer"], device=device, dtype=dtype
    )


def _build_hps(spec, found, device, dtype):
    from rewards.hps import HPSv2Score

    return HPSv2Score(spec.name, found[PRIMARY], device=device, dtype=dtype)


def _build_pickscore(spec, found, device, dtype):
    from rewards.clip_score import CLIPScore

    return CLIPScore(spec.name, found[PRIMARY], found["processor"], logit_scale=True, device=device, dtype=dtype)


def _tiny_clip_artifact(role: str) -> Artifact:
    """The tiny world's CLIP judge folder, which tiny-clip, tiny-aesthetic and tiny-align load."""
    return Artifact(
        role=role,
        what="the tiny CLIP folder (transformers CLIPModel with its processor)",
        files=CLIP_FOLDER_FILES,
        folder=True,
        published="this repository, zoo/tiny/assets/clip (trained and saved by the tiny world in zoo/tiny)",
        default_path=Path(__file__).resolve().parent.parent / "zoo" / "tiny" / "assets" / "clip",
    )

def _build_tiny_clip(spec, found, device, dtype):
    from rewards.clip_score import CLIPScore

    return CLIPScore(spec.name, found[PRIMARY], found[PRIMARY], logit_scale=False, device=device, dtype=dtype)


def _build_tiny_aesthetic(spec, found, device, dtype):
    from rewards.tiny_gold import TinyAesthetic

    return TinyAesthetic(spec.name, found[PRIMARY], found["clip"], device=device, dtype=dtype)


def _build_tiny_align(spec, found, device, dtype):
    from rewards.tiny_gold import TinyAlign

    return TinyAlign(spec.name, found[PRIMARY], device=device, dtype=dtype)


def _gold_builder(class_name: str):
    def build(spec, found, device, dtype):
        import rewards.tiny_gold

        return getattr(rewards.tiny_gold, class_name)(spec.name, device=device, dtype=dtype)

    return build


def _jpeg_builder(sign: float):
    def build(spec, found, device, dtype):
        from rewards.jpeg import JpegSize

        return JpegSize(spec.name, sign, device=device, dtype=dtype)

    return build


def _hps_checkpoint(version: str, filename: str) -> Artifact:
    return Artifact(
        role=PRIMARY,
        what=f"the HPS {version} checkpoint {filename}",
        files=((filename,),),
        folder=False,
        published=f"https://huggingface.co/xswu/HPSv2/blob/main/{filename}",
        hub_repo="xswu/HPSv2",
    )


_HPS_COMMON = dict(
    inputs="224x224, bicubic resize of the short side + centre crop, OpenAI CLIP mean/std",
    score_range="cosine of image and prompt features, ~0.2-0.3 for ordinary images (max 1)",
    packages=("open_clip",),
    extra=None,
    build=_build_hps,
    differentiable=True,
)

REWARDS: dict[str, RewardSpec] = {
    "aesthetic": RewardSpec(
        name="aesthetic",
        source="LAION aesthetic predictor v2, https://github.com/christophschuhmann/improved-aesthetic-predictor "
        "(MLP on CLIP ViT-L/14 image embeddings, as DDPO/SDPO use it)",
        inputs="224x224, bicubic resize of the short side + centre crop, OpenAI CLIP mean/std; prompt ignored",
        score_range="predicted mean AVA rating, 1-10 (ordinary images 4-7)",
        packages=("transformers",),
        extra=None,
        artifacts=(
            Artifact(
                role=PRIMARY,
                what="the MLP head sac+logos+ava1-l14-linearMSE.pth",
                files=(("sac+logos+ava1-l14-linearMSE.pth",),),
                folder=False,
                published="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                "sac%2Blogos%2Bava1-l14-linearMSE.pth",
                # Where ImageReward's `load_score("Aesthetic")` downloads it.
                default_path=Path("~/.cache/ImageReward/sac+logos+ava1-l14-linearMSE.pth"),
            ),
            Artifact(
                role="clip",
                what="the CLIP ViT-L/14 folder (transformers format, with its processor)",
                files=CLIP_FOLDER_FILES,
                folder=True,
                published="https://huggingface.co/openai/clip-vit-large-patch14",
                hub_repo="openai/clip-vit-large-patch14",
                hub_companions=CLIP_TOKENIZER_COMPANIONS,
            ),
        ),
        build=_build_aesthetic,
        differentiable=True,
    ),
    "imagereward": RewardSpec(
        name="imagereward",
        source="ImageReward v1.0, Xu et al. 2023, https://github.com/THUDM/ImageReward (the image-reward package)",
        inputs="224x224, bicubic resize of the short side + centre crop, OpenAI CLIP mean/std; prompt: "
        "BERT uncased tokens, 35 max",
        score_range="standardised preference, ~N(0, 1) on its training images (typically -2..2)",
        packages=("ImageReward", "timm", "fairscale", "clip", "datasets"),
        extra="real-rewards",
        artifacts=(
            Artifact(
                role=PRIMARY,
                what="the folder with ImageReward.pt and med_config.json",
                files=(("ImageReward.pt",), ("med_config.json",)),
                folder=True,
                published="https://huggingface.co/THUDM/ImageReward",
                hub_repo="THUDM/ImageReward",
            ),
            Artifact(
                role="tokenizer",
                what="the bert-base-uncased tokenizer folder (vocab.txt) that BLIP's text encoder uses",
                files=(("vocab.txt",),),
                folder=True,
                published="https://huggingface.co/google-bert/bert-base-uncased",
                hub_repo="bert-base-uncased",
                hub_companions=("tokenizer_config.json",),
            ),
        ),
        build=_build_imagereward,
        differentiable=True,
    ),
    "hpsv2": RewardSpec(
        name="hpsv2",
        source="HPS v2, Wu et al. 2023, https://github.com/tgxs002/HPSv2 (open_clip ViT-H-14)",
        artifacts=(_hps_checkpoint("v2.0", "HPS_v2_compressed.pt"),),
        **_HPS_COMMON,
    ),
    "hpsv2.1": RewardSpec(
        name="hpsv2.1",
        source="HPS v2.1, https://github.com/tgxs002/HPSv2 (open_clip ViT-H-14, more training data)",
        artifacts=(_hps_checkpoint("v2.1", "HPS_v2.1_compressed.pt"),),
        **_HPS_COMMON,
    ),
    "pickscore": RewardSpec(
        name="pickscore",
        source="PickScore_v1, Kirstain et al. 2023, https://github.com/yuvalkirstain/PickScore (CLIP ViT-H/14)",
        inputs="224x224, bicubic resize of the short side + centre crop, OpenAI CLIP mean/std; prompt: CLIP BPE, 77 max",
        score_range="logit_scale * cosine (logit scale ~100): ~18-23 for ordinary images",
        packages=("transformers",),
        extra=None,
        artifacts=(
            Artifact(
                role=PRIMARY,
                what="the PickScore_v1 model folder (transformers CLIPModel)",
                files=(("config.json",), ("model.safetensors", "pytorch_model.bin")),
                folder=True,
                published="https://huggingface.co/yuvalkirstain/PickScore_v1",
                hub_repo="yuvalkirstain/PickScore_v1",
            ),
            Artifact(
                role="processor",
                what="the processor folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K that PickScore's authors use",
                files=(("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")),
                folder=True,
                published="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                hub_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                hub_companions=CLIP_TOKENIZER_COMPANIONS,
            ),
        ),
        build=_build_pickscore,
        differentiable=True,
    ),
    "jpeg_compressibility": RewardSpec(
        name="jpeg_compressibility",
        source="DDPO, Black et al. 2023, https://github.com/kvablack/ddpo-pytorch",
        inputs="any size; rounded to 8 bits and saved as JPEG quality 95; prompt ignored",
        score_range="minus the file size in kB (1000 bytes): -(a few) .. -(tens) at 512 px",
        packages=("PIL",),
        extra=None,
        artifacts=(),
        build=_jpeg_builder(-1.0),
    ),
    "jpeg_incompressibility": RewardSpec(
        name="jpeg_incompressibility",
        source="DDPO, Black et al. 2023, https://github.com/kvablack/ddpo-pytorch",
        inputs="any size; rounded to 8 bits and saved as JPEG quality 95; prompt ignored",
        score_range="the file size in kB (1000 bytes): a few to tens at 512 px",
        packages=("PIL",),
        extra=None,
        artifacts=(),
        build=_jpeg_builder(1.0),
    ),
    "tiny-clip": RewardSpec(
        name="tiny-clip",
        source="this project's CLIP-style judge of the tiny world (zoo/tiny), loaded like pickscore",
        inputs="the folder's CLIPImageProcessor settings (resize of the short side, centre crop, mean/std)",
        score_range="cosine of image and caption embeddings, -1..1",
        packages=("transformers",),
        extra=None,
        artifacts=(
            _tiny_clip_artifact(PRIMARY),
        ),
        build=_build_tiny_clip,
        differentiable=True,
    ),
    "tiny-aesthetic": RewardSpec(
        name="tiny-aesthetic",
        source="this project's aesthetic proxy of the tiny world (rewards/tiny_gold.py): an MLP head on the tiny "
        "judge's mean patch token trained on noisy tiny-aesthetic-gold labels, as the LAION predictor on CLIP; "
        "a training reward, judged by tiny-aesthetic-gold",
        inputs="the tiny judge's CLIPImageProcessor settings, its vision tower's last hidden state averaged over "
        "the patch tokens; prompt ignored",
        score_range="predicted tiny-aesthetic-gold (0..1): base model 0.51 at 1 step, 0.70 at 8; best renders 0.88",
        packages=("transformers", "safetensors"),
        extra=None,
        artifacts=(
            Artifact(
                role=PRIMARY,
                what="the tiny aesthetic head folder (config.json + model.safetensors)",
                files=(("config.json",), ("model.safetensors",)),
                folder=True,
                published="this repository, zoo/tiny/assets/aesthetic (trained by `python -m zoo.tiny.build --only aesthetic`)",
                default_path=Path(__file__).resolve().parent.parent / "zoo" / "tiny" / "assets" / "aesthetic",
            ),
            _tiny_clip_artifact("clip"),
        ),
        build=_build_tiny_aesthetic,
        differentiable=True,
        gold="tiny-aesthetic-gold",
    ),
    "tiny-aesthetic-gold": RewardSpec(
        name="tiny-aesthetic-gold",
        source="this project's pixel rule for the tiny world (zoo/tiny/gold.py): size, centring, saturation and "
        "edge crispness of the segmented shape; EVALUATION ONLY, the gold that tiny-aesthetic approximates",
        inputs="resized to 32x32 if needed; prompt ignored",
        score_range="0..1: base model 0.49 at 1 step, 0.72 at 8; best renders 0.91",
        packages=("torch",),
        extra=None,
        artifacts=(),
        build=_gold_builder("TinyAestheticGold"),
    ),
    "tiny-align": RewardSpec(
        name="tiny-align",
        source="this project's alignment proxy of the tiny world (rewards/tiny_gold.py): the tiny judge's "
        "probability of the prompt among the 48 captions; a training reward, judged by tiny-align-gold",
        inputs="the folder's CLIPImageProcessor settings; prompt: the folder's CLIP tokenizer, 16 tokens",
        score_range="probability 0..1 (chance 1/48): base model 0.29 at 1 step, 0.95 at 8",
        packages=("transformers",),
        extra=None,
        artifacts=(
            _tiny_clip_artifact(PRIMARY),
        ),
        build=_build_tiny_align,
        differentiable=True,
        gold="tiny-align-gold",
    ),
    "tiny-align-gold": RewardSpec(
        name="tiny-align-gold",
        source="this project's pixel rule for the tiny world (zoo/tiny/gold.py): colour, shape and background "
        "measured on the segmented picture against the prompt's; EVALUATION ONLY, the gold that tiny-align approximates",
        inputs="resized to 32x32 if needed; the prompt must name a tiny-world colour, shape or background",
        score_range="fraction of the prompt's attributes shown: 0, 1/3, 2/3 or 1",
        packages=("torch",),
        extra=None,
        artifacts=(),
        build=_gold_builder("TinyAlignGold"),
    ),
}

GOLD_OF: dict[str, str] = {name: spec.gold for name, spec in REWARDS.items() if spec.gold is not None}
"""Proxy -> gold: the declared pairs. The runner evaluates the gold of the training reward
and the report marks a proxy's cell as hacking against its gold (benchmarks.report)."""
