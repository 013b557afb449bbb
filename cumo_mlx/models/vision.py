"""The vision side of CuMo: a CLIP ViT with dense or sparse-MoE MLPs (CuMo's CLIP-MoE), applied to
the S2 multi-scale crops of each image (`VisionTower`).

Pre-LN transformer with `pre_layrnorm` and no post layernorm. The image features are the hidden
state entering the last layer (the original always takes it, whatever `mm_vision_select_layer`
says), so at inference the last layer is not computed; in training its router still runs, because
the original counts the last layer's auxiliary losses.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs, VisionConfig
from .moe import MLP, Routing, SparseMoE, feed_forward
from .s2 import merge_scales, multiscale_crops


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig, num_experts: Optional[int], top_k: int):
        super().__init__()
        dims = config.hidden_size
        self.self_attn = Attention(dims, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        shape = (dims, config.intermediate_size, dims)
        if num_experts:
            self.mlp = SparseMoE(*shape, num_experts, top_k, config.hidden_act)
        else:
            self.mlp = MLP(*shape, config.hidden_act)

    def __call__(self, x: mx.array) -> tuple[mx.array, Optional[Routing]]:
        x = x + self.self_attn(self.layer_norm1(x))
        y, routing = feed_forward(self.mlp, self.layer_norm2(x))
        return x + y, routing

    def route_only(self, x: mx.array) -> Routing:
        """The routing this layer would make, without running its experts."""
        h = self.layer_norm2(x + self.self_attn(self.layer_norm1(x)))
        return Routing(self.mlp.gate(h).astype(mx.float32), None)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dims = config.hidden_size
        self.class_embedding = mx.zeros((dims,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, dims, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, dims)

    def __call__(self, pixels: mx.array) -> mx.array:
        """pixels [B, H, W, C] -> [B, 1 + patches, D]."""
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1]))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig, num_experts: Optional[int], top_k: int):
        super().__init__()
        self.layers = [EncoderLayer(config, num_experts, top_k) for _ in range(config.num_hidden_layers)]


class ClipVisionModel(nn.Module):
    """CLIP ViT; MoE MLPs in every layer when `num_experts` is given."""

    def __init__(self, config: VisionConfig, num_experts: Optional[int] = None, top_k: int = 2):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config, num_experts, top_k)

    def __call__(self, pixels: mx.array) -> tuple[mx.array, list[Routing]]:
        """Hidden state entering the last layer [B, 1 + patches, D], and each MoE layer's routing.

        Routings come back only in training mode (`model.train()`), and then include the last layer.
        """
        x = self.pre_layrnorm(self.embeddings(pixels))
        *feature_layers, last = self.encoder.layers
        routings = []
        for layer in feature_layers:
            x, routing = layer(x)
            routings.append(routing)
        if self.training and isinstance(last.mlp, SparseMoE):
            routings.append(last.route_only(x))
            return x, routings
        return x, []


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
