"""The sharded train step equals the same step on one device; accumulation computes what it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import OPTIM, tiny_config, tiny_run
from tiny import text_batch as batch

from clip_jax.models import init_variables
from clip_jax.train.optim import make_optimizer


def run(name, mesh_shape, devices, steps=2, accum=1, n=16, loss="softmax"):
    r = tiny_run(tiny_config(name, loss, accum), mesh_shape, devices)
    state, losses = r.state, []
    for i in range(steps):
        own_tokenizer = r.model.config if r.model.config.text.kind == "bert" else None
        state, metrics = r.step_fn(state, batch(n, r.model.config.vision.image_size, i, own_tokenizer))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree_util.tree_map(np.asarray, state.params), state


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated devices")
@pytest.mark.parametrize("name,loss", [("ViT-Tiny-test", "softmax"), ("RN-Tiny-test", "softmax_ring"),
                                       ("cn-ViT-Tiny-test", "softmax")])
def test_eight_devices_equal_one(name, loss):
    one_losses, one_params, one_state = run(name, {"data": 1}, jax.devices()[:1], loss=loss)
    # ViT: data x FSDP x tensor parallel (heads and MLP split); ResNet: data x FSDP.
    mesh = {"data": 2, "fsdp": 2, "tensor": 2} if "ViT" in name else {"data": 2, "fsdp": 4}
    many_losses, many_params, many_state = run(name, mesh, jax.devices(), loss=loss)
    np.testing.assert_allclose(many_losses, one_losses, rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(many_params), jax.tree_util.tree_leaves(one_params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert int(many_state.step) == 2
    if name.startswith("RN"):  # BatchNorm statistics of the global batch, equal too
        for a, b in zip(jax.tree_util.tree_leaves(many_state.model_state),
                        jax.tree_util.tree_leaves(one_state.model_state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_accumulation_is_the_mean_over_microbatches():
    """accum=2 on 16 pairs == the optimizer applied to the mean gradient of two 8-pair losses,
    computed here by hand from the model and the loss (not through the step)."""
    import optax

    from clip_jax.methods.losses import make_loss

    r = tiny_run(accum=2)
    model, mesh = r.model, r.mesh
    variables = init_variables(model, jax.random.key(0))
    optimizer = make_optimizer(OPTIM, variables["params"], total_steps=10)
    loss_fn = make_loss("softmax", mesh, ("data", "fsdp"))
    data = batch(16, model.config.vision.image_size)

    def micro_loss(params, i):
        out = model.apply({"params": params}, data["image"][i * 8:(i + 1) * 8], data["tokens"][i * 8:(i + 1) * 8])
        return loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    grads = [jax.jit(jax.grad(micro_loss), static_argnums=1)(variables["params"], i) for i in range(2)]
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = optimizer.update(mean, optimizer.init(variables["params"]), variables["params"])
    want = optax.apply_updates(variables["params"], updates)
    for a, b in zip(jax.tree_util.tree_leaves(r.state.params), jax.tree_util.tree_leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same init as the step's
    state, metrics = r.step_fn(r.state, data)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_logit_scale_is_clamped_on_the_param():
    r = tiny_run(learning_rate=0.0)
    state = r.state.replace(params=dict(r.state.params, logit_scale=jnp.float32(4.7)))  # above ln(100) = 4.605
    state, metrics = r.step_fn(state, batch(8, 32))
    assert float(state.params["logit_scale"]) == pytest.approx(np.log(100), rel=1e-6)
    assert float(metrics["logit_scale"]) == pytest.approx(100.0, rel=1e-5)


def test_non_finite_step_is_not_applied_and_counted():
    r = tiny_run()
    state = r.state
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    good = batch(8, 32)
    image = np.array(good["image"], np.float32)
    image[3, 0, 0, 0] = np.nan  # one pixel of one image
    bad = dict(good, image=image)
    state, metrics = r.step_fn(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1 and int(state.skipped) == 1 and int(state.skipped_in_a_row) == 1
    after = jax.tree_util.tree_map(np.asarray, (state.params, state.opt_state))
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)  # params and Adam moments untouched
    state, metrics = r.step_fn(state, good)
    assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1 and int(state.skipped_in_a_row) == 0
    changed = [not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                                   jax.tree_util.tree_leaves(before[0]))]
    assert all(changed)


def test_params_are_finite_checks_every_leaf():
    from clip_jax.train.step import params_are_finite

    params = {"a": jnp.ones((3, 4)), "b": {"c": jnp.zeros((5,))}}
    assert bool(params_are_finite(params))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        broken = {"a": params["a"], "b": {"c": params["b"]["c"].at[2].set(bad)}}
        assert not bool(params_are_finite(broken))


@pytest.mark.parametrize("name", ["ViT-Tiny-test", "RN-Tiny-test"])
def test_bfloat16_step_takes_every_tower_matmul_in_bfloat16(name):
    """dtype=bfloat16: every matmul and convolution of the training step, forward and backward,
    takes bf16 operands, except the loss's [N, d] x [d, N] logits and their gradients (float32 on
    purpose). Read off the lowered program: autodiff of float32 attention logits would turn each
    layer's dq and dk into float32 matmuls; attention_logits' own backward keeps them bf16."""
    import re

    n = 8
    c = tiny_config(name)
    c.dtype, c.scan = "bfloat16", False
    r = tiny_run(c)
    model = r.model
    text = r.step_fn.lower(r.state, batch(n, model.config.vision.image_size)).as_text()
    loss_shapes = {f"{n}x{model.config.embed_dim}", f"{model.config.embed_dim}x{n}", f"{n}x{n}"}
    dots = f32 = 0
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line and "stablehlo.convolution" not in line:
            continue
        dots += 1
        operands = re.findall(r"tensor<([\dx]+)x(bf16|f32)>", re.search(r": \((.*)\) ->", line).group(1))
        if any(dtype != "bf16" for _, dtype in operands):
            f32 += 1
            assert all(shape in loss_shapes and dtype == "f32" for shape, dtype in operands), line.strip()[:300]
    assert dots > 50 and 1 <= f32 <= 6, (dots, f32)


def test_moving_average_follows_the_applied_steps_of_the_trained_params():
    """config.optim.ema_decay: ema_t = d * ema_{t-1} + (1 - d) * params_t over the trained params, starting at the
    init; a skipped (non-finite) step leaves it as it was; evaluation reads it with the frozen params as they are."""
    from flax import traverse_util

    from clip_jax.runs import evaluated_params

    d = 0.9
    r = tiny_run(ema_decay=d, frozen=r"text/.*")
    flat = lambda tree: traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, tree))  # noqa: E731
    trained = {k: v for k, v in flat(r.state.params).items() if k[0] != "text"}
    assert set(flat(r.state.ema)) == set(trained)  # the frozen tower is not averaged
    want, state = trained, r.state
    for i in range(2):
        state, _ = r.step_fn(state, batch(8, 32, i))
        now = flat(state.params)
        want = {k: d * v + (1 - d) * now[k] for k, v in want.items()}
    got = flat(state.ema)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=str(k))
    assert any(not np.allclose(got[k], now[k]) for k in want)  # it lags the params
    image = np.array(batch(8, 32, 5)["image"], np.float32)
    image[0, 0, 0, 0] = np.nan
    skipped, _ = r.step_fn(state, dict(batch(8, 32, 5), image=image))
    assert int(skipped.skipped) == 1
    for k, v in flat(skipped.ema).items():
        np.testing.assert_array_equal(v, got[k])
    read = flat(evaluated_params(skipped.params, skipped.ema))
    params = flat(skipped.params)
    for k, v in read.items():
        np.testing.assert_array_equal(v, got[k] if k in got else params[k])


def test_moving_average_decay_out_of_range_is_refused_before_compiling():
    with pytest.raises(ValueError, match="ema_decay=1.0.*\\[0, 1\\)"):
        tiny_run(ema_decay=1.0)
