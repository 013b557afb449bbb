"""The vision-language connector: `mlp2x_gelu` (dense) or `smoe_mlp` (MoE of the same MLPs).

Both are Linear(D * len(scales) -> h) -> GELU (exact erf) -> Linear(h -> h).
"""

import mlx.nn as nn

from .config import ModelArgs
from .moe import MLP, SparseMoE


def build_connector(args: ModelArgs) -> nn.Module:
    shape = (args.mm_hidden_size * len(args.scales), args.text_config.hidden_size, args.text_config.hidden_size)
    if args.connector_is_moe:
        return SparseMoE(*shape, args.num_experts, args.num_selected, "gelu")
    return MLP(*shape, "gelu")
