"""Padding does not leak: a sequence's outputs in a left-padded batch are its outputs alone.

Decoding feeds one real token per sequence, so there padding exists only as masked KV entries.
Short prompts prefilled together are right-padded, where the causal mask hides the padding from
the prompt's positions. These tests check the pieces that guarantee it: the batch KV cache's mask
and per-sequence RoPE offsets, the Mixtral MoE, whose capacity-free top-k routing lets no token
change another's output, and prefill together giving each prompt the KV cache it gets alone.
"""

import mlx.core as mx
import numpy as np
import pytest
from cumo_mlx.batch.prefill import prefill_alone, prefill_groups, prefill_together
from cumo_mlx.models import moe
from cumo_mlx.models.moe import SparseMoE
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

TOL = 1e-5


@pytest.mark.parametrize("mode", ["gather", "grouped"])
def test_moe_routing_of_other_tokens_does_not_change_a_tokens_output(mode):
    """Real tokens' outputs and routing are the same with padding-like tokens (zeros, and large
    values that pull every expert) added to the call, whichever dispatch path runs."""
    mx.random.seed(0)
    block = SparseMoE(32, 64, 32, num_experts=4, top_k=2, activation="swiglu", bias=False)
    mx.eval(block.parameters())
    moe.set_dispatch(block, mode)
    real = mx.random.normal((1, 5, 32))
    alone, routing = block(real)
    for padding in (mx.zeros((1, 7, 32)), 50 * mx.random.normal((1, 40, 32))):
        mixed, mixed_routing = block(mx.concatenate([padding, real, padding], axis=1))
        start = padding.shape[1]
        assert np.allclose(np.array(mixed[:, start : start + 5]), np.array(alone), atol=TOL)
        chosen = np.array(mixed_routing.indices[:, start : start + 5])
        assert np.array_equal(np.sort(chosen), np.sort(np.array(routing.indices)))


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_a_sequence_decodes_alike_alone_and_left_padded_in_a_batch(models, name):
    """Two prompts of different lengths prefilled alone, merged into one batch cache (the shorter
    left-padded): each decode step's logits equal those of the sequence decoding alone."""
    language_model = models[name][0].language_model
    rng = np.random.default_rng(0)
    prompts = [mx.array(rng.integers(3, 300, n)) for n in (11, 4)]
    caches, alone_caches = [], []
    for prompt in prompts:
        for store in (caches, alone_caches):
            cache = make_prompt_cache(language_model)
            language_model(prompt[None, :-1], cache=cache)
            store.append(cache)
    batch_cache = [BatchKVCache.merge([c[layer] for c in caches]) for layer in range(len(caches[0]))]
    assert batch_cache[0].left_padding.tolist() == [0, 7]
    tokens = mx.array([[int(p[-1])] for p in prompts])
    for _ in range(4):
        batched = language_model(tokens, cache=batch_cache)[:, -1]
        for i, cache in enumerate(alone_caches):
            single = language_model(tokens[i : i + 1], cache=cache)[0, -1]
            assert np.allclose(np.array(batched[i]), np.array(single), atol=1e-4)
        tokens = mx.argmax(batched, axis=-1)[:, None]


def test_prefill_groups_fit_one_chunk_of_one_step_size():
    assert prefill_groups([3, 10, 5, 4000], [16] * 4) == [[0, 2], [1], [3]]  # 2 x 5 fits 16, 3 x 10 does not
    assert prefill_groups([2, 2], [8, 16]) == [[0], [1]]


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_prompts_prefilled_together_get_the_cache_each_gets_alone(models, name):
    """Right padding runs through the model (the MoE too) but changes no prompt's KV entries."""
    language_model = models[name][0].language_model
    rng = np.random.default_rng(1)
    embeddings = [language_model.model.embed_tokens(mx.array(rng.integers(3, 300, n))) for n in (9, 4)]
    for embedding, together in zip(embeddings, prefill_together(language_model, embeddings)):
        alone = make_prompt_cache(language_model)
        prefill_alone(language_model, embedding, alone, 2048)
        for mine, theirs in zip(together, alone):
            assert mine.offset == theirs.offset == embedding.shape[0]
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                assert np.allclose(np.array(a[..., : mine.offset, :]), np.array(b[..., : theirs.offset, :]), atol=1e-4)
