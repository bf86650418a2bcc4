"""Every loss form over the mesh equals the plain single-device loss, in value and gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.methods.losses import LOSSES, REFERENCES, make_loss

MESHES = [((1,), ("data",)), ((2,), ("data",)), ((4,), ("data",)), ((8,), ("data",)),
          ((2, 4), ("data", "fsdp")), ((4, 2), ("data", "fsdp"))]


def inputs(n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d)).astype(np.float32)
    txt = (img + 0.5 * rng.standard_normal((n, d))).astype(np.float32)  # correlated pairs
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return jnp.asarray(img), jnp.asarray(txt), jnp.float32(10.0), jnp.float32(-3.0)


@pytest.mark.parametrize("kind", LOSSES.names() + ("softmax_gather_by_sum",))
@pytest.mark.parametrize("shape,names", MESHES, ids=[str(m[0]) for m in MESHES])
def test_loss_and_grads_equal_single_device(kind, shape, names):
    if np.prod(shape) > len(jax.devices()):
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    img, txt, scale, bias = inputs()
    by_sum = kind == "softmax_gather_by_sum"  # the CPU multi-process form of the all_gather
    kind = "softmax" if by_sum else kind
    ref_fn = REFERENCES[kind]
    ref, ref_grads = jax.value_and_grad(ref_fn, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
    loss = make_loss(kind, mesh, names, gather_by_sum=by_sum)
    batch = NamedSharding(mesh, P(names))
    img_s, txt_s = jax.device_put(img, batch), jax.device_put(txt, batch)
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(img_s, txt_s, scale, bias)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    for name, g, r in zip(("img", "txt", "scale", "bias"), grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=name)
    if kind == "softmax":
        # A known closed form: identical unit pairs, orthogonal otherwise -> loss = log(1 + (N-1) e^-s)
        eye = jnp.eye(16, dtype=jnp.float32)
        v = jax.jit(loss)(jax.device_put(eye, batch), jax.device_put(eye, batch), scale)
        np.testing.assert_allclose(v, np.log1p(15 * np.exp(-10.0)), atol=1e-6)  # float32 cancellation


def test_bad_batch_and_axes():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="not a mesh axis"):
        make_loss("softmax", mesh, ("batch",))
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge", mesh)
    if len(jax.devices()) > 1:
        img, txt, scale, _ = inputs(n=len(jax.devices()) + 1)
        with pytest.raises(ValueError, match="does not divide over"):
            make_loss("softmax", mesh)(img, txt, scale)


@pytest.mark.parametrize("devices", [1, 8])
def test_sigmoid_loss_equals_siglips_formula_in_numpy(devices):
    """-sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / N, z = +1 on the diagonal, -1 elsewhere, in float64."""
    img, txt, scale, bias = inputs(seed=3)
    x, y = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = float(scale) * x @ y.T + float(bias)
    z = 2 * np.eye(len(x)) - 1
    want = np.sum(np.logaddexp(0.0, -z * logits)) / len(x)  # -log sigmoid(u) = log(1 + e^-u)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = NamedSharding(mesh, P("data"))
    got = jax.jit(make_loss("sigmoid", mesh, ("data",)))(jax.device_put(img, batch), jax.device_put(txt, batch),
                                                         scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def audioclip_loss_numpy(audio, image, text, log_scales):
    """AudioCLIP's loss_fn transcribed (model/audioclip.py): every present pair adds CE(L) + CE(L^T) against
    arange(N), the scales clamp(exp(s), 1, 100), the total divided by n_pairs!."""
    def ce(logits):
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    scale = {k: float(np.clip(np.exp(np.float64(v)), 1.0, 100.0)) for k, v in log_scales.items()}
    pairs = []
    if audio is not None and image is not None:
        pairs.append(scale["ai"] * audio @ image.T)
    if audio is not None and text is not None:
        pairs.append(scale["at"] * audio @ text.T)
    if image is not None and text is not None:
        pairs.append(scale["it"] * image @ text.T)
    return sum(ce(L) + ce(L.T) for L in pairs) / math.factorial(len(pairs))


@pytest.mark.parametrize("present", [("audio", "text"), ("audio", "image"), ("image", "text"),
                                     ("audio", "image", "text")])
@pytest.mark.parametrize("devices", [1, 8])
def test_pairs_loss_equals_audioclips_loss_in_numpy(present, devices):
    from clip_jax.methods.losses import clamped_scale, make_pairs_loss

    if devices > len(jax.devices()):
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    base = rng.standard_normal((16, 8))
    embeds = {m: unit(base + 0.7 * rng.standard_normal((16, 8))) for m in ("audio", "image", "text")}
    # one scale inside the clamp, one above it (exp 150 -> 100), one below (exp -1 -> 1)
    log_scales = {"ai": np.float32(np.log(30.0)), "at": np.float32(np.log(150.0)), "it": np.float32(-1.0)}
    want = audioclip_loss_numpy(*(embeds[m] if m in present else None for m in ("audio", "image", "text")),
                                log_scales)
    pairs = {("audio", "image"): "ai", ("audio", "text"): "at", ("image", "text"): "it"}
    loss = make_pairs_loss(mesh, ("data",))
    batch = NamedSharding(mesh, P("data"))

    def total(e, s):
        return loss(e, {p: clamped_scale(s[k]) for p, k in pairs.items()})[0]

    got = jax.jit(total)({m: jax.device_put(embeds[m], batch) for m in present}, log_scales)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_clamped_scale_and_its_gradient_equal_torch_clamp_of_exp():
    """AudioCLIP's clamp(exp(s), 1, 100), the bounds themselves included (exp(0) = 1); its init log(100) lies
    just above 100 in float32 (exp gives 100.0000076), so it is clamped with no gradient."""
    torch = pytest.importorskip("torch")
    from clip_jax.methods.losses import clamped_scale

    points = [0.0, float(np.float32(np.log(np.float32(100.0)))), 2.0, 5.0, -1.0]
    for s in points:
        t = torch.tensor(s, dtype=torch.float32, requires_grad=True)
        value = torch.clamp(torch.exp(t), 1.0, 100.0)
        value.backward()
        got, grad = jax.value_and_grad(clamped_scale)(jnp.float32(s))
        np.testing.assert_allclose(got, value.item(), rtol=1e-6, err_msg=str(s))
        np.testing.assert_allclose(grad, t.grad.item(), rtol=1e-6, err_msg=str(s))


def test_pairs_loss_needs_a_pair():
    from clip_jax.methods.losses import make_pairs_loss

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="no pair of modalities"):
        make_pairs_loss(mesh)({"audio": jnp.ones((2, 4))}, {("audio", "text"): 1.0})
