"""ImageReward v1.0 through the `image-reward` package, made importable under transformers 5."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rewards.base import Reward
from zoo.preprocess import ImageTransform


def _head_pruning_unsupported(*args, **kwargs):
    raise NotImplementedError("attention-head pruning is not available for ImageReward under transformers 5")


def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    # transformers 4's PreTrainedModel helper: 1 = attend -> 0, 0 = masked -> dtype's minimum.
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported for ImageReward under transformers 5")
    return [None] * num_hidden_layers


def _init_weights_via_post_init(self) -> None:
    # transformers 4 models ended __init__ with init_weights(); transformers 5 needs the
    # bookkeeping of post_init() first, and post_init() calls init_weights() back.
    from transformers import PreTrainedModel

    if "all_tied_weights_keys" in self.__dict__:
        PreTrainedModel.init_weights(self)
    else:
        self.post_init()


def import_image_reward() -> type:
    """Imports the `ImageReward` model class after restoring what its BLIP text encoder needs from transformers 4.

    transformers 5 moved `apply_chunking_to_forward` and `prune_linear_layer` to
    `transformers.pytorch_utils` and removed `find_pruneable_heads_and_indices` (used
    only for head pruning, which scoring never does) and the `PreTrainedModel` helpers
    `invert_attention_mask` and `get_head_mask`, and its models must call `post_init`
    where transformers 4 models called `init_weights`. The names are re-exported where
    the package imports them; the methods are attached to its own BERT classes only.
    """
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _head_pruning_unsupported

    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP import med

    if not hasattr(med.BertModel, "invert_attention_mask"):
        med.BertModel.invert_attention_mask = _invert_attention_mask
    if not hasattr(med.BertModel, "get_head_mask"):
        med.BertModel.get_head_mask = _get_head_mask
    med.BertPreTrainedModel.init_weights = _init_weights_via_post_init
    return ImageReward


@contextlib.contextmanager
def _local_bert_tokenizer(tokenizer_dir: str | Path):
    """During construction, BLIP's `init_tokenizer` loads `bert-base-uncased` from the hub
    and reads `additional_special_tokens_ids` (gone in transformers 5); this builds the
    same tokenizer ([DEC] as bos, [ENC] as extra special token) from a local folder."""
    from transformers import BertTokenizer
    from ImageReward.models.BLIP import blip_pretrain

    def init_tokenizer():
        tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    original = blip_pretrain.init_tokenizer
    blip_pretrain.init_tokenizer = init_tokenizer
    try:
        yield
    finally:
        blip_pretrain.init_tokenizer = original


class ImageRewardScore(Reward):
    """ImageReward v1.0 (Xu et al. 2023, https://github.com/THUDM/ImageReward).

    BLIP ViT-L image tower, a BERT text encoder cross-attending to it, and an MLP on the
    [CLS] feature, standardised by the package's mean/std: roughly N(0, 1) over its
    training images (good images > 0, typical range -2..2). Scoring calls the package's
    own batched `ImageReward.score_gard` with prompts tokenised as its `score` does
    (max_length 35). Images: 224 px bicubic, centre crop, OpenAI mean/std (the package's
    `_transform(224)`), on the device.

    Loading: the package's `load` uses `load_state_dict(strict=False)`, which would turn a
    wrong file into a random model silently; here every parameter used for scoring must
    be present in the checkpoint.
    """

    differentiable = True

    def __init__(
        self,
        name: str,
        checkpoint: str | Path,
        med_config: str | Path,
        tokenizer_dir: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        model_class = import_image_reward()
        super().__init__(device, dtype)
        self.name = name
        with _local_bert_tokenizer(tokenizer_dir):
            self.model = model_class(med_config=str(med_config), device="cpu").eval()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        missing, _ = self.model.load_state_dict(state, strict=False)
        needed = [key for key in missing if key.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp."))]
        if needed:
            raise ValueError(f"{name}: {checkpoint} lacks {len(needed)} parameters used for scoring, e.g. {needed[:3]}")
        self.transform = ImageTransform(size=224, crop=224)
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def to(self, device=None, dtype=None) -> "ImageRewardScore":
        super().to(device, dtype)
        # score_gard builds its cross-attention mask on `model.device`.
        self.model.device = self.device
        return self

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images).to(self.dtype)  # (B, 3, 224, 224)
        text = self.model.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        return self.model.score_gard(text.input_ids, text.attention_mask, pixels).squeeze(-1)
