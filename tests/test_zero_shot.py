"""Zero-shot classifier weights and logits equal open_clip's own zero-shot code (fixture), and
the shipped class-name / template files are well formed."""

import json
import os

import numpy as np
import pytest
from random_weights import random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.evaluate.zero_shot import classifier_weights, load_metadata, per_class_accuracy, topk_accuracy

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "clip_jax", "assets", "zero_shot")


def test_classifier_and_logits_equal_open_clip():
    """open_clip.build_zero_shot_classifier on the same random ViT-Tiny-test weights (make_zero_shot_fixture.py)."""
    fx = np.load(os.path.join(FIXTURES, "zero_shot_vit_tiny.npz"))
    model = clip_jax.create_model(str(fx["model"]))
    state_dict = random_state_dict(convert.expected_state_dict_shapes(model), int(fx["seed"]))
    params = convert.state_dict_to_variables(model, state_dict)
    classnames, templates = [str(c) for c in fx["classnames"]], [str(t) for t in fx["templates"]]
    weights = classifier_weights(model, params, [[t.format(c) for t in templates] for c in classnames])  # [C, d]
    np.testing.assert_allclose(weights.T, fx["classifier"], atol=1e-4)  # open_clip keeps [d, C]
    image_features = clip_jax.encode_image(model, params, fx["images"])
    np.testing.assert_allclose(image_features, fx["image_features"], atol=1e-4)
    np.testing.assert_allclose(100.0 * image_features @ weights.T, fx["logits"], atol=1e-4 * 100)


@pytest.mark.parametrize("name,classes,templates", [("imagenet", 1000, 80), ("cifar10", 10, 18), ("cifar100", 100, 18)])
def test_shipped_class_names_and_templates(name, classes, templates):
    with open(os.path.join(ASSETS, f"{name}.json")) as f:
        meta = json.load(f)
    assert len(meta["classnames"]) == classes and len(meta["templates"]) == templates
    assert all(t.count("{}") == 1 for t in meta["templates"])
    assert all(c.strip() == c and c for c in meta["classnames"])


def test_topk_and_per_class_accuracy_against_a_loop():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 12))
    labels = rng.integers(0, 12, 200)
    got = topk_accuracy(logits, labels, ks=(1, 5))
    for k in (1, 5):
        want = np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(200)])
        assert got[f"top{k}"] == pytest.approx(want)
    per_class = per_class_accuracy(logits, labels)
    for c in range(12):
        rows = labels == c
        assert per_class[c] == pytest.approx(np.mean(np.argmax(logits[rows], 1) == c))


def test_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no zero-shot class names for 'nope'"):
        load_metadata("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classnames": ["cat"], "templates": ["a photo"]}))
    with pytest.raises(ValueError, match="exactly one"):
        load_metadata(str(bad))
    assert len(load_metadata("cifar10")["classnames"]) == 10
