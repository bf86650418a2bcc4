"""The adaptation trains through the trainer's loop (clip_jax.train.loop): its non-finite guard stops
a streak and no checkpoint holds it; checkpoints hold the learned tensors only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.adapt import methods
from clip_jax.adapt.config import adapt_config
from clip_jax.adapt.data import Split
from clip_jax.adapt.train import Runner, train
from clip_jax.models import create_model, init_variables
from clip_jax.parallel.sharding import make_mesh
from clip_jax.train.loop import NonFiniteError

NAMES = ["cat", "dog", "bus"]


def _setup(**kw):
    model = create_model("ViT-Tiny-test")
    variables = init_variables(model, jax.random.key(3))
    s = adapt_config()
    s.update(dict(method="clip_adapter", batch_size=4, epochs=3, checkpoint_every_steps=1, **kw))
    runner = Runner(s, model, variables, make_mesh({"data": -1}))
    size = model.config.vision.image_size
    rng = np.random.default_rng(0)
    train_set = Split(rng.integers(0, 256, (8, size, size, 3), np.uint8), np.arange(8, dtype=np.int32) % 3)
    adapter = methods.make_adapter(s, model, runner.variables, NAMES, [[f"a photo of a {n}."] for n in NAMES])
    return runner, adapter, train_set


def test_a_non_finite_streak_stops_the_adaptation_and_is_never_checkpointed(tmp_path, monkeypatch):
    from clip_jax.adapt import method as adapt_method
    from clip_jax.train import checkpoint

    # every view NaN inside the step: every loss and gradient is NaN
    monkeypatch.setattr(adapt_method, "augment", lambda images, key, scale, size: jnp.full(
        (images.shape[0], size, size, 3), jnp.nan, jnp.float32))
    runner, adapter, train_set = _setup(max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite"):
        train(runner, adapter, train_set, str(tmp_path), log=lambda _: None)
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"))
    assert max(manager.all_steps()) == 2  # saved every step until the streak reached its limit at step 3
    import orbax.checkpoint as ocp

    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert set(state["params"]) == {"learned"}  # the frozen towers are not in the checkpoint
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))
