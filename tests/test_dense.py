"""Dense outputs of the towers (clip_jax.models.dense): per-patch features, MaskCLIP's value path,
intermediate blocks and per-token text states, against open_clip and transformers on random weights."""

import jax
import numpy as np
import pytest
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.models import create_model
from tests.conftest import reference, torch_reference

TOL = 2e-4


def _weights(name, seed=3, overrides=None, scan=False):
    """(model, variables) of random open_clip-layout weights (the same tensors for scan or not)."""
    model = create_model(name, scan=scan, overrides=overrides)
    sd = random_state_dict(convert.expected_state_dict_shapes(create_model(name, overrides=overrides)), seed)
    return model, convert.state_dict_to_variables(model, sd)


def test_avg_pooled_vit_patch_mean_is_the_pooled_embedding():
    """pool_type 'avg': the mean of the 'patch' features (ln_post, proj per token) is the pooled features."""
    model, variables = _weights("ViT-Tiny-test", overrides={"vision_cfg": {"pool_type": "avg"}})
    images = random_images(3, 32, 0)
    dense = clip_jax.encode_image_dense(model, variables, images)
    assert dense.shape == (3, 4, 4, 32) and dense.dtype == np.float32
    pooled = np.asarray(model.apply(variables, images, method=lambda m, x: m.visual(x)))
    np.testing.assert_allclose(dense.mean(axis=(1, 2)), pooled, atol=1e-5)
    unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(clip_jax.encode_image(model, variables, images), unit, atol=1e-5)


OPEN_CLIP_DENSE = """
import open_clip, torch
import torch.nn.functional as F
torch.set_grad_enabled(False)
open_clip.add_model_config("{dir}")
vit = open_clip.create_model("ViT-Tiny-test", pretrained="{vit}").eval().visual
images = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)
# MaskCLIP by hand: every block but the last, then the last one's value path
x = vit._embeds(images)
for block in vit.transformer.resblocks[:-1]:
    x = block(x)
last = vit.transformer.resblocks[-1]
c = x.shape[-1]
v = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * c:], last.attn.in_proj_bias[2 * c:])
y = x + last.attn.out_proj(v)
y = y + last.mlp(last.ln_2(y))
outputs["maskclip"] = (vit.ln_post(y)[:, 1:] @ vit.proj).numpy()
full = vit.transformer(vit._embeds(images))
outputs["patch"] = (vit.ln_post(full)[:, 1:] @ vit.proj).numpy()
inter = vit.forward_intermediates(images, indices=[0, 1], intermediates_only=True)["image_intermediates"]
outputs["inter0"], outputs["inter1"] = (t.permute(0, 2, 3, 1).numpy() for t in inter)
# the text tower per token: ln_final and the projection at every position
clip = open_clip.create_model("ViT-Tiny-test", pretrained="{vit}").eval()
tokens = torch.from_numpy(inputs["tokens"]).long()
t = clip.token_embedding(tokens) + clip.positional_embedding
t = clip.transformer(t, attn_mask=clip.attn_mask)
outputs["text"] = (clip.ln_final(t) @ clip.text_projection).numpy()
# ModifiedResNet: the final map through the attention pool's v and c projections
rn = open_clip.create_model("RN-Tiny-test", pretrained="{rn}").eval().visual
fmap = rn.stem(torch.from_numpy(inputs["rn_images"]).permute(0, 3, 1, 2))
for i, stage in enumerate((rn.layer1, rn.layer2, rn.layer3, rn.layer4)):
    fmap = stage(fmap)
    outputs["rn_stage%d" % i] = fmap.permute(0, 2, 3, 1).numpy()
fmap = fmap.flatten(2).permute(0, 2, 1)
pool = rn.attnpool
for name, tokens in (("rn_maskclip", fmap), ("rn_patch", fmap + pool.positional_embedding[1:])):
    outputs[name] = pool.c_proj(pool.v_proj(tokens)).numpy()
"""


@pytest.mark.slow  # torch and open_clip start in a subprocess
def test_dense_forms_and_intermediates_match_open_clip(tmp_path):
    reference("torch", load=False)
    reference("open_clip", load=False)
    vit, vit_vars = _weights("ViT-Tiny-test")
    rn, rn_vars = _weights("RN-Tiny-test")
    vit_path, rn_path = (clip_jax.save_open_clip(name, variables, str(tmp_path / f"{name}.safetensors"),
                                                 config_path=str(tmp_path / f"{name}.json"))
                         for name, variables in (("ViT-Tiny-test", vit_vars), ("RN-Tiny-test", rn_vars)))
    images, rn_images = random_images(2, 32, 1), random_images(2, 64, 2)
    tokens = clip_jax.tokenize(["a red square", "two blue circles and a triangle"])
    code = OPEN_CLIP_DENSE.format(vit=vit_path, rn=rn_path, dir=tmp_path)
    ref = torch_reference(code, images=images, rn_images=rn_images, tokens=tokens)
    for form in ("patch", "maskclip"):
        got = clip_jax.encode_image_dense(vit, vit_vars, images, form=form)
        np.testing.assert_allclose(got.reshape(2, 16, 32), ref[form], atol=TOL, err_msg=form)
        got = clip_jax.encode_image_dense(rn, rn_vars, rn_images, form=form)
        assert got.shape == (2, 2, 2, 32)
        np.testing.assert_allclose(got.reshape(2, 4, 32), ref[f"rn_{form}"], atol=TOL, err_msg=f"RN {form}")
    stages = rn.apply(rn_vars, rn_images, layers=(1, 2, 3, 4), method="encode_image_intermediates")
    for i, m in enumerate(stages):  # the ResNet's stages: strides 4 to 32
        assert m.shape == (2, 16 >> i, 16 >> i, ref[f"rn_stage{i}"].shape[-1])
        np.testing.assert_allclose(np.asarray(m), ref[f"rn_stage{i}"], atol=TOL, err_msg=f"RN stage {i + 1}")
    maps = vit.apply(vit_vars, images, layers=(1, 2), method="encode_image_intermediates")
    for i, m in enumerate(maps):
        assert m.shape == (2, 4, 4, 64)
        np.testing.assert_allclose(np.asarray(m), ref[f"inter{i}"], atol=TOL)
    states, eot = vit.apply(vit_vars, tokens, method="encode_text_tokens")
    np.testing.assert_allclose(np.asarray(states), ref["text"], atol=TOL)
    np.testing.assert_array_equal(np.asarray(eot), tokens.argmax(-1))
    # the pooled text feature is the EOT row of the per-token states
    pooled = np.asarray(vit.apply(vit_vars, tokens, method=lambda m, t: m.text(t)))
    np.testing.assert_allclose(np.asarray(states)[np.arange(2), eot], pooled, atol=1e-5)


@pytest.mark.slow  # imports torch and transformers
def test_siglip_maskclip_is_the_map_heads_value_path_in_transformers():
    """SigLIP: each token after post_layernorm through transformers' MAP head's v, out_proj and MLP residual."""
    torch = reference("torch")
    from test_siglip import _clip_normalized, _hf_model, _inputs

    from clip_jax.hf_layouts import siglip as hf_siglip

    hf = _hf_model()
    model = create_model(hf_siglip.config_from_hf(hf.config.to_dict()))
    variables = hf_siglip.variables_from_hf(model, {k: v.numpy() for k, v in hf.state_dict().items()})
    pixels, _ = _inputs()
    with torch.no_grad():
        tower = hf.vision_model
        x = tower(pixel_values=torch.tensor((2 * pixels - 1).transpose(0, 3, 1, 2))).last_hidden_state
        head, c = tower.head, x.shape[-1]
        y = head.attention.out_proj(torch.nn.functional.linear(x, head.attention.in_proj_weight[2 * c:],
                                                               head.attention.in_proj_bias[2 * c:]))
        want = (y + head.mlp(head.layernorm(y))).numpy()
    got = clip_jax.encode_image_dense(model, variables, _clip_normalized(pixels), form="maskclip")
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=TOL)
    with pytest.raises(ValueError, match="form='maskclip'"):
        clip_jax.encode_image_dense(model, variables, _clip_normalized(pixels), form="patch")


def test_scan_remat_and_an_8_device_mesh_give_the_same_dense_outputs():
    images = random_images(8, 32, 4)
    model, variables = _weights("ViT-Tiny-test")
    scanned, scanned_vars = _weights("ViT-Tiny-test", scan=True)
    assert "resblocks" in scanned_vars["params"]["visual"]["transformer"]
    rematerialized = create_model("ViT-Tiny-test", scan=True, remat="full")
    np.testing.assert_allclose(clip_jax.encode_image_dense(rematerialized, scanned_vars, images, form="maskclip"),
                               clip_jax.encode_image_dense(model, variables, images, form="maskclip"), atol=1e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    for form in ("patch", "maskclip"):
        want = clip_jax.encode_image_dense(model, variables, images, form=form)
        np.testing.assert_allclose(clip_jax.encode_image_dense(scanned, scanned_vars, images, form=form), want,
                                   atol=1e-5)
        sharded = jax.jit(lambda v, x, f=form: model.apply(v, x, form=f, method="encode_image_dense"))(
            variables, jax.device_put(images, batch))
        assert len(sharded.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(sharded), want, atol=1e-5)
    for layers in ((1,), (2,), (1, 2), (2, 1)):
        want = model.apply(variables, images, layers=layers, method="encode_image_intermediates")
        got = scanned.apply(scanned_vars, images, layers=layers, method="encode_image_intermediates")
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_chunks_and_bad_input():
    model, variables = _weights("ViT-Tiny-test")
    images = random_images(5, 32, 5)
    np.testing.assert_allclose(clip_jax.encode_image_dense(model, variables, images, batch_size=2),
                               clip_jax.encode_image_dense(model, variables, images), atol=1e-5)
    with pytest.raises(ValueError, match="dense form 'cls'"):
        clip_jax.encode_image_dense(model, variables, images, form="cls")
    with pytest.raises(ValueError, match="resize/crop"):
        clip_jax.encode_image_dense(model, variables, random_images(1, 64, 0))
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        model.apply(variables, images, layers=(0,), method="encode_image_intermediates")
    attn_pool, attn_vars = _weights("ViT-Tiny-test", overrides={"vision_cfg": {"pool_type": "map"}})
    assert attn_pool.config.vision.pool_type == "map"
    with pytest.raises(ValueError, match="pool_type 'map'"):
        clip_jax.encode_image_dense(attn_pool, attn_vars, images)
