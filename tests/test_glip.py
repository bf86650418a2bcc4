"""GLIP's head against the reference's modules (fuse_helper's BiMultiHeadAttention and BiAttentionBlock, vldyhead's
CLIPTransformerLayer, transcribed in torch below), and the method's loss, detector and grounder contracts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_reference
from tiny import tiny_config

from clip_jax.methods.glip import GLIP, HEAD, FusionBlock, LanguageLayer

SMALL = {"levels": (2, 3, 4, 5), "fpn_width": 16, "gn_groups": 4, "anchor_scale": 4.0, "num_convs": 2,
         "fusion_dim": 16, "fusion_heads": 2, "text_heads": 2, "query_length": 16, "max_objects": 4,
         "detections": 10, "pre_nms": 50, "negatives": 2}

# The reference's forward passes (eval mode: no dropout), STABLE_SOFTMAX_2D off and both clamps on (GLIP-T's).
TORCH = """
import torch
t = {k: torch.from_numpy(v) for k, v in inputs.items()}
def linear(x, name):
    return x @ t[name + '/kernel'] + t[name + '/bias']
def bi_attention(v, l, mask, heads):
    bsz, tgt_len, _ = v.shape
    dim = t['attn/v_proj/kernel'].shape[1]
    hd = dim // heads
    shape = lambda x: x.view(bsz, -1, heads, hd).transpose(1, 2).contiguous().view(bsz * heads, -1, hd)
    q = shape(linear(v, 'attn/v_proj') * hd ** -0.5)
    k = shape(linear(l, 'attn/l_proj'))
    vv = shape(linear(v, 'attn/values_v_proj'))
    vl = shape(linear(l, 'attn/values_l_proj'))
    src_len = k.size(1)
    w = torch.bmm(q, k.transpose(1, 2))
    w = torch.clamp(w, min=-50000)
    w = torch.clamp(w, max=50000)
    wt = w.transpose(1, 2)
    wl = wt - torch.max(wt, dim=-1, keepdim=True)[0]
    wl = torch.clamp(wl, min=-50000)
    wl = torch.clamp(wl, max=50000)
    wl = wl.softmax(dim=-1)
    m = mask.unsqueeze(1).unsqueeze(1).expand(bsz, 1, tgt_len, src_len).float()
    m = m.masked_fill(m == 0, -9e15)
    w = (w.view(bsz, heads, tgt_len, src_len) + m).view(bsz * heads, tgt_len, src_len)
    wv = torch.nn.functional.softmax(w, dim=-1)
    ov = torch.bmm(wv, vl).view(bsz, heads, tgt_len, hd).transpose(1, 2).reshape(bsz, tgt_len, dim)
    ol = torch.bmm(wl, vv).view(bsz, heads, src_len, hd).transpose(1, 2).reshape(bsz, src_len, dim)
    return linear(ov, 'attn/out_v_proj'), linear(ol, 'attn/out_l_proj')
def layer_norm(x, name):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], t[name + '/scale'], t[name + '/bias'], 1e-5)
v = layer_norm(t['v'], 'layer_norm_v')
l = layer_norm(t['l'], 'layer_norm_l')
dv, dl = bi_attention(v, l, t['mask'], int(t['heads']))
outputs['v'] = (v + t['gamma_v'] * dv).numpy()
outputs['l'] = (l + t['gamma_l'] * dl).numpy()

# CLIPTransformerLayer on the tokens, through torch's own MultiheadAttention
d = t['x'].shape[-1]
mha = torch.nn.MultiheadAttention(d, int(t['text_heads']))
with torch.no_grad():
    mha.in_proj_weight.copy_(torch.cat([t['q_w'], t['k_w'], t['v_w']], 0))
    mha.in_proj_bias.copy_(torch.cat([t['q_b'], t['k_b'], t['v_b']], 0))
    mha.out_proj.weight.copy_(t['o_w'])
    mha.out_proj.bias.copy_(t['o_b'])
x = t['x'].permute(1, 0, 2)
pad = (1.0 - t['mask'].float()).to(torch.bool)
h = torch.nn.functional.layer_norm(x, (d,), t['ln_1/scale'], t['ln_1/bias'], 1e-5)
x = x + mha(h, h, h, need_weights=False, key_padding_mask=pad)[0]
h = torch.nn.functional.layer_norm(x, (d,), t['ln_2/scale'], t['ln_2/bias'], 1e-5)
h = h @ t['c_fc/kernel'] + t['c_fc/bias']
h = h * torch.sigmoid(1.702 * h)
x = x + h @ t['c_proj/kernel'] + t['c_proj/bias']
outputs['x'] = x.permute(1, 0, 2).detach().numpy()
"""


def _randomized(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_fusion_and_language_layers_equal_glips_modules():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 7, 16)).astype(np.float32)
    lang = rng.normal(size=(2, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    block = FusionBlock(dim=32, heads=4, init_scale=0.5)
    params = _randomized(block.init(jax.random.key(0), v, lang, mask)["params"], jax.random.key(1))
    got_v, got_l = block.apply({"params": params}, v, lang, mask)
    from flax import traverse_util

    flat = {"/".join(k): np.asarray(x) for k, x in traverse_util.flatten_dict(params).items()}

    layer = LanguageLayer(heads=2)
    x = rng.normal(size=(2, 5, 12)).astype(np.float32)
    lp = _randomized(layer.init(jax.random.key(2), x, mask)["params"], jax.random.key(3))
    got_x = layer.apply({"params": lp}, x, mask)
    a = lp["attn"]
    heads_first = lambda w: np.asarray(w).reshape(12, -1).T  # noqa: E731  (flax [d, heads, hd] -> torch rows)
    mha = {"q_w": heads_first(a["query"]["kernel"]), "k_w": heads_first(a["key"]["kernel"]),
           "v_w": heads_first(a["value"]["kernel"]), "q_b": np.asarray(a["query"]["bias"]).reshape(-1),
           "k_b": np.asarray(a["key"]["bias"]).reshape(-1), "v_b": np.asarray(a["value"]["bias"]).reshape(-1),
           "o_w": np.asarray(a["out"]["kernel"]).reshape(-1, 12).T, "o_b": np.asarray(a["out"]["bias"])}
    rest = {"/".join(k): np.asarray(x) for k, x in traverse_util.flatten_dict(lp).items() if k[0] != "attn"}
    ref = torch_reference(TORCH, v=v, l=lang, mask=mask, heads=np.int64(4), x=x, text_heads=np.int64(2), **flat,
                          **mha, **rest)
    np.testing.assert_allclose(got_v, ref["v"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_l, ref["l"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_x, ref["x"], rtol=1e-5, atol=1e-5)
    # the padded tokens' values never reach the image side
    moved = lang.copy()
    moved[0, 3:] += 10.0
    again_v, _ = block.apply({"params": params}, v, moved, mask)
    np.testing.assert_allclose(again_v[0], got_v[0], rtol=1e-5, atol=1e-5)


def _config(**glip):
    c = tiny_config(model="RN-Tiny-test", learning_rate=1e-3, warmup_steps=0, grad_clip_norm=1.0)
    c.method, c.batch_size = "glip", 2
    c.glip.update({**SMALL, **glip})
    return c


def _method(**glip):
    from clip_jax.methods.run_model import model_from_config
    from clip_jax.parallel.sharding import make_mesh

    config = _config(**glip)
    method = GLIP(config, model_from_config(config), make_mesh({"data": -1}, jax.devices()[:1]))
    variables = nn.meta.unbox(jax.jit(method.init)(jax.random.key(0)))
    return method, variables


def _batch(method, n=2):
    rng = np.random.default_rng(0)
    names = method.classes
    prompt = method.class_inputs(names[:3])  # "circle. square. triangle": each box on its name's tokens
    tokens = np.repeat(prompt["tokens"], n, 0)
    positive = np.zeros((n, 4, method.length), bool)
    positive[:, 0] = prompt["weights"][0] > 0
    positive[:, 1] = prompt["weights"][2] > 0
    boxes = np.zeros((n, 4, 4), np.float32)
    boxes[:, 0], boxes[:, 1] = [6, 8, 22, 30], [34, 30, 60, 50]
    valid = np.zeros((n, 4), bool)
    valid[:, :2] = True
    return {"image": rng.uniform(0, 255, (n, 64, 64, 3)).astype(np.uint8), "boxes": boxes, "boxes/valid": valid,
            "glip/tokens": tokens, "glip/positive": positive}


@pytest.mark.parametrize("fusion", [True, False])
def test_loss_is_finite_with_and_without_boxes_and_the_predictions_keep_their_contracts(fusion):
    method, variables = _method(fusion=fusion)
    params = variables["params"]
    assert any(k.startswith("fuse") for k in params[HEAD]["head"]) == fusion
    state = {k: v for k, v in variables.items() if k != "params"}
    batch = _batch(method)
    empty = dict(batch, **{"boxes/valid": np.zeros_like(batch["boxes/valid"])})
    step = jax.jit(jax.value_and_grad(lambda p, b: method.loss(p, state, b, jax.random.key(1))[0]))
    for b in (batch, empty):
        loss, grads = step(params, b)
        assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    metrics = method.loss(params, state, batch, jax.random.key(1), train=False)[1]
    assert float(metrics["positive_anchors"]) > 0 and float(metrics["boxes_aligned"]) == 2.0

    classes = dict(method.class_inputs(method.classes))
    assert classes.pop("prompt") == ". ".join(method.classes)  # the evaluation prompt, GLIP's separator
    classes = jax.tree.map(jnp.asarray, classes)
    assert classes["weights"].shape == (6, method.length)
    np.testing.assert_allclose(classes["weights"].sum(-1), 1.0, rtol=1e-6)
    out = jax.jit(method.detect)(variables, batch["image"], classes, np.zeros(6, bool))
    assert out["boxes"].shape == (2, 10, 4) and out["classes"].dtype == jnp.int32
    assert (np.asarray(out["classes"]) < 6).all() and (np.asarray(out["boxes"]) <= 64).all()
    phrases = batch["glip/positive"][:, :2]
    grounded = jax.jit(method.ground)(variables, batch["image"], batch["glip/tokens"], phrases,
                                      np.ones((2, 2), bool))
    assert grounded["boxes"].shape == (2, 2, 10, 4) and grounded["scores"].shape == (2, 2, 10)
    assert (np.diff(np.asarray(grounded["scores"]), axis=-1) <= 1e-7).all()  # best first


def test_the_token_mask_keeps_a_zero_id_inside_the_prompt_and_stops_at_the_padding():
    method, _ = _method()
    from clip_jax.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(method.length)
    tokens = np.asarray(tokenizer(["a circle", "a"], method.length))
    tokens[0, 2] = 0  # id 0 is CLIP's "!" (a word-inner byte), the same id as the padding
    ends = np.argmax(tokens == tokenizer.eot_id, axis=1)
    mask = np.asarray(method.token_mask(jnp.asarray(tokens)))
    np.testing.assert_array_equal(mask, np.arange(method.length)[None] <= ends[:, None])


def test_bad_settings_are_named():
    for bad, words in (({"novel": ("hexagon",)}, "not classes"), ({"prompts": "captions"}, "'detection'"),
                       ({"levels": (3, 5)}, "consecutive"), ({"fpn_width": 10}, "gn_groups"),
                       ({"grounding_fraction": 2.0}, r"\[0, 1\]"), ({"fusion_dropout": 1.0}, "is a rate")):
        with pytest.raises(ValueError, match=words):
            GLIP.check_config(_config(**bad))
    from clip_jax.methods.run_model import model_from_config
    from clip_jax.parallel.sharding import make_mesh

    config = _config(text_heads=7)
    with pytest.raises(ValueError, match="text_heads=7 must divide the prompt tokens' width"):
        GLIP(config, model_from_config(config), make_mesh({"data": -1}, jax.devices()[:1]))


def test_anchors_follow_the_maps_where_p6_and_p7_round_up():
    """96 px: P5 is 3x3, so the stride-2 convs give P6 2x2 and P7 1x1 (ceil), as the anchors and ATSS's level
    counts must (GLIP-T's 800 px: P6 13, P7 7)."""
    from clip_jax.methods.run_model import model_from_config
    from clip_jax.models.detector import level_size
    from clip_jax.parallel.sharding import make_mesh

    assert [level_size(800, lv) for lv in (3, 4, 5, 6, 7)] == [100, 50, 25, 13, 7]
    config = _config(levels=(3, 4, 5, 6, 7))
    config.model_overrides = {"vision_cfg": {"image_size": 96}}
    method = GLIP(config, model_from_config(config), make_mesh({"data": -1}, jax.devices()[:1]))
    variables = nn.meta.unbox(jax.jit(method.init)(jax.random.key(0)))
    tokens = jnp.asarray(method.class_inputs(method.classes)["tokens"])
    logits, _, _, _ = jax.jit(method.forward)(variables, jnp.zeros((1, 96, 96, 3)), tokens)
    assert method.level_sizes == (144, 36, 9, 4, 1)
    assert logits.shape[1] == method.anchors.shape[0] == sum(method.level_sizes)
