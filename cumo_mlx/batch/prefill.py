"""Prefill of new requests from their input embeddings, before they join the decoding batch.

A prompt's positions but the last go into a KV cache; the last runs in the batch's first decode
step. Short prompts are prefilled together in one call, right-padded to the longest: mlx-lm's own
batch prefill (`PromptProcessingBatch.prompt`), but from embeddings, so that image rows go in too.
The padding sits after each prompt, where the causal mask hides it from the prompt's positions
(the MoE routes each position alone, so padded positions only cost compute), and `finalize` rolls
it to the left, where the batch cache masks it. A group never exceeds one prefill chunk, so each
prompt meets the chunk boundaries `generate` gives it; longer prompts are prefilled alone, chunk
by chunk, exactly as `generate` prefills.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache


def prefill_alone(language_model: nn.Module, embeddings: mx.array, cache: list, step_size: int) -> None:
    """`embeddings` [L, hidden] into `cache` in chunks of `step_size` positions, only the cache
    evaluated, as mlx-lm's generate_step prefills."""
    for start in range(0, embeddings.shape[0], step_size):
        language_model(None, cache=cache, input_embeddings=embeddings[None, start : start + step_size])
        mx.eval([c.state for c in cache])


def prefill_together(language_model: nn.Module, embeddings: list[mx.array]) -> list[list]:
    """Several prompts' embeddings [L_i, hidden] in one call; each prompt's own KV cache (KVCache per layer)."""
    lengths = [e.shape[0] for e in embeddings]
    longest = max(lengths)
    padded = mx.stack([mx.pad(e, [(0, longest - n), (0, 0)]) for e, n in zip(embeddings, lengths)])
    cache = [BatchKVCache([0] * len(embeddings)) for _ in language_model.layers]
    for layer in cache:
        layer.prepare(lengths=lengths, right_padding=[longest - n for n in lengths])
    language_model(None, cache=cache, input_embeddings=padded)
    for layer in cache:
        layer.finalize()
    mx.eval([c.state for c in cache])
    return [[layer.extract(i) for layer in cache] for i in range(len(embeddings))]


def prefill_groups(lengths: list[int], step_sizes: list[int]) -> list[list[int]]:
    """Indices of the prompts to prefill together: each group padded fits one chunk (prompts x the
    longest <= their step size, all of one step size); a prompt that fills a chunk goes alone."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (step_sizes[i], lengths[i])):
        group = groups[-1] if groups else []
        fits = group and step_sizes[group[0]] == step_sizes[i] and (len(group) + 1) * lengths[i] <= step_sizes[i]
        if fits:
            group.append(i)
        else:
            groups.append([i])
    return groups
