"""A run that its input ends (no usable data) ends with that error as the last line a user reads: the
input's reader threads are stopped before it is printed, so none of their warnings (an unreadable
shard, read again and again by a stream still reading ahead) comes after it; the checkpoints before
it stay."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from clip_jax.input import records  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "clip_jax input: unreadable shard"


def train(workdir, data: str, tmp_path, **overrides) -> subprocess.CompletedProcess:
    """The train CLI on the smoke config with a tiny model, stdout and stderr in one stream as a terminal shows them."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("CLIP_JAX_COORDINATOR", "CLIP_JAX_NUM_PROCESSES", "CLIP_JAX_PROCESS_ID"):
        env.pop(key, None)
    args = [f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path}/data",
            f"--config.compilation_cache_dir={tmp_path}/xla", "--config.eval_every_steps=0",
            "--config.log_every_steps=1", "--config.model=ViT-Tiny-test", "--config.summary_png=False",
            f"--config.data.train=tfrecord:{data}/*.tfrecord"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.run([sys.executable, "-m", "clip_jax.train"] + args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def write_pictures(path, count: int, cut: int = 0) -> None:
    """`count` image-caption records; the file's last `cut` bytes cut off (an unreadable shard that
    still gives its records before the damage)."""
    rng = np.random.default_rng(count)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
            writer.write(records.serialize_example(buf.getvalue(), f"a picture {i}"))
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])


def test_random_bytes_end_the_run_with_the_error_as_its_last_line(tmp_path):
    """The smoke config's two streams each read a file of random bytes: the first stream to end raises,
    and its own read-ahead (the next epochs of the same file) prints nothing after."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(2):
        (garbage / f"part{i}.tfrecord").write_bytes(np.random.default_rng(i).bytes(200_000))
    done = train(tmp_path / "run", garbage, tmp_path, total_steps=2)
    assert done.returncode != 0
    assert last_line(done.stdout).startswith("clip_jax.input.pipeline.NoUsableData: data stream 0 of 2 read a whole "
                                             "pass over its files without one usable example"), done.stdout[-3000:]
    assert "unreadable_shard=1. Files: " in last_line(done.stdout)
    assert WARNING in done.stdout  # the warning itself is still shown, before the error


@pytest.mark.slow
def test_records_that_do_not_parse_end_a_resumed_run_after_the_other_streams_readers(tmp_path):
    """Stream 1's records are no tf.train.Example; stream 0 reads a damaged shard with one usable record,
    so it is still reading epoch after epoch (a warning each) when stream 1 ends the run. A run resumed
    from a checkpoint: the checkpoints stay as they were."""
    good = tmp_path / "good"
    good.mkdir()
    for name in ("a", "b"):
        write_pictures(good / f"{name}.tfrecord", 4)
    workdir = tmp_path / "run"
    # batch 512: stream 0 needs 256 epochs of its damaged shard for one batch, so it is still reading when
    # stream 1 stops
    size = {"batch_size": 512, "checkpoint_every_steps": 1}
    first = train(workdir, good, tmp_path, total_steps=1, **size)
    assert first.returncode == 0, first.stdout[-3000:]
    checkpoints = sorted(os.listdir(workdir / "checkpoints"))
    assert "1" in checkpoints

    mixed = tmp_path / "mixed"
    mixed_streams(mixed)
    done = train(workdir, mixed, tmp_path, total_steps=3, **size)
    assert done.returncode != 0
    assert "resumed from step 1" in done.stdout, done.stdout[-3000:]
    assert WARNING in done.stdout
    assert last_line(done.stdout).startswith("clip_jax.input.pipeline.NoUsableData: data stream 1 of 2 read a whole "
                                             "pass over its files without one usable example"), done.stdout[-3000:]
    assert "not_an_example=20. Files: " in last_line(done.stdout) and "b.tfrecord" in last_line(done.stdout)
    assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints
    again = train(workdir, good, tmp_path, total_steps=1, **size)  # the checkpoint restores (no step is left)
    assert again.returncode == 0 and "resumed from step 1" in again.stdout, again.stdout[-3000:]


def mixed_streams(folder) -> str:
    """Two streams: stream 0 a damaged shard with one usable record (it reads epoch after epoch, a warning
    each, for a batch), stream 1 records that are no tf.train.Example (no usable data)."""
    folder.mkdir()
    write_pictures(folder / "a.tfrecord", 2, cut=10)
    with tf.io.TFRecordWriter(str(folder / "b.tfrecord")) as writer:
        for _ in range(20):
            writer.write(b"not an example")
    return f"tfrecord:{folder}/*.tfrecord"


def pipeline(spec: str):
    from clip_jax.input.pipeline import InputPipeline

    return InputPipeline(spec, {"streams": 2}, global_batch_size=512, image_size=16, train=True)


def printed_within(capfd, seconds: float) -> str:
    """What the process writes to stderr (tf.print's, at the file descriptor) within the next `seconds`."""
    import time

    capfd.readouterr()
    time.sleep(seconds)
    return capfd.readouterr().err


def test_an_input_error_stops_every_streams_readers_before_it_is_raised(tmp_path, capfd):
    from clip_jax.input.pipeline import NoUsableData

    pipe = pipeline(mixed_streams(tmp_path / "mixed"))
    with pytest.raises(NoUsableData, match="data stream 1 of 2 .*not_an_example=20") as raised:
        next(pipe)
    assert WARNING not in printed_within(capfd, 1.0)  # stream 0 was still reading ahead when stream 1 stopped
    with pytest.raises(NoUsableData) as again:  # the pipeline stays ended: the same error
        next(pipe)
    assert again.value is raised.value


def test_closing_the_device_prefetch_stops_the_pipelines_readers(tmp_path, capfd):
    """An error of the run's own (not its input's) closes the batches in the trainer: the reader thread
    and the pipeline's readers stop, so nothing of theirs prints after it; a later read says it was closed."""
    import jax

    from clip_jax.input.pipeline import DevicePrefetch

    folder = tmp_path / "damaged"
    folder.mkdir()
    for name in ("a", "b"):  # each stream reads a damaged shard with one usable record
        write_pictures(folder / f"{name}.tfrecord", 2, cut=10)
    for interrupted in (None, lambda: False):  # read here, or by the reader thread
        pipe = pipeline(f"tfrecord:{folder}/*.tfrecord")
        batches = DevicePrefetch(pipe, jax.sharding.SingleDeviceSharding(jax.devices()[0]), size=1,
                                 interrupted=interrupted)
        next(batches)
        batches.close()
        assert WARNING not in printed_within(capfd, 1.0)
        with pytest.raises(ValueError, match=r"the input pipeline of tfrecord:.*\*\.tfrecord was closed"):
            next(pipe)
