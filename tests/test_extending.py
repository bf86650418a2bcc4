"""docs/extending.md's complete example runs as written: its one python block, saved outside the
repository and run with `python FILE` from the repository root, registers a record feature, a method
and an evaluation task of its own, trains through the trainer and prints the task's figure."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "extending.md")
# The example's last line, and what its task scores: the second half of limit=256 images.
FIGURE = re.compile(r"^object count accuracy: (\d\.\d{3})$", re.MULTILINE)
SCORED = 128


def example() -> str:
    with open(DOC) as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"{DOC} holds {len(blocks)} python blocks; the example is the one"
    return blocks[0]


def test_the_example_is_one_block_that_registers_its_own_parts():
    code = example()
    for registration in ('FEATURES.register("num_objects")', '@METHODS.register("clip_count")',
                         '@TASKS.register("object_count")', "train_and_evaluate(config"):
        assert registration in code
    assert not re.search(r"clip_jax[\w.]* import .*\b_\w", code), "the example imports a private name"


@pytest.mark.slow
def test_the_example_runs_as_written(tmp_path):
    path = tmp_path / "count_objects.py"  # outside the repository
    path.write_text(example())
    env = dict(os.environ)
    # From a checkout: the repository's package before an installed one, nothing else added.
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = FIGURE.findall(result.stdout)
    assert len(figures) == 1, result.stdout[-3000:]
    accuracy = float(figures[0])
    assert 0.0 <= accuracy <= 1.0
    # A share of the 128 images the task scored, printed to 3 decimals.
    assert abs(accuracy * SCORED - round(accuracy * SCORED)) <= 0.0005 * SCORED + 1e-9
    assert re.search(r"object_count\s+shapes\.train\s+accuracy=", result.stdout)  # the trainer's evaluation table


# -- the seam the example needed: a task reads a record feature beside the method's predictions --------
def _count_feature():
    tf = pytest.importorskip("tensorflow")
    from clip_jax.input.features import FEATURES, Feature

    if "test_extending_count" not in FEATURES:
        FEATURES.register("test_extending_count")(Feature(
            parse=lambda reading: {"objects/shape": tf.io.VarLenFeature(tf.int64)},
            value=lambda parsed, reading: tf.size(parsed["objects/shape"].values, out_type=tf.int32),
            empty=lambda reading: tf.constant(0, tf.int32)))
    return "test_extending_count"


def test_a_task_reads_record_features_and_a_varying_one_is_refused_early(tmp_path, monkeypatch):
    import jax
    import numpy as np

    import clip_jax
    from clip_jax.evaluate import Evaluator
    from clip_jax.evaluate.features import Encoder
    from clip_jax.evaluate.tasks import TASKS, Read, Task
    from clip_jax.input.pipeline import shapes_files
    from clip_jax.parallel import sharding

    tf = pytest.importorskip("tensorflow")
    count = _count_feature()
    seen = {}

    class Counts(Task):
        def reads(self):
            return {"data": Read(self.spec.data, self.limit, predictions=self.predictions, features=(count,))}

        def evaluate(self, features, encoder):
            seen.update(features["data"])
            return {f"counts/{self.infos['data'].name}/mean": float(features["data"][count].mean())}, {}

    class Shapes(Counts):  # reads the per-object list itself, which has no fixed shape per example
        def reads(self):
            return {"data": Read(self.spec.data, features=("objects/shape",))}

    class Clash(Counts):  # a record feature under a prediction's name
        def reads(self):
            return {"data": Read(self.spec.data, features=("image_embeds",))}

    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the registrations end with the test
    for name, task in (("counts", Counts), ("shape_lists", Shapes), ("clash", Clash)):
        TASKS.register(name)(task)
    config = {"cache_dir": str(tmp_path), "shapes_sizes": {"train": 24, "validation": 4, "test": 4},
              "shapes_shards": {"train": 2, "validation": 1, "test": 1}}
    kw = dict(image_size=32, context_length=77, log=lambda *_: None)
    model = clip_jax.create_model("ViT-Tiny-test")
    mesh = sharding.make_mesh({"data": -1})
    encoder = Encoder(model, clip_jax.init_variables(model, jax.random.key(0)), mesh)

    metrics, _ = Evaluator("counts=shapes:train", config, **kw).run(encoder, batch_size=16)  # 24 rows: one padded
    want = [len(tf.train.Example.FromString(r).features.feature["objects/shape"].int64_list.value)
            for path in shapes_files("train", config) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    assert seen[count].tolist() == want and set(want) == {1, 2}  # each record's own count, in the split's order
    assert len(seen["image_embeds"]) == len(want) == 24
    assert metrics["counts/shapes.train/mean"] == pytest.approx(np.mean(want))
    with pytest.raises(ValueError, match=r"record feature 'objects/shape' has shape \(None,\) per example"):
        Evaluator("shape_lists=shapes:train", config, **kw)
    with pytest.raises(ValueError, match=r"\['image_embeds'\] name both a record feature and a prediction"):
        Evaluator("clash=shapes:train", config, **kw)
