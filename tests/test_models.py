"""Tower options against the plain float32 form: scan, remat, bfloat16; axes; logit scale."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.models import MAX_LOGIT_SCALE, create_model, init_variables, logical_axes, variable_shapes

TINY = ["ViT-Tiny-test", "RN-Tiny-test-quickgelu"]


def inputs(model, n=3, seed=0):
    images = random_images(n, model.config.vision.image_size, seed)
    tokens = clip_jax.tokenize(["a red circle", "two small blue squares on the left", ""][:n])
    return jnp.asarray(images), jnp.asarray(tokens)


def loss_fn(model, params, variables, images, tokens):
    out = model.apply({**variables, "params": params}, images, tokens)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), jnp.arange(len(logits))])


def random_variables(model, seed=0):
    sd = random_state_dict(convert.expected_state_dict_shapes(model), seed)
    return convert.state_dict_to_variables(model, sd)


def stack_like(variables, model):
    """Per-layer variables -> the stacked layout of a scanned model."""
    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, variables))
    return traverse_util.unflatten_dict(convert.stack_layers(flat))


@pytest.mark.parametrize("name", TINY)
def test_scan_and_remat_match_plain_outputs_and_gradients(name):
    plain = create_model(name)
    variables = random_variables(plain)
    images, tokens = inputs(plain)
    ref_out = jax.jit(plain.apply)(variables, images, tokens)
    # Everything passed as arguments: closed-over arrays would become HLO constants (slow compiles).
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)
    ref_grad = grad_fn(plain, variables["params"], variables, images, tokens)
    # XLA:CPU compiles of gradients take seconds: cover each option once, not every product.
    for scan, remat in ((True, "none"), (False, "full"), (True, "dots_with_no_batch_dims_saveable")):
        model = create_model(name, remat=remat, scan=scan)
        v = stack_like(variables, model) if scan else variables
        out = jax.jit(model.apply)(v, images, tokens)
        for k in ref_out:
            np.testing.assert_allclose(out[k], ref_out[k], atol=2e-6, err_msg=f"{k} scan={scan}")
        grad = jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)(model, v["params"], v, images, tokens)
        ref = stack_like(ref_grad, model) if scan else ref_grad
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"{path} scan={scan}")


@pytest.mark.parametrize("causal,scan,remat", [(True, False, "none"), (False, True, "none"), (True, True, "full")])
def test_pooled_last_layer_equals_full_stack_then_row(causal, scan, remat):
    """Transformer(x, pool_index) computes only the pooled row of the last layer: the same row
    (and the same gradients for every param and the input) as the full stack then a gather."""
    from clip_jax.models.layers import Transformer

    stack = Transformer(layers=3, heads=4, causal=causal, remat=remat, scan=scan)
    x = jax.random.normal(jax.random.key(1), (4, 13, 32))
    index = jnp.array([12, 0, 5, 7])  # EOT-like positions; 0 is the class token
    variables = stack.init(jax.random.key(0), x)
    full = lambda v, x: jnp.take_along_axis(stack.apply(v, x), index[:, None, None], axis=1)[:, 0]  # noqa: E731
    pooled = lambda v, x: stack.apply(v, x, index)  # noqa: E731
    np.testing.assert_allclose(jax.jit(pooled)(variables, x), jax.jit(full)(variables, x), atol=1e-5)
    # a cotangent on the output: every param and the input get the same gradient both ways
    w = jax.random.normal(jax.random.key(2), (4, 32))
    grads = [jax.jit(jax.grad(lambda v, x: jnp.sum(f(v, x) * w), argnums=(0, 1)))(variables, x) for f in (pooled, full)]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=str(path))
    # the rows it skips matter to the full stack's other rows: the pooled path is not a no-op
    other = jnp.take_along_axis(stack.apply(variables, x), (index[:, None, None] + 1) % 13, axis=1)[:, 0]
    assert np.abs(np.asarray(other) - np.asarray(jax.jit(pooled)(variables, x))).max() > 1e-2


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(name):
    model32 = create_model(name)
    model16 = create_model(name, dtype="bfloat16")
    variables = random_variables(model32)
    # Initialising the bf16 model gives float32 params.
    shapes = variable_shapes(model16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes["params"])} == {jnp.dtype("float32")}
    images, tokens = inputs(model32)
    a = jax.jit(model32.apply)(variables, images, tokens)
    b = jax.jit(model16.apply)(variables, images, tokens)
    assert b["image_embeds"].dtype == jnp.float32
    # Unit vectors: bf16 has ~3 significant digits; cosine with the fp32 result stays ~1.
    for k in ("image_embeds", "text_embeds"):
        cos = np.sum(np.asarray(a[k]) * np.asarray(b[k]), axis=-1)
        assert cos.min() > 0.99, (k, cos)


def test_scan_compiles_one_layer_whatever_the_depth():
    """Compile time flat in depth: the scanned program has the same size for 2 and 12 layers."""

    def program_size(layers, scan):
        cfg = clip_jax.get_model_config("ViT-Tiny-test").to_dict()
        cfg["vision_cfg"]["layers"] = layers
        cfg["text_cfg"]["layers"] = layers
        model = create_model(cfg, scan=scan)
        images, tokens = inputs(model)
        v = variable_shapes(model)
        # Count HLO ops (lines): the text itself differs in the stacked params' leading dim.
        return len(jax.jit(model.apply).lower(v, images, tokens).as_text().splitlines())

    assert program_size(2, True) == program_size(12, True)
    assert program_size(12, False) > 3 * program_size(2, False)


@pytest.mark.parametrize("name", ["ViT-B-16", "RN50", "ViT-Tiny-test", "ViT-B-16-SigLIP"])
def test_every_param_has_logical_axes(name):
    model = create_model(name, scan=name.startswith("ViT"))
    specs = logical_axes(model)["params"]
    shapes = variable_shapes(model)["params"]
    flat_specs = traverse_util.flatten_dict(specs)
    flat_shapes = traverse_util.flatten_dict(shapes)
    assert flat_specs.keys() == flat_shapes.keys()
    for path, spec in flat_specs.items():
        assert spec is not None and len(spec) == flat_shapes[path].ndim, path
        if flat_shapes[path].ndim >= 2 and math.prod(flat_shapes[path].shape) > 4096:
            # every big tensor has at least one shardable named axis
            assert any(a in ("embed", "mlp", "heads", "vocab", "conv_out", "conv_in") for a in spec), path


def test_logit_scale_init_and_clamp():
    model = create_model("ViT-Tiny-test")
    variables = init_variables(model, jax.random.key(0))
    assert float(variables["params"]["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    variables["params"]["logit_scale"] = jnp.asarray(7.0)
    images, tokens = inputs(model)
    out = model.apply(variables, images, tokens, method=lambda m, *_: m.temperature())
    assert float(out[0]) == pytest.approx(100.0)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_siglip_bias_param():
    cfg = clip_jax.get_model_config("ViT-Tiny-test").to_dict()
    cfg["init_logit_bias"] = -10.0
    model = create_model(cfg)
    out = model.apply(init_variables(model, jax.random.key(0)), method=lambda m: m.temperature())
    assert float(out[1]) == -10.0


def test_resnet_train_mode_uses_batch_statistics():
    """BatchNorm in train mode: batch mean/var, running stats updated with momentum 0.1, counter +1."""
    model = create_model("RN-Tiny-test")
    variables = random_variables(model)
    images, tokens = inputs(model)
    apply = jax.jit(lambda v, i: model.apply(v, i, train=True, mutable=["batch_stats"], method="encode_image"))
    _, updated = apply(variables, images)
    stem = traverse_util.flatten_dict(updated["batch_stats"])
    old = traverse_util.flatten_dict(variables["batch_stats"])
    assert int(stem[("visual", "bn1", "num_batches_tracked")]) == int(old[("visual", "bn1", "num_batches_tracked")]) + 1
    # Reference for the first BatchNorm: the stem conv output's batch statistics.
    kernel = variables["params"]["visual"]["conv1"]["kernel"]
    x = jax.lax.conv_general_dilated(images, kernel, (2, 2), [(1, 1), (1, 1)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mean = x.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(
        stem[("visual", "bn1", "bn", "mean")], 0.9 * old[("visual", "bn1", "bn", "mean")] + 0.1 * mean, atol=1e-5
    )


def test_list_models_has_every_preset():
    names = clip_jax.list_models()
    for base in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50", "RN101", "RN50x4",
                 "RN50x16", "RN50x64", "ViT-Tiny-test", "RN-Tiny-test"]:
        assert base in names and base + "-quickgelu" in names


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown remat policy"):
        create_model("ViT-Tiny-test", remat="sometimes")
    with pytest.raises(ValueError, match="attn_impl 'flash' not supported"):
        create_model("ViT-Tiny-test", attn_impl="flash")
    with pytest.raises(ValueError, match="dtype 'float16' not supported"):
        create_model("ViT-Tiny-test", dtype="float16")
    cfg = clip_jax.get_model_config("ViT-Tiny-test").to_dict()
    cfg["vision_cfg"]["patch_droput"] = 0.5  # a misspelt key
    with pytest.raises(ValueError, match="unsupported keys in vision_cfg: \\['patch_droput'\\]"):
        create_model(cfg)


@pytest.mark.parametrize("length,causal", [(197, False), (77, True), (50, False), (80, True)])
def test_attention_padded_for_cudnn_equals_unpadded(length, causal):
    """cuDNN takes lengths that are multiples of 8: the padding (keys masked by length, query rows
    sliced off) must not change outputs or gradients. Checked here with XLA's kernel on both sides."""
    from clip_jax.models.layers import padded_attention

    rng = np.random.default_rng(length)
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, 3, 16)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=(2, length, 3, 16)), jnp.float32)  # a loss that weighs every output

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    def padded(q, k, v):
        return padded_attention(q, k, v, causal, "xla")

    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=2e-6)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    for got, want in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)
    if length % 8:  # the padding is real: without the key mask the result differs
        pad = ((0, 0), (0, -length % 8), (0, 0), (0, 0))
        unmasked = jax.nn.dot_product_attention(*(jnp.pad(x, pad) for x in (q, k, v)), is_causal=causal)[:, :length]
        assert causal or not np.allclose(unmasked, plain(q, k, v), atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_heads_major_attention_equals_jax_attention(causal, dtype):
    """The layout XLA's batched dots want ([batch, heads, length, head_dim]) computes what
    jax.nn.dot_product_attention's 'xla' implementation does on [batch, length, heads, head_dim],
    outputs and gradients, in float32 and bfloat16. ``attention(..., "xla")`` is it between the
    two layouts (also cuDNN's fallback)."""
    from clip_jax.models.layers import attention

    rng = np.random.default_rng(int(causal))
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, 13, 3, 16)), dtype) for _ in range(4))

    def ours(q, k, v):
        return attention(q, k, v, causal, "xla")

    def jax_xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    assert ours(q, k, v).dtype == dtype
    np.testing.assert_allclose(ours(q, k, v).astype(np.float32), jax_xla(q, k, v).astype(np.float32), atol=tol)
    loss = lambda f: lambda *a: jnp.sum((f(*a) * w).astype(jnp.float32))
    for got, want in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(jax_xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=10 * tol)
    # the mask is real: the first query sees only the first key causally, every key otherwise
    first = ours(q, k, v)[:, 0].astype(np.float32)
    if causal:
        np.testing.assert_allclose(first, v[:, 0].astype(np.float32), atol=tol)
    else:
        assert not np.allclose(first, v[:, 0].astype(np.float32), atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_and_heads_major_qkv_equal_autodiff_of_einsums(dtype):
    """The projections with written-out backwards (``linear``: the weight gradient as one row-
    contracting dot; ``heads_major_qkv``: q/k/v in the heads-major layout, one gradient pass)
    give the values and gradients of autodiff through the plain einsums."""
    from clip_jax.models.layers import heads_major_qkv, linear

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 7, 16)), dtype)
    kernel = jnp.asarray(rng.normal(size=(16, 3, 2, 8)) * 0.3, dtype)
    bias = jnp.asarray(rng.normal(size=(3, 2, 8)), dtype)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2

    def check(ours, ref, args):
        weights = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in jax.tree.leaves(ref(*args))]
        loss = lambda f: lambda *a: sum(jnp.sum(o.astype(jnp.float32) * w)  # noqa: E731
                                        for o, w in zip(jax.tree.leaves(f(*a)), weights))
        for got, want in zip(jax.tree.leaves(ours(*args)), jax.tree.leaves(ref(*args))):
            assert got.dtype == want.dtype == dtype and got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)
        argnums = tuple(range(len(args)))
        for got, want in zip(jax.grad(loss(ours), argnums)(*args), jax.grad(loss(ref), argnums)(*args)):
            assert got.dtype == want.dtype == dtype
            scale = float(jnp.abs(want.astype(jnp.float32)).max())
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=tol * scale)

    check(linear, lambda x, k: jnp.einsum("btd,dchk->btchk", x, k), (x, kernel))
    check(linear, lambda x, k: x @ k, (x, kernel.reshape(16, -1)))

    def ref_qkv(x, k, b):
        qkv = jnp.einsum("btd,dchk->cbhtk", x, k) + b[:, None, :, None]
        return qkv[0], qkv[1], qkv[2]

    check(heads_major_qkv, ref_qkv, (x, kernel, bias))


def test_attention_implementation_choice():
    from clip_jax.models.layers import attention_impl

    q32, q16 = jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert jax.default_backend() == "cpu"
    assert attention_impl(None, q16) == attention_impl("auto", q32) == "xla"  # no cuDNN off GPU
    assert attention_impl("xla", q16) == "xla"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attention_impl("cudnn", q16)
    # 'auto' and 'xla' give the same model outputs on the CPU
    model = create_model("ViT-Tiny-test", attn_impl="auto")
    variables = random_variables(model)
    a = model.apply(variables, *inputs(model))
    b = create_model("ViT-Tiny-test", attn_impl="xla").apply(variables, *inputs(model))
    np.testing.assert_array_equal(a["image_embeds"], b["image_embeds"])


def _layer_norm_reference(x, scale, bias, eps=1e-5):
    # the textbook formula, differentiated by autodiff: what the hand-written backward must equal
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_outputs_and_gradients_equal_the_formula(dtype):
    from clip_jax.models.layers import LayerNorm, layer_norm

    kx, ks, kb, kg = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(kx, (3, 7, 64)) * 3 + 1.5).astype(dtype)  # an offset mean: cancellation matters
    scale = 1 + 0.3 * jax.random.normal(ks, (64,))
    bias = 0.2 * jax.random.normal(kb, (64,))
    cotangent = jax.random.normal(kg, x.shape)
    y, vjp = jax.vjp(lambda x, s, b: layer_norm(x, s, b).astype(jnp.float32), x, scale, bias)
    y_ref, vjp_ref = jax.vjp(lambda x, s, b: _layer_norm_reference(x, s, b), x, scale, bias)
    assert y.dtype == jnp.float32 and layer_norm(x, scale, bias).dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(y, y_ref, atol=tol * 4)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * 10, rtol=tol)
    # the module: flax's LayerNorm param names and init, the same function
    module = LayerNorm(dtype)
    params = module.init(jax.random.key(1), x)["params"]
    assert {k: v.value.shape for k, v in params.items()} == {"scale": (64,), "bias": (64,)}
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x), np.float32),
                               _layer_norm_reference(x, 1.0, 0.0), atol=tol * 4)


def test_gelu_is_the_exact_erf_form_with_its_gradient():
    from clip_jax.models.layers import gelu

    x = jnp.linspace(-9.0, 9.0, 4001)
    y, grad = jax.vmap(jax.value_and_grad(gelu))(x)
    y_ref, grad_ref = jax.vmap(jax.value_and_grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(y, y_ref, atol=2e-6)
    np.testing.assert_allclose(grad, grad_ref, atol=2e-6)
    # not the tanh approximation, which differs by up to ~5e-4 around |x| ~ 2
    assert float(jnp.abs(y - jax.nn.gelu(x, approximate=True)).max()) > 1e-4
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
    # the written-out backward in bfloat16: the gradient's dtype is the input's, its value the float32 one's
    x16 = x.astype(jnp.bfloat16)
    grad16 = jax.vmap(jax.grad(gelu))(x16)
    assert grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(grad16.astype(np.float32), jax.vmap(jax.grad(gelu))(x16.astype(jnp.float32)), atol=1e-2)


def test_patch_embedding_equals_the_strided_conv():
    import flax.linen as nn

    from clip_jax.models.vit import PatchEmbed

    images = jax.random.uniform(jax.random.key(0), (2, 48, 48, 3))
    embed = PatchEmbed(patch_size=16, width=32, name="conv1")
    conv = nn.Conv(32, (16, 16), strides=(16, 16), padding="VALID", use_bias=False)
    params = embed.init(jax.random.key(1), images)["params"]
    conv_params = conv.init(jax.random.key(1), images)["params"]
    assert jax.tree.map(np.shape, nn.unbox(params)) == jax.tree.map(np.shape, conv_params)  # same checkpoint tree
    out = embed.apply({"params": params}, images)
    want = conv.apply({"params": nn.unbox(params)}, images).reshape(2, 9, 32)
    assert out.shape == (2, 9, 32)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_a_registered_vision_tower_is_chosen_by_its_kind():
    """A tower of a new kind is one builder registered in VISION_TOWERS, named by vision_cfg.kind; the
    JSON of a built-in tower carries no kind (open_clip's schema has none)."""
    import flax.linen as nn

    from clip_jax.models.clip import VISION_TOWERS

    class MeanColour(nn.Module):
        out: int

        @nn.compact
        def __call__(self, images, train=False, pooled_too=False, **_):
            projected = nn.Dense(self.out, name="proj")(images.mean(axis=(1, 2)))
            return (images.mean(axis=(1, 2)), projected) if pooled_too else projected

    if "test_mean_colour" not in VISION_TOWERS:
        VISION_TOWERS.register("test_mean_colour")(lambda clip: MeanColour(clip.config.embed_dim))
    model = create_model("ViT-Tiny-test", overrides={"vision_cfg": {"kind": "test_mean_colour"}})
    assert model.config.to_dict()["vision_cfg"]["kind"] == "test_mean_colour"
    assert "kind" not in create_model("ViT-Tiny-test").config.to_dict()["vision_cfg"]
    variables = init_variables(model, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    dense = variables["params"]["visual"]["proj"]
    want = images.mean(axis=(1, 2)) @ dense["kernel"] + dense["bias"]
    want = want / jnp.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(model.apply(variables, images, method="encode_image"), want, rtol=1e-5, atol=1e-6)
