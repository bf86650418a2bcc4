"""A few-shot adaptation as a method of the one train step (clip_jax.train.step).

The step's params are {'learned': the adapter's tensors, 'towers': the frozen CLIP's params}
and the method's parameter group freezes 'towers/.*': the step computes no gradient for the
towers and the optimizer holds no state for them, as for a locked tower in pretraining. The
towers are laid out on the mesh by their logical axes (config.mesh: data, fsdp, tensor), the
learned tensors replicated; the batch (uint8 images, labels, row weights) is split over the
data axes and augmented on the device from the step's key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax.methods.base import Method
from clip_jax.parallel import sharding
from clip_jax.preprocessing import normalize_images
from clip_jax.train.build import abstract_state
from clip_jax.train.optim import ParamGroups, resolve_param_groups
from clip_jax.train.step import TrainState, create_state, jit_train_step

FROZEN_TOWERS = (("towers/.*", {"frozen": True}),)


# -- training views, on the device ------------------------------------------------------------
def _random_resized_crop(image, key, scale, size: int):
    """One uint8 [S, S, 3] image -> float [size, size, 3] pixels: a crop of area share in `scale` and
    aspect ratio in [3/4, 4/3] (clipped to the image), resized (cubic, antialiased), flipped with
    p = 0.5."""
    h, w = image.shape[0], image.shape[1]
    k = jax.random.split(key, 5)
    area = jax.random.uniform(k[0], minval=scale[0], maxval=scale[1])
    ratio = jnp.exp(jax.random.uniform(k[1], minval=math.log(3 / 4), maxval=math.log(4 / 3)))
    cw = jnp.minimum(jnp.sqrt(area * ratio), 1.0) * w
    ch = jnp.minimum(jnp.sqrt(area / ratio), 1.0) * h
    x0 = jax.random.uniform(k[2]) * (w - cw)
    y0 = jax.random.uniform(k[3]) * (h - ch)
    sy, sx = size / ch, size / cw
    out = jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, 3), (0, 1), jnp.stack([sy, sx]),
                                        jnp.stack([-y0 * sy, -x0 * sx]), method="cubic", antialias=True)
    out = jnp.where(jax.random.bernoulli(k[4]), out[:, ::-1], out)
    return jnp.clip(out, 0.0, 255.0)


def augment(images, key, scale, size: int):
    """uint8 [B, S, S, 3] -> normalized float [B, size, size, 3], one key per image."""
    keys = jax.random.split(key, images.shape[0])
    return normalize_images(jax.vmap(lambda im, k: _random_resized_crop(im, k, scale, size))(images, keys))


# -- the method -------------------------------------------------------------------------------
class FewShotMethod(Method):
    """Cross-entropy of the adapter's class logits on augmented views of the batch's images.

    Batch: 'image' uint8 [N, S, S, 3], 'label' int32 [N], 'weight' float32 [N]: a row's weight is
    N / (real rows) for a real row and 0 for padding, so the mean of weight x loss over any split
    of the batch (devices, accumulation) is the mean over the real rows."""

    batch_keys = ("image", "label", "weight")

    def __init__(self, adapter, crop_scale, mesh):
        super().__init__(None, adapter.model, mesh)
        self.adapter = adapter
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.size = adapter.model.config.vision.image_size

    def batch_shapes(self, n):
        return {"image": jax.ShapeDtypeStruct((n, self.size, self.size, 3), jnp.uint8),
                "label": jax.ShapeDtypeStruct((n,), jnp.int32),
                "weight": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def param_groups(self):
        return FROZEN_TOWERS

    def loss(self, params, model_state, batch, rng, train=True):
        views = augment(batch["image"], rng, self.crop_scale, self.size)
        with self.adapter.bound(towers_variables(params, model_state)):
            features = self.adapter.image_features(params["learned"], views)
            logits = self.adapter.logits(params["learned"], features, train=True)
        labels, weight = batch["label"], batch["weight"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
        return jnp.mean(ce * weight), {"train_top1": jnp.mean(correct * weight)}, model_state

    def model_variables(self, params, model_state):
        return towers_variables(params, model_state)


def towers_variables(params, model_state) -> dict:
    """The frozen CLIP's variables from the step's params and state."""
    return {"params": params["towers"], **model_state}


def row_weights(real: int, rows: int):
    """The batch's 'weight' for `real` real rows padded to `rows`."""
    import numpy as np

    return np.where(np.arange(rows) < real, rows / max(real, 1), 0.0).astype(np.float32)


# -- the assembly -----------------------------------------------------------------------------
@dataclasses.dataclass
class AdaptRun:
    method: FewShotMethod
    groups: ParamGroups
    state: TrainState  # params {'learned', 'towers'}; model_state: the towers' other collections
    batch_sharding: NamedSharding
    step_fn: Callable  # (state, batch) -> (state, metrics), the one train step, jitted; the state donated


def build_adaptation(adapter, optimizer, variables, mesh, *, crop_scale, seed: int, accum_steps: int = 1,
                     abstract: bool = False) -> AdaptRun:
    """The adapter's train step and its initial state (the learned tensors: adapter.init at `seed`).
    `variables`: the frozen CLIP's, already laid out on `mesh` (sharding.variable_shardings), or
    with `abstract` their jax.ShapeDtypeStructs with shardings (nothing is allocated: the step can
    be compiled for a topology this host does not have). The step donates its state, the towers'
    buffers with it: after a step, read the frozen variables from the state (towers_variables),
    not from `variables`."""
    method = FewShotMethod(adapter, crop_scale, mesh)
    replicated = NamedSharding(mesh, P())
    init = lambda: adapter.init(jax.random.key(seed))  # noqa: E731
    learned = jax.eval_shape(init) if abstract else init()
    params = {"learned": learned, "towers": variables["params"]}
    model_state = {k: v for k, v in variables.items() if k != "params"}
    groups = resolve_param_groups(params, None, method.param_groups())
    if abstract:
        params["learned"] = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), learned)
        state = abstract_state({"params": params, **model_state}, optimizer, groups, mesh)
    else:
        params["learned"] = jax.device_put(learned, replicated, may_alias=False)  # the adapter's own stay live
        state = create_state({"params": params, **model_state}, optimizer, groups)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jit_train_step(method, optimizer, state, batch_sharding, groups=groups, accum_steps=accum_steps,
                             seed=seed)
    return AdaptRun(method, groups, state, batch_sharding, step_fn)
