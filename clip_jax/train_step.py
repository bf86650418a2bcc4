"""The train state and the jitted, sharded train step (a pure module-level function of its inputs).

Gradient accumulation (`accum_steps` > 1) splits the global batch into microbatches and
averages their losses and gradients: the contrastive loss of each microbatch is computed
over that microbatch (N / accum_steps pairs, every pair against every other of the same
microbatch, across all devices), NOT over the full accumulated batch. It trades the number
of negatives for memory; for the full N x N matrix at lower memory use the ring loss.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from clip_jax import xla_cpu
from clip_jax.models import CLIP, MAX_LOGIT_SCALE
from clip_jax.preprocessing import normalize_images


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # ResNet BatchNorm statistics; {} for ViTs
    opt_state: Any
    # Steps whose loss or gradient was not finite: not applied, counted (total, and in a row).
    skipped: jax.Array
    skipped_in_a_row: jax.Array


def create_state(variables, optimizer: optax.GradientTransformation) -> TrainState:
    """The state on the params' mesh: optimizer moments sharded like the params, scalars replicated."""
    params = variables["params"]
    opt_state = jax.jit(optimizer.init)(params)  # created where, and sharded as, the params are
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
    state = TrainState(zero(), params, variables.get("batch_stats", {}), opt_state, zero(), zero())
    sharding = jax.tree_util.tree_leaves(params)[0].sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return state
    devices = set(sharding.mesh.devices.flat)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    # Leaves that do not depend on the params (step, Adam's count) land on one device otherwise.
    return jax.tree_util.tree_map(lambda x: x if x.sharding.device_set == devices else jax.device_put(x, replicated), state)


def _forward_loss(model: CLIP, loss_fn: Callable, params, batch_stats, images, tokens):
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        out, updated = model.apply(variables, images, tokens, train=True, mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
    else:
        out = model.apply(variables, images, tokens)
    loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"], out.get("logit_bias"))
    return loss, (batch_stats, out["logit_scale"])


def train_step(state: TrainState, batch: dict, *, model: CLIP, optimizer, loss_fn: Callable, accum_steps: int = 1):
    """One optimizer step on a global batch {'image': [N, S, S, 3] (float or uint8), 'tokens': [N, T]}."""
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = normalize_images(images)
    tokens = batch["tokens"]
    grad_fn = jax.value_and_grad(lambda p, bs, i, t: _forward_loss(model, loss_fn, p, bs, i, t), has_aux=True)
    if accum_steps == 1:
        (loss, (batch_stats, scale)), grads = grad_fn(state.params, state.batch_stats, images, tokens)
    else:
        n = images.shape[0]
        if n % accum_steps:
            raise ValueError(f"global batch {n} does not split into {accum_steps} microbatches")
        micro = lambda x: x.reshape((accum_steps, n // accum_steps) + x.shape[1:])

        def body(carry, xs):
            grads, loss, batch_stats = carry
            (l, (batch_stats, scale)), g = grad_fn(state.params, batch_stats, *xs)
            return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, batch_stats), scale

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss, batch_stats), scales = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), state.batch_stats), (micro(images), micro(tokens))
        )
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
        loss, scale = loss / accum_steps, scales[-1]
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient is never applied: params, moments and statistics stay as
    # they were (the step counter and the data still advance); the trainer stops on a streak.
    # One cond around the whole update, not a select per leaf: XLA copies every donated
    # moment buffer to keep the old value for a select (2x params of memory traffic and
    # temporaries per step); a cond updates the buffers in place and skips the work.
    # (Not the new params' norm too: on XLA:CPU that extra reduction made the 8-device ResNet
    # step deadlock in a collective rendezvous. The trainer checks it before each checkpoint.)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(old):
        params, opt_state, _ = old
        # the norm already taken, for the clipping (clip_jax.optim.clip_by_global_norm)
        updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
        params = optax.apply_updates(params, updates)
        # CLIP's clamp of the learned temperature, on the parameter (as open_clip does after each step).
        params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE))
        return params, opt_state, batch_stats

    params, opt_state, batch_stats = jax.lax.cond(
        finite, update, lambda old: old, (state.params, state.opt_state, state.batch_stats))
    bad = 1 - finite.astype(jnp.int32)
    skipped, in_a_row = state.skipped + bad, (state.skipped_in_a_row + 1) * bad
    # No params' norm here: one more pass over every param each step (1.3% of a ViT-B/32 step
    # on a CPU) for a figure the trainer needs only before a checkpoint (params_are_finite).
    metrics = {"loss": loss, "logit_scale": scale, "grad_norm": grad_norm,
               "skipped_steps": skipped, "skipped_in_a_row": in_a_row}
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, skipped, in_a_row)
    return new_state, metrics


@jax.jit
def params_are_finite(params):
    """Whether every parameter is finite (their global norm is): the check before a checkpoint."""
    return jnp.isfinite(optax.tree.norm(params))


def jit_train_step(model, optimizer, loss_fn, state: TrainState, batch_sharding, accum_steps: int = 1,
                   compiler_options: dict | None = None):
    """jit with explicit shardings: the state keeps its layout (donated), the batch is split on data axes.
    `compiler_options`: XLA options for this program alone (clip_jax.xla_cpu.step_compiler_options)."""
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    fn = lambda s, b: train_step(s, b, model=model, optimizer=optimizer, loss_fn=loss_fn, accum_steps=accum_steps)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    step = jax.jit(
        fn,
        in_shardings=(state_shardings, {"image": batch_sharding, "tokens": batch_sharding}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options or None,
    )
    # With oneDNN options its executables (in jit's cache) must outlive the run: xla_cpu.keep_alive.
    return xla_cpu.keep_alive(step, compiler_options)
