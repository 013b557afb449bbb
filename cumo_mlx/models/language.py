"""The language model: Mistral (dense) or Mixtral (MoE), built from mlx-lm's pieces.

Attention with RoPE and GQA, the SwiGLU MLP, RMSNorm, masks and the KV cache come from mlx-lm;
Mixtral's experts go through CuMo's own `SparseMoE`, so that the LLM, the connector and CLIP share
one MoE block. `__call__` has mlx-lm's model signature, so mlx-lm's generation loop drives it.
"""

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.llama import MLP, Attention

from .config import TextConfig
from .moe import Routing, SparseMoE, feed_forward


class DecoderLayer(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(
                args.hidden_size,
                args.intermediate_size,
                args.hidden_size,
                args.num_local_experts,
                args.num_experts_per_tok,
                "swiglu",
                bias=False,
            )
        else:
            self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask=None, cache=None) -> tuple[mx.array, Optional[Routing]]:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        ffn = self.block_sparse_moe if "block_sparse_moe" in self else self.mlp
        y, routing = feed_forward(ffn, self.post_attention_layernorm(h))
        return h + y, routing


class TextModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs, cache=None, input_embeddings=None) -> tuple[mx.array, list[Routing]]:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0], window_size=self.args.sliding_window)
        routings = []
        for layer, layer_cache in zip(self.layers, cache):
            h, routing = layer(h, mask, layer_cache)
            if routing is not None:
                routings.append(routing)
        return self.norm(h), routings


class LanguageModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(
        self, inputs: mx.array, cache: Optional[list[Any]] = None, input_embeddings: Optional[mx.array] = None
    ) -> tuple[mx.array, list[Routing]]:
        """Logits [B, L, vocab] and the routing of every Mixtral layer (empty for Mistral)."""
        h, routings = self.model(inputs, cache, input_embeddings)
        return self.head(h), routings

    def head(self, h: mx.array) -> mx.array:
        """Logits of final hidden states (through the embedding when it is tied)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs, cache=None, input_embeddings=None) -> mx.array:
        return self.forward(inputs, cache, input_embeddings)[0]

    @property
    def layers(self):
        return self.model.layers
