"""The Top-K sparsely-gated mixture of experts used at all three MoE sites of CuMo.

CLIP layers (quick_gelu MLP experts), the connector (GELU MLP experts) and Mixtral layers (SwiGLU
experts) share `SparseMoE`. Routing follows the original (SHI-Labs/CuMo: `CLIPEncoderMoELayer` in
cumo/model/multimodal_encoder/clip_smoe.py, the `smoe_mlp` connector in
cumo/model/multimodal_projector/builder.py):
softmax of the router logits in float32, the top-k probabilities renormalised to sum to one.

Expert weights are stacked per block ([E, out, in], mlx-lm's SwitchLinear) and dispatched one of
two ways, chosen per backend:
- "gather": `mx.gather_mm`/`gather_qmm` over token-expert pairs, sorted by expert when there are
  many (fast on Metal and CUDA);
- "grouped": tokens sorted by expert on the host, then one dense matmul per expert over its
  tokens. The CPU backend's gather_mm runs one matrix-vector product per pair (~30x slower than
  a dense matmul of the same work), reading the expert's weights again for each pair, so on the
  CPU grouping wins as soon as there are as many pairs as experts (benchmarks/moe_dispatch.py).
Both call the same expert modules, so float, quantized and LoRA experts share one code path.
`set_dispatch` forces a path on the blocks of one model; CUMO_MLX_MOE_DISPATCH on every block.
"""

import os
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import SwitchLinear

from ..errors import ConfigError

# Below this many token-expert pairs the gather path does not sort them by expert (as mlx-lm).
SORT_THRESHOLD = 64
DISPATCH_MODES = ("auto", "gather", "grouped")


# CLIP's quick_gelu, x * sigmoid(1.702 x), is MLX's gelu_fast_approx (compiled: one fused kernel).
ACTIVATIONS = {"quick_gelu": nn.gelu_fast_approx, "gelu": nn.gelu}


def dispatch_mode(num_pairs: int, num_experts: int, mode: str = "auto") -> str:
    """The path for `num_pairs` token-expert pairs over `num_experts` experts.

    `mode` (a block's own setting) wins unless "auto"; then CUMO_MLX_MOE_DISPATCH unless "auto";
    then the backend decides.
    """
    if mode == "auto":
        mode = os.environ.get("CUMO_MLX_MOE_DISPATCH", "auto")
        if mode not in DISPATCH_MODES:
            raise ConfigError(
                f"CUMO_MLX_MOE_DISPATCH must be one of {', '.join(DISPATCH_MODES)}, got {mode!r}", "fix or unset it"
            )
    if mode != "auto":
        return mode
    on_cpu = mx.default_device() == mx.cpu
    return "grouped" if on_cpu and num_pairs >= num_experts else "gather"


class Routing(NamedTuple):
    """What one MoE call decided, kept for the auxiliary losses."""

    logits: mx.array  # [..., E] router logits, float32
    indices: mx.array  # [..., k] chosen experts


class MLP(nn.Module):
    """fc1 -> activation -> fc2: a CLIP MLP or the dense `mlp2x_gelu` connector."""

    def __init__(self, input_dims: int, hidden_dims: int, output_dims: int, activation: str, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(input_dims, hidden_dims, bias=bias)
        self.fc2 = nn.Linear(hidden_dims, output_dims, bias=bias)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class ExpertMLP(nn.Module):
    """E stacked MLP experts: fc1 -> activation -> fc2."""

    def __init__(self, input_dims, hidden_dims, output_dims, num_experts, activation, bias=True):
        super().__init__()
        self.fc1 = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.fc2 = SwitchLinear(hidden_dims, output_dims, num_experts, bias=bias)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x, indices, sorted_indices=False):
        h = self.activation(self.fc1(x, indices, sorted_indices=sorted_indices))
        return self.fc2(h, indices, sorted_indices=sorted_indices)


class ExpertGLU(nn.Module):
    """E stacked SwiGLU experts (Mixtral): down(silu(gate(x)) * up(x))."""

    def __init__(self, input_dims, hidden_dims, output_dims, num_experts, bias=False):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, output_dims, num_experts, bias=bias)

    def __call__(self, x, indices, sorted_indices=False):
        gate = self.gate_proj(x, indices, sorted_indices=sorted_indices)
        up = self.up_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(swiglu(gate, up), indices, sorted_indices=sorted_indices)


def route(logits: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """Top-k experts of each token and their weights (the top-k softmax probabilities renormalised)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(probs, indices, axis=-1)
    return indices, weights / weights.sum(axis=-1, keepdims=True)


def gather_dispatch(experts: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
    """Expert outputs [N, k, out] for tokens x [N, D] via gather_mm, sorted by expert when many."""
    n, k = indices.shape
    if indices.size < SORT_THRESHOLD:
        return experts(x[:, None, None, :], indices).squeeze(-2)
    flat = indices.flatten()
    order = mx.argsort(flat)
    y = experts(x[order // k][:, None, :], flat[order], sorted_indices=True)
    return y.squeeze(-2)[mx.argsort(order)].reshape(n, k, -1)


def grouped_dispatch(experts: nn.Module, x: mx.array, indices: mx.array) -> mx.array:
    """Expert outputs [N, k, out]: one dense matmul per expert over the tokens routed to it."""
    n, k = indices.shape
    flat = np.array(indices.flatten())  # the group sizes must be known on the host
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=1)
    x_sorted = x[mx.array(order // k)]
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            group = x_sorted[start : start + count][None]
            outputs.append(experts(group, mx.array([expert]))[0])
            start += count
    y = mx.concatenate(outputs) if len(outputs) > 1 else outputs[0]
    return y[mx.array(np.argsort(order))].reshape(n, k, -1)


class SparseMoE(nn.Module):
    """Router + E experts; each token goes to its top-k experts, outputs mixed by routing weight."""

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        output_dims: int,
        num_experts: int,
        top_k: int,
        activation: str,
        bias: bool = True,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.dispatch = "auto"  # or "gather" / "grouped": see `set_dispatch`
        self.gate = nn.Linear(input_dims, num_experts, bias=False)
        if activation == "swiglu":
            self.experts = ExpertGLU(input_dims, hidden_dims, output_dims, num_experts, bias=bias)
        else:
            self.experts = ExpertMLP(input_dims, hidden_dims, output_dims, num_experts, activation, bias=bias)

    def __call__(self, x: mx.array) -> tuple[mx.array, Routing]:
        logits = self.gate(x).astype(mx.float32)
        indices, weights = route(logits, self.top_k)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_indices = indices.reshape(-1, self.top_k)
        if dispatch_mode(flat_indices.size, self.num_experts, self.dispatch) == "grouped":
            y = grouped_dispatch(self.experts, flat_x, flat_indices)
        else:
            y = gather_dispatch(self.experts, flat_x, flat_indices)
        y = (y * weights.reshape(-1, self.top_k, 1).astype(y.dtype)).sum(axis=-2)
        return y.reshape(*x.shape[:-1], -1), Routing(logits, indices)


def set_dispatch(module: nn.Module, mode: str) -> None:
    """Force the dispatch path ("gather" or "grouped") of every SparseMoE in `module` (itself
    included), or "auto" to let CUMO_MLX_MOE_DISPATCH, then the backend, pick (the default)."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch mode must be one of {DISPATCH_MODES}, got {mode!r}")
    for _, block in module.named_modules():
        if isinstance(block, SparseMoE):
            block.dispatch = mode


def feed_forward(ffn: nn.Module, x: mx.array) -> tuple[mx.array, Optional[Routing]]:
    """Apply a dense MLP or a SparseMoE; the routing is None for a dense one."""
    if isinstance(ffn, SparseMoE):
        return ffn(x)
    return ffn(x), None


def balance_loss(logits: mx.array, per_sequence: bool) -> mx.array:
    """E^2 * mean_e(P_e * f_e) of router logits [..., tokens, E]: P_e the mean router probability,
    f_e the top-1 share of expert e.

    per_sequence: compute it over the tokens of each batch element, then average (CLIP and the
    connector, where a batch element is one image or crop); otherwise over all tokens (Mixtral).
    """
    num_experts = logits.shape[-1]
    if not per_sequence:
        logits = logits.reshape(-1, num_experts)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    top1 = mx.stop_gradient(mx.argmax(probs, axis=-1))
    top1_share = (top1[..., None] == mx.arange(num_experts)).astype(mx.float32).mean(axis=-2)
    return (probs.mean(axis=-2) * top1_share).mean() * num_experts**2


def router_z_loss(logits: mx.array) -> mx.array:
    """Mean over tokens of logsumexp(router logits)^2."""
    return mx.square(mx.logsumexp(logits.astype(mx.float32), axis=-1)).mean()
