"""A BERT-architecture text tower (Chinese-CLIP's RoBERTa-wwm-ext / RBT3): learned absolute
positions and token types, bidirectional attention over the non-padding tokens, post-LN layers
with exact GELU, dropout in training, the [CLS] token's state projected to the joint space.

Parameter names say what each is; clip_jax.convert maps them to Chinese-CLIP's and Hugging
Face's keys (``bert.encoder.layer.{i}.attention.self.query.weight``, ...). The q/k/v weights
are stored as BERT stores them (three projections) and stacked on use, so the attention is the
CLIP towers' own (``layers.self_attention``).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    MLP,
    Dense,
    Dtype,
    LayerNorm,
    Transformer,
    constrain,
    gelu,
    normal,
    param_with_axes,
    self_attention,
    take_rows,
)

BERT_LN_EPS = 1e-12
BERT_INIT_STD = 0.02  # initializer_range of every BERT config


class BertLayer(nn.Module):
    """x = LN(x + drop(attn(x))); x = LN(x + drop(W2 gelu(W1 x))). With ``query_index`` [batch]
    only that row is computed ([batch, 1, width]): the [CLS] row of a pooled last layer."""

    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, query_index=None, kv_lengths=None):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"text width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads
        init = normal(BERT_INIT_STD)
        qkv = [self.param(f"{n}_kernel", param_with_axes(init, ("embed", "heads", "kv")), (width, self.heads, head_dim))
               for n in ("query", "key", "value")]
        qkv_bias = [self.param(f"{n}_bias", param_with_axes(nn.initializers.zeros, ("heads", "kv")),
                               (self.heads, head_dim)) for n in ("query", "key", "value")]
        out_kernel = self.param("attention_output_kernel", param_with_axes(init, ("heads", "kv", "embed")),
                                (self.heads, head_dim, width))
        out_bias = self.param("attention_output_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (width,))
        drop_attn = not self.deterministic and self.attn_dropout > 0.0
        x = constrain(x, (BATCH, LENGTH, EMBED))
        y = self_attention(x, jnp.stack(qkv, axis=1), jnp.stack(qkv_bias), out_kernel, out_bias, causal=False,
                           dtype=self.dtype, attn_impl=self.attn_impl, query_index=query_index,
                           kv_lengths=kv_lengths, dropout_rate=self.attn_dropout,
                           dropout_rng=self.make_rng("dropout") if drop_attn else None)
        if query_index is not None:
            x = take_rows(x, query_index)
        drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
        x = LayerNorm(self.dtype, eps=BERT_LN_EPS, name="attention_norm")(x.astype(self.dtype) + drop(y))
        x = constrain(x, (BATCH, LENGTH, EMBED))
        mlp_dim = int(width * self.mlp_ratio)
        h = Dense(mlp_dim, self.dtype, kernel_init=param_with_axes(init, ("embed", "mlp")),
                  bias_init=param_with_axes(nn.initializers.zeros, ("mlp",)), name="intermediate")(x)
        h = constrain(gelu(h), (BATCH, LENGTH, MLP))
        h = Dense(width, self.dtype, kernel_init=param_with_axes(init, ("mlp", "embed")),
                  bias_init=param_with_axes(nn.initializers.zeros, ("embed",)), name="output")(h)
        x = LayerNorm(self.dtype, eps=BERT_LN_EPS, name="output_norm")(x + drop(h))
        return constrain(x, (BATCH, LENGTH, EMBED))


class BertEncoder(Transformer):
    """The stack of BertLayers (per layer or scanned, rematerialized by policy, as CLIP's)."""

    dropout: float = 0.0
    attn_dropout: float = 0.0
    deterministic: bool = True

    Block = BertLayer

    def _block_kwargs(self) -> dict:
        return dict(heads=self.heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype, attn_impl=self.attn_impl,
                    dropout=self.dropout, attn_dropout=self.attn_dropout, deterministic=self.deterministic)

    def _draws_dropout(self) -> bool:
        return not self.deterministic and (self.dropout > 0.0 or self.attn_dropout > 0.0)


class BertTextTower(nn.Module):
    """tokens int32 [N, T] ([CLS] ... [SEP], right-padded with ``pad_id``) -> [N, output_dim]."""

    context_length: int = 52
    vocab_size: int = 21128
    width: int = 768
    heads: int = 12
    layers: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    max_positions: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_id: int = 0
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False, embeddings=None, per_token: bool = False):
        """`embeddings` [N, T, width]: in place of the word embeddings of `tokens` (prompt learning).
        per_token: ([N, T, output_dim], every position's last hidden state through the projection; the [CLS]
        index [N])."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [N, T], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be an integer array, got {tokens.dtype}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"tokens have length {length} > context_length {self.context_length}; "
                             f"tokenize with context_length={self.context_length}")

        def table(rows, name, axes=(None, "embed")):
            return nn.Embed(rows, self.width, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            embedding_init=param_with_axes(normal(BERT_INIT_STD), axes))

        words = table(self.vocab_size, "word_embeddings", ("vocab", "embed"))
        x = ((words(tokens) if embeddings is None else embeddings.astype(self.dtype))
             + table(self.max_positions, "position_embeddings")(jnp.arange(length))
             + table(self.type_vocab_size, "token_type_embeddings")(jnp.zeros((1, length), jnp.int32)))
        x = LayerNorm(self.dtype, eps=BERT_LN_EPS, name="embeddings_norm")(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        # Keys are the tokens that are not padding (Chinese-CLIP's mask: ids != [PAD]), right-padded.
        positions = jnp.arange(1, length + 1, dtype=jnp.int32)
        kv_lengths = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=-1)
        cls_index = jnp.zeros(tokens.shape[:1], jnp.int32)
        x = BertEncoder(layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                        attn_impl=self.attn_impl, remat=self.remat, scan=self.scan, dropout=self.dropout,
                        attn_dropout=self.attn_dropout, deterministic=not train, name="encoder")(
            x, None if per_token else cls_index, kv_lengths)
        proj = self.param("text_projection", param_with_axes(normal(self.width**-0.5), ("embed", None)),
                          (self.width, self.output_dim))
        out = x @ proj.astype(self.dtype)
        return (out, cls_index) if per_token else out
