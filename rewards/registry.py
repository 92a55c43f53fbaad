"""Every reward by name, where its weights live, and a cheap preflight check.

`check_reward` only looks at the file system and at `importlib.util.find_spec`: it
imports no torch and loads no model, so the benchmark can call it for every reward
before it builds a pipeline, and fail in a second with one readable paragraph.

Besides the registered names, a `--reward` term may be
- a plugin, `module.path:ClassName`: any importable subclass of `rewards.base.Reward`
  that implements `_score` (and `_modules` if it holds networks). A class that keeps
  `Reward`'s constructor (the smallest plugin: `name` and `_score`) is built as
  `ClassName(device=..., dtype=...)` and its `name` set to the term; one with its own
  constructor is built as `ClassName(name=<the term>, device=..., dtype=...)`, sets
  `self.name = name`, calls `super().__init__(device, dtype)` and finds its own
  weights. The check imports the module (and torch with it) and inspects the class; it
  builds nothing.
- a reward server, `http://HOST:PORT/NAME` (or https), as `python -m rewards.serve NAME`
  prints it: scored by `rewards.http.HttpReward`; the check asks the server's health
  endpoint, so a dead server is reported before training starts.
Registered names come first: `hpsv2:2` is hpsv2 with weight 2, never a plugin.

Weights are looked up, for each file or folder a reward needs, in this order (the
first place that is set is used; a place that is set but incomplete is an error,
never a reason to look further):
1. a path given by the caller (`--reward-path NAME=PATH`; a reward's second artifact
   as `--reward-path NAME:ROLE=PATH`, e.g. `aesthetic:clip=/models/clip-vit-l-14`),
2. the environment variable `STEPZOO_<NAME>_PATH` (`STEPZOO_<NAME>_<ROLE>_PATH`),
   the name upper-cased with `-` and `.` turned into `_`,
3. a default local location where one exists (tiny-clip's folder in the repository),
4. the Hugging Face hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`), where an artifact
   published on the hub is downloaded on first use (only its files, at `hub_revision`;
   `zoo.hub`). Offline (`HF_HUB_OFFLINE=1`) or without network, the check refuses with
   a first line that names the `hf download` command that fetches what is missing.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rewards.errors import (
    DamagedRewardWeights,
    MissingRewardPackages,
    MissingRewardWeights,
    RewardUnavailable,
    UnknownReward,
)
from zoo import hub
from zoo.hub import UNPINNED, HubFiles

if TYPE_CHECKING:
    import torch

    from rewards.base import Reward

PRIMARY = "weights"
"""Role of the artifact a plain `--reward-path NAME=PATH` points at."""

REAL_REWARDS_INSTALL = (
    "pip install -e '.[real-rewards]' && pip install --no-deps image-reward==1.5 hpsv2x==1.2.0 "
    "(or `make venv`)"
)
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
    """A registry entry: what the reward is and what it needs."""

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
    """Builds the reward from the paths `check_reward` found (role -> path)."""
    gold: str | None = None
    """The registry name of this reward's gold, when it is a proxy: the score it
    approximates, evaluated next to it and never trained on (`GOLD_OF`)."""
    differentiable: bool = False
    """Whether the reward it builds is differentiable (`rewards.base.Reward.differentiable`,
    which tests/test_rewards_models.py checks it against), known here before anything
    loads so that a reward back-propagation algorithm (zoo/draft.py) refuses the others."""


def env_var(name: str, role: str = PRIMARY) -> str:
    """STEPZOO_<NAME>_PATH for the primary artifact, STEPZOO_<NAME>_<ROLE>_PATH otherwise."""
    parts = [name] if role == PRIMARY else [name, role]
    stem = "_".join(part.upper().replace("-", "_").replace(".", "_") for part in parts)
    return f"STEPZOO_{stem}_PATH"


def path_key(name: str, role: str = PRIMARY) -> str:
    """The key of `paths` (and of `--reward-path KEY=PATH`) for a reward's artifact."""
    return name if role == PRIMARY else f"{name}:{role}"


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


def non_differentiable_rewards(spec: str) -> list[str]:
    """The rewards of a `--reward` spec (its members, for a weighted sum) that are not
    differentiable, in the spec's order, without loading any: a registered one by its
    `RewardSpec.differentiable`, a plugin by its class's `differentiable` (the module is
    imported), a server never (its images travel as 8-bit, rewards/http.py). Raises
    UnknownReward."""
    blocked = []
    for name, _ in parse_reward_spec(spec):
        if name in REWARDS:
            differentiable = REWARDS[name].differentiable
        elif re.fullmatch(SERVER_NAME, name):
            differentiable = False
        else:
            differentiable = plugin_class(name).differentiable
        if not differentiable:
            blocked.append(name)
    return blocked


def gold_rewards(spec: str) -> list[str]:
    """The golds of the rewards of a `--reward` spec (of each member of a weighted sum), in
    the spec's order, each once; [] when none is a proxy. Raises UnknownReward."""
    golds = (GOLD_OF.get(name) for name, _ in parse_reward_spec(spec))
    return list(dict.fromkeys(gold for gold in golds if gold is not None))


PLUGIN_NAME = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"
"""A plugin reward, `module.path:ClassName`."""
SERVER_NAME = r"https?://[^/\s,]+/[^\s,:]+"
"""A reward server, `http://HOST:PORT/NAME`: the path is required (and has no `:`), so a
`:weight` after it is never mistaken for the port."""
_EXTERNAL_TERM = re.compile(rf"(?P<name>{SERVER_NAME}|{PLUGIN_NAME})(?::(?P<weight>[^:]*))?")

REWARD_FORMS = (
    "a plugin class module.path:ClassName (a rewards.base.Reward subclass on the Python path), "
    "or a reward server http://HOST:PORT/NAME (started with python -m rewards.serve NAME)"
)
"""The non-registered forms of a `--reward` term, for help texts and errors."""


def _name_and_weight(term: str) -> tuple[str, str] | None:
    """A term's reward name and weight text ('' when absent), or None if it is no reward."""
    name, _, weight_text = term.partition(":")
    if name in REWARDS:
        return name, weight_text
    match = _EXTERNAL_TERM.fullmatch(term)
    return (match["name"], match["weight"] or "") if match else None


def parse_reward_spec(spec: str, flag: str = "--reward") -> list[tuple[str, float]]:
    """'aesthetic:1,pickscore:0.5' -> [('aesthetic', 1.0), ('pickscore', 0.5)]; a missing
    weight is 1. A term may also be a plugin or a server (module docstring), weighted the
    same way: 'tiny-align:1,mypkg.rewards:Sharpness:0.5'. A weight must be a finite number
    other than 0 (a negative one minimises its reward). Imports nothing. Raises
    UnknownReward (a ValueError) naming `flag` (the option the spec came from) and the
    choices."""
    choices = ", ".join(REWARDS)
    terms = []
    for term in spec.split(","):
        term = term.strip()
        parsed = _name_and_weight(term)
        if parsed is None:
            unknown = term if "://" in term else term.partition(":")[0]
            raise UnknownReward(
                f"{flag}: unknown reward {unknown!r} in {spec!r}; choose from {choices}, "
                f"{REWARD_FORMS} (a weighted sum is written aesthetic:1,pickscore:0.5)"
            )
        name, weight_text = parsed
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise UnknownReward(f"{flag}: weight {weight_text!r} of {name!r} in {spec!r} is not a number") from None
        # A weight of 0 trains on a constant and NaN or inf scores nothing: refused, not run.
        if weight == 0 or not math.isfinite(weight):
            raise UnknownReward(
                f"{flag}: weight {weight_text} of {name!r} in {spec!r} "
                f"{'leaves it out of every score' if weight == 0 else 'makes every score NaN or inf'}; give a finite "
                f"non-zero weight (negative to minimise {name}), or leave the term out"
            )
        if name in dict(terms):
            raise UnknownReward(f"{flag}: {name!r} appears twice in {spec!r}")
        terms.append((name, weight))
    return terms


def parse_reward_paths(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """--reward-path items ('aesthetic=/a.pth', 'aesthetic:clip=/clip') as {key: path};
    every key must name a reward's weights (`path_key`). Raises UnknownReward."""
    keys = [path_key(name, artifact.role) for name, spec in REWARDS.items() for artifact in spec.artifacts]
    paths = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise UnknownReward(f"--reward-path: expected NAME=PATH or NAME:ROLE=PATH, got {item!r}")
        if key not in keys:
            raise UnknownReward(f"--reward-path: {key!r} names no reward's weights; choose from {', '.join(keys)}")
        paths[key] = path
    return paths


def _complete(path: Path, artifact: Artifact) -> Path | None:
    """The artifact's path at `path` if every needed file is there, else None. A file
    artifact may be named directly or by the folder that holds it."""
    if not artifact.folder:
        filename = artifact.files[0][0]
        if path.is_file():
            return path
        return path / filename if (path / filename).is_file() else None
    return None if _absent_groups(path, artifact) else path


def _from_hub(artifact: Artifact) -> Path | None:
    """The artifact in the hub cache, downloaded first if it is not there; None when the
    pinned revision lacks its files. Raises HubUnreachable or DownloadFailed (zoo.hub)."""
    folder = hub.snapshot(artifact.hub_files(), lambda folder: _complete(folder, artifact) is not None)
    absent = _absent_groups(folder, artifact)
    if absent:
        # The first names are the usual ones; the repo may publish another accepted name.
        folder = hub.download(artifact.hub_files(absent))
    return _complete(folder, artifact)


def _describe_files(artifact: Artifact, groups: tuple[tuple[str, ...], ...] | None = None) -> str:
    return ", ".join(" or ".join(group) for group in (artifact.files if groups is None else groups))


def _missing_files(path: Path, artifact: Artifact) -> str:
    if not path.exists():
        return "which does not exist"
    if not artifact.folder:
        return f"which is neither {artifact.files[0][0]} nor a folder holding it"
    return f"which lacks {_describe_files(artifact, _absent_groups(path, artifact))}"


def _absent_groups(folder: Path, artifact: Artifact) -> tuple[tuple[str, ...], ...]:
    """The groups of `artifact.files` of which `folder` holds no file."""
    return tuple(group for group in artifact.files if not any((folder / name).is_file() for name in group))


def _missing_paragraph(spec: RewardSpec, problems: list[tuple[Artifact, str]], unreachable: str | None) -> str:
    """The refusal: a first line with what is missing and the one command (or flag) that
    fixes it, then one paragraph of details. `unreachable` is why the hub could not be
    asked (offline, no network), when it could have supplied the weights."""
    fetch = [artifact.hub_files().command() for artifact, _ in problems if artifact.hub_repo and unreachable]
    flags = [f"--reward-path {path_key(spec.name, artifact.role)}=PATH" for artifact, _ in problems
             if not (artifact.hub_repo and unreachable)]
    fixes = ([f"`{' && '.join(fetch)}`"] if fetch else []) + flags
    why = f"its weights are not in the Hugging Face cache and {unreachable}" if fetch else problems[0][1]
    first = f"Reward '{spec.name}' cannot be loaded: {why}; fix: {' and '.join(fixes)}"
    parts = []
    for artifact, looked in problems:
        key = path_key(spec.name, artifact.role)
        where = [f"pass --reward-path {key}=PATH", f"set {env_var(spec.name, artifact.role)}"]
        if artifact.default_path is not None:
            where.append(f"put it at {artifact.default_path.expanduser()}")
        if artifact.hub_repo is not None:
            where.append(
                f"let it download into the Hugging Face cache ({hub.cache_dir()}) with network and without "
                f"HF_HUB_OFFLINE, or fetch it there on a machine with access (`{artifact.hub_files().command()}`) "
                "and copy the cache here"
            )
        parts.append(
            f"It needs {artifact.what} ({'a folder with ' if artifact.folder else 'file '}{_describe_files(artifact)}), "
            f"published at {artifact.published}; {looked}. To fix: {', or '.join(where)}."
        )
    return first + "\n" + " ".join(parts)


def _damaged_json(folder: Path) -> str | None:
    """What is wrong with the first JSON file of a weights folder that does not parse (a
    model's config, its processor's or tokenizer's), or None when all of them do."""
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, OSError) as error:
            return f"{file.name} is not valid JSON ({' '.join(str(error).split())})"
    return None


def check_reward(
    name: str, path: str | Path | None = None, paths: dict[str, str | Path] | None = None, flag: str = "--reward"
) -> dict[str, Path]:
    """Preflight for one reward: packages importable and every weight file found, weights
    published on the hub downloaded into its cache first if they are not there, and the
    JSON files of a weights folder readable (a damaged copy fails here, not at loading).

    `path` is the reward's `--reward-path` (primary artifact); `paths` may hold the same
    and the `NAME:ROLE` keys of the other artifacts. Returns role -> local path. Raises
    MissingRewardPackages (one paragraph), MissingRewardWeights (a line naming the fix,
    then details) or DamagedRewardWeights (one line), all RewardUnavailable, or
    zoo.hub.DownloadFailed when a download
    breaks off; imports no torch and loads nothing. A plugin is checked by `plugin_class`
    and a server by its health endpoint (RewardServerError); both return {}. `flag` is
    the option that named the reward, for the messages.
    """
    if name not in REWARDS:
        if re.fullmatch(SERVER_NAME, name):
            from rewards.http import HttpReward

            HttpReward.from_env(name).health()
            return {}
        if re.fullmatch(PLUGIN_NAME, name):
            plugin_class(name, flag)
            return {}
        parse_reward_spec(name, flag)
    spec = REWARDS[name]
    given = dict(paths or {})
    if path is not None:
        given[name] = path

    missing_packages = [module for module in spec.packages if importlib.util.find_spec(module) is None]
    if missing_packages:
        install = REAL_REWARDS_INSTALL if spec.extra else "pip install -e ."
        raise MissingRewardPackages(
            f"Reward '{spec.name}' needs the Python packages {', '.join(missing_packages)}, which are not "
            f"importable here; install them with {install}."
        )

    found: dict[str, Path] = {}
    problems: list[tuple[Artifact, str]] = []
    unreachable = None
    for artifact in spec.artifacts:
        key = path_key(spec.name, artifact.role)
        variable = env_var(spec.name, artifact.role)
        if given.get(key) is not None:
            source, location = f"--reward-path {key}", Path(given[key]).expanduser()
        elif os.environ.get(variable):
            source, location = variable, Path(os.environ[variable]).expanduser()
        else:
            source, location = None, None
        if location is not None:
            hit = _complete(location, artifact)
            if hit is None:
                problems.append((artifact, f"{source} points at {location}, {_missing_files(location, artifact)}"))
            else:
                found[artifact.role] = hit
                damaged = _damaged_json(hit) if artifact.folder else None
                if damaged:
                    raise DamagedRewardWeights(
                        f"{source} points at {location}, whose {damaged}; the folder is damaged: replace it with "
                        f"an intact copy of {artifact.what} ({artifact.published})"
                    )
            continue
        hit = _complete(artifact.default_path.expanduser(), artifact) if artifact.default_path is not None else None
        looked = f"neither --reward-path {key} nor {variable} is set and no default location has it"
        if hit is None and artifact.hub_repo is not None:
            try:
                hit = _from_hub(artifact)
            except hub.HubUnreachable as reason:
                unreachable = str(reason)
            else:
                looked = f"the hub repo {artifact.hub_repo} at revision {artifact.hub_revision} lacks some of them"
        if hit is None:
            problems.append((artifact, looked))
        else:
            found[artifact.role] = hit
            damaged = _damaged_json(hit) if artifact.folder else None
            if damaged:
                raise DamagedRewardWeights(
                    f"Reward '{spec.name}': {hit}, where {artifact.what} was found, is damaged: its {damaged}; "
                    f"delete it to fetch it again, or pass --reward-path {key}=PATH to an intact copy"
                )
    if problems:
        raise MissingRewardWeights(_missing_paragraph(spec, problems, unreachable))
    return found


def plugin_class(name: str, flag: str = "--reward") -> type["Reward"]:
    """The class of a plugin reward `module.path:ClassName`, checked against the contract
    (module docstring) without building it. Raises MissingRewardPackages when the module
    does not import, UnknownReward when the class is missing or breaks the contract; both
    name `flag`, the option that named the plugin."""
    from rewards.base import Reward

    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise MissingRewardPackages(
            f"{flag} {name}: the plugin module {module_name!r} cannot be imported ({type(error).__name__}: "
            f"{error}); install the package that provides it (pip install ...) or add the folder that holds "
            f"it to PYTHONPATH."
        ) from None
    where = f"the module {module_name!r} ({getattr(module, '__file__', None) or 'no file'})"
    found = getattr(module, class_name, None)
    if found is None:
        defined = [
            key for key, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Reward) and not inspect.isabstract(value)
        ]
        raise UnknownReward(
            f"{flag} {name}: {where} has no attribute {class_name!r}; its Reward subclasses are "
            f"{', '.join(defined) or 'none'}."
        )
    if not (isinstance(found, type) and issubclass(found, Reward)):
        raise UnknownReward(
            f"{flag} {name}: {class_name!r} in {where} is {found!r}, not a subclass of rewards.base.Reward; "
            "a plugin reward subclasses it and implements _score."
        )
    if inspect.isabstract(found):
        raise UnknownReward(
            f"{flag} {name}: {class_name} in {where} leaves {', '.join(sorted(found.__abstractmethods__))} "
            "unimplemented."
        )
    if uses_base_constructor(found):
        return found
    try:
        inspect.signature(found).bind(name=name, device="cpu", dtype=None)
    except TypeError as error:
        raise UnknownReward(
            f"{flag} {name}: {class_name} in {where} cannot be built as {class_name}(name=..., device=..., "
            f"dtype=...) ({error}); give its constructor those keyword arguments."
        ) from None
    return found


def uses_base_constructor(reward_class: type["Reward"]) -> bool:
    """Whether a plugin class keeps `Reward.__init__`, as the smallest plugin does (it sets
    `name` and defines `_score`, like the built-in rewards): it is built with that
    constructor and then named by its term (`_build`)."""
    from rewards.base import Reward

    return reward_class.__init__ is Reward.__init__


def check_rewards(
    spec: str, paths: dict[str, str | Path] | None = None, flag: str = "--reward"
) -> dict[str, dict[str, Path]]:
    """Preflight of every reward of a `--reward` spec (given as `flag`): name -> (role -> path)."""
    return {name: check_reward(name, paths=paths, flag=flag) for name, _ in parse_reward_spec(spec, flag)}


def load_reward(
    spec: str,
    device: "torch.device | str" = "cpu",
    dtype: "torch.dtype | None" = None,
    paths: dict[str, str | Path] | None = None,
    flag: str = "--reward",
) -> "Reward":
    """Builds the reward of a `--reward` spec (given as `flag`), after `check_rewards`
    found everything.

    One name with weight 1 gives that reward; otherwise a WeightedSum of the members.
    Raises RewardUnavailable naming `flag` when a reward cannot be built (weights that
    do not load, a plugin's constructor that raises).
    """
    import torch

    from rewards.base import WeightedSum

    dtype = torch.float32 if dtype is None else dtype
    found = check_rewards(spec, paths, flag)
    terms = parse_reward_spec(spec, flag)
    members = [(_build(name, found[name], device, dtype, flag), weight) for name, weight in terms]
    if len(members) == 1 and members[0][1] == 1.0:
        return members[0][0]
    return WeightedSum(members)


def _build(
    name: str, found: dict[str, Path], device: "torch.device | str", dtype: "torch.dtype", flag: str
) -> "Reward":
    """One checked reward: a registered one from its weights, a server's client, or a plugin."""
    if re.fullmatch(SERVER_NAME, name):
        from rewards.http import HttpReward

        return HttpReward.from_env(name, device=device, dtype=dtype)
    # Loading runs third-party code on files the preflight only looked at: its failure is
    # reported as one line naming the reward, not as a traceback from inside a library.
    reward_class = None if name in REWARDS else plugin_class(name, flag)
    try:
        if reward_class is None:
            return REWARDS[name].build(REWARDS[name], found, device, dtype)
        if not uses_base_constructor(reward_class):
            return reward_class(name=name, device=device, dtype=dtype)
        reward = reward_class(device=device, dtype=dtype)
        reward.name = name
        return reward
    except RewardUnavailable:
        raise
    except Exception as error:
        why = f"{type(error).__name__}: {' '.join(str(error).split())}"
        if reward_class is None:
            where = ", ".join(str(path) for path in found.values()) or "no files"
            raise RewardUnavailable(
                f"{flag} {name}: its weights ({where}) do not load ({why}); replace them with an intact copy "
                "(`python -m rewards check NAME` shows where each is looked for)"
            ) from None
        raise RewardUnavailable(f"{flag} {name}: the plugin's constructor raised {why}; fix the plugin") from None
