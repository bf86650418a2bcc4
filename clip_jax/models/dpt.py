"""A DPT dense head (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") as LSeg uses it.

Four token maps of a ViT's blocks are *reassembled* into an image-like pyramid (LSeg's
`pretrained.act_postprocess{1..4}`): the class token is folded into every patch token by the
"project" readout (Linear(2C -> C) + GELU on [token, cls]), a 1x1 conv maps each to its stage's
width, and the maps are resampled to 4x, 2x, 1x and 1/2x of the token grid (transposed convs of
kernel = stride 4 and 2, identity, a 3x3 conv of stride 2). The *scratch* part (LSeg's
`scratch`) brings each stage to `features` channels (3x3 conv, no bias), fuses them from the
coarsest up with residual conv units (ReLU-conv-BN twice, BatchNorm as LSeg's `use_bn=True`),
each fusion upsampling x2 bilinearly (align_corners=True) before a 1x1 conv, and ends in a 1x1
conv to the embedding width: [N, 8h, 8w, E] for an h x w token grid (half the input for patch 16).

A CNN's four stages (strides 4, 8, 16, 32: DPT's hybrid backbone) are already such a pyramid: with
`scales=(1, 1, 1, 1)` and readout 'ignore' each is only projected to its stage's width.

Layout NHWC; the names follow LSeg's modules (reassemble1..4 / layer1_rn.., refinenet1.., head1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

READOUTS = ("project", "ignore", "add")


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with align_corners=True (corner pixels aligned)."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    low = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - low
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), low] += 1 - frac
    m[np.arange(n_out), low + 1] += frac
    return m


def resize_bilinear(x, height: int, width: int):
    """x [N, H, W, C] -> [N, height, width, C], bilinear with align_corners=True (torch's
    F.interpolate(..., mode='bilinear', align_corners=True), which DPT and LSeg use; jax.image.resize
    aligns pixel centres instead). Two small matmuls: the sizes are static."""
    if (x.shape[1], x.shape[2]) == (height, width):
        return x
    rows = jnp.asarray(_interp_matrix(height, x.shape[1]), x.dtype)
    cols = jnp.asarray(_interp_matrix(width, x.shape[2]), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols)


def _batch_norm(train: bool, name: str):
    # torch's BatchNorm2d defaults (momentum 0.1 is flax's 0.9, eps 1e-5); statistics over the global batch
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ResidualConvUnit(nn.Module):
    """x + BN(conv(relu(BN(conv(relu(x)))))) (LSeg's ResidualConvUnit_custom with bn=True: convs without bias)."""

    features: int
    batch_norm: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = x
        for i in (1, 2):
            out = nn.Conv(self.features, (3, 3), padding=1, use_bias=not self.batch_norm, dtype=self.dtype,
                          name=f"conv{i}")(nn.relu(out))
            if self.batch_norm:
                out = _batch_norm(train, f"bn{i}")(out)
        return out + x


class FeatureFusionBlock(nn.Module):
    """(x [+ RCU1(skip)]) -> RCU2 -> bilinear x2 (align_corners) -> 1x1 conv (LSeg's FeatureFusionBlock_custom)."""

    features: int
    batch_norm: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip=None, train: bool = False):
        if skip is not None:
            x = x + ResidualConvUnit(self.features, self.batch_norm, self.dtype, name="resConfUnit1")(skip, train)
        x = ResidualConvUnit(self.features, self.batch_norm, self.dtype, name="resConfUnit2")(x, train)
        x = resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
        return nn.Conv(self.features, (1, 1), dtype=self.dtype, name="out_conv")(x)


class Reassemble(nn.Module):
    """One stage's tokens [N, h, w, C] (+ the class token [N, C]) -> [N, s*h, s*w, stage_features]."""

    stage_features: int
    scale: float  # 4, 2, 1 or 0.5 of the token grid
    readout: str = "project"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, cls=None):
        width = tokens.shape[-1]
        if self.readout != "ignore":
            if cls is None:
                raise ValueError(f"the DPT readout {self.readout!r} folds in the class token: pass the class tokens "
                                 "[N, width] of each stage, or use readout='ignore'")
            cls = jnp.broadcast_to(cls[:, None, None, :], tokens.shape).astype(tokens.dtype)
            if self.readout == "add":
                tokens = tokens + cls
            else:  # torch's nn.GELU is the exact erf form
                tokens = nn.gelu(nn.Dense(width, dtype=self.dtype, name="readout")(
                    jnp.concatenate([tokens, cls], axis=-1)), approximate=False)
        x = nn.Conv(self.stage_features, (1, 1), dtype=self.dtype, name="project")(tokens)
        if self.scale > 1:
            s = int(self.scale)
            x = nn.ConvTranspose(self.stage_features, (s, s), strides=(s, s), padding="VALID", dtype=self.dtype,
                                 name="resample")(x)
        elif self.scale < 1:
            x = nn.Conv(self.stage_features, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype, name="resample")(x)
        return x


class DPTHead(nn.Module):
    """maps: 4 token maps [N, h, w, C] (shallow to deep), cls: None or 4 class tokens [N, C] ->
    per-pixel features [N, 8h, 8w, out_dim] (not normalized). `scales`: each map's resampling (a ViT's
    one grid: 4, 2, 1, 1/2; a CNN's stages, each half the last: 1, 1, 1, 1), so that the reassembled
    maps halve stage by stage."""

    out_dim: int = 512
    features: int = 256
    stage_features: Sequence[int] = (256, 512, 1024, 1024)  # LSeg's ViT-L/16 (ViT-B/32: 96, 192, 384, 768)
    readout: str = "project"
    batch_norm: bool = True
    scales: Sequence[float] = (4, 2, 1, 0.5)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, maps, cls: Optional[Sequence] = None, train: bool = False):
        if len(maps) != 4 or len(self.stage_features) != 4:
            raise ValueError(f"the DPT head fuses 4 stages: got {len(maps)} token maps and stage_features="
                             f"{tuple(self.stage_features)}")
        if self.readout not in READOUTS:
            raise ValueError(f"DPT readout {self.readout!r} is not one of {READOUTS}")
        sizes = [(int(m.shape[1] * k), int(m.shape[2] * k)) for m, k in zip(maps, self.scales)]
        halving = all(abs(a[0] - 2 * b[0]) <= 1 and abs(a[1] - 2 * b[1]) <= 1 for a, b in zip(sizes, sizes[1:]))
        if len({m.shape[0] for m in maps}) != 1 or not halving or min(sizes[3]) < 1:
            raise ValueError(f"the DPT head fuses 4 maps [N, h, w, C] that, resampled by scales={tuple(self.scales)}, "
                             f"halve stage by stage (a ViT's 4 maps of one grid h, w >= 2 at scales 4, 2, 1, 0.5; a "
                             f"CNN's stages at 1, 1, 1, 1): got {[tuple(m.shape) for m in maps]}")
        cls = cls if cls is not None else [None] * 4
        layers = []
        for k, (m, c, width, scale) in enumerate(zip(maps, cls, self.stage_features, self.scales), start=1):
            x = Reassemble(width, scale, self.readout, self.dtype, name=f"reassemble{k}")(m, c)
            layers.append(nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                                  name=f"layer{k}_rn")(x))
        fuse = lambda k: FeatureFusionBlock(self.features, self.batch_norm, self.dtype, name=f"refinenet{k}")  # noqa: E731
        path = fuse(4)(layers[3], None, train)
        for k in (3, 2, 1):
            if path.shape[1:3] != layers[k - 1].shape[1:3]:  # an odd grid: the halved stage comes back one short
                path = resize_bilinear(path, *layers[k - 1].shape[1:3])
            path = fuse(k)(path, layers[k - 1], train)
        return nn.Conv(self.out_dim, (1, 1), dtype=self.dtype, name="head1")(path)


# The param-name prefixes of LSeg's two optimizer groups: the reassemble ops sit in its `pretrained`
# module (trained at the backbone's rate), the rest in `scratch` (10x).
SCRATCH = r"(layer\d_rn|refinenet\d|head1)"
