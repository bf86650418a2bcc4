"""SLIP: NT-Xent and the detached CLIP loss against plain references, the head's BatchNorm against
numpy's full-batch statistics on a sharded batch, and the method's step through the trainer's
assembly on 1 and 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config, tiny_run

from clip_jax.methods.losses import make_loss, make_nt_xent, nt_xent_reference
from clip_jax.methods.slip import HEAD, SSLHead
from clip_jax.parallel.sharding import BATCH_AXES, make_mesh


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_nt_xent(qa, qb, t):
    """SimCLR's loss written out in numpy, one row at a time."""
    n = len(qa)
    views = {"a": qa, "b": qb}
    total, correct = 0.0, 0
    for me, other in (("a", "b"), ("b", "a")):
        for i in range(n):
            pos = views[me][i] @ views[other][i] / t
            negatives = [views[me][i] @ views[other][j] / t for j in range(n) if j != i]
            negatives += [views[me][i] @ views[me][j] / t for j in range(n) if j != i]
            logits = np.array([pos] + negatives, np.float64)
            total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - pos
            if me == "a":
                correct += int(pos > max(negatives))
    return total / (2 * n), correct / n


@pytest.mark.parametrize("devices", [1, 8])
def test_nt_xent_equals_numpy_on_a_sharded_batch(devices):
    rng = np.random.default_rng(0)
    qa, qb = _unit(rng, 16, 8), _unit(rng, 16, 8)
    qb[:5] = qa[:5]  # some rows certain to be right, some not
    want_loss, want_acc = _numpy_nt_xent(qa, qb, 0.1)
    mesh = make_mesh({"data": -1}, jax.devices()[:devices])
    shard = NamedSharding(mesh, P(BATCH_AXES))
    loss_fn = make_nt_xent(mesh, BATCH_AXES, 0.1)
    loss, acc = jax.jit(loss_fn)(jax.device_put(qa, shard), jax.device_put(qb, shard))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc)
    # gradients through every device's rows: the same as the single-device reference's
    grads = jax.jit(jax.grad(lambda a, b: loss_fn(a, b)[0], argnums=(0, 1)))(
        jax.device_put(qa, shard), jax.device_put(qb, shard))
    ref = jax.grad(lambda a, b: nt_xent_reference(a, b, 0.1)[0], argnums=(0, 1))(qa, qb)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_the_detached_clip_loss_trains_each_tower_by_its_own_term_only():
    """SLIP's multi-GPU CLIP loss: 1/2 [CE(s img sg(txt)^T) + CE(s txt sg(img)^T)], value and gradient."""
    rng = np.random.default_rng(1)
    img, txt, scale = _unit(rng, 16, 8), _unit(rng, 16, 8), 7.0
    mesh = make_mesh({"data": -1}, jax.devices()[:8])
    shard = NamedSharding(mesh, P(BATCH_AXES))
    detached = make_loss("softmax", mesh, BATCH_AXES, detach=True)

    def reference(i, t):
        ce = lambda logits: jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diag(logits))  # noqa: E731
        return (ce(scale * i @ jax.lax.stop_gradient(t).T) + ce(scale * t @ jax.lax.stop_gradient(i).T)) / 2

    args = (jax.device_put(img, shard), jax.device_put(txt, shard))
    value, grads = jax.jit(jax.value_and_grad(lambda i, t: detached(i, t, scale), argnums=(0, 1)))(*args)
    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(img, txt)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    full = make_loss("softmax", mesh, BATCH_AXES)
    assert jax.jit(full)(*args, scale) == pytest.approx(float(value), rel=1e-5)  # same value, other gradient
    with pytest.raises(ValueError, match="'softmax' loss only"):
        make_loss("sigmoid", mesh, BATCH_AXES, detach=True)


def test_the_heads_batchnorm_uses_the_global_batch_statistics_on_a_sharded_batch():
    head = SSLHead(mlp_dim=32, emb_dim=8)
    x = np.random.default_rng(2).normal(size=(16, 12)).astype(np.float32) * 3 + 1
    variables = nn.meta.unbox(head.init(jax.random.key(0), x[:2], train=False))
    mesh = make_mesh({"data": -1}, jax.devices()[:8])
    sharded = jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))
    out, updated = jax.jit(lambda v, a: head.apply(v, a, True, mutable=["batch_stats"]))(variables, sharded)
    # numpy: the first Linear, then normalization by the whole batch's mean and (biased) variance
    p = variables["params"]
    h = x @ np.asarray(p["linear1"]["kernel"]) + np.asarray(p["linear1"]["bias"])
    mean, var = h.mean(0), h.var(0)
    np.testing.assert_allclose(updated["batch_stats"]["bn1"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["bn1"]["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)
    single = head.apply(variables, x, True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(out, single, rtol=1e-4, atol=1e-5)


def _slip_config(**slip):
    c = tiny_config()
    c.method = "slip"
    c.batch_size = 16
    c.slip.mlp_dim, c.slip.emb_dim = 64, 16
    c.slip.update(slip)
    return c


def _views_batch(run, n=16, seed=0):
    shapes = run.method.batch_shapes(n)
    rng = np.random.default_rng(seed)
    batch = {}
    for key, s in shapes.items():
        if key == "tokens":
            batch[key] = rng.integers(1, 400, size=s.shape).astype(np.int32)
        else:
            batch[key] = rng.normal(size=s.shape).astype(np.float32)
    return batch


def test_slip_steps_report_its_metrics_and_equal_on_1_and_8_devices():
    losses = {}
    for devices in (1, 8):
        run = tiny_run(_slip_config(), devices=jax.devices()[:devices])
        assert HEAD in run.state.params and HEAD in run.state.model_state["batch_stats"]
        assert HEAD not in run.method.model_variables(run.state.params, run.state.model_state)["params"]
        state, rows = run.state, []
        for step in range(3):
            batch = jax.device_put(_views_batch(run, seed=step), run.batch_sharding)
            state, metrics = run.step_fn(state, batch)
            rows.append({k: float(v) for k, v in metrics.items()})
        assert {"clip_loss", "ssl_loss", "ssl_acc"} <= set(rows[0])
        assert rows[0]["loss"] == pytest.approx(rows[0]["clip_loss"] + rows[0]["ssl_loss"], rel=1e-5)
        losses[devices] = [r["loss"] for r in rows]
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-3)


def test_slip_on_a_resnet_reads_the_attention_pools_output_before_its_projection():
    c = _slip_config()
    c.model = "RN-Tiny-test"
    run = tiny_run(c)
    width = run.model.config.vision.width * 32
    assert run.state.params[HEAD]["linear1"]["kernel"].shape == (width, 64)
    state, metrics = run.step_fn(run.state, jax.device_put(_views_batch(run), run.batch_sharding))
    assert np.isfinite(float(metrics["ssl_loss"]))
    # the tower's BatchNorm statistics and the head's both update
    assert set(state.model_state["batch_stats"]) == {"visual", HEAD}


def test_slip_refuses_what_it_cannot_do_before_compiling():
    with pytest.raises(ValueError, match="detach_clip_gather.*config.clip.loss='sigmoid'"):
        c = _slip_config(detach_clip_gather=True)
        c.clip.loss = "sigmoid"
        tiny_run(c)


def test_the_pipeline_makes_two_simclr_views_per_image_and_resumes_them_exactly(tmp_path):
    from clip_jax.input.pipeline import InputPipeline
    from clip_jax.methods.clip import CLIP_INPUTS
    from clip_jax.methods.slip import SIMCLR_VIEWS

    config = {"cache_dir": str(tmp_path), "shapes_sizes": {"train": 40, "validation": 8, "test": 8},
              "shapes_shards": {"train": 2, "validation": 1, "test": 1}, "shuffle_buffer": 16}
    make = lambda state=None: InputPipeline("shapes", config, global_batch_size=8, image_size=32, train=True,  # noqa: E731
                                            inputs=CLIP_INPUTS + (SIMCLR_VIEWS,), state=state)
    pipe = make()
    first = next(pipe)
    state = pipe.state()
    second = next(pipe)
    views = first["image_views"]
    assert views.shape == (8, 2, 32, 32, 3) and views.dtype == first["image"].dtype
    assert np.isfinite(views).all()
    # two different augmentations of each image, and neither is the CLIP view
    assert not np.allclose(views[:, 0], views[:, 1]) and not np.allclose(views[:, 0], first["image"])
    again = next(make(state))
    for key in ("image", "image_views", "tokens"):
        np.testing.assert_array_equal(again[key], second[key])
    assert "image_views" not in next(InputPipeline("shapes", config, global_batch_size=8, image_size=32, train=True))
