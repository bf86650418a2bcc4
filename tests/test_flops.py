"""FLOPs from the jaxpr against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import get_model_config
from clip_jax.train.flops import clip_forward_flops, count_flops, peak_flops


def vit_clip_closed_form(name: str, batch: int) -> dict:
    """Matmul FLOPs of a ViT CLIP forward written out by hand (2 per multiply-add)."""
    cfg = get_model_config(name)
    v, t, d = cfg.vision, cfg.text, cfg.embed_dim

    def block(n, w, mlp):  # qkv + out projection + MLP, then q.k and attn.v
        return 2 * n * (4 * w * w + 2 * w * mlp) + 2 * 2 * n * n * w

    def pooled_block(n, w, mlp):  # the last layer: k and v of n rows; q, out, MLP of one; 1 x n attention
        return 2 * (2 * n * w * w + 2 * w * w + 2 * w * mlp) + 2 * 2 * n * w

    patches = (v.image_size // v.patch_size) ** 2
    image = (2 * patches * v.patch_size**2 * 3 * v.width  # patch embedding
             + (v.layers - 1) * block(patches + 1, v.width, int(v.width * v.mlp_ratio))
             + pooled_block(patches + 1, v.width, int(v.width * v.mlp_ratio))
             + 2 * v.width * d)  # projection of the class token
    text = ((t.layers - 1) * block(t.context_length, t.width, int(t.width * t.mlp_ratio))
            + pooled_block(t.context_length, t.width, int(t.width * t.mlp_ratio)) + 2 * t.width * d)
    return {"image": batch * image, "text": batch * text, "logits": 2 * batch * batch * d}


@pytest.mark.parametrize("name,batch", [("ViT-B-32", 4), ("ViT-Tiny-test", 8)])
def test_vit_clip_matches_closed_form(name, batch):
    got = clip_forward_flops(name, batch)
    want = vit_clip_closed_form(name, batch)
    assert {k: got[k] for k in want} == want
    assert got["forward"] == sum(want.values()) and got["train_step"] == 3 * got["forward"]


def test_scanned_layers_count_once_per_layer():
    from clip_jax.models import create_model, variable_shapes

    tokens = jax.ShapeDtypeStruct((3, 77), jnp.int32)
    counts = []
    for scan in (False, True):
        model = create_model("ViT-Tiny-test", scan=scan, attn_impl="xla")
        counts.append(count_flops(lambda v, t: model.apply(v, t, method="encode_text"), variable_shapes(model), tokens))
    assert counts[0] == counts[1] > 0


def test_dot_and_conv_closed_forms():
    a, b = jnp.zeros((5, 7, 11)), jnp.zeros((5, 11, 13))
    assert count_flops(lambda x, y: jnp.einsum("bik,bkj->bij", x, y), a, b) == 2 * 5 * 7 * 11 * 13
    x, k = jnp.zeros((2, 16, 16, 6)), jnp.zeros((3, 3, 3, 8))  # grouped: 6 inputs in 2 groups of 3
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     feature_group_count=2)
    assert count_flops(conv, x, k) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
    # a cond counts its dearer branch; remat (checkpoint) is counted once, as model work
    f = lambda p, x: jax.lax.cond(p, lambda: x @ x, lambda: x)
    assert count_flops(f, True, np.zeros((4, 4), np.float32)) == 2 * 4**3
    assert count_flops(jax.checkpoint(lambda x: x @ x), np.zeros((4, 4), np.float32)) == 2 * 4**3


def test_matmul_eqns_lists_the_backward_dots_with_their_multiplicity():
    """The gradient of a residual 2-layer MLP in its weights, scanned 3 times: per step the
    forward's two dots, and the backward's dW2, dh, dW1 and the carry's gradient dh W1^T."""
    from clip_jax.train.flops import eqn_flops, matmul_eqns

    b, i, h = 4, 5, 6

    def loss(w1, w2, x):
        def layer(carry, _):
            return carry + jnp.tanh(carry @ w1) @ w2, None
        return jax.lax.scan(layer, x, None, length=3)[0].sum()

    args = (np.zeros((i, h), np.float32), np.zeros((h, i), np.float32), np.zeros((b, i), np.float32))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args).jaxpr
    found = sorted((sorted(tuple(v.aval.shape) for v in eqn.invars), eqn_flops(eqn), times)
                   for eqn, times in matmul_eqns(jaxpr))
    flop = 2 * b * i * h  # every one of these dots
    want = sorted((sorted(shapes), f, t) for shapes, f, t in [
        ([(b, i), (i, h)], flop, 3), ([(b, h), (h, i)], flop, 3),  # forward: carry W1, tanh(.) W2
        ([(b, h), (b, i)], flop, 3),  # dW2 = tanh(.)^T g
        ([(b, i), (h, i)], flop, 3),  # dh = g W2^T
        ([(b, i), (b, h)], flop, 3),  # dW1 = carry^T dh
        ([(b, h), (i, h)], flop, 3),  # dcarry = dh W1^T
    ])
    assert found == want
    assert sum(eqn_flops(e) * t for e, t in matmul_eqns(jaxpr)) == count_flops(jax.grad(loss, argnums=(0, 1)), *args)


def test_peaks_by_device_kind():
    class D:
        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops(D("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(D("TPU v5 lite")) == 197e12 and peak_flops(D("TPU v5p")) == 459e12
    assert peak_flops(D("TPU v4")) == 275e12 and peak_flops(D("TPU v6 lite")) == 918e12
    assert peak_flops(D("cpu")) is None
