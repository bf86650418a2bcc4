"""Evaluation tasks are registered classes fed by the method's predict functions: a task of the
test's own, with a predict function of its own, runs beside the built-in ones in the same pass
over a split; what a source offers evaluation comes from clip_jax.input.catalog."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import evaluate
from clip_jax.evaluate import features
from clip_jax.evaluate.tasks import TASKS, Read, Task
from clip_jax.input import catalog, eval_data, records, shapes
from clip_jax.input.pipeline import parse_spec, shapes_files
from clip_jax.methods.base import Method, Prediction
from clip_jax.parallel import sharding

CLASSES = ["dark", "grey", "light"]
KW = dict(image_size=32, context_length=77, log=lambda *_: None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """15 records: flat images of brightness 20 + 15 * i, label i % 3, one caption each."""
    path = tmp_path_factory.mktemp("brightness")
    with records.ShardWriter(str(path / "flat"), 2) as w:
        for i in range(15):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 20, 3), 20 + 15 * i, np.uint8)).save(buf, format="PNG")
            w.write(records.serialize_example(buf.getvalue(), f"a {CLASSES[i % 3]} square number {i}", label=i % 3))
    classes = path / "classes.json"
    classes.write_text(json.dumps({"classnames": CLASSES, "templates": ["a {} square."]}))
    return f"tfrecord:{path}/flat-*", str(classes)


@pytest.fixture(scope="module")
def tiny_model():
    model = clip_jax.create_model("ViT-Tiny-test")
    return model, clip_jax.init_variables(model, jax.random.key(3))


class Brightness(Task):
    """brightness=DATA: the mean pixel value of a split's images per label, from a predict function
    the built-in tasks do not read."""

    predictions = ("pixel_mean",)

    def reads(self):
        return {"data": Read(self.spec.data, self.limit, ("label",), predictions=self.predictions)}

    def evaluate(self, feats, encoder):
        means, labels = feats["data"]["pixel_mean"], feats["data"]["labels"][:, 0]
        name = self.infos["data"].name
        return ({f"brightness/{name}/{CLASSES[k]}": float(means[labels == k].mean()) for k in range(3)},
                {"examples": int(len(means))})


class PixelMeans(Method):
    """A method that offers one more prediction than the towers': each image's mean value."""

    def predictions(self):
        mean = Prediction(lambda variables, images: images.astype(jnp.float32).mean(axis=(1, 2, 3)), "image", 3)
        return {**super().predictions(), "pixel_mean": mean}


def _encoder(model, variables, predictions):
    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return features.Encoder(model, jax.device_put(variables, replicated), mesh, predictions=predictions)


def test_a_task_is_one_class_and_its_registration(shards, tiny_model, monkeypatch):
    spec, classes = shards
    model, variables = tiny_model
    monkeypatch.setattr(TASKS, "_entries", dict(TASKS._entries))  # the registration ends with the test
    TASKS.register("brightness")(Brightness)
    passes = []
    extract = features.extract
    monkeypatch.setattr(features, "extract", lambda *a, **k: passes.append(k["predictions"]) or extract(*a, **k))
    encoder = _encoder(model, variables, PixelMeans(None, model, None).predictions())

    ev = evaluate.Evaluator(f"zero_shot={spec}|classes={classes},brightness={spec},retrieval={spec}", {}, **KW)
    metrics, details = ev.run(encoder, batch_size=8)
    assert len(ev.groups) == 1 and passes == [["image_embeds", "pixel_mean", "text_embeds"]]  # one pass serves all
    scale = float(np.exp(np.asarray(variables["params"]["logit_scale"])))  # the model's temperature, by hand
    assert float(encoder.value("logit_scale")) == pytest.approx(scale, rel=1e-6)

    info = eval_data.describe(spec, {})
    (batch,) = eval_data.eval_batches(info, {}, batch_size=32, image_size=32, context_length=77, label_keys=["label"])
    images, labels = batch["image"][batch["mask"]], batch["labels"][batch["mask"], 0]
    for k, name in enumerate(CLASSES):
        assert metrics[f"brightness/flat/{name}"] == pytest.approx(images[labels == k].mean(), rel=1e-5)
    assert details[f"brightness={spec}"] == {"examples": 15}

    alone, _ = evaluate.Evaluator(f"zero_shot={spec}|classes={classes},retrieval={spec}", {}, **KW).run(
        _encoder(model, variables, None), batch_size=8)  # the built-in tasks' figures are unchanged beside it
    assert alone == pytest.approx({k: v for k, v in metrics.items() if not k.startswith("brightness/")})
    assert set(alone) == {k for k in metrics if not k.startswith("brightness/")} and len(alone) == 2 + 6

    with pytest.raises(ValueError, match=r"brightness=.*needs the predictions \['pixel_mean'\]"):
        evaluate.Evaluator(f"brightness={spec}", {}, **KW).run(_encoder(model, variables, None), batch_size=8)
    with pytest.raises(ValueError, match="unknown option 'classes=x' for brightness"):
        evaluate.parse_evals(f"brightness={spec}|classes=x")


def test_the_catalog_says_what_a_source_offers():
    zh = catalog.of("shapes:test|lang=zh")
    source = parse_spec("shapes:test|lang=zh")
    assert zh.default_label_keys(source) == ["label", "label_color", "label_shape"]
    assert [zh.task_name(k) for k in ("label", "label_color", "label_shape", "other")] == ["combo", "color", "shape",
                                                                                            None]

    info = type("Info", (), {"source": source, "lang": "zh", "label_names": {}, "name": "shapes_zh.test"})
    colours = zh.class_names(info, "label_color")
    assert colours.names == list(shapes.COLOR_NAMES_ZH) and colours.prompts == shapes.prompts("color", lang="zh")
    assert zh.class_prompts(source, "label_shape") == shapes.prompts("shape", lang="zh")
    assert zh.class_prompts(source, "other") is None and zh.templates(source) is None
    assert zh.with_split("shapes:test|lang=zh", "train") == "shapes:train" and "lang" in zh.data_options

    tfds = catalog.of("tfds:cifar10:test")
    assert tfds.with_split("tfds:cifar10", "validation") == "tfds:cifar10:validation"
    shipped = catalog.load_metadata("cifar10")
    assert tfds.class_names(type("Info", (), {"source": parse_spec("tfds:cifar10:test")}), "label") == \
        catalog.ClassNames(shipped["classnames"], catalog.prompts_for(shipped))
    notes = []
    own = type("Info", (), {"source": parse_spec("tfds:mine:test"), "name": "mine.test",
                            "label_names": {"label": ["tabby_cat", "dog"]}})
    assert tfds.class_names(own, "label", notes.append) == catalog.ClassNames(
        ["tabby cat", "dog"], [["a photo of a tabby cat."], ["a photo of a dog."]])
    assert len(notes) == 1 and "no class-name file ships for mine.test" in notes[0]
    assert tfds.templates(parse_spec("tfds:cifar10/x:test")) == shipped["templates"]
    assert tfds.templates(own.source) is None and tfds.class_prompts(own.source, "label") is None

    plain = catalog.of("tfrecord:/data/x-*")
    assert plain.with_split("tfrecord:/data/x-*", "test") == "tfrecord:/data/x-*"
    assert plain.class_names(own, "label") is None and plain.preview("tfrecord:/data/x-*", {}, 4) is None
    assert type(catalog.of("nosuchkind:x")) is catalog.Catalog


def test_the_preview_is_the_split_the_catalog_names(tmp_path):
    config = {"cache_dir": str(tmp_path), "shapes_sizes": {"train": 8, "validation": 8, "test": 8}}
    preview = catalog.of("shapes:train|lang=zh").preview("shapes:train|lang=zh", config, 5)
    test = shapes.read_split(shapes_files("test", config))[:5]
    assert preview.labels == [r["label"] for r in test] and len(preview.images) == 5
    np.testing.assert_array_equal(preview.images[0], test[0]["image"])
    assert preview.names == shapes.class_names("combo") and preview.prompts == shapes.prompts("combo", lang="zh")


def test_adaptation_prompts_come_from_the_catalog():
    from types import SimpleNamespace

    from clip_jax.adapt.prompts import class_prompts

    zh = SimpleNamespace(dataset="shapes|lang=zh", label_key="label_color", templates=())
    assert class_prompts(zh, shapes.class_names("color")) == shapes.prompts("color", lang="zh")
    cifar = SimpleNamespace(dataset="tfds:cifar10", label_key="label", templates=())
    templates = catalog.load_metadata("cifar10")["templates"]
    assert class_prompts(cifar, ["cat", "dog"]) == [[t.format(c) for t in templates] for c in ("cat", "dog")]
    own = SimpleNamespace(dataset="tfds:cifar10", label_key="label", templates=("{} here",))
    assert class_prompts(own, ["cat"]) == [["cat here"]]


def test_specs_of_one_task_on_one_dataset_get_keys_of_their_own(shards, tiny_model, tmp_path):
    """Two zero-shot specs on one split with other class files: keys told apart by the option that differs, each
    with the figures of that spec evaluated alone; specs that differ in nothing are refused before any pass."""
    spec, classes = shards
    model, variables = tiny_model
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"classnames": CLASSES[::-1], "templates": ["{}"]}))
    encoder = _encoder(model, variables, None)
    both, _ = evaluate.Evaluator(f"zero_shot={spec}|classes={classes},zero_shot={spec}|classes={other}", {},
                                 **KW).run(encoder, batch_size=8)
    for path in (classes, str(other)):
        alone, _ = evaluate.Evaluator(f"zero_shot={spec}|classes={path}", {}, **KW).run(encoder, batch_size=8)
        tag = "classes-" + str(path).replace("/", "_").strip("_")
        assert {k.replace("flat/", f"flat.{tag}/"): v for k, v in alone.items()} == pytest.approx(
            {k: v for k, v in both.items() if f"flat.{tag}/" in k})
    assert len(both) == 2 * len(alone)

    def tags(*specs):
        tasks = [TASKS.get(s.task)(s, {}) for s in evaluate.parse_evals(list(specs))]
        for task in tasks:
            task.infos = {"data": eval_data.SplitInfo(str(task.spec), None, "shapes_scenes.test", None, {}, None)}
        evaluate.evaluator.tag_collisions(tasks)
        return [task.named("shapes_scenes.test") for task in tasks]

    # one spec keeps the contract's keys; a spec without the differing option keeps them too
    assert tags("segmentation=shapes_scenes:test") == ["shapes_scenes.test"]
    assert tags("segmentation=shapes_scenes:test", "segmentation=shapes_scenes:test|labels=color",
                "segmentation=shapes_scenes:test|labels=combo|bg_thresh=0.9") == [
        "shapes_scenes.test", "shapes_scenes.test.labels-color", "shapes_scenes.test.bg_thresh-0.9.labels-combo"]
    assert tags("segmentation=shapes_scenes:test", "zero_shot=shapes_scenes:test") == ["shapes_scenes.test"] * 2
    with pytest.raises(ValueError, match=r"segmentation=shapes_scenes:test\|labels=color and .* same evaluation"):
        tags("segmentation=shapes_scenes:test|labels=color", "segmentation=shapes_scenes:test|labels=color")
