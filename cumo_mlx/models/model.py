"""The CuMo model: images -> vision tower -> connector -> spliced into the prompt -> LLM logits."""

import re
from collections import defaultdict
from typing import NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import CheckpointError
from ..prompt import IMAGE_TOKEN_INDEX, image_layout
from .config import ModelArgs
from .connector import build_connector
from .language import LanguageModel
from .moe import Routing, feed_forward
from .vision import VisionTower


class ImageEncoding(NamedTuple):
    features: mx.array  # [images, patches, LLM hidden]: what replaces each <image> placeholder
    vision_routings: list[Routing]  # per CLIP MoE layer, over all S2 crops (training mode only)
    connector_routing: Optional[Routing]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionTower(args)
        self.mm_projector = build_connector(args)
        self.language_model = LanguageModel(args.text_config)

    def encode_images(self, pixels: mx.array) -> ImageEncoding:
        """pixels [n, S, S, 3] -> per-image LLM embeddings [n, patches, hidden] and routings."""
        features, vision_routings = self.vision_tower(pixels)
        features, connector_routing = feed_forward(self.mm_projector, features)
        return ImageEncoding(features, vision_routings, connector_routing)

    def embed_inputs(self, input_ids: Sequence[int], image_features: Optional[mx.array] = None) -> mx.array:
        """Token embeddings [L', hidden] with each IMAGE_TOKEN_INDEX replaced by its image's rows."""
        count = 0 if image_features is None else image_features.shape[0]
        placeholders = int(np.sum(np.asarray(input_ids) == IMAGE_TOKEN_INDEX))
        if placeholders != count:
            raise ValueError(f"{placeholders} image placeholders but {count} images")
        tokens, rows = image_layout(input_ids, image_features.shape[1] if count else 0)
        return self.embed_batch(mx.array(tokens)[None], mx.array(rows)[None], image_features if count else None)[0]

    def embed_batch(self, tokens: mx.array, image_rows: mx.array, image_features: Optional[mx.array]) -> mx.array:
        """Embeddings [B, L, hidden] of a padded batch with the images already laid out.

        tokens [B, L]: token ids (any valid id where an image row goes); image_rows [B, L]: the row of
        `image_features` flattened to [images * patches, hidden] that goes at each position, -1 for
        a token. The layout (splice, truncation, padding) is computed on the host by the data code.
        """
        embeddings = self.language_model.model.embed_tokens(tokens)
        if image_features is None:
            return embeddings
        rows = image_features.reshape(-1, image_features.shape[-1]).astype(embeddings.dtype)
        return mx.where((image_rows >= 0)[..., None], rows[mx.maximum(image_rows, 0)], embeddings)

    def __call__(self, input_ids: Sequence[int], pixels: Optional[mx.array] = None, cache=None) -> mx.array:
        """Logits [1, L', vocab] for one prompt (ids with image placeholders) and its images."""
        image_features = None if pixels is None else self.encode_images(pixels).features
        embeddings = self.embed_inputs(input_ids, image_features)
        return self.language_model(None, cache=cache, input_embeddings=embeddings[None])

    @property
    def layers(self):
        return self.language_model.layers

    def sanitize(self, weights: dict) -> dict:
        """Map an original PyTorch CuMo checkpoint's names and layouts to this model's.

        Experts stored one module each are stacked into [E, out, in]; the patch convolution goes
        channels-last; unused buffers are dropped. Weights already in MLX layout pass unchanged.
        """
        renamed = {}
        for name, value in weights.items():
            new = _rename(name)
            if new is None:
                continue
            if new.endswith("patch_embedding.weight") and name.startswith("model.") and value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            renamed[new] = value
        return _stack_experts(renamed)


# The original checkpoint's name prefix <-> ours, used both ways (`_rename`, `original_name`): the
# original's LlavaMetaModel keeps vision_tower and mm_projector inside the LLM's `model`
# (cumo/model/llava_arch.py).
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.mm_projector.", "mm_projector."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_DROPPED = re.compile(r"(rotary_emb\.inv_freq|position_ids|post_layernorm\.)")
# Layer names, original -> ours: the connector's nn.Sequential indices
# (cumo/model/multimodal_projector/builder.py), and transformers Mixtral's expert w1/w3/w2.
_CONNECTOR_LAYERS = {"0": "fc1", "2": "fc2"}
_MIXTRAL_EXPERT_LAYERS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_LAYERS = {**_CONNECTOR_LAYERS, **_MIXTRAL_EXPERT_LAYERS}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")  # one expert's tensor: prefix, index, rest


def _swap_prefix(name: str, pairs) -> Optional[str]:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _rename(name: str) -> Optional[str]:
    """Our name for the original checkpoint's tensor `name`; None drops it."""
    if _DROPPED.search(name):
        return None
    ours = _swap_prefix(name, _PREFIXES)
    if ours is None:
        return name  # already ours
    if ours.startswith("vision_tower."):
        # CLIP-MoE keeps `gate` and `experts` on the encoder layer (cumo/model/multimodal_encoder/
        # clip_smoe.py); ours live under the layer's `mlp`.
        ours = re.sub(r"(encoder\.layers\.\d+)\.(gate|experts)\.", r"\1.mlp.\2.", ours)
    if ours.startswith("mm_projector."):
        ours = re.sub(r"^mm_projector\.(0|2)\.", lambda m: f"mm_projector.{_CONNECTOR_LAYERS[m.group(1)]}.", ours)
    return re.sub(
        r"\.experts\.(\d+)\.(0|2|w1|w2|w3)\.", lambda m: f".experts.{m.group(1)}.{_EXPERT_LAYERS[m.group(2)]}.", ours
    )


def original_name(ours: str) -> str:
    """The original checkpoint's name for our parameter `ours` (`*` for the expert index of stacked
    experts): the inverse of `Model.sanitize`'s renaming; `ours` itself where none maps back to it."""
    name = _swap_prefix(ours, [(new, old) for old, new in _PREFIXES])
    if name is None:
        return ours
    name = re.sub(r"(encoder\.layers\.\d+)\.mlp\.(gate|experts)\.", r"\1.\2.", name)
    connector = {new: old for old, new in _CONNECTOR_LAYERS.items()}
    name = re.sub(r"^(model\.mm_projector\.(?:experts\.)?)(fc[12])\.", lambda m: f"{m[1]}{connector[m[2]]}.", name)
    mixtral = {new: old for old, new in _MIXTRAL_EXPERT_LAYERS.items()}
    name = re.sub(r"\.experts\.(\w+)\.", lambda m: f".experts.*.{mixtral.get(m[1], m[1])}.", name)
    back = _rename(name.replace("*", "0"))  # the guess must map back to `ours`, expert 0 standing for all
    if back is not None and (match := _EXPERT.match(back)):
        back = f"{match[1]}.{match[3]}"
    return name if back == ours else ours


def _stack_experts(weights: dict) -> dict:
    """`...experts.{e}.{rest}` tensors -> one `...experts.{rest}` tensor stacked over e."""
    groups = defaultdict(dict)
    out = {}
    for name, value in weights.items():
        match = _EXPERT.match(name)
        if match:
            groups[(match.group(1), match.group(3))][int(match.group(2))] = value
        else:
            out[name] = value
    for (prefix, rest), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            raise CheckpointError(
                f"{prefix}.*.{rest}: experts {missing} are missing from the checkpoint",
                "check that the checkpoint is complete",
            )
        out[f"{prefix}.{rest}"] = mx.stack([experts[e] for e in range(len(experts))])
    return out
