"""The language model against transformers' Mistral and Mixtral (same weights, float32).

Tiny random configs with GQA and rope_theta 1e6. The transformers weights are written out under
the original CuMo checkpoint names (Mixtral experts one module each, w1/w2/w3) and loaded through
`Model.sanitize`, so the name mapping and the expert stacking are checked as well.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from cumo_mlx.models import moe
from cumo_mlx.models.config import TextConfig
from cumo_mlx.models.language import LanguageModel
from cumo_mlx.models.model import Model
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

TOL = 1e-4
VOCAB = 128
DIMS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    sliding_window=None,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)


def original_names(state: dict, moe_llm: bool) -> dict:
    """transformers' state dict -> the original CuMo checkpoint's names (reference §3), as numpy."""
    out = {}
    for name, value in state.items():
        value = value.detach().float().numpy()
        if moe_llm:  # transformers 5 calls Mixtral's MoE `mlp`; the original checkpoints `block_sparse_moe`
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("block_sparse_moe.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            prefix = name[: -len("gate_up_proj")]
            gate, up = np.split(value, 2, axis=1)
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = gate[e]
                out[f"{prefix}{e}.w3.weight"] = up[e]
        elif name.endswith("block_sparse_moe.experts.down_proj"):  # [E, H, I]
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = value[e]
        else:
            out[name] = value
    return out


def build_pair(moe_llm: bool, num_experts: int = 4, top_k: int = 2, seed: int = 0):
    """A transformers causal LM with random weights (norms too) and our LanguageModel with the same."""
    torch.manual_seed(seed)
    if moe_llm:
        config = MixtralConfig(**DIMS, num_local_experts=num_experts, num_experts_per_tok=top_k)
        reference = MixtralForCausalLM._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    else:
        config = MistralConfig(**DIMS)
        reference = MistralForCausalLM._from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
    reference.eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.ndim >= 2:
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
            else:
                param.copy_(0.1 * torch.randn_like(param))

    extra = dict(num_local_experts=num_experts, num_experts_per_tok=top_k) if moe_llm else {}
    ours = LanguageModel(TextConfig(**DIMS, **extra))
    weights = {k: mx.array(v) for k, v in original_names(reference.state_dict(), moe_llm).items()}
    weights = Model.sanitize(None, weights)  # original names -> ours, experts stacked
    prefix = "language_model."
    assert all(k.startswith(prefix) for k in weights)
    ours.load_weights([(k[len(prefix) :], v) for k, v in weights.items()], strict=True)
    mx.eval(ours.parameters())
    return reference, ours


def reference_logits(reference, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@pytest.fixture(params=["mistral", "mixtral"], scope="module")
def pair(request):
    return build_pair(request.param == "mixtral")


def test_weights_complete(pair):
    reference, ours = pair
    ours_count = sum(v.size for _, v in tree_flatten(ours.parameters()))
    assert ours_count == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("length", [1, 7, 45])  # 45 tokens x top-2 = 90 pairs: the sorted/grouped paths
def test_prefill_logits(pair, length):
    reference, ours = pair
    tokens = np.random.default_rng(length).integers(0, VOCAB, size=(2, length))
    expected = reference_logits(reference, tokens)
    got = ours(mx.array(tokens))
    assert got.shape == (2, length, VOCAB) and got.dtype == mx.float32
    assert np.abs(expected).max() > 1.0  # logits of a meaningful size, so the tolerance means something
    assert max_diff(got, expected) <= TOL


def test_step_by_step_with_kv_cache(pair):
    """A chunked prefill, then one token at a time, then a chunk again, through mlx-lm's KV cache."""
    reference, ours = pair
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 16))
    expected = reference_logits(reference, tokens)
    cache = make_prompt_cache(ours)
    assert len(cache) == len(ours.layers)
    steps = [(0, 5)] + [(i, i + 1) for i in range(5, 13)] + [(13, 16)]
    pieces = []
    for start, end in steps:
        logits = ours(mx.array(tokens[:, start:end]), cache=cache)
        mx.eval(logits)
        pieces.append(np.array(logits))
        assert cache[0].offset == end
    stepped = np.concatenate(pieces, axis=1)
    assert max_diff(stepped, expected) <= TOL
    assert max_diff(stepped, ours(mx.array(tokens))) <= TOL


def test_input_embeddings_equal_token_path(pair):
    _, ours = pair
    tokens = mx.array(np.random.default_rng(2).integers(0, VOCAB, size=(1, 12)))
    embeddings = ours.model.embed_tokens(tokens)
    by_tokens = ours(tokens)
    by_embeddings = ours(None, input_embeddings=embeddings)
    assert max_diff(by_embeddings, by_tokens) == 0.0
    # Embeddings for a prefill, then tokens through the same cache (how generation runs after an image).
    cache = make_prompt_cache(ours)
    first = ours(None, cache=cache, input_embeddings=embeddings[:, :9])
    rest = [ours(tokens[:, i : i + 1], cache=cache) for i in range(9, 12)]
    assert max_diff(mx.concatenate([first, *rest], axis=1), by_tokens) <= TOL


def test_forward_returns_routing():
    _, ours = build_pair(moe_llm=True)
    logits, routings = ours.forward(mx.array([[3, 4, 5]]))
    assert len(routings) == DIMS["num_hidden_layers"]
    assert routings[0].logits.shape == (1, 3, 4) and routings[0].indices.shape == (1, 3, 2)
    _, mistral = build_pair(moe_llm=False)
    assert mistral.forward(mx.array([[3, 4, 5]]))[1] == []


@pytest.mark.parametrize("dispatch", ["gather", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_mixtral_idle_experts(dispatch, top_k):
    """8 experts, 3 tokens: at most 3 * top_k experts get a token, the others none."""
    reference, ours = build_pair(moe_llm=True, num_experts=8, top_k=top_k, seed=3)
    moe.set_dispatch(ours, dispatch)
    tokens = np.array([[11, 57, 98]])
    logits, routings = ours.forward(mx.array(tokens))
    for routing in routings:
        assert len(set(np.array(routing.indices).ravel().tolist())) < 8
    assert max_diff(logits, reference_logits(reference, tokens)) <= TOL
    cache = make_prompt_cache(ours)
    stepped = mx.concatenate([ours(mx.array(tokens[:, i : i + 1]), cache=cache) for i in range(3)], axis=1)
    assert max_diff(stepped, reference_logits(reference, tokens)) <= TOL
