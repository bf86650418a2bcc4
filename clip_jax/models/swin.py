"""Swin Transformer image tower (Swin-T of GLIP-T), in timm 1.x's layout and NHWC.

A 4x4 patch embedding with LayerNorm, then stages of window-attention blocks (every odd block's
windows shifted by half a window, with the attention mask of the cyclic shift, and a relative
position bias per head), a 2x2 patch merging (LayerNorm, then a linear reduction, timm 1.x) at the
start of every stage but the first, a final LayerNorm. Its outputs: the four stage maps (as timm's
``features_only``), and the mean of the final-norm map through a linear projection (a CLIP tower).

Any input size whose sides are multiples of the patch, by GLIP's rule (``swint.py``, from Swin's
detection code): each block pads its normalized map with zeros to a multiple of the window, then
rolls it, takes its windows with the shift mask computed on the padded size, and crops back; the
padded tokens are attended as any others (that code masks nothing else), odd sides are padded before
a merge. The window and its shift are kept where a stage's map is no larger than the window, as GLIP
does, while timm 1.0.31 then makes the map one unshifted window (``clamp_window=True``: equal to timm
where no stage map is smaller than the window or a non-multiple of it, 224 px included). GLIP's
detector puts a LayerNorm on each stage map but the first: that is the detector's, not this tower's.
Weights come from timm's state dict by ``clip_jax.convert_timm.params_from_timm``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.dense import check_form
from clip_jax.models.layers import (
    BATCH,
    Dense,
    Dtype,
    LayerNorm,
    constrain,
    drop_path,
    drop_path_rates,
    gelu,
    param_with_axes,
)
from clip_jax.models.vit import PatchEmbed

# timm's init of every Linear and of the relative position tables
_init = nn.initializers.truncated_normal(0.02)
_MASKED = -100.0  # Swin's additive mask between tokens of different regions of a shifted window


def check_images(images, patch_size: int):
    """A clear error, at trace time, for images that are not NHWC float with 3 channels and sides that are
    multiples of the patch."""
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (looks NCHW: transpose to NHWC)" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ValueError(f"a Swin image tower takes NHWC float images [N, H, W, 3], got shape {images.shape}{hint}")
    if images.shape[1] % patch_size or images.shape[2] % patch_size:
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}: a Swin tower's sides must be multiples of "
                         f"its patch {patch_size}; pad or resize them to one")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float (normalized), got {images.dtype}: use clip_jax.preprocess")


def window_geometry(size: Tuple[int, int], window: int, shifted: bool, clamp: bool):
    """((window h, w), (shift h, w)) of a block on a map of `size`: GLIP's (the window and half of it as the shift,
    always), or with `clamp` timm's (a side no larger than the window is one unshifted window)."""
    shift = window // 2 if shifted else 0
    if not clamp:
        return (window, window), (shift, shift)
    return tuple(min(s, window) for s in size), tuple(0 if s <= window else shift for s in size)


def shift_mask(padded: Tuple[int, int], win: Tuple[int, int], shift: Tuple[int, int]) -> np.ndarray:
    """[windows, N, N] additive mask of a shifted block on the padded map: -100 between tokens from different
    regions of the rolled map (Swin's img_mask construction)."""
    regions = np.zeros(padded, np.float32)
    count = 0
    for hs in (slice(0, -win[0]), slice(-win[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -win[1]), slice(-win[1], -shift[1]), slice(-shift[1], None)):
            regions[hs, ws] = count
            count += 1
    ids = partition(regions[None, :, :, None], win)[0, :, :, 0]  # [windows, N]
    return np.where(ids[:, None, :] != ids[:, :, None], _MASKED, 0.0).astype(np.float32)


def partition(x, win: Tuple[int, int]):
    """[B, H, W, C] -> [B, windows, wh * ww, C], windows in row-major order (numpy or jax arrays)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // win[0], win[0], w // win[1], win[1], c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // win[0]) * (w // win[1]), win[0] * win[1], c)


def unpartition(x, win: Tuple[int, int], h: int, w: int):
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // win[0], w // win[1], win[0], win[1], c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_index(win: Tuple[int, int], window: int) -> np.ndarray:
    """[N, N] rows of the (2 window - 1)^2 relative position table for the token pairs of a (wh, ww) window."""
    coords = np.stack(np.meshgrid(np.arange(win[0]), np.arange(win[1]), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + window - 1) * (2 * window - 1) + rel[1] + window - 1


class WindowAttention(nn.Module):
    """Multi-head attention within each window, with the relative position bias (and a shift mask)."""

    heads: int
    window: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, win: Tuple[int, int], mask: Optional[np.ndarray]):
        b, nw, n, c = x.shape
        hd = c // self.heads
        table = self.param("relative_position_bias_table", param_with_axes(_init, (None, None)),
                           ((2 * self.window - 1) ** 2, self.heads))
        bias = table[relative_index(win, self.window)].transpose(2, 0, 1)  # [heads, N, N]
        qkv = Dense(3 * c, self.dtype, kernel_init=param_with_axes(_init, ("embed", "mlp")),
                    bias_init=param_with_axes(nn.initializers.zeros, ("mlp",)), name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, nw, n, 3, self.heads, hd), 3, 0)
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * hd**-0.5, k, preferred_element_type=jnp.float32)
        logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = logits + mask[None, :, None]
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, c)
        return Dense(c, self.dtype, kernel_init=param_with_axes(_init, ("mlp", "embed")),
                     bias_init=param_with_axes(nn.initializers.zeros, ("embed",)), name="proj")(out)


class SwinBlock(nn.Module):
    heads: int
    window: int
    shifted: bool
    clamp: bool = False
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    def _dropped(self, y, train: bool):
        return drop_path(self, y, self.drop_path, train)

    @nn.compact
    def __call__(self, x, train: bool):
        b, h, w, c = x.shape
        win, shift = window_geometry((h, w), self.window, self.shifted, self.clamp)
        hp, wp = math.ceil(h / win[0]) * win[0], math.ceil(w / win[1]) * win[1]
        # GLIP's order: normalize, pad with zeros, roll; the mask is the padded map's
        y = jnp.pad(LayerNorm(self.dtype, name="norm1")(x), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2)) if any(shift) else y
        mask = shift_mask((hp, wp), win, shift) if any(shift) else None
        y = WindowAttention(self.heads, self.window, self.dtype, name="attn")(partition(y, win), win, mask)
        y = unpartition(y, win, hp, wp)
        y = jnp.roll(y, shift, axis=(1, 2)) if any(shift) else y
        x = x + self._dropped(y[:, :h, :w], train)
        y = LayerNorm(self.dtype, name="norm2")(x)
        y = Dense(int(c * self.mlp_ratio), self.dtype, kernel_init=param_with_axes(_init, ("embed", "mlp")),
                  bias_init=param_with_axes(nn.initializers.zeros, ("mlp",)), name="fc1")(y)
        y = Dense(c, self.dtype, kernel_init=param_with_axes(_init, ("mlp", "embed")),
                  bias_init=param_with_axes(nn.initializers.zeros, ("embed",)), name="fc2")(gelu(y))
        return constrain(x + self._dropped(y, train), (BATCH, None, None, None))


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: odd sides padded with zeros, each 2x2 cell's tokens
    concatenated as (0, 0), (1, 0), (0, 1), (1, 1) (row, column), LayerNorm, linear reduction without bias."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = LayerNorm(self.dtype, name="norm")(x)
        kernel = self.param("reduction", param_with_axes(_init, (None, "embed")), (4 * c, 2 * c))
        return jnp.einsum("bhwc,cd->bhwd", x, kernel.astype(self.dtype))


class SwinStage(nn.Module):
    depth: int
    heads: int
    window: int
    downsample: bool
    drop_paths: Tuple[float, ...]
    clamp: bool = False
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.downsample:
            x = PatchMerging(self.dtype, name="downsample")(x)
        block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
        for j in range(self.depth):
            x = block(self.heads, self.window, j % 2 == 1, self.clamp, self.mlp_ratio, self.drop_paths[j],
                      self.dtype, name=f"blocks_{j}")(x, train)
        return x


class SwinPatchEmbed(nn.Module):
    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        n, h, w, _ = images.shape
        x = PatchEmbed(self.patch_size, self.width, self.dtype, use_bias=True, name="proj")(images)
        x = x.reshape(n, h // self.patch_size, w // self.patch_size, self.width)
        return LayerNorm(self.dtype, name="norm")(x)


class SwinTransformer(nn.Module):
    """images NHWC [N, H, W, 3] (sides multiples of the patch) -> features [N, output_dim] (not normalized).

    Params: patch_embed, layers_{i} (downsample, blocks_{j}), norm, and proj [width * 2^(stages-1), output_dim]
    where output_dim is set (no projection: the pooled features are the output). drop_path: the last block's
    stochastic-depth rate, linear from 0 over all blocks (timm's and GLIP's rule), in training only.
    """

    depths: Sequence[int] = (2, 2, 6, 2)
    heads: Sequence[int] = (3, 6, 12, 24)
    width: int = 96
    patch_size: int = 4
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    output_dim: Optional[int] = None
    clamp_window: bool = False  # timm's rule for maps no larger than the window (module docstring)
    dtype: Dtype = jnp.float32
    remat: str = "none"  # 'none' or other: rematerialize each block in the backward pass

    def setup(self):
        if len(self.depths) != len(self.heads):
            raise ValueError(f"Swin depths {tuple(self.depths)} and heads {tuple(self.heads)} need one entry per stage")
        for i, heads in enumerate(self.heads):
            if (self.width * 2**i) % heads:
                raise ValueError(f"Swin stage {i + 1}: width {self.width * 2**i} is not divisible by heads {heads}")
        rates = drop_path_rates(self.drop_path, sum(self.depths))
        starts = np.cumsum([0] + list(self.depths)).tolist()
        self.patch_embed = SwinPatchEmbed(self.patch_size, self.width, self.dtype)
        self.layers = [SwinStage(depth, heads, self.window_size, i > 0, tuple(rates[starts[i]:starts[i + 1]]),
                                 self.clamp_window, self.mlp_ratio, self.dtype, self.remat != "none")
                       for i, (depth, heads) in enumerate(zip(self.depths, self.heads))]
        self.norm = LayerNorm(self.dtype)
        if self.output_dim:
            features = self.width * 2 ** (len(self.depths) - 1)
            self.proj = self.param("proj", param_with_axes(nn.initializers.normal(features**-0.5), ("embed", None)),
                                   (features, self.output_dim))

    def stages(self, images, train: bool = False, upto: Optional[int] = None):
        """The maps of stages 1..upto (all by default), [N, H/(p 2^i), W/(p 2^i), width 2^i] for stage i + 1
        (sides rounded up), NHWC in the compute dtype: timm's features_only outputs."""
        check_images(images, self.patch_size)
        x = self.patch_embed(constrain(images.astype(self.dtype), (BATCH, None, None, None)))
        maps = []
        for stage in self.layers[:upto]:
            x = stage(x, train)
            maps.append(x)
        return maps

    def forward_features(self, images, train: bool = False):
        """The last stage's map through the final norm (timm's forward_features)."""
        return self.norm(self.stages(images, train)[-1])

    def __call__(self, images, train: bool = False, pooled_too: bool = False, dense: Optional[str] = None,
                 intermediates: Sequence[int] = ()):
        """pooled_too: (the mean of the final-norm map [N, width 2^(stages-1)], float32; the features).
        dense 'patch': every position of the final-norm map through the projection, [N, h, w, output_dim].
        intermediates (stage numbers, 1-based): those stages' maps (`stages`), later stages not run."""
        wanted = tuple(int(i) for i in intermediates)
        if wanted:
            if not all(1 <= i <= len(self.depths) for i in wanted):
                raise ValueError(f"intermediates={wanted}: a Swin tower's stages are 1..{len(self.depths)}")
            maps = self.stages(images, train, max(wanted))
            return [maps[i - 1] for i in wanted]
        if dense is not None and check_form(dense) != "patch":
            raise ValueError(f"dense form {dense!r}: a Swin tower ends in no attention to take MaskCLIP's value path "
                             "of; use 'patch'")
        x = self.forward_features(images, train)
        proj = self.proj.astype(self.dtype) if self.output_dim else None
        if dense is not None:
            return x if proj is None else jnp.einsum("bhwc,cd->bhwd", x, proj)
        pooled = x.astype(jnp.float32).mean(axis=(1, 2))
        features = pooled.astype(self.dtype) @ proj if proj is not None else pooled
        return (pooled, features) if pooled_too else features


def vision_tower(clip) -> nn.Module:
    """The image tower of a CLIP module whose vision_cfg kind is 'swin'."""
    v = clip.config.vision
    if not v.patch_size or not v.window_size:
        raise ValueError("a Swin image tower (vision_cfg kind 'swin') needs patch_size and window_size (Swin-T: 4, 7)")
    if not v.stage_depths or len(v.stage_depths) != len(v.stage_heads):
        raise ValueError(f"a Swin image tower needs stage_depths and stage_heads, one per stage (Swin-T: [2, 2, 6, 2] "
                         f"and [3, 6, 12, 24]); got {list(v.stage_depths)} and {list(v.stage_heads)}")
    if sum(v.stage_depths) != v.layers:
        raise ValueError(f"vision_cfg layers={v.layers} must be the sum of stage_depths {list(v.stage_depths)}")
    if v.pool_type != "avg":
        raise ValueError(f"pool_type={v.pool_type!r}: a Swin tower pools by the mean of its last map; set 'avg'")
    if v.patch_dropout:
        raise ValueError(f"patch_dropout={v.patch_dropout}: the Swin image tower has no patch dropout; set it to 0")
    if not 0 <= v.drop_path < 1:
        raise ValueError(f"vision_cfg drop_path={v.drop_path} is a rate: give one in [0, 1) (GLIP-T's 0.2)")
    return SwinTransformer(depths=tuple(v.stage_depths), heads=tuple(v.stage_heads), width=v.width,
                           patch_size=v.patch_size, window_size=v.window_size, mlp_ratio=v.mlp_ratio,
                           drop_path=v.drop_path, output_dim=clip.config.embed_dim, dtype=clip.dtype,
                           remat=clip.remat)
