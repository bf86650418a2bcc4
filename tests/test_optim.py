"""Optimizer: the decay mask on real CLIP params, the schedule's closed form, one AdamW step by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from clip_jax.models import create_model, variable_shapes
from clip_jax.train.optim import make_optimizer, make_schedule, weight_decay_mask


def test_mask_decays_weight_matrices_only():
    for name in ("ViT-Tiny-test", "RN-Tiny-test"):
        params = variable_shapes(create_model(name, scan=True))["params"]
        mask = traverse_util.flatten_dict(weight_decay_mask(params))
        named = {"/".join(p): m for p, m in mask.items()}
        assert named["logit_scale"] is False
        assert named["text/token_embedding/embedding"] is False
        assert named["text/positional_embedding"] is False
        assert named["text/text_projection"] is True
        for path, m in named.items():
            if path.endswith(("/bias", "/scale")) or "_bias" in path:
                assert m is False, path
            if path.endswith("kernel"):
                assert m is True, path
        if name.startswith("ViT"):
            assert named["visual/class_embedding"] is False
            assert named["visual/transformer/resblocks/attn/in_proj_kernel"] is True
        else:
            assert named["visual/attnpool/positional_embedding"] is False
            assert named["visual/conv1/kernel"] is True


def test_schedule_closed_form():
    cfg = {"learning_rate": 1e-3, "warmup_steps": 10, "end_learning_rate": 1e-5}
    sched = make_schedule(cfg, total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(sched(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(sched(10), 1e-3, rtol=1e-6)
    t = (60 - 10) / 100
    np.testing.assert_allclose(sched(60), 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t)), rtol=1e-5)
    np.testing.assert_allclose(sched(110), 1e-5, rtol=1e-5)


def test_one_adamw_step_by_hand():
    params = {"kernel": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.full((2, 2), 0.5), "b": jnp.full((2,), 0.5)}
    cfg = {"learning_rate": 0.1, "warmup_steps": 1, "weight_decay": 0.2, "grad_clip_norm": 0.0,
           "b1": 0.9, "b2": 0.98, "eps": 1e-6}
    opt = make_optimizer(cfg, params, total_steps=100)
    state = opt.init(params)
    # Step 0 of warmup has lr 0: take a step, then check the second against numpy.
    updates, state = opt.update(grads, state, params)
    np.testing.assert_allclose(updates["kernel"], 0.0, atol=1e-12)
    updates, state = opt.update(grads, state, params)
    lr = float(make_schedule(cfg, 100)(1))
    m = 0.9 * (0.1 * 0.5) + 0.1 * 0.5
    v = 0.98 * (0.02 * 0.25) + 0.02 * 0.25
    m_hat, v_hat = m / (1 - 0.9**2), v / (1 - 0.98**2)
    adam = m_hat / (math.sqrt(v_hat) + 1e-6)
    np.testing.assert_allclose(updates["b"], -lr * adam, rtol=1e-5)
    np.testing.assert_allclose(updates["kernel"], -lr * (adam + 0.2 * 2.0), rtol=1e-5)


def test_grad_clipping_happens_before_adam():
    """With clipping at norm 1, Adam's first moment after one step is (1 - b1) * g / |g|."""
    import optax

    params = {"w": jnp.zeros((3, 3))}
    opt = make_optimizer({"learning_rate": 1.0, "warmup_steps": 0, "grad_clip_norm": 1.0, "weight_decay": 0.0},
                         params, total_steps=10)
    _, state = opt.update({"w": jnp.full((3, 3), 100.0)}, opt.init(params), params)
    mu = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0].mu
    np.testing.assert_allclose(optax.tree.norm(mu), 0.1, rtol=1e-5)


def test_clip_by_global_norm_equals_optax_and_keeps_its_state():
    """Our clipping (one scalar scale, the step's norm passed in) gives optax.clip_by_global_norm's
    updates above and below the threshold, and the same (empty) state, so checkpoints written
    with optax's transformation restore into ours."""
    import optax

    from clip_jax.train.optim import clip_by_global_norm

    rng = np.random.default_rng(0)
    for size in (0.1, 10.0):  # global norm below and above max_norm = 1
        grads = {"w": jnp.asarray(rng.normal(size=(5, 3)) * size, jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(3,)) * size, jnp.float32)}
        want, want_state = optax.clip_by_global_norm(1.0).update(grads, optax.clip_by_global_norm(1.0).init(grads))
        ours = clip_by_global_norm(1.0)
        state = ours.init(grads)
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(want_state)
        for kwargs in ({}, {"grad_norm": optax.tree.norm(grads)}):
            got, _ = ours.update(grads, state, None, **kwargs)
            for k in grads:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
        clipped = optax.tree.norm(got)
        assert (clipped == pytest.approx(1.0, rel=1e-5)) if size > 1 else (clipped < 1.0)
    # the norm passed in is the one used (the step's), not recomputed
    got, _ = ours.update(grads, state, None, grad_norm=jnp.float32(2 * optax.tree.norm(grads)))
    assert optax.tree.norm(got) == pytest.approx(0.5, rel=1e-5)
