"""Vision Transformer image tower in the OpenAI layout."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.dense import DenseTransformer, check_form, check_layers, to_grid
from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Dtype,
    LayerNorm,
    Transformer,
    constrain,
    heads_major_attention,
    normal,
    param_with_axes,
)

VISION_POOL_TYPES = ("tok", "avg", "map")


def check_images(images, image_size: int):
    """Raise a clear error for images of the wrong size/layout/dtype: on the host for numpy
    inputs, at trace time (before any compile) inside the model."""
    size = f"[N, {image_size}, {image_size}, 3]"
    if images.ndim == 3:
        raise ValueError(f"images must be a batch {size}; got one image {images.shape}: add a batch axis")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (looks NCHW: transpose to NHWC)" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ValueError(f"images must be NHWC float {size}, got shape {images.shape}{hint}")
    if tuple(images.shape[1:3]) != (image_size, image_size):
        raise ValueError(
            f"images are {images.shape[1]}x{images.shape[2]} but the model takes {image_size}x{image_size}: "
            f"resize/crop them (clip_jax.preprocess(image, image_size={image_size})) or pick a preset of that size"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float (normalized), got {images.dtype}: use clip_jax.preprocess")


class AttentionalPooler(nn.Module):
    """Cross-attention of learned queries over the tokens (open_clip's AttentionalPooler).

    query [n_queries, d_model]; tokens are layer-normed (ln_k), queries too (ln_q), then a
    multi-head attention with separate in-projections (key/value dims = context width).
    """

    d_model: int
    heads: int = 8
    n_queries: int = 1
    dtype: Dtype = jnp.float32
    layer_norms: bool = True  # False: no ln_k / ln_q (big_vision's MAP head attends to the raw tokens)

    @nn.compact
    def __call__(self, x):
        context_dim = x.shape[-1]
        head_dim = self.d_model // self.heads
        query = self.param("query", param_with_axes(normal(1.0), (None, "embed")), (self.n_queries, self.d_model))
        q = query.astype(self.dtype)
        if self.layer_norms:
            x = LayerNorm(self.dtype, name="ln_k")(x)
            q = LayerNorm(self.dtype, name="ln_q")(q)

        def proj(name, dim_in, axes_in):
            return self.param(
                name, param_with_axes(normal(dim_in**-0.5), (axes_in, "heads", "kv")), (dim_in, self.heads, head_dim)
            ).astype(self.dtype)

        bias = self.param(
            "in_proj_bias", param_with_axes(nn.initializers.zeros, (None, "heads", "kv")), (3, self.heads, head_dim)
        ).astype(self.dtype)
        # heads-major [batch, heads, length, head_dim]: heads_major_attention's layout
        qh = jnp.einsum("qd,dhk->hqk", q, proj("q_proj_kernel", self.d_model, "embed")) + bias[0, :, None]
        kh = jnp.einsum("btd,dhk->bhtk", x, proj("k_proj_kernel", context_dim, "embed")) + bias[1, :, None]
        vh = jnp.einsum("btd,dhk->bhtk", x, proj("v_proj_kernel", context_dim, "embed")) + bias[2, :, None]
        qh = jnp.broadcast_to(qh, (x.shape[0],) + qh.shape)
        out = heads_major_attention(qh, kh, vh, causal=False).transpose(0, 2, 1, 3)  # [batch, queries, heads, head_dim]
        out_kernel = self.param(
            "out_proj_kernel",
            param_with_axes(normal(self.d_model**-0.5), ("heads", "kv", "embed")),
            (self.heads, head_dim, self.d_model),
        )
        out_bias = self.param("out_proj_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (self.d_model,))
        return jnp.einsum("bqhk,hkd->bqd", out, out_kernel.astype(self.dtype)) + out_bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """The patch embedding (open_clip's conv1, stride = kernel = patch, no bias) as one matmul.

    Same param as a flax nn.Conv named conv1 (``kernel`` [patch, patch, 3, width], HWIO), so
    checkpoints and converters are unchanged. Cutting the image into patches and multiplying
    by the flattened kernel is the same sum; XLA:CPU ran the strided conv at a fraction of its
    matmul speed.
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    use_bias: bool = False  # SigLIP's patch embedding has one

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        batch, height, width, channels = images.shape
        kernel = self.param("kernel", param_with_axes(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                            (p, p, channels, self.width))
        patches = images.astype(self.dtype).reshape(batch, height // p, p, width // p, p, channels)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", constrain(patches, (BATCH,) + (None,) * 5), kernel.astype(self.dtype))
        if self.use_bias:
            x = x + self.param("bias", param_with_axes(nn.initializers.zeros, ("embed",)), (self.width,)).astype(
                self.dtype)
        return x.reshape(batch, (height // p) * (width // p), self.width)


def drop_patches(x, rate: float, rng):
    """x [N, 1 + L, d] (class token first) -> [N, 1 + K, d], K = max(1, int(L * (1 - rate))): the
    class token and K patch tokens per example, a uniform random subset (the top K of Gaussian
    noise, as open_clip's PatchDropout), in their original order."""
    length = x.shape[1] - 1
    keep = max(1, int(length * (1 - rate)))
    noise = jax.random.normal(rng, (x.shape[0], length))
    index = jnp.sort(jax.lax.top_k(noise, keep)[1], axis=-1)
    patches = jnp.take_along_axis(x[:, 1:], index[..., None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)


class VisionTransformer(nn.Module):
    """images NHWC [N, S, S, 3] (normalized) -> image features [N, output_dim] (not normalized).

    pool_type: 'tok' (OpenAI: class token after ln_post), 'avg' (mean of the patch tokens
    after ln_post), 'map' (open_clip's attentional pooler with one learned query, then
    ln_post; the projection is then [output_dim, output_dim]).
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    pool_type: str = "tok"
    attn_pooler_heads: int = 8
    patch_dropout: float = 0.0
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, images, train: bool = False, pooled_too: bool = False, prompts=None, deep_prompts=None,
                 dense: Optional[str] = None, intermediates: Optional[Sequence[int]] = None):
        """In training with patch_dropout r > 0 (FLIP), each image keeps a uniform random
        max(1, int(L * (1 - r))) of its L patch tokens (and the class token), drawn from the
        'dropout' rng; evaluation sees every token. pooled_too: (pooled features before the
        projection [N, width], features) (SLIP's SimCLR head reads the former).
        MaPLe: `prompts` [n, width] are appended after the patch tokens (after the positions,
        before ln_pre); `deep_prompts` (values [layers, n, width], active [layers]) replace those
        last n tokens at the input of each active layer.
        dense ('patch' | 'maskclip'): [N, grid, grid, output_dim] per-patch features instead (models/dense.py);
        intermediates (1-based block indices): [[N, grid, grid, width] patch tokens of each block's output]."""
        check_images(images, self.image_size)
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.pool_type not in VISION_POOL_TYPES:
            raise ValueError(f"vision pool_type {self.pool_type!r} not in {VISION_POOL_TYPES}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        grid = self.image_size // self.patch_size
        scale = self.width**-0.5
        x = PatchEmbed(self.patch_size, self.width, self.dtype, name="conv1")(images)
        cls = self.param("class_embedding", param_with_axes(normal(scale), ("embed",)), (self.width,))
        pos = self.param(
            "positional_embedding", param_with_axes(normal(scale), (None, "embed")), (grid * grid + 1, self.width)
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
        x = constrain(jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype), (BATCH, LENGTH, EMBED))
        if train and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout, self.make_rng("dropout"))
        deep = None
        if prompts is not None:
            n = prompts.shape[0]
            x = jnp.concatenate([x, jnp.broadcast_to(prompts.astype(x.dtype), (x.shape[0], n, self.width))], axis=1)
            if deep_prompts is not None:
                deep = (deep_prompts[0], deep_prompts[1], x.shape[1] - n)
        x = LayerNorm(self.dtype, name="ln_pre")(x)
        if dense is not None or intermediates is not None:
            if prompts is not None:
                raise ValueError("dense outputs of a prompted ViT are not defined: call without prompts")
            if dense is not None and check_form(dense) and self.pool_type == "map":
                raise ValueError("a ViT with pool_type 'map' projects its attention pooler's output, not its tokens: "
                                 "its patch tokens have no place in the joint space (use a 'tok' or 'avg' tower)")
            collect = () if intermediates is None else check_layers(intermediates, self.layers)
            x, maps = DenseTransformer.of_tower(self, causal=False)(x, collect, value_last=dense == "maskclip")
            if intermediates is not None:
                return [to_grid(m[:, 1:], grid) for m in maps]
            x = LayerNorm(self.dtype, name="ln_post")(x[:, 1:])
            proj = self.param("proj", param_with_axes(normal(scale), ("embed", None)), (self.width, self.output_dim))
            return to_grid(x @ proj.astype(self.dtype), grid)
        transformer = Transformer.of_tower(self, causal=False)
        pool_dim = self.width
        if self.pool_type == "map":
            pool_dim = self.output_dim
            pooler = AttentionalPooler(self.output_dim, self.attn_pooler_heads, 1, self.dtype, name="attn_pool")
            x = pooler(transformer(x, deep_prompts=deep))
            pooled = LayerNorm(self.dtype, name="ln_post")(x)[:, 0]
        elif self.pool_type == "avg":
            if prompts is not None:
                raise ValueError("vision prompts with pool_type 'avg' would be averaged in: use a 'tok' tower")
            pooled = LayerNorm(self.dtype, name="ln_post")(transformer(x))[:, 1:].mean(axis=1)
        else:  # the class token: the last layer computes only its row
            pooled = LayerNorm(self.dtype, name="ln_post")(transformer(x, jnp.zeros(x.shape[:1], jnp.int32),
                                                                       deep_prompts=deep))
        proj = self.param("proj", param_with_axes(normal(scale), ("embed", None)), (pool_dim, self.output_dim))
        features = pooled @ proj.astype(self.dtype)
        return (pooled, features) if pooled_too else features

