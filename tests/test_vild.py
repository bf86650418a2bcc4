"""ViLD: the detector's target rules against torchvision's (Matcher, BalancedPositiveNegativeSampler,
MultiScaleRoIAlign), ViLD's formulas against numpy (logits, ensemble, distillation), the frozen classifier
against the text tower computed directly and unchanged by training, and a finite loss on degenerate batches."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_reference
from tiny import tiny_config, tiny_run

from clip_jax.methods.vild import HEAD, ViLD, distill_l1, ensemble_scores, region_logits
from clip_jax.models import detector as det
from clip_jax.tokenizers import tokenizer_for

SMALL = dict(fpn_width=8, head_convs=1, head_conv_dim=8, head_fcs=1, head_fc_dim=16, rpn_batch=32, roi_batch=16,
             rpn_pre_nms=100, rpn_post_nms=20, test_rpn_pre_nms=100, test_rpn_post_nms=20, anchor_scale=4.0,
             canonical_size=32.0, max_objects=4, max_regions=3, detections=10,
             templates=("a {}.", "a photo of a {}."))


def _config(**vild):
    c = tiny_config(model="RN-Tiny-test", optimizer="sgd", learning_rate=0.05, warmup_steps=0, weight_decay=1e-4,
                    weight_decay_on="all", grad_clip_norm=0.0)
    c.method, c.batch_size = "vild", 2
    c.vild.update({**SMALL, **vild})
    return c


def _batch(n=2, seed=0, size=64, embed=32):
    rng = np.random.default_rng(seed)
    boxes = np.zeros((n, 4, 4), np.float32)
    boxes[:, 0] = [6, 8, 22, 30]
    boxes[:, 1] = [34, 30, 60, 50]
    return {"image": rng.integers(0, 255, (n, size, size, 3)).astype(np.uint8), "boxes": boxes,
            "boxes/labels": np.array([[0, 5, -1, -1]] * n, np.int32),
            "boxes/valid": np.array([[True, True, False, False]] * n),
            "regions": np.concatenate([rng.uniform(0, 30, (n, 3, 2)), rng.uniform(34, 64, (n, 3, 2))], -1)
            .astype(np.float32),
            "regions/embeds": rng.normal(size=(n, 3, embed)).astype(np.float32),
            "regions/valid": np.array([[True, True, False]] * n)}


def test_vild_formulas_equal_numpy():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    regions, classes, background = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(3, 8))), rng.normal(size=8)
    want = 100 * regions @ np.concatenate([unit(background)[None], classes]).T
    np.testing.assert_allclose(region_logits(regions, classes, background, 100.0), want, rtol=1e-5, atol=1e-4)

    p_text, p_img = rng.uniform(size=(5, 3)), rng.uniform(size=(5, 3))
    novel = np.array([False, True, False])
    want = np.where(novel, p_text ** (1 / 3) * p_img ** (2 / 3), p_text ** (2 / 3) * p_img ** (1 / 3))
    np.testing.assert_allclose(ensemble_scores(p_text, p_img, novel, 2 / 3), want, rtol=1e-5)

    teacher, valid = rng.normal(size=(2, 4, 8)), np.array([[True, False, True, True], [False] * 4])
    student = unit(rng.normal(size=(2, 4, 8)))
    want = np.abs(student - unit(teacher)).sum(-1)[valid].mean()  # the mean L1 over valid regions only
    np.testing.assert_allclose(distill_l1(student, teacher, valid), want, rtol=1e-5)
    assert float(distill_l1(student, teacher, np.zeros((2, 4), bool))) == 0.0


TORCH_SIDE = """
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import MultiScaleRoIAlign
iou = torch.tensor(inputs["iou"])
for name, high, low, low_quality in (("rpn", 0.7, 0.3, True), ("roi", 0.5, 0.5, False)):
    outputs[name] = Matcher(high, low, allow_low_quality_matches=low_quality)(iou).numpy()
label = torch.tensor(inputs["label"])
for i, (num, fraction) in enumerate(((64, 0.25), (16, 0.5), (4000, 0.25))):
    pos, neg = BalancedPositiveNegativeSampler(min(num, len(label)), fraction)([label])
    outputs[f"counts{i}"] = torch.tensor([int(pos[0].sum()), int(neg[0].sum())]).numpy()
levels = (2, 3, 4, 5)
pooler = MultiScaleRoIAlign([f"p{k}" for k in levels], 7, 2, canonical_scale=32, canonical_level=4)
feats = {f"p{k}": torch.tensor(inputs[f"p{k}"]).permute(0, 3, 1, 2) for k in levels}
boxes = torch.tensor(inputs["boxes"])
outputs["pooled"] = pooler(feats, [boxes[:6], boxes[6:]], [(64, 64), (64, 64)]).permute(0, 2, 3, 1).numpy()
"""
SAMPLES = ((64, 0.25), (16, 0.5), (4000, 0.25))


@pytest.fixture(scope="module")
def torch_side():
    """The reference's matches, sample counts and pooled regions for the inputs below (one torch process)."""
    from clip_jax.models import box_ops

    rng = np.random.default_rng(1)
    anchors = np.asarray(det.pyramid_anchors(64, (2, 3, 4), 2.0, (0.5, 1.0, 2.0)))
    xy = rng.uniform(0, 44, (5, 2))
    gt = np.concatenate([xy, xy + rng.uniform(6, 20, (5, 2))], 1).astype(np.float32)
    label = rng.choice([-1, 0, 0, 0, 1], size=2000).astype(np.int64)  # sampling: more candidates than any batch
    maps = {f"p{k}": rng.normal(size=(2, 64 // 2 ** k, 64 // 2 ** k, 3)).astype(np.float32) for k in (2, 3, 4, 5)}
    xy = rng.uniform(-4, 50, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (12, 2))], 1).astype(np.float32)
    inputs = dict(iou=np.asarray(box_ops.box_iou(gt, anchors)), label=label, boxes=boxes, **maps)
    return dict(anchors=anchors, gt=gt, **inputs), torch_reference(TORCH_SIDE, **inputs)


def test_matching_follows_torchvisions_matcher(torch_side):
    data, ref = torch_side
    padded = np.concatenate([data["gt"], np.zeros((3, 4), np.float32)])  # padding rows never match
    valid = np.arange(8) < 5
    for name, high, low, low_quality in (("rpn", 0.7, 0.3, True), ("roi", 0.5, 0.5, False)):
        index, label = det.match(data["anchors"], padded, valid, high, low, low_quality)
        want = ref[name]
        np.testing.assert_array_equal(np.asarray(label), np.where(want >= 0, 1, np.where(want == -1, 0, -1)))
        np.testing.assert_array_equal(np.asarray(index)[want >= 0], want[want >= 0])


def test_sampling_takes_torchvisions_counts_from_the_right_sets(torch_side):
    data, ref = torch_side
    label = data["label"]
    for i, (num, fraction) in enumerate(SAMPLES):
        pick, ok = det.sample(jax.random.key(3), jnp.asarray(label, jnp.int32), num, fraction)
        chosen = np.asarray(pick)[np.asarray(ok)]
        assert len(set(chosen.tolist())) == len(chosen)  # no candidate twice
        np.testing.assert_array_equal([(label[chosen] == 1).sum(), (label[chosen] == 0).sum()], ref[f"counts{i}"])


def test_multilevel_roi_align_equals_torchvisions_multiscale_pooler(torch_side):
    data, ref = torch_side
    levels = (2, 3, 4, 5)
    index = np.repeat(np.arange(2), 6).astype(np.int32)
    got = det.multilevel_roi_align([jnp.asarray(data[f"p{k}"]) for k in levels], levels, jnp.asarray(data["boxes"]),
                                   jnp.asarray(index), 7, canonical_size=32.0, canonical_level=4, aligned=False)
    np.testing.assert_allclose(np.asarray(got), ref["pooled"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def run():
    return tiny_run(_config())


def test_the_frozen_classifier_is_the_text_towers_and_training_leaves_it_bit_identical(run):
    method, state = run.method, run.state
    params = jax.device_get(state.params)
    config = run.config
    texts = [t.format(c) for c in ("circle", "square", "triangle", "diamond") for t in config.vild.templates]
    tokens = np.asarray(tokenizer_for(method.model.config.text)(texts, method.model.config.text.context_length))
    towers = {k: v for k, v in params.items() if k != HEAD}
    text = np.asarray(method.model.apply({"params": towers}, tokens, method="encode_text")).reshape(4, 2, -1)
    mean = text.mean(1)
    np.testing.assert_allclose(params[HEAD]["classifier"], mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    before = np.array(params[HEAD]["classifier"])
    batch = {k: v for k, v in _batch().items() if k in method.batch_keys}
    for _ in range(2):
        state, metrics = run.step_fn(state, jax.device_put(batch, run.batch_sharding))
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after[HEAD]["classifier"], before)  # bit-identical
    assert not np.array_equal(after[HEAD]["background"], params[HEAD]["background"])  # the background trains
    assert np.isfinite(float(jax.device_get(metrics["loss"])))


def test_the_loss_is_finite_on_batches_without_boxes_or_regions():
    config = _config(ensemble=True)  # both branches: the image one distilled, the two scores combined at inference
    method = ViLD(config, *_model_and_mesh(config))
    variables = jax.jit(method.start_variables)(nn.meta.unbox(jax.jit(method.init)(jax.random.key(0))))
    batch = _batch()
    empty = dict(batch, **{"boxes": np.zeros_like(batch["boxes"]), "boxes/valid": np.zeros_like(batch["boxes/valid"]),
                           "boxes/labels": np.full_like(batch["boxes/labels"], -1),
                           "regions/valid": np.zeros_like(batch["regions/valid"])})
    novel_only = dict(batch, **{"boxes/labels": np.array([[3, 4, -1, -1]] * 2, np.int32)})  # star, cross: no truth
    state = {k: v for k, v in variables.items() if k != "params"}
    for b in (batch, empty, novel_only):
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: method.loss(p, state, b, jax.random.key(1))[0]))(
            variables["params"], b)
        assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    out = jax.jit(method.detect)(variables, batch["image"], variables["params"][HEAD]["classifier"], np.zeros(4, bool))
    boxes, scores, valid = (np.asarray(out[k]) for k in ("boxes", "scores", "valid"))
    assert boxes.shape == (2, 10, 4) and (boxes >= 0).all() and (boxes <= 64).all()
    assert (np.diff(np.where(valid, scores, -1), axis=1) <= 1e-7).all()  # best first
    assert (np.asarray(out["classes"]) < 4).all()


def test_vild_image_alone_drops_the_text_loss_and_trains_no_background():
    losses = {}
    for weight in (1.0, 0.0):
        config = _config(text_weight=weight)
        method = ViLD(config, *_model_and_mesh(config))
        variables = jax.jit(method.start_variables)(nn.meta.unbox(jax.jit(method.init)(jax.random.key(0))))
        state = {k: v for k, v in variables.items() if k != "params"}
        batch = {k: v for k, v in _batch().items() if k in method.batch_keys}
        (loss, metrics), grads = jax.jit(jax.value_and_grad(
            lambda p, b: method.loss(p, state, b, jax.random.key(1))[:2], has_aux=True))(variables["params"], batch)
        losses[weight] = (float(loss), float(metrics["text_loss"]), np.asarray(grads[HEAD]["background"]))
    (with_text, text, background), (alone, _, background_alone) = losses[1.0], losses[0.0]
    assert text > 0 and np.abs(background).max() > 0
    np.testing.assert_allclose(alone, with_text - text, rtol=1e-5)
    assert not np.abs(background_alone).any()


def _model_and_mesh(config):
    from clip_jax.methods.run_model import model_from_config
    from clip_jax.parallel.sharding import make_mesh

    return model_from_config(config), make_mesh({"data": -1}, jax.devices()[:1])


def test_training_reads_no_box_of_a_novel_class():
    config = _config()
    method = ViLD(config, *_model_and_mesh(config))
    (boxes,) = [b for b in method.inputs() if b.key == "boxes"]
    assert dict(boxes.options)["exclude"] == (3, 4)  # star and cross in the shapes order


def test_bad_settings_are_named():
    for bad, words in (({"novel": ("hexagon",)}, "not classes"), ({"templates": ("a photo",)}, "'{}'"),
                       ({"rpn_bg_iou": 0.9}, "above rpn_fg_iou"),
                       ({"text_weight": 0.0, "distill_weight": 0.0}, "no region classifier"),
                       ({"novel": ("circle", "square", "triangle", "star", "cross", "diamond")}, "no base class")):
        with pytest.raises(ValueError, match=words):
            ViLD.check_config(_config(**bad))
