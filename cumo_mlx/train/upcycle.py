"""Co-upcycling: a dense CuMo becomes the MoE CuMo that stage 3 trains (the original does it when
stage 3 loads the stage-2 weights: `initialize_vision_modules` in SHI-Labs/CuMo's cumo/model/llava_arch.py).

Every expert of each new MoE block is a copy of the trained dense MLP it replaces (CLIP: each
layer's `mlp.fc1/fc2`; connector: the `mlp2x_gelu`), and the routers are freshly initialised
(seeded). Since the experts are equal and the top-k weights sum to one, the upcycled model
computes what the dense one does until training moves the experts apart.
"""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CuMoError
from ..models.model import Model
from ..models.moe import MLP, SparseMoE
from .lora import is_quantized


def _copy_into_experts(dense: MLP, moe: SparseMoE) -> None:
    """Each expert of `moe` = `dense` (fc1, fc2 weights and biases stacked E times)."""
    E = moe.num_experts
    for name in ("fc1", "fc2"):
        source, target = getattr(dense, name), getattr(moe.experts, name)
        target.weight = mx.broadcast_to(source.weight[None], (E, *source.weight.shape))
        if "bias" in source:
            target.bias = mx.broadcast_to(source.bias[None], (E, *source.bias.shape))


def upcycle(model: Model, num_experts: int = 4, top_k: int = 2, vision: bool = True, connector: bool = True, seed: int = 0) -> Model:
    """A new Model whose dense CLIP MLPs and/or `mlp2x_gelu` connector are MoE blocks of copies."""
    args = model.args
    if not 1 <= top_k <= num_experts:
        raise CuMoError(f"--top-k {top_k} must be between 1 and --num-experts {num_experts}", "choose a smaller --top-k")
    vision = vision and not args.clip_smoe
    connector = connector and not args.connector_is_moe
    if not (vision or connector):
        raise CuMoError(
            "nothing to upcycle: the vision tower and the connector are already MoE (or were left out)",
            "give a dense model (clip_smoe false, mlp2x_gelu connector)",
        )
    if (vision and is_quantized(model.vision_tower)) or (connector and is_quantized(model.mm_projector)):
        raise CuMoError("cannot upcycle quantized MLPs", "upcycle the float model, then quantize the result")
    if (args.clip_smoe or args.connector_is_moe) and (num_experts, top_k) != (args.num_experts, args.num_selected):
        raise CuMoError(
            f"the model already has MoE blocks of {args.num_experts} experts (top-{args.num_selected})",
            f"use --num-experts {args.num_experts} --top-k {args.num_selected}",
        )
    new_args = dataclasses.replace(
        args,
        clip_smoe=args.clip_smoe or vision,
        mm_projector_type="smoe_mlp" if (connector or args.connector_is_moe) else args.mm_projector_type,
        num_experts=num_experts,
        num_selected=top_k,
    )
    mx.random.seed(seed)
    new = Model(new_args)  # fresh routers come from here; every other weight is replaced below
    weights = [(k, v) for k, v in tree_flatten(model.parameters()) if not _replaced(k, vision, connector)]
    if args.quantization:  # a quantized LLM stays quantized, layer for layer
        names = {k for k, _ in weights}
        nn.quantize(
            new,
            group_size=args.quantization["group_size"],
            bits=args.quantization["bits"],
            mode=args.quantization.get("mode", "affine"),
            class_predicate=lambda path, module: hasattr(module, "to_quantized") and f"{path}.scales" in names,
        )
    new.load_weights(weights, strict=False)
    if vision:
        for old, layer in zip(model.vision_tower.vision_model.encoder.layers, new.vision_tower.vision_model.encoder.layers):
            _copy_into_experts(old.mlp, layer.mlp)
            layer.mlp.gate.weight = layer.mlp.gate.weight.astype(old.mlp.fc1.weight.dtype)
    if connector:
        _copy_into_experts(model.mm_projector, new.mm_projector)
        new.mm_projector.gate.weight = new.mm_projector.gate.weight.astype(model.mm_projector.fc1.weight.dtype)
    mx.eval(new.parameters())
    return new


def _replaced(name: str, vision: bool, connector: bool) -> bool:
    """Dense weights that the upcycled model holds as experts instead."""
    return (vision and name.startswith("vision_tower.") and ".mlp." in name) or (connector and name.startswith("mm_projector."))
