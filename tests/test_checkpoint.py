"""Orbax: the input position resumes the exact batch stream; a train state restores onto another mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_input_pipeline import captions, write_shards

from clip_jax.input.pipeline import InputPipeline
from clip_jax.train import checkpoint


def test_input_position_saved_with_checkpoint_resumes_exactly(tmp_path):
    glob = write_shards(tmp_path / "data", bad={(0, 3): "empty_caption"})
    make = lambda state=None: InputPipeline("tfrecord:" + glob, {"shuffle_buffer": 16}, global_batch_size=4,
                                            image_size=16, train=True, state=state)
    reference = make()
    ref = [next(reference) for _ in range(16)]
    run = make()
    for _ in range(5):
        next(run)
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"))
    checkpoint.save(manager, 5, {"w": jnp.ones(3)}, run.state(), force=True)
    manager.wait_until_finished()
    # "Crash": a new process-like start from the checkpoint only.
    restored, input_state, step = checkpoint.restore(checkpoint.make_manager(str(tmp_path / "ckpt")),
                                                     {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 5
    resumed = make(input_state)
    for want in ref[5:]:
        got = next(resumed)
        assert captions(got) == captions(want)
        np.testing.assert_array_equal(got["image"], want["image"])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated devices")
def test_state_written_on_8_devices_restores_on_4(tmp_path):
    mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    mesh4 = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    value = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    state = {"w": jax.device_put(value, NamedSharding(mesh8, P("fsdp"))), "step": jnp.int32(7)}
    manager = checkpoint.make_manager(str(tmp_path))
    checkpoint.save(manager, 7, state, None, force=True)
    manager.wait_until_finished()
    target = {"w": jax.ShapeDtypeStruct((64, 3), jnp.float32, sharding=NamedSharding(mesh4, P("fsdp"))),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh4, P()))}
    restored, input_state, _ = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), target)
    assert input_state is None
    np.testing.assert_array_equal(np.asarray(restored["w"]), value)
    assert len(restored["w"].sharding.device_set) == 4 and int(restored["step"]) == 7


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.restore(checkpoint.make_manager(str(tmp_path)), {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_a_train_state_saved_before_the_moving_average_existed_restores(tmp_path):
    """Checkpoints written before TrainState held 'ema' have no such entry: a run without a moving average reads
    them (not moved aside as unreadable); one with an average gets its state, ema included, back as saved."""
    from clip_jax.train.step import TrainState

    one = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                                      axis_types=(jax.sharding.AxisType.Auto,)), P())
    put = lambda x: jax.device_put(jnp.asarray(x), one)  # noqa: E731
    old = {"step": put(np.int32(5)), "params": {"w": put(np.arange(6, dtype=np.float32))}, "model_state": {},
           "opt_state": {"mu": put(np.ones(6, np.float32))}, "skipped": put(np.int32(1)),
           "skipped_in_a_row": put(np.int32(0))}
    manager = checkpoint.make_manager(str(tmp_path / "old"))
    checkpoint.save(manager, 5, old, None, force=True)
    manager.wait_until_finished()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                      TrainState(**old))
    restored, _, step = checkpoint.restore_latest_good(checkpoint.make_manager(str(tmp_path / "old")), abstract)
    assert step == 5 and isinstance(restored, TrainState) and restored.ema == {}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.arange(6))
    assert int(restored.skipped) == 1
    with_average = TrainState(**old, ema={"w": put(np.full(6, 2.0, np.float32))})
    manager = checkpoint.make_manager(str(tmp_path / "new"))
    checkpoint.save(manager, 5, with_average, None, force=True)
    manager.wait_until_finished()
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), with_average)
    restored, _, _ = checkpoint.restore(checkpoint.make_manager(str(tmp_path / "new")), target)
    np.testing.assert_array_equal(np.asarray(restored.ema["w"]), np.full(6, 2.0))
