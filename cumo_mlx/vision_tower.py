"""The vision side of CuMo: CLIP(-MoE) applied to the S2 multi-scale crops of each image."""

import mlx.core as mx
import mlx.nn as nn

from .clip import ClipVisionModel
from .config import ModelArgs
from .moe import Routing
from .s2 import merge_scales, multiscale_crops


class VisionTower(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scales = list(args.scales)
        num_experts = args.num_experts if args.clip_smoe else None
        self.vision_model = ClipVisionModel(args.vision_config, num_experts, args.num_selected)

    def __call__(self, pixels: mx.array) -> tuple[mx.array, list[Routing]]:
        """pixels [B, S, S, 3] (normalised) -> features [B, patches, D * len(scales)] and routings.

        Each routing covers every crop of every scale in one batch (see `s2.scale_slices`).
        """
        hidden, routings = self.vision_model(multiscale_crops(pixels, self.scales))
        return merge_scales(hidden[:, 1:], pixels.shape[0], self.scales), routings
