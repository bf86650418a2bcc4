"""The Swin tower (clip_jax.models.swin) against timm's SwinTransformer on random weights, and against a
transcription of GLIP's padded-window rule (maskrcnn_benchmark/modeling/backbone/swint.py) at a size that
is no multiple of the window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.convert_timm import model_from_timm, params_from_timm
from clip_jax.models.swin import SwinTransformer
from tests.conftest import reference

TOL = 1e-5


@pytest.fixture(scope="module")
def ts():
    """timm's swin_transformer module (torch with it)."""
    reference("torch")
    reference("timm")
    from timm.models import swin_transformer

    return swin_transformer


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _stages_and_final(module, images):
    maps = module.stages(images)
    return maps, module.norm(maps[-1])


def _ours(model, params, images):
    """(the stage maps, the final-norm map), one compile."""
    maps, final = jax.jit(lambda p, x: model.apply({"params": p}, x, method=_stages_and_final))(params, images)
    return [np.asarray(m) for m in maps], np.asarray(final)


def test_swin_t_equals_timm_features_at_224(ts):
    """swin_tiny_patch4_window7_224, random init, through params_from_timm: the four stage maps equal timm's
    features_only outputs and the final-norm map its forward_features. At 224 px the last stage's 7x7 map is
    one window: timm's always_partition=True keeps it shifted as GLIP does (our default)."""
    import timm
    import torch

    torch.manual_seed(0)
    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                             always_partition=True).eval()
    # what features_only=True, out_indices=(0, 1, 2, 3) wraps the model in (timm's build_model_with_cfg)
    feats = timm.models.FeatureListNet(full, out_indices=(0, 1, 2, 3), flatten_sequential=True, output_fmt="NHWC")
    state = full.state_dict()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref_maps, ref_final = [m.numpy() for m in feats(x)], full.forward_features(x).numpy()
    params = params_from_timm(state)
    maps, final = _ours(SwinTransformer(), params, _nhwc(x))
    assert [m.shape for m in maps] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768)]
    for ours, ref in zip(maps, ref_maps):
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(final, ref_final, atol=TOL, rtol=0)


def test_clamp_window_equals_timm_default_rule(ts):
    """clamp_window=True: timm's own rule (a map no larger than the window is one unshifted window), here on
    a small Swin at 224 px whose last stage (7x7, two blocks) takes it; GLIP's rule gives other values there."""
    import torch

    torch.manual_seed(1)
    arch = dict(img_size=224, embed_dim=16, depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2), num_classes=0)
    net, glip = ts.SwinTransformer(**arch).eval(), ts.SwinTransformer(**arch, always_partition=True).eval()
    state = net.state_dict()
    glip.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = [m.numpy().transpose(0, 2, 3, 1) for m in net.forward_intermediates(x, intermediates_only=True)]
        other = glip.forward_intermediates(x, intermediates_only=True)[-1].numpy().transpose(0, 2, 3, 1)
    assert np.abs(other - ref[-1]).max() > 1e-2  # the two rules differ on this net
    model = model_from_timm(state).clone(clamp_window=True)
    maps, _ = _ours(model, params_from_timm(state, model), _nhwc(x))
    for ours, want in zip(maps, ref):
        np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)


def _glip_mask(ts, hp, wp, ws, shift):
    """GLIP's BasicLayer.forward: the shifted windows' attention mask on the padded size."""
    import torch

    img_mask = torch.zeros((1, hp, wp, 1))
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = ts.window_partition(img_mask, (ws, ws)).view(-1, ws * ws)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


def _glip_attn(ts, block, x):
    """GLIP's SwinTransformerBlock.forward between norm1 and the residual, on timm's block: pad to the window,
    then roll, attend with the padded size's mask, roll back, crop."""
    import torch
    import torch.nn.functional as F

    _, H, W, C = x.shape
    ws, shift = block.window_size[0], block.shift_size[0]
    x = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
    _, Hp, Wp, _ = x.shape
    mask = None
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = _glip_mask(ts, Hp, Wp, ws, shift)
    windows = ts.window_partition(x, (ws, ws)).view(-1, ws * ws, C)
    out = block.attn(windows, mask=mask).view(-1, ws, ws, C)
    x = ts.window_reverse(out, (ws, ws), Hp, Wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def test_bad_inputs_and_weights_are_named(ts):
    model = SwinTransformer(depths=(1, 1), heads=(1, 2), width=8, window_size=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\], got shape \(1, 32, 32, 4\)"):
        jax.eval_shape(model.init, key, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="looks NCHW"):
        jax.eval_shape(model.init, key, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="30x32: a Swin tower's sides must be multiples of its patch 4"):
        jax.eval_shape(model.init, key, jnp.zeros((1, 30, 32, 3)))
    import torch

    net = ts.SwinTransformer(img_size=32, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4,
                             num_classes=10)
    state = dict(net.state_dict())
    assert "head.fc.weight" in state  # the classifier is dropped, as the buffers are
    state["layers.1.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    params = params_from_timm(state)
    assert params["layers_1"]["downsample"]["reduction"].shape == (32, 16)
    del state["layers.0.blocks.0.mlp.fc2.bias"]
    state["layers.0.blocks.0.extra.weight"] = torch.zeros(3)
    state["norm.weight"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"(?s)missing keys: layers\.0\.blocks\.0\.mlp\.fc2\.bias.*unexpected keys: "
                                         r"layers\.0\.blocks\.0\.extra\.weight.*mis-shaped keys: norm\.weight"):
        params_from_timm(state)


def test_clip_tower_padded_windows_equal_glip_rule(ts, monkeypatch):
    """kind 'swin' in a CLIP model (the Swin-Tiny-test preset, window 4) with timm weights, at 100x68 px: stage
    maps 25x17, 13x9, 7x5, 4x3, each padded to the window but the last's height, odd sides merged. The stage
    maps (encode_image_intermediates) equal timm's modules run in GLIP's block order, and the embedding is the
    projected mean of their final-norm map."""
    import torch

    from clip_jax.models import create_model, get_model_config, variable_shapes

    config = get_model_config("Swin-Tiny-test")
    assert get_model_config(config.to_dict()) == config
    torch.manual_seed(2)
    net = ts.SwinTransformer(img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4,
                             always_partition=True, dynamic_img_size=True, num_classes=0).eval()
    monkeypatch.setattr(ts.SwinTransformerBlock, "_attn", lambda block, x: _glip_attn(ts, block, x))
    x = torch.randn(2, 3, 100, 68)
    with torch.no_grad():
        ref = [m.numpy().transpose(0, 2, 3, 1) for m in net.forward_intermediates(x, intermediates_only=True)]
        pooled = net.forward_features(x).numpy().mean((1, 2))

    model = create_model("Swin-Tiny-test")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape, np.float32), variable_shapes(model)["params"])
    params["visual"] = {**params_from_timm(net.state_dict()), "proj": params["visual"]["proj"]}
    maps, embeds = jax.jit(lambda v, x: (model.apply(v, x, (1, 2, 3, 4), method="encode_image_intermediates"),
                                         model.apply(v, x, method="encode_image")))({"params": params}, _nhwc(x))
    assert [m.shape[1:3] for m in maps] == [(25, 17), (13, 9), (7, 5), (4, 3)]
    for ours, want in zip(maps, ref):
        assert np.isfinite(np.asarray(ours)).all()
        np.testing.assert_allclose(np.asarray(ours), want, atol=TOL, rtol=0)
    want = pooled @ params["visual"]["proj"]
    np.testing.assert_allclose(np.asarray(embeds), want / np.linalg.norm(want, axis=-1, keepdims=True), atol=TOL)
