"""Recall@K against a brute-force loop over every query."""

import numpy as np
import pytest

from clip_jax.evaluate.retrieval import recall_at_k


def brute_force(img, txt, owner, k):
    sims = img @ txt.T
    i2t = np.mean([any(owner[j] == i for j in sorted(range(len(txt)), key=lambda j: (-sims[i, j], j))[:k])
                   for i in range(len(img))])
    t2i = np.mean([owner[t] in sorted(range(len(img)), key=lambda i: (-sims[i, t], i))[:k] for t in range(len(txt))])
    return i2t, t2i


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_equals_brute_force_with_five_captions_per_image():
    rng = np.random.default_rng(0)
    img = unit(rng.standard_normal((30, 8)).astype(np.float32))
    owner = np.repeat(np.arange(30), 5)
    txt = unit(img[owner] + 1.5 * rng.standard_normal((150, 8)).astype(np.float32))  # noisy captions
    got = recall_at_k(img, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(img, txt, owner, k)
        assert got[f"image_to_text_R{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R{k}"] == pytest.approx(t2i)
    assert 0 < got["text_to_image_R1"] < got["text_to_image_R10"] < 1  # a non-trivial case


def test_ties_and_perfect_and_bad_inputs():
    eye = np.eye(4, dtype=np.float32)
    assert recall_at_k(eye, eye, np.arange(4), ks=(1,)) == {"image_to_text_R1": 1.0, "text_to_image_R1": 1.0}
    same = np.ones((4, 2), np.float32) / np.sqrt(2)  # all tied: ranks by index
    got = recall_at_k(same, same, np.arange(4), ks=(1, 4))
    assert got["image_to_text_R1"] == got["text_to_image_R1"] == 0.25 and got["text_to_image_R4"] == 1.0
    with pytest.raises(ValueError, match="one image index per caption"):
        recall_at_k(eye, eye, np.arange(3))
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(eye, eye, np.array([0, 0, 1, 2]))
