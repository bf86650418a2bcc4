"""End to end: the trainer on the embedded dataset, and a restart that continues exactly."""

import json

import jax
import numpy as np

from clip_jax import train
import importlib.util
import os


def smoke_config(tmp_path, total_steps):
    spec = importlib.util.spec_from_file_location("smoke", os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.batch_size = 16
    c.total_steps = total_steps
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.shapes_sizes = {"train": 64, "validation": 8, "test": 8}
    c.data.shuffle_buffer = 32
    return c


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_restart_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(straight))
    interrupted = tmp_path / "interrupted"
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(interrupted), stop_at=4)  # stops after step 4 ...
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(interrupted))  # ... and a new run resumes there
    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6] and [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert set(x) >= {"step", "loss", "learning_rate", "logit_scale", "images_per_sec"}
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-6)
    # TensorBoard events hold the same losses.
    import tensorflow as tf

    events = sorted((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    logged = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            if value.tag == "loss":
                logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([logged[s] for s in range(1, 7)], [m["loss"] for m in a], rtol=1e-6)
