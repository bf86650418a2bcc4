"""CLIP's text tower: learned positions, pre-LN blocks, a causal (or bidirectional) stack, EOT (or
first / last token) pooling."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Dtype,
    LayerNorm,
    Transformer,
    constrain,
    normal,
    param_with_axes,
)

TEXT_POOL_TYPES = ("argmax", "first", "last")


def check_tokens(tokens, context_length: int):
    """Raise a clear error for tokens of the wrong rank, length or dtype (at trace time)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [N, T], got shape {tokens.shape}")
    if tokens.shape[1] > context_length:
        raise ValueError(
            f"tokens have length {tokens.shape[1]} > context_length {context_length}; "
            f"tokenize with context_length={context_length}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got {tokens.dtype}")


def embed_tokens(module: nn.Module, tokens, embeddings, pos_std: float):
    """Token plus learned position embeddings [N, T, width] inside `module`'s compact call (its params
    'token_embedding' and 'positional_embedding' [context_length, width]); `embeddings` [N, T, width],
    where given, stand in place of the token embeddings (prompt learning)."""
    embed = nn.Embed(module.vocab_size, module.width, dtype=module.dtype, param_dtype=jnp.float32,
                     embedding_init=param_with_axes(normal(0.02), ("vocab", "embed")), name="token_embedding")
    pos = module.param("positional_embedding", param_with_axes(normal(pos_std), (None, "embed")),
                       (module.context_length, module.width))
    if embeddings is not None and embeddings.shape != tokens.shape + (module.width,):
        raise ValueError(f"embeddings {embeddings.shape} must be the tokens' shape {tokens.shape} + "
                         f"({module.width},)")
    words = embed(tokens) if embeddings is None else embeddings.astype(module.dtype)
    return constrain(words + pos[: tokens.shape[1]].astype(module.dtype), (BATCH, LENGTH, EMBED))


class TextTransformer(nn.Module):
    """tokens int32 [N, T] (T <= context_length) -> text features [N, output_dim] (not normalized).

    pool_type: 'argmax' takes the position of the largest id, which is EOT (49407) for the
    CLIP vocabulary; 'first' / 'last' take position 0 / T-1 (for other vocabularies).
    no_causal_mask: a bidirectional stack over every position, the padding too, as open_clip's and
    big_vision's SigLIP towers; CLIP's own is causal. 'first' needs it: causally, token 0 sees only
    itself. use_pad_mask (with no_causal_mask): keys stop after the last non-`pad_id` token (right
    padding), so an embedding does not depend on the context length.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    pool_type: str = "argmax"
    no_causal_mask: bool = False
    use_pad_mask: bool = False
    pad_id: int = 0
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False, embeddings=None, deep_prompts=None, per_token: bool = False):
        """`embeddings` [N, T, width]: used in place of the token embeddings of `tokens` (prompt
        learning: learned context vectors among embedded words); `tokens` still place the pooled
        token (EOT) and the padding. `deep_prompts` (values [layers, n, width], active [layers]):
        MaPLe's per-layer prompts, replacing tokens 1..n at the input of each active layer.
        per_token: ([N, T, output_dim], every position through ln_final and the projection; the pooled index [N])."""
        del train  # no dropout in CLIP's tower; the flag is the towers' common signature
        check_tokens(tokens, self.context_length)
        if self.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"text pool_type {self.pool_type!r} not in {TEXT_POOL_TYPES}")
        if self.pool_type == "first" and not self.no_causal_mask:
            raise ValueError("text pool_type 'first' under the causal mask pools a token that sees only itself: "
                             "set text_cfg no_causal_mask=True (bidirectional) or use 'argmax' / 'last'")
        if self.use_pad_mask and not self.no_causal_mask:
            raise ValueError("text use_pad_mask masks padding keys of a bidirectional stack: set text_cfg "
                             "no_causal_mask=True too, or drop use_pad_mask (the causal mask already hides them)")
        length = tokens.shape[1]
        x = embed_tokens(self, tokens, embeddings, pos_std=0.01)
        if self.pool_type == "argmax":
            index = jnp.argmax(tokens, axis=-1)
        elif self.pool_type == "first":
            index = jnp.zeros(tokens.shape[:1], jnp.int32)
        else:
            index = jnp.full(tokens.shape[:1], length - 1, jnp.int32)
        kv_lengths = None
        if self.no_causal_mask and self.use_pad_mask:  # right padding: keys stop after the last real token
            positions = jnp.arange(1, length + 1, dtype=jnp.int32)
            kv_lengths = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=-1)
        # The last layer computes only the pooled token's row ([batch, width] out).
        deep = None if deep_prompts is None else (deep_prompts[0], deep_prompts[1], 1)
        x = Transformer.of_tower(self, causal=not self.no_causal_mask)(x, None if per_token else index, kv_lengths,
                                                                        deep)
        pooled = LayerNorm(self.dtype, name="ln_final")(x)
        proj = self.param(
            "text_projection", param_with_axes(normal(self.width**-0.5), ("embed", None)), (self.width, self.output_dim)
        )
        out = pooled @ proj.astype(self.dtype)
        return (out, index) if per_token else out
