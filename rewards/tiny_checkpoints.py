"""Tiny random-weight checkpoints of every real reward, written in the published formats.

No reward weights can be downloaded here, so tests and `rewards.throughput` build these:
a transformers CLIPModel folder with its processor (pickscore, tiny-clip, the aesthetic
predictor's CLIP), the aesthetic head as a `.pth` state dict with the published key
names, an HPS `{"state_dict": ...}` checkpoint of an open_clip model, and an ImageReward
folder (`ImageReward.pt` + `med_config.json`) with a BERT tokenizer folder. They load
through the same registry and code as the real files.

Two architectures are fixed by name in the real code, so `tiny_architectures()` shrinks
them while it is active: open_clip's `ViT-H-14` config (a 1-layer, 32-wide CLIP with the
real 224 px input and 49,408-token BPE) and ImageReward's BLIP `vit='large'` tower (the
same VisionTransformer class, 1 block of width 64). Everything else (factories,
tokenizers, preprocessing, state-dict loading, scoring) is the real code path.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
from pathlib import Path

import torch

from zoo import strict_json

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
BLIP_TINY_VISION_WIDTH = 64
BERT_WORDS = ["a", "an", "the", "photo", "of", "red", "blue", "green", "circle", "square", "cat", "dog", "on", "in"]


@contextlib.contextmanager
def tiny_architectures():
    """While active, open_clip's ViT-H-14 and ImageReward's BLIP ViT-L are tiny."""
    import open_clip.factory

    from rewards.imagereward import import_image_reward

    import_image_reward()
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    def create_tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        tower = VisionTransformer(img_size=image_size, patch_size=16, embed_dim=BLIP_TINY_VISION_WIDTH, depth=1, num_heads=2)
        return tower, BLIP_TINY_VISION_WIDTH

    # open_clip reads its config table by module global on every create_model call.
    original_config = open_clip.factory._MODEL_CONFIGS["ViT-H-14"]
    original_create_vit = blip_pretrain.create_vit
    open_clip.factory._MODEL_CONFIGS["ViT-H-14"] = TINY_OPEN_CLIP
    blip_pretrain.create_vit = create_tiny_vit
    try:
        yield
    finally:
        open_clip.factory._MODEL_CONFIGS["ViT-H-14"] = original_config
        blip_pretrain.create_vit = original_create_vit


def _write_clip_tokenizer(folder: Path, model_max_length: int, source: Path | None = None) -> None:
    """A transformers CLIPTokenizer folder with ids equal to open_clip's BPE tokenizer:
    256 byte symbols, the same with `</w>`, the merges, then the two special tokens; built
    from open_clip's BPE file, or copied from the `vocab.json` and `merges.txt` of the
    tokenizer folder `source` (for machines without open_clip)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(source / name, folder / name)
    else:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe

        merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge.split()) for merge in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        (folder / "vocab.json").write_text(strict_json.dumps({token: index for index, token in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5 ignores vocab/merges passed to the constructor; load from the folder.
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))


def build_clip_folder(
    folder: Path, *, projection_dim: int = 32, seed: int = 0, config: dict | None = None,
    device: torch.device | str = "cpu", tokenizer_source: Path | None = None,
) -> Path:
    """A random CLIPModel (224 px, patch 32, 1 layer per tower; or the architecture of
    `config`, CLIPConfig's arguments, initialised on `device`) with its CLIPProcessor
    (its tokenizer files from `tokenizer_source` when given: `_write_clip_tokenizer`)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(**config) if config is not None else CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection_dim,
    )
    with torch.device(device):
        model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    _write_clip_tokenizer(folder, model_max_length=77, source=tokenizer_source)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(folder))).save_pretrained(
        str(folder)
    )
    return folder


def build_aesthetic_head(path: Path, *, embed_dim: int = 32, seed: int = 0) -> Path:
    """The head as the published file stores it: a state dict with `layers.N.*` keys."""
    from rewards.aesthetic import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{key}": value for key, value in head.state_dict().items()}, path)
    return path


def build_hps_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """`{"state_dict": ...}` of open_clip's ViT-H-14, as HPS v2 publishes it; call inside
    `tiny_architectures()` for the tiny one."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def build_bert_tokenizer_folder(folder: Path) -> Path:
    """A BertTokenizer folder (uncased WordPiece) with a few dozen words."""
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + BERT_WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(strict_json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return folder


def build_imagereward_folder(folder: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """`ImageReward.pt` (the whole model's state dict) and `med_config.json`, as THUDM
    publishes them; call inside `tiny_architectures()` for the tiny image tower.

    The text encoder keeps hidden size 768 because ImageReward's MLP takes 768 inputs;
    it has one layer and a vocabulary the size of the tiny tokenizer (+[DEC], [ENC])."""
    from rewards.imagereward import _local_bert_tokenizer, import_image_reward

    model_class = import_image_reward()
    folder.mkdir(parents=True, exist_ok=True)
    med_config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "hidden_size": 768,
        "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 64,
        "vocab_size": 5 + len(BERT_WORDS) + 2, "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "encoder_width": BLIP_TINY_VISION_WIDTH, "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(strict_json.dumps(med_config, indent=2))
    torch.manual_seed(seed)
    with _local_bert_tokenizer(tokenizer_dir):
        model = model_class(med_config=str(folder / "med_config.json"), device="cpu")
    # The package initialises its MLP with std 1/769, which makes every score nearly the
    # same; spread the weights so that tests can tell images apart.
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    return folder


def build_all(root: Path) -> dict[str, str]:
    """Every tiny checkpoint under `root`; returns the `paths` for `load_reward`.

    Call inside `tiny_architectures()`, and load inside it too."""
    root = Path(root)
    clip = build_clip_folder(root / "clip")
    tokenizer = build_bert_tokenizer_folder(root / "bert-base-uncased")
    return {
        "aesthetic": str(build_aesthetic_head(root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")),
        "aesthetic:clip": str(clip),
        "imagereward": str(build_imagereward_folder(root / "imagereward", tokenizer)),
        "imagereward:tokenizer": str(tokenizer),
        "hpsv2": str(build_hps_checkpoint(root / "hps" / "HPS_v2_compressed.pt", seed=1)),
        "hpsv2.1": str(build_hps_checkpoint(root / "hps" / "HPS_v2.1_compressed.pt", seed=2)),
        "pickscore": str(clip),
        "pickscore:processor": str(clip),
        "tiny-clip": str(build_clip_folder(root / "tiny-clip", projection_dim=16, seed=3)),
    }
