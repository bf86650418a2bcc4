"""The train state and the jitted, sharded train step: one pure function for every method.

The step asks the method for (loss, metrics, model state) on the batch, differentiates with
respect to the trained params only (frozen params get no gradient and hold no optimizer
state), applies the optimizer, lets the method fix params (post_update), and guards the
whole update against a non-finite loss or gradient.

Gradient accumulation (`accum_steps` > 1) splits every batch key into microbatches and
averages their losses, metrics and gradients: a contrastive loss is then computed over each
microbatch (N / accum_steps pairs, across all devices), NOT over the full accumulated batch.
It trades negatives for memory; for the full N x N matrix at lower memory use the ring loss.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from clip_jax.methods.base import Method
from clip_jax.parallel import sharding
from clip_jax.train.optim import ParamGroups, merge


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # every param of the method, trained and frozen
    model_state: Any  # the non-param collections (BatchNorm statistics); {} when there are none
    opt_state: Any  # over the trained params only
    # Steps whose loss or gradient was not finite: not applied, counted (total, and in a row).
    skipped: jax.Array
    skipped_in_a_row: jax.Array
    ema: Any = flax.struct.field(default_factory=dict)  # the trained params' moving average; {} without one


def create_state(variables, optimizer: optax.GradientTransformation, groups: ParamGroups | None = None,
                 ema: bool = False) -> TrainState:
    """The state on the params' mesh: optimizer moments (and with `ema` the moving average, starting at the
    params) sharded like the params, scalars replicated."""
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    trained = groups.trainable(params) if groups is not None else params
    opt_state = jax.jit(optimizer.init)(trained)  # created where, and sharded as, the params are
    average = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t))(trained) if ema else {}  # own buffers: donated
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    state = TrainState(zero(), params, model_state, opt_state, zero(), zero(), average)
    sharding = jax.tree_util.tree_leaves(params)[0].sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return state
    devices = set(sharding.mesh.devices.flat)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    # Leaves that do not depend on the params (step, Adam's count) land on one device otherwise.
    return jax.tree_util.tree_map(
        lambda x: x if x.sharding.device_set == devices else jax.device_put(x, replicated), state
    )


def step_rng(seed: int, step) -> jax.Array:
    """The step's random key: the same for a step wherever and whenever it runs (resume, mesh)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def train_step(state: TrainState, batch: dict, *, method: Method, optimizer, groups: ParamGroups | None = None,
               accum_steps: int = 1, seed: int = 0, ema_decay: float = 0.0):
    """One optimizer step on a global batch holding the method's batch_keys; with `ema_decay` the state's
    moving average follows the updated params."""
    missing = [k for k in method.batch_keys if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing} "
                         f"(the method needs {list(method.batch_keys)}; it has {sorted(batch)})")
    batch = {k: batch[k] for k in method.batch_keys}
    if groups is None:
        trained, frozen = state.params, {}
    else:
        trained, frozen = groups.trainable(state.params), groups.fixed(state.params)
    rng = step_rng(seed, state.step)

    def loss_fn(trained, model_state, batch, rng):
        loss, metrics, model_state = method.loss(merge(trained, frozen), model_state, batch, rng, train=True)
        return loss, (metrics, model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, (metrics, model_state)), grads = grad_fn(trained, state.model_state, batch, rng)
    else:
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if n % accum_steps:
            raise ValueError(f"global batch {n} does not split into {accum_steps} microbatches")
        micro = lambda x: x.reshape((accum_steps, n // accum_steps) + x.shape[1:])  # noqa: E731

        def body(carry, xs):
            grads, loss, metrics, model_state = carry
            i, mb = xs
            (micro_loss, (m, model_state)), g = grad_fn(trained, model_state, mb, jax.random.fold_in(rng, i))
            add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
            return (add(grads, g), loss + micro_loss, add(metrics, m), model_state), None

        micro_batches = {k: micro(v) for k, v in batch.items()}
        first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
        metric_shapes = jax.eval_shape(grad_fn, trained, state.model_state, first, rng)[0][1][0]
        carry = (jax.tree_util.tree_map(jnp.zeros_like, trained), jnp.zeros((), jnp.float32),
                 jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes), state.model_state)
        (grads, loss, metrics, model_state), _ = jax.lax.scan(body, carry, (jnp.arange(accum_steps), micro_batches))
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
        loss = loss / accum_steps
        metrics = jax.tree_util.tree_map(lambda m: m / accum_steps, metrics)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient is never applied: params, moments and statistics stay as
    # they were (the step counter and the data still advance); the trainer stops on a streak.
    # One cond around the whole update, not a select per leaf: a select makes XLA copy every
    # donated moment buffer to keep the old value; a cond updates in place and skips the work.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(old):
        trained, opt_state, _, ema = old
        # the norm already taken, for the clipping (clip_jax.train.optim.clip_by_global_norm)
        updates, opt_state = optimizer.update(grads, opt_state, trained, grad_norm=grad_norm)
        params = method.post_update(merge(optax.apply_updates(trained, updates), frozen))
        trained = groups.trainable(params) if groups is not None else params  # frozen params never change
        if ema_decay:
            ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, trained)
        return trained, opt_state, model_state, ema

    trained, opt_state, model_state, ema = jax.lax.cond(
        finite, update, lambda old: old, (trained, state.opt_state, state.model_state, state.ema))
    bad = 1 - finite.astype(jnp.int32)
    skipped, in_a_row = state.skipped + bad, (state.skipped_in_a_row + 1) * bad
    # No params' norm here: one more pass over every param each step, for a figure the
    # trainer needs only before a checkpoint (params_are_finite).
    metrics = {"loss": loss, **metrics, "grad_norm": grad_norm, "skipped_steps": skipped, "skipped_in_a_row": in_a_row}
    new_state = TrainState(state.step + 1, merge(trained, frozen), model_state, opt_state, skipped, in_a_row, ema)
    return new_state, metrics


@jax.jit
def params_are_finite(params):
    """Whether every parameter is finite (their global norm is): the check before a checkpoint."""
    return jnp.isfinite(optax.tree.norm(params))


def jit_train_step(method: Method, optimizer, state: TrainState, batch_sharding, *, groups: ParamGroups | None = None,
                   accum_steps: int = 1, seed: int = 0, ema_decay: float = 0.0, compiler_options: dict | None = None):
    """jit with explicit shardings: the state keeps its layout (donated), every batch key is split on
    the data axes. `compiler_options`: XLA options for this program alone."""
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)

    def fn(s, b):
        with sharding.activation_layouts(batch_sharding.mesh):
            return train_step(s, b, method=method, optimizer=optimizer, groups=groups, accum_steps=accum_steps,
                              seed=seed, ema_decay=ema_decay)

    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        fn,
        in_shardings=(state_shardings, {k: batch_sharding for k in method.batch_keys}),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options or None,
    )
