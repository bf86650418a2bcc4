"""clip_jax.preprocess against open_clip's eval transform (fixture), and its errors."""

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

import clip_jax


@pytest.mark.parametrize("key", ["wide", "tall", "small", "gray"])
@pytest.mark.parametrize("size", [24, 32])
def test_matches_open_clip_eval_transform(key, size):
    fx = np.load(f"{FIXTURES}/preprocess.npz")
    ref = fx[f"output_{key}_{size}"]
    for image in (fx[f"input_{key}"], Image.fromarray(fx[f"input_{key}"])):
        out = clip_jax.preprocess(image, image_size=size)
        assert out.shape == (size, size, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_batch_and_errors():
    fx = np.load(f"{FIXTURES}/preprocess.npz")
    batch = clip_jax.preprocess([fx["input_wide"], fx["input_tall"]], image_size=24)
    assert batch.shape == (2, 24, 24, 3)
    with pytest.raises(ValueError, match="uint8"):
        clip_jax.preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="HWC"):
        clip_jax.preprocess(np.zeros((3, 10, 10), np.uint8))
