"""CLIP4Clip's similarity headers, ActionCLIP's fusion and KL loss equal the reference code's outputs
(tests/fixtures/video_reference.npz, written by make_video_fixtures.py from the fetched repositories)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clip_jax import convert_video
from clip_jax.methods.losses import kl_loss_reference, make_kl_loss, softmax_loss_reference
from clip_jax.models import video

REF = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "video_reference.npz"))
# the fixture's sizes (make_video_fixtures.py): 2 heads, 2 layers, 8 positions; Transf_cls 5 frames, 32 hidden
C4C = {"meanP": {}, "seqLSTM": {}, "seqTransf": dict(heads=2, layers=2, positions=8),
       "tightTransf": dict(heads=2, layers=2, positions=8)}
AC = {"meanP": {}, "LSTM": {}, "Conv_1D": {}, "Transf": dict(heads=2, positions=8),
      "Transf_cls": dict(frames=5, mlp_dim=32, positions=8)}


def state_dict(prefix):
    return {k.split("/", 1)[1]: REF[k] for k in REF.files if k.startswith(prefix + "/")}


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip4clip_logits(head, variables, text, frames, mask, scale):
    module = video.video_head(f"clip4clip:{head}", **C4C[head])
    apply = jax.jit(module.apply)  # one compile: op by op, the transformers take seconds on 2 cores
    if head == "tightTransf":
        return apply(variables, text, frames, mask)
    return video.loose_logits(text, apply(variables, frames, mask), scale)


@pytest.mark.parametrize("head", list(C4C))
def test_clip4clip_headers_equal_reference(head):
    module = video.video_head(f"clip4clip:{head}", **C4C[head])
    variables, clip = convert_video.video_head_variables(state_dict(f"c4c_{head}"), module)
    scale = np.exp(clip["logit_scale"]) if head != "tightTransf" else None
    logits = clip4clip_logits(head, variables, REF["c4c_text"], REF["c4c_frames"], REF["c4c_mask"], scale)
    np.testing.assert_allclose(logits, REF[f"c4c_{head}_logits"], rtol=1e-5, atol=1e-5)
    if head == "seqTransf":  # CrossEn both ways is clip_jax's symmetric softmax loss
        pooled = module.apply(variables, REF["c4c_frames"], REF["c4c_mask"])
        loss = softmax_loss_reference(pooled, jnp.asarray(unit(REF["c4c_text"]), jnp.float32), scale)
        np.testing.assert_allclose(loss, REF["c4c_seqTransf_loss"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", list(AC))
def test_actionclip_fusions_equal_reference(head):
    module = video.video_head(f"actionclip:{head}", **AC[head])
    variables, clip = convert_video.video_head_variables(state_dict(f"ac_{head}"), module)
    assert clip == {}
    np.testing.assert_allclose(module.apply(variables, REF["ac_frames"]), REF[f"ac_{head}_video"], rtol=1e-5,
                               atol=1e-5)


def test_conv_1d_init_is_the_references_shift():
    params = video.ActionFusion("Conv_1D").init(jax.random.key(0), jnp.zeros((1, 5, 16)))["params"]
    np.testing.assert_array_equal(params["shift"]["weight"], REF["ac_Conv_1D_init_shift"])


def test_kl_loss_equals_reference_on_one_and_two_devices():
    vid = jnp.asarray(unit(REF["ac_Transf_video"]), jnp.float32)
    txt = jnp.asarray(unit(REF["ac_text"]), jnp.float32)
    labels, scale = jnp.asarray(REF["ac_labels"]), np.exp(REF["logit_scale"])
    np.testing.assert_allclose(kl_loss_reference(vid, txt, labels, scale), REF["ac_loss"], rtol=1e-5, atol=1e-6)
    # both directions alone: KLLoss(logits_per_image) is the mean-over-entries KL times the batch
    same = REF["ac_ground_truth"]
    target = np.exp(10 * same) / np.exp(10 * same).sum(1, keepdims=True)
    logits = scale * unit(REF["ac_Transf_video"]) @ unit(REF["ac_text"]).T
    logq = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose((target * (np.log(target) - logq)).mean() * len(same), REF["ac_loss_imgs"], rtol=1e-5)

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.jit(jax.value_and_grad(make_kl_loss(mesh), argnums=(0, 1)))
    plain = jax.jit(jax.value_and_grad(kl_loss_reference, argnums=(0, 1)))
    (v1, g1), (v2, g2) = sharded(vid, txt, labels, scale), plain(vid, txt, labels, scale)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mean_pool_of_one_frame_is_clip_similarity():
    rng = np.random.default_rng(3)
    images, texts, scale = rng.normal(size=(4, 16)), rng.normal(size=(3, 16)), 17.0
    pooled = video.MeanPool().apply({}, jnp.asarray(images[:, None], jnp.float32), np.ones((4, 1), np.int32))
    np.testing.assert_allclose(video.loose_logits(jnp.asarray(texts, jnp.float32), pooled, scale),
                               scale * unit(texts) @ unit(images).T, rtol=1e-5)


def _garbage_in_padding(frames, mask, seed):
    noise = 100 * np.random.default_rng(seed).normal(size=frames.shape).astype(np.float32)
    return np.where(mask[..., None] > 0, frames, noise)


@pytest.mark.parametrize("head", list(C4C))
def test_clip4clip_padding_changes_nothing(head):
    variables, clip = convert_video.video_head_variables(state_dict(f"c4c_{head}"),
                                                         video.video_head(f"clip4clip:{head}", **C4C[head]))
    frames, mask, text = REF["c4c_frames"], REF["c4c_mask"], REF["c4c_text"]
    scale = np.exp(clip.get("logit_scale", 0.0))
    want = clip4clip_logits(head, variables, text, frames, mask, scale)
    got = clip4clip_logits(head, variables, text, _garbage_in_padding(frames, mask, 1), mask, scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["meanP", "LSTM", "Transf", "Transf_cls"])
def test_actionclip_padding_changes_nothing(head):
    module = video.video_head(f"actionclip:{head}", **AC[head])
    variables, _ = convert_video.video_head_variables(state_dict(f"ac_{head}"), module)
    frames, mask = REF["ac_frames"], np.array([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]] * 2, np.int32)
    want = module.apply(variables, frames, mask)
    np.testing.assert_allclose(module.apply(variables, _garbage_in_padding(frames, mask, 2), mask), want,
                               rtol=1e-5, atol=1e-5)
    # a full mask is the reference's unmasked fusion
    np.testing.assert_allclose(module.apply(variables, frames, np.ones((6, 5), np.int32)), REF[f"ac_{head}_video"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [f"c4c_{h}" for h in C4C] + [f"ac_{h}" for h in AC])
def test_converter_uses_every_key(name):
    family, head = ("clip4clip", name[4:]) if name.startswith("c4c") else ("actionclip", name[3:])
    module = video.video_head(f"{family}:{head}", **(C4C if family == "clip4clip" else AC)[head])
    sd = state_dict(name)
    expected = convert_video.expected_keys(module, 16)
    skipped = set(convert_video.UNUSED.get(f"{family}:{head}", ()))
    clip = {k for k in sd if k.startswith("clip.")}
    assert set(sd) == set(expected) | skipped | clip
    assert skipped <= set(sd)
    if not expected:
        return
    first = sorted(expected)[0]
    with pytest.raises(ValueError, match="missing keys: " + first.replace(".", r"\.")):
        convert_video.video_head_variables({k: v for k, v in sd.items() if k != first}, module, 16)
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        convert_video.video_head_variables({**sd, "extra.weight": np.zeros(1)}, module, 16)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="real frames first"):
        video.MeanPool().apply({}, jnp.zeros((1, 3, 4)), np.array([[1, 0, 1]]))
    with pytest.raises(ValueError, match="8 frame positions but got 9"):
        video.SeqTransf(heads=2, positions=8).init(jax.random.key(0), jnp.zeros((1, 9, 16)), np.ones((1, 9)))
    with pytest.raises(ValueError, match="built for 5 frames and got 4"):
        video.ActionFusion("Transf_cls", frames=5).init(jax.random.key(0), jnp.zeros((1, 4, 16)))
    with pytest.raises(ValueError, match="unknown video head"):
        video.video_head("clip4clip:Transf")
