"""Every loss form over the mesh equals the plain single-device loss, in value and gradient."""

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
