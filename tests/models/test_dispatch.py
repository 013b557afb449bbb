"""How `SparseMoE` picks its dispatch path, and the override (`set_dispatch`, CUMO_MLX_MOE_DISPATCH).

The paths' numbers are tested in test_moe.py; here only which path runs. On the CPU backend the
grouped path is taken once the token-expert pairs are as many as the experts (a prefill chunk, a
CLIP crop), the gather path for decode (one token: fewer pairs than experts).
"""

import mlx.core as mx
import pytest
from cumo_mlx.errors import ConfigError
from cumo_mlx.models import moe
from cumo_mlx.models.moe import SparseMoE


@pytest.fixture(autouse=True)
def cpu_and_auto(monkeypatch):
    monkeypatch.delenv("CUMO_MLX_MOE_DISPATCH", raising=False)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def paths_taken(monkeypatch, block: SparseMoE, tokens: int) -> list[str]:
    """The dispatch functions a call of `block` on `tokens` tokens goes through."""
    taken = []
    for name in ("gather_dispatch", "grouped_dispatch"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _f=original, _n=name: taken.append(_n.split("_")[0]) or _f(*a))
    mx.eval(block(mx.random.normal((1, tokens, 16), key=mx.random.key(tokens)))[0])
    return taken


@pytest.mark.parametrize("experts, top_k", [(4, 2), (8, 2), (4, 1)])
def test_auto_on_cpu_groups_once_pairs_reach_experts(monkeypatch, experts, top_k):
    block = SparseMoE(16, 32, 16, experts, top_k, "gelu")
    assert paths_taken(monkeypatch, block, 1) == ["gather"]  # decode
    below = (experts - 1) // top_k  # the most tokens with fewer pairs than experts
    if below >= 1:
        assert paths_taken(monkeypatch, block, below) == ["gather"]
    assert paths_taken(monkeypatch, block, -(-experts // top_k)) == ["grouped"]
    assert paths_taken(monkeypatch, block, 200) == ["grouped"]
    assert moe.dispatch_mode(experts * 2, experts) == "grouped" and moe.dispatch_mode(experts - 1, experts) == "gather"


def test_set_dispatch_overrides_auto_and_environment(monkeypatch):
    block = SparseMoE(16, 32, 16, 4, 2, "quick_gelu")
    monkeypatch.setenv("CUMO_MLX_MOE_DISPATCH", "gather")
    assert paths_taken(monkeypatch, block, 100) == ["gather"]
    moe.set_dispatch(block, "grouped")
    assert paths_taken(monkeypatch, block, 1) == ["grouped"]
    moe.set_dispatch(block, "auto")  # back to the environment's choice
    assert paths_taken(monkeypatch, block, 100) == ["gather"]


def test_bad_environment_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("CUMO_MLX_MOE_DISPATCH", "loop")
    block = SparseMoE(16, 32, 16, 4, 2, "gelu")
    with pytest.raises(ConfigError, match="CUMO_MLX_MOE_DISPATCH must be one of auto, gather, grouped"):
        block(mx.zeros((1, 3, 16)))
