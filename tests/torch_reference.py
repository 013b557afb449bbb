"""An independent PyTorch implementation of CuMo, the yardstick for the MLX port's parity tests.

Written from ../shared/reference/cumo.md (sections 3-5); it never imports `cumo_mlx`. Float32,
CPU, tiny configs. The computations follow the original's own order (per-expert loops, per-batch-
element balance losses, one vision-tower call per S2 scale), so the numbers are the original's.

Stable API (other tests and tools reuse it; extend, do not change):

    build_reference(config_dict, seed=0) -> CuMoReference
        A whole CuMo (vision tower, connector, transformers Mistral/Mixtral LLM) from a CuMo
        config.json dict (e.g. tests/tiny_models.tiny_config()), every weight drawn from a seeded
        torch.Generator at scales that give non-trivial routing; float32, eval mode.
        The vision tower config is `config_dict["vision_config"]` (CLIP-L/14-336 defaults for
        missing fields, and when absent).

    original_state_dict(model) -> {name: torch.Tensor}
        The weights under the ORIGINAL checkpoint names (reference §3): model.vision_tower.
        vision_model.*, model.mm_projector.*, model.embed_tokens.weight, model.layers.*, model.norm.
        weight, lm_head.weight; Mixtral experts as block_sparse_moe.experts.{e}.{w1,w2,w3}.weight.
    load_original_state_dict(model, state_dict)
        The inverse: put original-layout weights into a CuMoReference (strict).

    CuMoReference.forward(input_ids, images=None, labels=None) -> ReferenceOutput
        input_ids: 1-D ints with IMAGE_TOKEN_INDEX (-200) placeholders (list, array or tensor);
        images: [n_images, 3, S, S] normalised pixels (NCHW), one per placeholder, in order;
        labels: 1-D ints like input_ids (IGNORE_INDEX -100 where unsupervised), optional.
        ReferenceOutput fields:
          logits [1, L', vocab]; labels [L'] (image rows -100) or None; inputs_embeds [L', hidden];
          image_features [n, patches, hidden] (connector output) or None;
          vision (VisionOutput or None); connector (MoEOutput or None);
          llm_router_logits (tuple of [L', E] per Mixtral layer) or None;
          lm_loss, loss (None without labels); aux: {"clip_balance", "clip_z", "mlp_balance",
          "mlp_z", "llm_balance", "llm_z"} -> scalar tensor or None (absent site).
        loss = lm_loss + balance_loss_coef * (sum of balance terms) + router_z_loss_coef * (sum of
        z terms). As in the original, the aux terms (the Mixtral LLM's too) enter the loss only
        when the CLIP or the connector is a MoE; `aux` holds them regardless.

    Pieces (usable alone):
      TopKMoE(gate, experts, top_k, per_sequence) / TopKMoE.build(kind, in, hidden, out, E, k,
          per_sequence): forward(x) -> MoEOutput(output, indices, weights, logits, probs,
          balance_loss, router_z_loss). kind "quick_gelu" (CLIP: experts.{e}.fc1/fc2), "gelu"
          (connector: experts.{e}.0/2), "swiglu" (Mixtral: experts.{e}.w1/w2/w3, no bias).
          per_sequence=True: x [B, N, D], balance per batch element then averaged (CLIP,
          connector); False: all tokens flattened (Mixtral LLM). indices/weights are top-k
          sorted by probability (indices[..., 0] is the top-1 expert).
      ClipVisionReference(vision_cfg, num_experts=None, top_k=2): forward(pixels NCHW) ->
          ClipOutput(features = hidden state entering the last layer (CLS included),
          hidden_states (states entering each layer, then the final one), moe (per-layer
          MoEOutput, the last layer included; [] when dense), balance_loss, router_z_loss (mean
          over layers; None when dense)).
      VisionTowerReference(vision_cfg, scales, num_experts=None, top_k=2): forward(images NCHW)
          -> VisionOutput(features [B, patches, D * len(scales)], balance_loss, router_z_loss
          (mean over scales of the per-scale layer means; None when dense), per_scale
          (ClipOutput per scale), pyramid (the pixel batch fed at each scale)).
      bicubic_resize, split_chessboard, merge_chessboard, area_resize: the S2 steps.
      build_connector(kind, in_dims, hidden, num_experts, top_k), apply_connector(module, x) ->
          (y, MoEOutput or None).
      splice(input_ids, image_features, embed, labels=None) -> (inputs_embeds, labels).
      balance_loss(logits, top1, per_sequence), router_z_loss(logits): the §5 formulas.
      quick_gelu(x).

Importing this module sets torch.set_num_threads(1) (see below).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Tiny tensors: torch's thread pool only contends with MLX's and OpenBLAS's (index_add alone went
# from ~0.1 ms to ~15 ms a call with several threads on a 2-core machine).
torch.set_num_threads(1)

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return quick_gelu(x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # exact erf
    raise ValueError(f"unknown activation {name!r}")


# ---------------------------------------------------------------------------------------------
# §5: the Top-K sparse MoE
# ---------------------------------------------------------------------------------------------


class MoEOutput(NamedTuple):
    output: torch.Tensor  # same leading shape as the input, last dim = expert output dim
    indices: torch.Tensor  # [..., k] top-k experts, by decreasing probability
    weights: torch.Tensor  # [..., k] renormalised top-k probabilities
    logits: torch.Tensor  # [..., E] router logits
    probs: torch.Tensor  # [..., E] softmax of the logits (float32)
    balance_loss: torch.Tensor  # scalar
    router_z_loss: torch.Tensor  # scalar


def balance_loss(logits: torch.Tensor, top1: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """E^2 * mean_e(P_e * f_e); per batch element (logits [B, N, E]) then averaged, or flattened."""
    num_experts = logits.shape[-1]
    if not per_sequence:
        logits, top1 = logits.reshape(-1, num_experts), top1.reshape(-1)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    density_proxy = probs.mean(dim=-2)  # P_e
    density = F.one_hot(top1, num_experts).float().mean(dim=-2)  # f_e (top-1 share)
    return (density_proxy * density).mean() * float(num_experts**2)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class ClipMLP(nn.Module):
    """fc1 -> activation -> fc2 (a CLIP MLP / CLIP-MoE expert)."""

    def __init__(self, in_dims, hidden_dims, out_dims, activation="quick_gelu", bias=True):
        super().__init__()
        self.fc1 = nn.Linear(in_dims, hidden_dims, bias=bias)
        self.fc2 = nn.Linear(hidden_dims, out_dims, bias=bias)
        self.act = _activation(activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUExpert(nn.Module):
    """Mixtral expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, in_dims, hidden_dims, out_dims, bias=False):
        super().__init__()
        self.w1 = nn.Linear(in_dims, hidden_dims, bias=bias)
        self.w2 = nn.Linear(hidden_dims, out_dims, bias=bias)
        self.w3 = nn.Linear(in_dims, hidden_dims, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_expert(kind: str, in_dims: int, hidden_dims: int, out_dims: int, bias: bool = True) -> nn.Module:
    if kind == "swiglu":
        return SwiGLUExpert(in_dims, hidden_dims, out_dims, bias=bias)
    if kind == "gelu":  # the connector's nn.Sequential: indices 0 and 2
        return nn.Sequential(nn.Linear(in_dims, hidden_dims, bias=bias), nn.GELU(), nn.Linear(hidden_dims, out_dims, bias=bias))
    return ClipMLP(in_dims, hidden_dims, out_dims, kind, bias=bias)


def top_k_moe(gate: nn.Module, experts: Sequence[nn.Module], x: torch.Tensor, top_k: int, per_sequence: bool) -> MoEOutput:
    """The original's MoE call: route, aux losses, then a loop over (batch element,) expert."""
    num_experts = len(experts)
    shape = x.shape
    if per_sequence:
        if x.ndim != 3:
            raise ValueError("per_sequence MoE expects x [B, N, D]")
    else:
        x = x.reshape(-1, shape[-1])
    logits = gate(x)
    z_loss = router_z_loss(logits)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(x.dtype)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    b_loss = balance_loss(logits, indices[..., 0], per_sequence)
    weights = weights / weights.sum(dim=-1, keepdim=True)

    def mix(tokens: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = None
        for e, expert in enumerate(experts):
            token_idx, nth = torch.where(idx == e)
            y = w[token_idx, nth, None] * expert(tokens[token_idx])
            if out is None:
                out = tokens.new_zeros(tokens.shape[0], y.shape[-1])
            out = out.index_add(0, token_idx, y)
        return out

    if per_sequence:
        output = torch.stack([mix(x[b], indices[b], weights[b]) for b in range(x.shape[0])])
    else:
        output = mix(x, indices, weights).reshape(*shape[:-1], -1)
        indices = indices.reshape(*shape[:-1], top_k)
        weights = weights.reshape(*shape[:-1], top_k)
        logits = logits.reshape(*shape[:-1], num_experts)
        probs = probs.reshape(*shape[:-1], num_experts)
    return MoEOutput(output, indices, weights, logits, probs, b_loss, z_loss)


class TopKMoE(nn.Module):
    """Router `gate` (Linear, no bias) + `experts` (ModuleList); names as in the original."""

    def __init__(self, gate: nn.Linear, experts: Sequence[nn.Module], top_k: int, per_sequence: bool = True):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.per_sequence = per_sequence

    @classmethod
    def build(cls, kind, in_dims, hidden_dims, out_dims, num_experts, top_k, per_sequence=None, bias=None):
        bias = kind != "swiglu" if bias is None else bias
        per_sequence = kind != "swiglu" if per_sequence is None else per_sequence
        experts = [make_expert(kind, in_dims, hidden_dims, out_dims, bias) for _ in range(num_experts)]
        return cls(nn.Linear(in_dims, num_experts, bias=False), experts, top_k, per_sequence)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        return top_k_moe(self.gate, self.experts, x, self.top_k, self.per_sequence)


# ---------------------------------------------------------------------------------------------
# CLIP ViT (dense or MoE), original parameter names
# ---------------------------------------------------------------------------------------------


def vision_settings(config: Optional[dict]) -> dict:
    out = dict(CLIP_L_336)
    out.update({k: v for k, v in (config or {}).items() if k in CLIP_L_336})
    return out


class ClipAttention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dims // num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.q_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def forward(self, x):
        B, L, D = x.shape

        def heads(t):
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * self.scale)
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(B, L, D))


class ClipEncoderLayer(nn.Module):
    """Dense: `mlp.fc1/fc2`; MoE: `gate` + `experts.{e}.fc1/fc2` directly on the layer."""

    def __init__(self, cfg: dict, num_experts: Optional[int], top_k: int):
        super().__init__()
        d = cfg["hidden_size"]
        self.self_attn = ClipAttention(d, cfg["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])
        self.top_k = top_k
        if num_experts:
            self.gate = nn.Linear(d, num_experts, bias=False)
            self.experts = nn.ModuleList(
                [ClipMLP(d, cfg["intermediate_size"], d, cfg["hidden_act"]) for _ in range(num_experts)]
            )
        else:
            self.mlp = ClipMLP(d, cfg["intermediate_size"], d, cfg["hidden_act"])
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "experts")

    def forward(self, x) -> tuple[torch.Tensor, Optional[MoEOutput]]:
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.layer_norm2(x)
        if self.is_moe:
            moe = top_k_moe(self.gate, self.experts, h, self.top_k, per_sequence=True)
            return x + moe.output, moe
        return x + self.mlp(h), None


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, p = cfg["hidden_size"], cfg["patch_size"]
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], d, kernel_size=p, stride=p, bias=False)
        self.num_positions = (cfg["image_size"] // p) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, d)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipEncoder(nn.Module):
    def __init__(self, cfg: dict, num_experts: Optional[int], top_k: int):
        super().__init__()
        self.layers = nn.ModuleList([ClipEncoderLayer(cfg, num_experts, top_k) for _ in range(cfg["num_hidden_layers"])])


class ClipOutput(NamedTuple):
    features: torch.Tensor  # [B, 1 + patches, D]: the state entering the last layer
    hidden_states: tuple  # states entering each layer, then the last layer's output
    moe: list  # MoEOutput per layer (all layers, the last one included); [] when dense
    balance_loss: Optional[torch.Tensor]  # mean over layers
    router_z_loss: Optional[torch.Tensor]


class ClipVisionReference(nn.Module):
    """CLIP ViT with `pre_layrnorm`, no post layernorm; MoE MLPs in every layer if num_experts."""

    def __init__(self, config: Optional[dict] = None, num_experts: Optional[int] = None, top_k: int = 2):
        super().__init__()
        self.cfg = vision_settings(config)
        self.embeddings = ClipEmbeddings(self.cfg)
        self.pre_layrnorm = nn.LayerNorm(self.cfg["hidden_size"], eps=self.cfg["layer_norm_eps"])
        self.encoder = ClipEncoder(self.cfg, num_experts, top_k)

    def forward(self, pixels: torch.Tensor) -> ClipOutput:
        x = self.pre_layrnorm(self.embeddings(pixels))
        states, moes = [], []
        for layer in self.encoder.layers:  # the last layer runs too, as in the original
            states.append(x)
            x, moe = layer(x)
            if moe is not None:
                moes.append(moe)
        states.append(x)
        if moes:
            b = torch.stack([m.balance_loss for m in moes]).mean()
            z = torch.stack([m.router_z_loss for m in moes]).mean()
        else:
            b = z = None
        return ClipOutput(states[-2], tuple(states), moes, b, z)


# ---------------------------------------------------------------------------------------------
# S2 multi-scale
# ---------------------------------------------------------------------------------------------


def bicubic_resize(images: torch.Tensor, size) -> torch.Tensor:
    """NCHW float32 bicubic, align_corners=False, no antialias (PyTorch's own)."""
    return F.interpolate(images.to(torch.float32), size=size, mode="bicubic", align_corners=False)


def area_resize(images: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(images.to(torch.float32), size=size, mode="area")


def split_chessboard(x: torch.Tensor, num_split: int) -> torch.Tensor:
    """[B, C, H, W] -> [num_split^2 * B, C, H/n, W/n]: crop (i, j) of every image, crops row-major."""
    B, C, H, W = x.shape
    h, w = H // num_split, W // num_split
    return torch.cat([x[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(num_split) for j in range(num_split)])


def merge_chessboard(x: torch.Tensor, num_split: int) -> torch.Tensor:
    """Inverse of split_chessboard."""
    b = x.shape[0] // num_split**2
    rows = [torch.cat([x[(i * num_split + j) * b : (i * num_split + j + 1) * b] for j in range(num_split)], dim=-1) for i in range(num_split)]
    return torch.cat(rows, dim=-2)


class VisionOutput(NamedTuple):
    features: torch.Tensor  # [B, patches, D * len(scales)] (CLS dropped)
    balance_loss: Optional[torch.Tensor]  # mean over scales of per-scale (mean over layers)
    router_z_loss: Optional[torch.Tensor]
    per_scale: list  # ClipOutput per scale
    pyramid: list  # pixel batch per scale ([s*s*B, 3, S, S], crops row-major, crop-major batch)


class VisionTowerReference(nn.Module):
    """S2 wrapper around one CLIP: one tower call per scale, as the original."""

    def __init__(self, config: Optional[dict] = None, scales=(1, 3), num_experts: Optional[int] = None, top_k: int = 2):
        super().__init__()
        self.scales = list(scales)
        self.vision_model = ClipVisionReference(config, num_experts, top_k)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        input_size = images.shape[3]
        sizes = [int(input_size * s) for s in self.scales]
        splits = [math.ceil(size / input_size) for size in sizes]
        pyramid = [images]
        for i, (size, n) in enumerate(zip(sizes, splits)):
            if i > 0:
                pyramid.append(split_chessboard(bicubic_resize(images, size).to(images.dtype), n))
        features, outs = [], []
        for i, (x, n) in enumerate(zip(pyramid, splits)):
            out = self.vision_model(x)
            outs.append(out)
            f = out.features[:, 1:]
            if i > 0:
                g = int(f.shape[1] ** 0.5)
                f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)  # b (h w) c -> b c h w
                f = merge_chessboard(f, n)
                base = int(features[0].shape[1] ** 0.5)
                f = area_resize(f, base).to(x.dtype)
                f = f.flatten(2).transpose(1, 2)
            features.append(f)
        if outs[0].balance_loss is not None:
            b = torch.stack([o.balance_loss for o in outs]).mean()
            z = torch.stack([o.router_z_loss for o in outs]).mean()
        else:
            b = z = None
        return VisionOutput(torch.cat(features, dim=-1), b, z, outs, pyramid)


# ---------------------------------------------------------------------------------------------
# Connector
# ---------------------------------------------------------------------------------------------


def build_connector(kind: str, in_dims: int, hidden: int, num_experts: int = 4, top_k: int = 2) -> nn.Module:
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dims, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    if kind == "smoe_mlp":
        return TopKMoE.build("gelu", in_dims, hidden, hidden, num_experts, top_k, per_sequence=True)
    raise ValueError(f"unknown connector {kind!r}")


def apply_connector(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[MoEOutput]]:
    if isinstance(module, TopKMoE):
        out = module(x)
        return out.output, out
    return module(x), None


# ---------------------------------------------------------------------------------------------
# Splice and the whole model
# ---------------------------------------------------------------------------------------------


def splice(input_ids, image_features: Optional[torch.Tensor], embed, labels=None):
    """Replace each IMAGE_TOKEN_INDEX by its image's rows (in order); labels -100 at image rows."""
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    labels = torch.full_like(ids, IGNORE_INDEX) if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
    where = torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist()
    count = 0 if image_features is None else image_features.shape[0]
    if len(where) != count:
        raise ValueError(f"{len(where)} image placeholders but {count} images")
    bounds = [-1] + where + [ids.shape[0]]
    text_ids = [ids[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
    text_labels = [labels[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
    text_embeds = torch.split(embed(torch.cat(text_ids)), [len(t) for t in text_ids])
    embeds, new_labels = [], []
    for i in range(len(where) + 1):
        embeds.append(text_embeds[i])
        new_labels.append(text_labels[i])
        if i < len(where):
            embeds.append(image_features[i])
            new_labels.append(torch.full((image_features.shape[1],), IGNORE_INDEX, dtype=labels.dtype))
    return torch.cat(embeds), torch.cat(new_labels)


class ReferenceOutput(NamedTuple):
    logits: torch.Tensor
    labels: Optional[torch.Tensor]
    inputs_embeds: torch.Tensor
    image_features: Optional[torch.Tensor]
    vision: Optional[VisionOutput]
    connector: Optional[MoEOutput]
    llm_router_logits: Optional[tuple]
    lm_loss: Optional[torch.Tensor]
    loss: Optional[torch.Tensor]
    aux: dict


_LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "sliding_window",
    "max_position_embeddings",
    "tie_word_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
)


def _build_llm(config: dict) -> nn.Module:
    import transformers

    values = {k: config[k] for k in _LLM_FIELDS if k in config}
    values.setdefault("rope_theta", 1e6)
    mixtral = config["model_type"] == "llava_mixtral"
    if not mixtral:
        values.pop("num_local_experts", None)
        values.pop("num_experts_per_tok", None)
    cfg_cls = transformers.MixtralConfig if mixtral else transformers.MistralConfig
    cfg = cfg_cls(**values, attn_implementation="eager", router_jitter_noise=0.0)
    if mixtral:
        cfg._experts_implementation = "eager"
    model_cls = transformers.MixtralForCausalLM if mixtral else transformers.MistralForCausalLM
    return model_cls(cfg)


class CuMoReference(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.is_mixtral = config["model_type"] == "llava_mixtral"
        self.clip_smoe = bool(config.get("clip_smoe", True))
        self.connector_kind = config.get("mm_projector_type", "smoe_mlp")
        num_experts, top_k = config.get("num_experts", 4), config.get("num_selected", 2)
        scales = config.get("scales", [1, 3])
        vision_cfg = vision_settings(config.get("vision_config"))
        self.vision_tower = VisionTowerReference(vision_cfg, scales, num_experts if self.clip_smoe else None, top_k)
        in_dims = vision_cfg["hidden_size"] * len(scales)
        self.mm_projector = build_connector(self.connector_kind, in_dims, config["hidden_size"], num_experts, top_k)
        self.llm = _build_llm(config)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(ids)

    def encode_images(self, images: torch.Tensor):
        vision = self.vision_tower(images)
        features, connector = apply_connector(self.mm_projector, vision.features)
        return features, vision, connector

    def forward(self, input_ids, images: Optional[torch.Tensor] = None, labels=None) -> ReferenceOutput:
        vision = connector = None
        features = None
        if images is not None and images.shape[0]:
            features, vision, connector = self.encode_images(images)
        embeds, new_labels = splice(input_ids, features, self.embed_tokens, labels)
        kwargs = {"output_router_logits": True} if self.is_mixtral else {}
        out = self.llm(inputs_embeds=embeds[None], use_cache=False, **kwargs)
        logits = out.logits.float()
        router_logits = tuple(out.router_logits) if self.is_mixtral else None

        aux = dict.fromkeys(("clip_balance", "clip_z", "mlp_balance", "mlp_z", "llm_balance", "llm_z"))
        if vision is not None and vision.balance_loss is not None:
            aux["clip_balance"], aux["clip_z"] = vision.balance_loss, vision.router_z_loss
        if connector is not None:
            aux["mlp_balance"], aux["mlp_z"] = connector.balance_loss, connector.router_z_loss
        if router_logits:
            n = len(router_logits)
            aux["llm_balance"] = sum(balance_loss(r, r.argmax(-1), per_sequence=False) for r in router_logits) / n
            aux["llm_z"] = sum(router_z_loss(r) for r in router_logits) / n

        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[0, :-1], new_labels[1:], ignore_index=IGNORE_INDEX)
            loss = lm_loss
            if self.clip_smoe or self.connector_kind == "smoe_mlp":  # the original's condition
                bc = self.config.get("balance_loss_coef", 0.1)
                zc = self.config.get("router_z_loss_coef", 0.01)
                for site in ("clip", "mlp", "llm"):
                    if aux[f"{site}_balance"] is not None:
                        loss = loss + bc * aux[f"{site}_balance"] + zc * aux[f"{site}_z"]
        return ReferenceOutput(
            logits, new_labels if labels is not None else None, embeds, features, vision, connector, router_logits, lm_loss, loss, aux
        )


# ---------------------------------------------------------------------------------------------
# Original checkpoint names, building
# ---------------------------------------------------------------------------------------------


def original_state_dict(model: CuMoReference) -> dict:
    """Every weight under the original checkpoint's name (reference §3), as float32 tensors."""
    out = {}
    for k, v in model.vision_tower.vision_model.state_dict().items():
        out["model.vision_tower.vision_model." + k] = v.detach().clone()
    for k, v in model.mm_projector.state_dict().items():
        out["model.mm_projector." + k] = v.detach().clone()
    inter = model.config["intermediate_size"]
    for k, v in model.llm.state_dict().items():
        v = v.detach().clone()
        if ".mlp.experts.gate_up_proj" in k:  # transformers 5 fuses Mixtral's experts
            prefix = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = v[e, :inter].clone()
                out[f"{prefix}.{e}.w3.weight"] = v[e, inter:].clone()
        elif ".mlp.experts.down_proj" in k:
            prefix = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = v[e].clone()
        elif model.is_mixtral and ".mlp.gate.weight" in k:
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
        elif "rotary_emb" not in k:
            out[k] = v
    return out


def load_original_state_dict(model: CuMoReference, state_dict: dict) -> None:
    """Load original-layout weights (what `original_state_dict` returns) into `model`, strictly."""
    vision, projector, llm = {}, {}, {}
    experts = {}
    for k, v in state_dict.items():
        v = torch.as_tensor(v)
        if k.startswith("model.vision_tower.vision_model."):
            vision[k[len("model.vision_tower.vision_model.") :]] = v
        elif k.startswith("model.mm_projector."):
            projector[k[len("model.mm_projector.") :]] = v
        elif ".block_sparse_moe.experts." in k:
            prefix, rest = k.split(".block_sparse_moe.experts.")
            e, w = rest.split(".")[:2]
            experts.setdefault(prefix, {}).setdefault(w, {})[int(e)] = v
        elif ".block_sparse_moe.gate." in k:
            llm[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
        else:
            llm[k] = v
    for prefix, ws in experts.items():
        n = len(ws["w1"])
        llm[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([ws["w1"][e], ws["w3"][e]]) for e in range(n)])
        llm[f"{prefix}.mlp.experts.down_proj"] = torch.stack([ws["w2"][e] for e in range(n)])
    model.vision_tower.vision_model.load_state_dict(vision, strict=True)
    model.mm_projector.load_state_dict(projector, strict=True)
    missing, unexpected = model.llm.load_state_dict(llm, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise KeyError(f"LLM weights: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded random weights at scales that keep activations O(1) and routing decisive."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        n = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.ndim == 1 and leaf == "weight":  # LayerNorm / RMSNorm scales
            p.copy_(1.0 + 0.1 * n)
        elif p.ndim == 1:  # biases, class embedding
            p.copy_((0.5 if "class_embedding" in name else 0.1) * n)
        elif "embed_tokens" in name or "position_embedding" in name:
            p.copy_(0.5 * n)
        else:
            fan_in = int(np.prod(p.shape[1:])) if p.ndim == 4 else p.shape[-1]
            p.copy_(n * fan_in**-0.5)


def build_reference(config: dict, seed: int = 0) -> CuMoReference:
    """A CuMoReference for a CuMo config.json dict, with seeded random float32 weights, eval mode."""
    torch.manual_seed(seed)
    model = CuMoReference(config).float()
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()
