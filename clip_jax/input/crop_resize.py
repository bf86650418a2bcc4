"""Crop-and-resize of many boxes of many images in one batched, jitted call: PIL's
``Image.resize((S, S), resample, box=(x1, y1, x2, y2))`` at float precision (PIL's mode 'F' path).

PIL resizes in two separable passes, each a sum over input pixels with coefficients that depend
on the box and the sizes only. The coefficients are built on the host in float64 as PIL builds
them; both passes run on the device as float32 matrix products at full precision (no TF32), and
the result is clipped to [0, 255] once, as the input pipeline clips its bicubic overshoot. A box is
floats in the image's pixels (0..W, 0..H), inside the image.
"""

from __future__ import annotations

import functools

import numpy as np

RESAMPLE = ("bilinear", "bicubic")


def _bilinear(x):
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x):  # a = -0.5, as PIL
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


_FILTERS = {"bilinear": _bilinear, "bicubic": _bicubic}


def coefficients(in_size: int, lo, hi, out_size: int, resample: str = "bicubic", padded: int = 0) -> np.ndarray:
    """float32 [n, out_size, padded or in_size]: PIL's coefficients of each output pixel over the input pixels,
    for n boxes [lo, hi) along an axis of in_size pixels (columns past in_size, padding, get 0)."""
    if resample not in _FILTERS:
        raise ValueError(f"resample={resample!r}: use one of {', '.join(RESAMPLE)}")
    lo = np.asarray(lo, np.float32).reshape(-1, 1, 1)  # PIL takes the box as C floats
    hi = np.asarray(hi, np.float32).reshape(-1, 1, 1)
    scale = (hi - lo).astype(np.float64) / out_size
    filterscale = np.maximum(scale, 1.0)
    center = lo.astype(np.float64) + (np.arange(out_size).reshape(1, -1, 1) + 0.5) * scale
    j = np.arange(in_size, dtype=np.float64).reshape(1, 1, -1)
    # PIL sums the pixels within the filter's support; the filter is 0 outside it, so all pixels may be summed
    w = _FILTERS[resample](((j - center) + 0.5) * (1.0 / filterscale))
    total = w.sum(-1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    if padded > in_size:
        w = np.concatenate([w, np.zeros(w.shape[:2] + (padded - in_size,))], -1)
    return w.astype(np.float32)


def resample(images, index, kx, ky):
    """images [N, H, W, 3] (uint8 or float pixels), index int32 [Q] (the image of each box), kx float32 [Q, S, W],
    ky float32 [Q, S, H] -> float32 [Q, S, S, 3] pixels in [0, 255] (jnp: jit it, or call apply)."""
    import jax
    import jax.numpy as jnp

    picked = images[index].astype(jnp.float32)  # [Q, H, W, 3]
    hp = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("qhwc,qxw->qhxc", picked, kx, precision=hp)  # [Q, H, S, 3]
    return jnp.clip(jnp.einsum("qhxc,qyh->qyxc", rows, ky, precision=hp), 0.0, 255.0)


def apply(images, index, kx, ky):
    """resample, jitted, on the default device."""
    return _jitted()(images, index, kx, ky)


@functools.lru_cache(maxsize=None)
def _jitted():
    import jax

    return jax.jit(resample)


def crop_resize(image: np.ndarray, boxes, size: int, resample: str = "bicubic") -> np.ndarray:
    """[H, W, 3] pixels and boxes [n, 4] (x1, y1, x2, y2) in them -> float32 [n, size, size, 3] (one image: the
    plain form of what region_embeds batches)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = image.shape[:2]
    kx = coefficients(w, boxes[:, 0], boxes[:, 2], size, resample)
    ky = coefficients(h, boxes[:, 1], boxes[:, 3], size, resample)
    return np.asarray(apply(np.asarray(image)[None], np.zeros(len(boxes), np.int32), kx, ky))
