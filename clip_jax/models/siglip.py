"""SigLIP's towers (big_vision's two-tower model; transformers' SiglipModel; open_clip's timm SigLIP).

Image: a patch embedding with a bias, learned positions, no class token and no ln_pre, pre-LN blocks,
ln_post, then the MAP head (one learned probe attending over the tokens, then x + MLP(LN(x))); the
pooled token is the embedding (no projection: embed_dim is the image width). Text: token and
position embeddings, a bidirectional pre-LN stack over every position, ln_final, the last position
pooled, then a Linear head with a bias. Both: LayerNorm eps 1e-6, GELU's tanh approximation.

The blocks are CLIP's (``layers.Transformer``, ``vit.PatchEmbed``, ``vit.AttentionalPooler``), so
scan, remat, dtype, the attention kernels and the logical axes behave as in the other towers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.dense import DenseTransformer, MAPValueHead, check_form, check_layers, to_grid
from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Dense,
    Dtype,
    LayerNorm,
    Mlp,
    Transformer,
    constrain,
    normal,
    param_with_axes,
)
from clip_jax.models.text import check_tokens, embed_tokens
from clip_jax.models.vit import AttentionalPooler, PatchEmbed, check_images

SIGLIP_LN_EPS = 1e-6  # flax's LayerNorm default, which big_vision's SigLIP was trained with
SIGLIP_ACT = "gelu_tanh"  # flax's nn.gelu default (approximate=True)
# The normalization of every tower's input in clip_jax (clip_jax.preprocessing's MEAN and STD, tested equal:
# models import nothing outside models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_to_siglip_pixels(images):
    """Images normalized with CLIP's mean and std -> SigLIP's input, the pixels in [0, 1] mapped to [-1, 1]
    (one multiply-add per channel: 2 (x std + mean) - 1)."""
    scale = jnp.asarray([2.0 * s for s in CLIP_STD], jnp.float32)
    offset = jnp.asarray([2.0 * m - 1.0 for m in CLIP_MEAN], jnp.float32)
    return images.astype(jnp.float32) * scale + offset


class MAPHead(nn.Module):
    """big_vision's multihead attention pooling: a learned probe attends over the tokens (no
    LayerNorm before), then probe + MLP(LN(probe)); [N, L, D] -> [N, D]."""

    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = AttentionalPooler(width, self.heads, 1, self.dtype, layer_norms=False, name="attn")(x)
        y = LayerNorm(self.dtype, eps=SIGLIP_LN_EPS, name="ln")(x)
        x = x + Mlp(int(width * self.mlp_ratio), dtype=self.dtype, act=SIGLIP_ACT, name="mlp")(y)
        return x[:, 0]


class SiglipVisionTransformer(nn.Module):
    """images NHWC [N, S, S, 3], normalized as for every clip_jax tower (clip_jax.preprocess, the input
    pipeline: CLIP's mean and std) -> image features [N, width] (not normalized). The tower maps them to
    the [-1, 1] pixels SigLIP was trained on first, so the input pipeline and the evaluations stay one."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    quick_gelu: bool = False  # unused (the act below): Transformer.of_tower's common field
    act: str = SIGLIP_ACT
    ln_eps: float = SIGLIP_LN_EPS
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, images, train: bool = False, pooled_too: bool = False, dense: Optional[str] = None,
                 intermediates: Optional[Sequence[int]] = None):
        """pooled_too: (pooled features, features), the same array here: SigLIP has no image projection.
        dense: 'maskclip' only, [N, grid, grid, width]: each token after ln_post through the MAP head's value
        path (dense.MAPValueHead); 'patch' is an error (the MAP head is a cross-attention, no per-token map).
        intermediates (1-based block indices): [[N, grid, grid, width] tokens of each block's output]."""
        del train  # no dropout, no patch dropout
        check_images(images, self.image_size)
        grid = self.image_size // self.patch_size
        # a 'VALID' strided conv, as big_vision's: the rows and columns past the last whole patch are not seen
        # (So400m/14 at 384 pixels: 27 patches of 14)
        images = clip_to_siglip_pixels(images[:, : grid * self.patch_size, : grid * self.patch_size])
        x = PatchEmbed(self.patch_size, self.width, self.dtype, use_bias=True, name="conv1")(images)
        pos = self.param("positional_embedding", param_with_axes(normal(self.width**-0.5), (None, "embed")),
                         (grid * grid, self.width))
        x = constrain(x + pos.astype(self.dtype), (BATCH, LENGTH, EMBED))
        if dense is not None or intermediates is not None:
            if dense is not None and check_form(dense) == "patch":
                raise ValueError("a SigLIP image tower has no per-token head into the joint space (its MAP head "
                                 "attends over all tokens): use form='maskclip', the head's value path per token")
            collect = () if intermediates is None else check_layers(intermediates, self.layers)
            x, maps = DenseTransformer.of_tower(self, causal=False)(x, collect)
            if intermediates is not None:
                return [to_grid(m, grid) for m in maps]
            x = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_post")(x)
            return to_grid(MAPValueHead(self.heads, self.mlp_ratio, self.ln_eps, self.act, self.dtype,
                                        name="attn_pool")(x), grid)
        x = Transformer.of_tower(self, causal=False)(x)
        x = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_post")(x)
        pooled = MAPHead(self.heads, self.mlp_ratio, self.dtype, name="attn_pool")(x)
        return (pooled, pooled) if pooled_too else pooled


class SiglipTextTransformer(nn.Module):
    """tokens int32 [N, T] (right-padded, EOS last before the padding) -> text features [N, output_dim].

    The last position is pooled: SigLIP's tokenizer pads with EOS ("sticky" EOS), so it is an EOS at
    every length; tokens shorter than context_length pool their own last position.
    """

    context_length: int = 64
    vocab_size: int = 32000
    width: int = 768
    heads: int = 12
    layers: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 768
    quick_gelu: bool = False  # unused (the act below): Transformer.of_tower's common field
    act: str = SIGLIP_ACT
    ln_eps: float = SIGLIP_LN_EPS
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False, embeddings=None, per_token: bool = False):
        """`embeddings` [N, T, width]: in place of the token embeddings of `tokens` (prompt learning).
        per_token: ([N, T, output_dim], every position through ln_final and the head; the pooled index [N])."""
        del train  # no dropout
        check_tokens(tokens, self.context_length)
        length = tokens.shape[1]
        x = embed_tokens(self, tokens, embeddings, pos_std=self.width**-0.5)
        index = jnp.full(tokens.shape[:1], length - 1, jnp.int32)
        # the last layer computes only the last position's row (every row per_token)
        x = Transformer.of_tower(self, causal=False)(x, None if per_token else index)
        x = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_final")(x)
        x = Dense(self.output_dim, self.dtype, kernel_init=param_with_axes(normal(self.width**-0.5), ("embed", None)),
                  bias_init=param_with_axes(nn.initializers.zeros, (None,)), name="head")(x)
        return (x, index) if per_token else x
