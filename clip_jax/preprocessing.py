"""CLIP's eval image transform on the host (PIL): resize the shorter side, center crop, normalize.

Matches open_clip's ``image_transform(size, is_train=False)`` (torchvision Resize with
bicubic interpolation on PIL images, CenterCrop, ToTensor, Normalize) pixel for pixel,
but returns NHWC numpy arrays. The tf.data pipeline has its own in-graph version.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

# OpenAI's image normalisation (facts of the released models).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 [H, W] or [H, W, 3|4], got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"array images must be [H, W] or [H, W, 3|4] (HWC), got shape {arr.shape}")
    return Image.fromarray(arr)


def preprocess_one(image, image_size: int = 224, mean=MEAN, std=STD) -> np.ndarray:
    """One PIL image or uint8 array -> float32 [image_size, image_size, 3], normalized."""
    from PIL import Image

    img = _to_pil(image)
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"empty image of size {w}x{h}")
    # torchvision Resize(int): the shorter side becomes image_size, the longer one is truncated.
    if w <= h:
        new_w, new_h = image_size, int(image_size * h / w)
    else:
        new_w, new_h = int(image_size * w / h), image_size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size)).convert("RGB")
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess(images: Union[object, Sequence[object]], image_size: int = 224, mean=MEAN, std=STD) -> np.ndarray:
    """The eval transform: one image -> [S, S, 3]; a list of images -> [N, S, S, 3] (float32 NHWC)."""
    if isinstance(images, (list, tuple)):
        return np.stack([preprocess_one(im, image_size, mean, std) for im in images])
    return preprocess_one(images, image_size, mean, std)


def model_images(images):
    """A batch of images as the towers take them: uint8 ones (image_dtype='uint8') normalized on the
    device, float ones (normalized by the input pipeline) as they are."""
    import jax.numpy as jnp

    return normalize_images(images) if images.dtype == jnp.uint8 else images


def normalize_images(images):
    """uint8 NHWC from the input pipeline (image_dtype='uint8') -> float32 normalized, in jnp.

    Run inside the jitted step, so the host ships 1 byte per channel instead of 4."""
    import jax.numpy as jnp

    scale = jnp.asarray([1.0 / (255.0 * s) for s in STD], jnp.float32)
    offset = jnp.asarray([-m / s for m, s in zip(MEAN, STD)], jnp.float32)
    return images.astype(jnp.float32) * scale + offset
