"""The one Top-K MoE block (`cumo_mlx.models.moe.SparseMoE`) against the PyTorch reference and itself.

- Against `torch_reference.TopKMoE` (the original's per-expert loop) with the same weights, for the
  three expert shapes CuMo uses (connector GELU MLP, CLIP quick_gelu MLP, Mixtral SwiGLU): outputs,
  chosen experts (as sets), routing weights, router logits, balance and router-z losses.
- Both dispatch paths ("gather", "grouped") against a plain per-expert loop written here with
  dense matmuls, for k = 1..E, with an expert that receives no token, below and above the sort
  threshold; the same for gradients; quantized experts: the two paths against each other.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from cumo_mlx.models import moe
from cumo_mlx.models.moe import Routing, SparseMoE, balance_loss, route, router_z_loss
from mlx.utils import tree_flatten
from torch_reference import TopKMoE

TOL = 1e-4
IN, HIDDEN, OUT, E = 32, 64, 48, 4
KINDS = ("gelu", "quick_gelu", "swiglu")
# token counts below and above moe.SORT_THRESHOLD token-expert pairs (for every k)
SMALL, LARGE = 6, max(80, moe.SORT_THRESHOLD)


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().float().numpy())


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


# Expert sub-module names: ours <- the reference's (connector Sequential, CLIP fc, Mixtral w*).
EXPERT_NAMES = {
    "gelu": {"fc1": "0", "fc2": "2"},
    "quick_gelu": {"fc1": "fc1", "fc2": "fc2"},
    "swiglu": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
}


def mlx_from_reference(ref: TopKMoE, kind: str) -> SparseMoE:
    bias = kind != "swiglu"
    ours = SparseMoE(IN, HIDDEN, OUT, len(ref.experts), ref.top_k, kind, bias=bias)
    weights = [("gate.weight", to_mx(ref.gate.weight))]
    for mine, theirs in EXPERT_NAMES[kind].items():
        for leaf in ("weight", "bias") if bias else ("weight",):
            # nn.Sequential children are attributes "0", "2" as well
            stacked = torch.stack([getattr(getattr(expert, theirs), leaf) for expert in ref.experts])
            weights.append((f"experts.{mine}.{leaf}", to_mx(stacked)))
    ours.load_weights(weights)  # strict: every parameter is set
    mx.eval(ours.parameters())
    return ours


def make_pair(kind: str, top_k: int, seed: int = 0):
    torch.manual_seed(seed)
    per_sequence = kind != "swiglu"
    ref = TopKMoE.build(kind, IN, HIDDEN, OUT, E, top_k, per_sequence=per_sequence)
    with torch.no_grad():  # decisive routing: router logits of order 1
        ref.gate.weight.normal_(0, IN**-0.5 * 2)
        for p in ref.experts.parameters():
            p.normal_(0, 0.2)
    return ref, mlx_from_reference(ref, kind)


def sorted_by_expert(indices: np.ndarray, weights: np.ndarray):
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(indices, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("mode", ["gather", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_against_reference(kind, top_k, mode):
    ref, ours = make_pair(kind, top_k)
    per_sequence = kind != "swiglu"
    x = torch.randn(3, 17, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    moe.set_dispatch(ours, mode)
    y, routing = ours(to_mx(x))
    np.testing.assert_allclose(to_np(y), expected.output.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(to_np(routing.logits), expected.logits.numpy(), atol=TOL, rtol=0)

    # chosen experts as sets, and their weights matched by expert
    idx, w = route(routing.logits, top_k)
    ours_idx, ours_w = sorted_by_expert(np.array(idx), np.array(w))
    ref_idx, ref_w = sorted_by_expert(expected.indices.numpy(), expected.weights.numpy())
    np.testing.assert_array_equal(np.sort(np.array(routing.indices), -1), ref_idx)
    np.testing.assert_array_equal(ours_idx, ref_idx)
    np.testing.assert_allclose(ours_w, ref_w, atol=TOL, rtol=0)

    b = balance_loss(routing.logits, per_sequence=per_sequence)
    z = router_z_loss(routing.logits)
    assert abs(b.item() - expected.balance_loss.item()) <= TOL
    assert abs(z.item() - expected.router_z_loss.item()) <= TOL


def test_balance_loss_per_sequence_differs_from_flattened():
    """CLIP/connector average per image; the LLM flattens: the two must not be confused."""
    ref, ours = make_pair("quick_gelu", 2)
    x = torch.randn(2, 9, IN, generator=torch.Generator().manual_seed(3))
    x[1] += 3.0  # the two batch elements route differently
    _, routing = ours(to_mx(x))
    with torch.no_grad():
        expected = ref(x)
        flat = TopKMoE(ref.gate, ref.experts, 2, per_sequence=False)(x)
    assert abs(balance_loss(routing.logits, per_sequence=True).item() - expected.balance_loss.item()) <= TOL
    assert abs(balance_loss(routing.logits, per_sequence=False).item() - flat.balance_loss.item()) <= TOL
    assert abs(expected.balance_loss.item() - flat.balance_loss.item()) > 1e-3


# ------------------------------------------------------------------------------------------------
# dispatch paths vs a plain per-expert loop
# ------------------------------------------------------------------------------------------------


def starving_inputs(ours: SparseMoE, n: int, seed: int) -> mx.array:
    """Inputs [n, IN] and a router for which the last expert never wins a top-(E-1) slot."""
    x = mx.random.normal((n, IN), key=mx.random.key(seed))
    x[:, 0] = 4.0
    w = ours.gate.weight
    w[:, 0] = 0.0
    w[-1, 0] = -10.0
    ours.gate.weight = w
    return x


def expert_dense(ours: SparseMoE, e: int, x: mx.array) -> mx.array:
    """Expert e applied to x [n, IN] with ordinary matmuls of its weight slices."""
    ex = ours.experts

    def lin(layer, h):
        out = h @ layer.weight[e].T
        return out + layer.bias[e] if "bias" in layer else out

    if hasattr(ex, "gate_proj"):
        return lin(ex.down_proj, nn.silu(lin(ex.gate_proj, x)) * lin(ex.up_proj, x))
    return lin(ex.fc2, ex.activation(lin(ex.fc1, x)))


def plain_loop(ours: SparseMoE, x: mx.array) -> mx.array:
    indices, weights = route(ours.gate(x), ours.top_k)
    y = mx.zeros((x.shape[0], OUT))
    for e in range(ours.num_experts):
        w = ((indices == e) * weights).sum(axis=-1, keepdims=True)  # 0 where e not chosen
        y = y + w * expert_dense(ours, e, x)
    return y


@pytest.mark.parametrize("n", [SMALL, LARGE])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_paths_equal_plain_loop(kind, top_k, n):
    _, ours = make_pair(kind, top_k)
    x = starving_inputs(ours, n, seed=top_k)
    counts = np.bincount(np.array(route(ours.gate(x), top_k)[0]).ravel(), minlength=E)
    if top_k < E:
        assert counts[-1] == 0 and counts[:-1].sum() == n * top_k  # an expert with no tokens
    expected = to_np(plain_loop(ours, x))
    for mode in ("gather", "grouped"):
        moe.set_dispatch(ours, mode)
        y, routing = ours(x)
        np.testing.assert_allclose(to_np(y), expected, atol=1e-5, rtol=0, err_msg=mode)
        assert routing.indices.shape == (n, top_k)
    # leading batch dims are kept
    moe.set_dispatch(ours, "grouped")
    y3, _ = ours(x.reshape(2, n // 2, IN))
    np.testing.assert_allclose(to_np(y3).reshape(n, OUT), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_across_paths(kind):
    _, ours = make_pair(kind, 2)
    x = starving_inputs(ours, LARGE, seed=7)
    r = mx.random.normal((LARGE, OUT), key=mx.random.key(8))

    def loss(model, inputs):
        return (model(inputs)[0] * r).sum()

    def plain_loss(model, inputs):
        return (plain_loop(model, inputs) * r).sum()

    grads = {}
    for mode in ("gather", "grouped"):
        moe.set_dispatch(ours, mode)
        value, g = nn.value_and_grad(ours, loss)(ours, x)
        gx = mx.grad(lambda inputs: loss(ours, inputs))(x)
        grads[mode] = (value, dict(tree_flatten(g)), gx)
    value, g = nn.value_and_grad(ours, plain_loss)(ours, x)
    gx = mx.grad(lambda inputs: plain_loss(ours, inputs))(x)
    grads["plain"] = (value, dict(tree_flatten(g)), gx)

    base_value, base_g, base_gx = grads["plain"]
    assert set(base_g) == set(dict(tree_flatten(ours.trainable_parameters())))
    for mode in ("gather", "grouped"):
        value, g, gx = grads[mode]
        assert abs(value.item() - base_value.item()) <= 1e-3
        assert set(g) == set(base_g)
        for name in base_g:
            np.testing.assert_allclose(to_np(g[name]), to_np(base_g[name]), atol=1e-4, rtol=1e-5, err_msg=f"{mode} {name}")
        np.testing.assert_allclose(to_np(gx), to_np(base_gx), atol=1e-4, rtol=1e-5, err_msg=mode)
    # the starved expert gets no gradient
    key = "experts.fc1.weight" if kind != "swiglu" else "experts.gate_proj.weight"
    assert np.abs(to_np(base_g[key])[-1]).max() == 0.0


@pytest.mark.parametrize("n", [SMALL, LARGE])
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_paths_agree(kind, top_k, n):
    _, ours = make_pair(kind, top_k)
    x = starving_inputs(ours, n, seed=11)
    nn.quantize(ours, group_size=32, bits=4)
    assert type(ours.experts.fc1 if kind != "swiglu" else ours.experts.gate_proj).__name__ == "QuantizedSwitchLinear"
    outputs = {}
    for mode in ("gather", "grouped"):
        moe.set_dispatch(ours, mode)
        y, routing = ours(x)
        outputs[mode] = (to_np(y), np.sort(np.array(routing.indices), -1))
    np.testing.assert_array_equal(outputs["gather"][1], outputs["grouped"][1])
    np.testing.assert_allclose(outputs["gather"][0], outputs["grouped"][0], atol=1e-5, rtol=1e-5)


def test_set_dispatch_rejects_unknown_mode():
    with pytest.raises(ValueError):
        moe.set_dispatch(SparseMoE(IN, HIDDEN, OUT, E, 2, "gelu"), "loop")


def test_routing_logits_are_float32_for_half_weights():
    _, ours = make_pair("gelu", 2)
    ours.set_dtype(mx.bfloat16)
    x = mx.random.normal((5, IN)).astype(mx.bfloat16)
    y, routing = ours(x)
    assert routing.logits.dtype == mx.float32
    assert y.shape == (5, OUT)
    assert isinstance(routing, Routing)
