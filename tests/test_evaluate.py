"""Evaluation: sharded feature extraction and the evaluators against a plain one-device
computation on the same images, on a small tfds dataset made here; the CLI on a training
workdir and on its export; the errors for missing data and mismatched class names."""

import json

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import evaluate
from clip_jax.evaluate import features, zero_shot
from clip_jax.evaluate.retrieval import recall_at_k
from clip_jax.input import eval_data
from clip_jax.parallel import sharding

CLASSES = ["circle", "square", "triangle"]


def _images(rng, n):
    return [rng.integers(0, 256, (int(rng.integers(24, 48)), int(rng.integers(24, 48)), 3), dtype=np.uint8)
            for _ in range(n)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """'cliptiny': image, label (3 named classes), 0-3 captions per image; train 30 / validation 12 / test 21."""
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    features_ = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=CLASSES),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
    })
    rng = np.random.default_rng(0)

    def split(name, n):
        rows = []
        for i, image in enumerate(_images(rng, n)):
            captions = [f"a {CLASSES[i % 3]} number {i} version {j}" for j in range(i % 4)]
            rows.append((f"{name}{i}", {"image": image, "label": i % 3, "captions": {"text": captions}}))
        return rows

    tfds.dataset_builders.store_as_tfds_dataset(
        "cliptiny", "1.0.0", features_,
        {"train": split("tr", 30), "validation": split("va", 12), "test": split("te", 21)},
        data_dir=data_dir, disable_shuffling=True)
    return data_dir


@pytest.fixture(scope="module")
def tiny_model():
    model = clip_jax.create_model("ViT-Tiny-test")
    return model, clip_jax.init_variables(model, jax.random.key(3))


def _classes_file(tmp_path, names=CLASSES):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"classnames": names, "templates": ["a photo of a {}.", "a drawing of a {}."]}))
    return str(path)


def _plain(model, variables, info, config, max_captions=5):
    """Every example in one host batch, encoded on one device with the public API."""
    ctx = model.config.text.context_length
    (batch,) = eval_data.eval_batches(info, config, batch_size=64, image_size=model.config.vision.image_size,
                                      context_length=ctx, label_keys=["label"], max_captions=max_captions)
    mask = batch["mask"]
    out = {"image_embeds": clip_jax.encode_image(model, variables, batch["image"][mask]),
           "labels": batch["labels"][mask, 0]}
    if max_captions:
        tokens, cmask = batch["tokens"][mask], batch["caption_mask"][mask]
        out["text_embeds"] = clip_jax.encode_text(model, variables, tokens.reshape(-1, ctx)).reshape(
            tokens.shape[0], max_captions, -1)
        out["caption_mask"] = cmask
    return out


def _encoder(model, variables):
    mesh = sharding.make_mesh({"data": -1})  # the 8 host devices of conftest
    assert mesh.devices.size == 8
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return features.Encoder(model, jax.device_put(variables, replicated), mesh)


def test_extract_on_8_devices_with_padding_equals_one_device(tfds_dir, tiny_model):
    model, variables = tiny_model
    config = {"data_dir": tfds_dir}
    info = eval_data.describe("tfds:cliptiny:test", config, label_keys=["label"], need_captions=True)
    assert info.num_examples == 21 and info.label_names == {"label": CLASSES} and info.caption_key == "captions/text"
    ref = _plain(model, variables, info, config)
    batches = eval_data.eval_batches(info, config, batch_size=8, image_size=32, context_length=77,
                                     label_keys=["label"], max_captions=5)  # 3 batches, the last 5 rows real
    got = features.extract(_encoder(model, variables), batches, texts=True)
    assert got["image_embeds"].shape == (21, 32)
    np.testing.assert_allclose(got["image_embeds"], ref["image_embeds"], atol=2e-6)
    np.testing.assert_array_equal(got["labels"][:, 0], ref["labels"])
    np.testing.assert_array_equal(got["caption_mask"], ref["caption_mask"])
    np.testing.assert_array_equal(got["caption_mask"].sum(1), np.arange(21) % 4)  # 0-3 captions, as written
    m = ref["caption_mask"]
    np.testing.assert_allclose(got["text_embeds"][m], ref["text_embeds"][m], atol=2e-6)


def test_zero_shot_and_retrieval_equal_a_plain_computation(tfds_dir, tiny_model, tmp_path):
    model, variables = tiny_model
    config = {"data_dir": tfds_dir}
    classes = _classes_file(tmp_path)
    ev = evaluate.Evaluator(f"zero_shot=tfds:cliptiny:test|classes={classes},"
                            "retrieval=tfds:cliptiny:test|max_captions=2",
                            config, image_size=32, context_length=77, log=lambda *_: None)
    assert len(ev.groups) == 1  # one pass over the split serves both
    metrics, details = ev.run(_encoder(model, variables), batch_size=8)

    info = eval_data.describe("tfds:cliptiny:test", config, label_keys=["label"], need_captions=True)
    ref = _plain(model, variables, info, config)
    weights = zero_shot.classifier_weights(model, variables, zero_shot.prompts_for(zero_shot.load_metadata(classes)))
    logits = ref["image_embeds"] @ weights.T
    want = zero_shot.topk_accuracy(logits, ref["labels"], ks=(1,))
    assert metrics["zero_shot/cliptiny.test/top1"] == pytest.approx(want["top1"])
    per_class = zero_shot.per_class_accuracy(logits, ref["labels"])
    assert metrics["zero_shot/cliptiny.test/mean_per_class"] == pytest.approx(np.mean(per_class))
    assert "zero_shot/cliptiny.test/top5" not in metrics  # 3 classes
    key = f"zero_shot=tfds:cliptiny:test|classes={classes}"
    assert details[key]["per_class"] == pytest.approx(dict(zip(CLASSES, per_class)))

    has = ref["caption_mask"][:, :2].any(1)
    m = ref["caption_mask"][has][:, :2]
    texts = ref["text_embeds"][has][:, :2][m]
    want = recall_at_k(ref["image_embeds"][has], texts, np.nonzero(m)[0])
    for k, v in want.items():
        assert metrics[f"retrieval/cliptiny.test/{k}"] == pytest.approx(v)
    r = details["retrieval=tfds:cliptiny:test|max_captions=2"]
    assert r == {"images": 15, "captions": 5 + 2 * 10, "images_without_caption": 6}


def test_shipped_class_names_are_found_by_tfds_name():
    assert evaluate.find_metadata("cifar10") == "cifar10"
    assert evaluate.find_metadata("cifar100") == "cifar100"
    assert evaluate.find_metadata("imagenet2012") == "imagenet"
    assert evaluate.find_metadata("food101") == "food101"
    assert evaluate.find_metadata("no_such_dataset") is None


def test_spec_parsing():
    specs = evaluate.parse_evals("shapes:test, retrieval=tfrecord:/a/x-*,/b/y-*|max_captions=3,"
                                 "linear_probe=tfds:cifar10|val=train[:10%]")
    assert [(s.task, s.data) for s in specs] == [("zero_shot", "shapes:test"), ("retrieval", "tfrecord:/a/x-*,/b/y-*"),
                                                 ("linear_probe", "tfds:cifar10")]
    assert specs[1].get("max_captions") == "3" and specs[2].get("val") == "train[:10%]"
    with pytest.raises(ValueError, match="unknown option 'classs=x'"):
        evaluate.parse_evals("zero_shot=shapes:test|classs=x")
    with pytest.raises(ValueError, match="TASK=DATA"):
        evaluate.parse_evals("zeroshot=shapes:test")


def test_errors_name_the_problem(tfds_dir, tmp_path):
    config = {"data_dir": tfds_dir}
    kw = dict(image_size=32, context_length=77, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="tfds build no_such_data"):
        evaluate.Evaluator("zero_shot=tfds:no_such_data:test", config, **kw)
    with pytest.raises(FileNotFoundError, match="not prepared"):  # a tfds name, but no data here
        evaluate.Evaluator("zero_shot=tfds:cifar10:test", config, **kw)
    with pytest.raises(ValueError, match="has no split 'val'.*'test', 'train', 'validation'"):
        evaluate.Evaluator("zero_shot=tfds:cliptiny:val", config, **kw)
    with pytest.raises(ValueError, match="has 10 names but tfds:cliptiny:test declares 3 classes"):
        evaluate.Evaluator("zero_shot=tfds:cliptiny:test|classes=cifar10", config, **kw)
    with pytest.raises(ValueError, match="no feature 'fine_label'"):
        evaluate.Evaluator("zero_shot=tfds:cliptiny:test|label_key=fine_label", config, **kw)
    with pytest.raises(ValueError, match="no caption feature 'text_en'"):
        evaluate.Evaluator("retrieval=tfds:cliptiny:test|caption_key=text_en", config, **kw)


def test_own_class_names_on_shapes_replace_its_prompts(tiny_model, tmp_path):
    """classes= on the embedded dataset is used (not ignored) for the one label task it names."""
    from clip_jax.input import shapes

    model, variables = tiny_model
    config = {"shapes_sizes": {"test": 40}, "cache_dir": str(tmp_path / "cache")}
    kw = dict(image_size=32, context_length=77, log=lambda *_: None)
    colours = _classes_file(tmp_path, shapes.class_names("color"))
    ev = evaluate.Evaluator(f"zero_shot=shapes:test|classes={colours}|label_key=label_color", config, **kw)
    metrics, _ = ev.run(_encoder(model, variables), batch_size=16)
    assert set(metrics) == {f"zero_shot/shapes.test/color/{m}" for m in ("top1", "top5", "mean_per_class")}

    info = eval_data.describe("shapes:test", config, label_keys=["label_color"])
    (batch,) = eval_data.eval_batches(info, config, batch_size=64, image_size=32, context_length=77,
                                      label_keys=["label_color"], max_captions=0)
    images = clip_jax.encode_image(model, variables, batch["image"][batch["mask"]])
    weights = zero_shot.classifier_weights(model, variables, zero_shot.prompts_for(zero_shot.load_metadata(colours)))
    want = zero_shot.topk_accuracy(images @ weights.T, batch["labels"][batch["mask"], 0], ks=(1,))
    assert metrics["zero_shot/shapes.test/color/top1"] == pytest.approx(want["top1"])

    with pytest.raises(ValueError, match="classes= on shapes needs label_key="):
        evaluate.Evaluator(f"zero_shot=shapes:test|classes={colours}", config, **kw)
    with pytest.raises(ValueError, match="has 3 names but shapes:test declares 6 classes in 'label_shape'"):
        evaluate.Evaluator(f"zero_shot=shapes:test|classes={_classes_file(tmp_path)}|label_key=label_shape",
                           config, **kw)


def test_tfrecord_labels_outside_the_class_list_are_an_error(tmp_path, tiny_model):
    import io

    from PIL import Image

    from clip_jax.input import records

    with records.ShardWriter(str(tmp_path / "ev"), 1) as w:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            w.write(records.serialize_example(buf.getvalue(), f"caption {i}", label=i))  # labels 0..4
    ev = evaluate.Evaluator(f"zero_shot=tfrecord:{tmp_path}/ev-*|classes={_classes_file(tmp_path)}", {},
                            image_size=32, context_length=77, log=lambda *_: None)
    with pytest.raises(ValueError, match="has label 4 in 'label' but the class list has 3 names"):
        ev.run(_encoder(*tiny_model), batch_size=8)


def test_training_evaluates_and_the_cli_agrees_on_workdir_and_export(tmp_path, capsys):
    """Evaluations in training (params sharded, layers scanned) = the CLI on the workdir's checkpoint
    = the CLI on the exported .safetensors; metrics.jsonl, eval/step_N.json and TensorBoard hold them."""
    from test_train import read_metrics, smoke_config

    from clip_jax import export, train

    c = smoke_config(tmp_path, 2)
    c.eval_every_steps = 2
    c.data.shapes_sizes = {"train": 64, "validation": 24, "test": 20}
    c.data.eval = "zero_shot=shapes:validation,zero_shot=shapes:test,retrieval=shapes:test"
    c.eval_batch_size = 16
    run = tmp_path / "run"
    train.train_and_evaluate(c, str(run))
    row = read_metrics(run)[-1]
    in_training = {k: v for k, v in row.items() if k.startswith(("zero_shot/", "retrieval/"))}
    assert len(in_training) == 2 * 3 * 3 + 6  # 2 splits x 3 label tasks x (top1, top5, mean per class) + 6 recalls
    assert json.loads((run / "eval" / "step_2.json").read_text())["metrics"] == pytest.approx(in_training)
    assert "zero_shot/shapes.test/color/top1" in _tensorboard_tags(run / "tensorboard")

    workdir_metrics = evaluate.main([f"--workdir={run}", "--batch_size=8"])  # the run's data.eval
    _agree(workdir_metrics, in_training)
    assert json.loads((run / "eval_step2.json").read_text())["metrics"] == pytest.approx(workdir_metrics)
    export.main([f"--workdir={run}", f"--out={tmp_path / 'exp' / 'tiny'}"])
    exported = evaluate.main([f"--weights={tmp_path / 'exp' / 'tiny.safetensors'}", f"--out={tmp_path / 'e.json'}",
                              f"--eval={c.data.eval}", f"--data=cache_dir={c.data.cache_dir}",
                              f"--data=shapes_sizes={json.dumps(dict(c.data.shapes_sizes))}",
                              # the run's preprocessing (a bare export gets CLIP's: float images), so
                              # that near-tied retrieval ranks of this 2-step model resolve alike
                              f"--data=resize_method={c.data.resize_method}",
                              f"--data=image_dtype={c.data.image_dtype}"])
    _agree(exported, in_training)
    out = capsys.readouterr().out
    assert "zero_shot     shapes.test/color" in out and "image_to_text_R1=" in out


def _agree(got: dict, want: dict, queries: int = 20) -> None:
    """Zero-shot figures equal; retrieval within one of `queries` hits: the test split's captions
    repeat word for word, so a 2-step model's similarities tie up to rounding, which the sharded
    and the one-device embeddings may break apart differently."""
    assert set(got) == set(want)
    for key, value in want.items():
        tolerance = 1 / queries + 1e-6 if key.startswith("retrieval/") else 1e-6
        assert got[key] == pytest.approx(value, abs=tolerance), key


def _tensorboard_tags(logdir) -> set:
    import tensorflow as tf

    tags = set()
    for path in tf.io.gfile.glob(str(logdir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_linear_probe_uses_the_validation_split_and_equals_a_plain_probe(tfds_dir, tiny_model):
    from clip_jax.evaluate.linear_probe import linear_probe

    model, variables = tiny_model
    config = {"data_dir": tfds_dir}
    ev = evaluate.Evaluator("linear_probe=tfds:cliptiny", config, image_size=32, context_length=77, log=lambda *_: None)
    (spec, splits), = ev.probes
    assert {r: i.spec for r, i in splits.items()} == {"train": "tfds:cliptiny:train", "test": "tfds:cliptiny:test",
                                                     "val": "tfds:cliptiny:validation"}
    metrics, details = ev.run(_encoder(model, variables), batch_size=8)
    plain = {role: _plain(model, variables, eval_data.describe(f"tfds:cliptiny:{split}", config, label_keys=["label"]),
                          config, max_captions=0)
             for role, split in (("train", "train"), ("val", "validation"), ("test", "test"))}
    want = linear_probe(plain["train"]["image_embeds"], plain["train"]["labels"], plain["test"]["image_embeds"],
                        plain["test"]["labels"], 3, val_features=plain["val"]["image_embeds"],
                        val_labels=plain["val"]["labels"])
    assert metrics["linear_probe/cliptiny/C"] == pytest.approx(want["C"])
    assert metrics["linear_probe/cliptiny/top1"] == pytest.approx(want["top1"])
    assert metrics["linear_probe/cliptiny/val_top1"] == pytest.approx(want["val_top1"])
    assert details["linear_probe=tfds:cliptiny"]["train_examples"] == 30


def _write_multi_caption_records(path, n=12):
    import io

    from PIL import Image

    from clip_jax.input import records

    rng = np.random.default_rng(1)
    with records.ShardWriter(str(path / "coco"), 2) as w:
        for i, image in enumerate(_images(rng, n)):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            w.write(records.serialize_example(buf.getvalue(), [f"picture {i} take {j}" for j in range(1 + i % 3)]))
    return f"tfrecord:{path}/coco-*"


def test_records_with_several_captions_retrieval_and_training(tmp_path, tiny_model):
    """A record may hold several captions: retrieval reads all of them, training draws one per epoch."""
    from clip_jax.input.pipeline import InputPipeline

    spec = _write_multi_caption_records(tmp_path)
    model, variables = tiny_model
    ev = evaluate.Evaluator(f"retrieval={spec}", {}, image_size=32, context_length=77, log=lambda *_: None)
    metrics, details = ev.run(_encoder(model, variables), batch_size=8)
    assert details[f"retrieval={spec}"] == {"images": 12, "captions": 4 * (1 + 2 + 3), "images_without_caption": 0}
    ref = _plain(model, variables, eval_data.describe(spec, {}), {})
    m = ref["caption_mask"]
    want = recall_at_k(ref["image_embeds"], ref["text_embeds"][m], np.nonzero(m)[0])
    for k, v in want.items():
        assert metrics[f"retrieval/coco/{k}"] == pytest.approx(v)

    pipe = InputPipeline(spec, {"shuffle_buffer": 4}, global_batch_size=4, image_size=32, train=True, num_epochs=6)
    tokenizer = clip_jax.tokenizers.get_tokenizer()
    seen = set()
    for batch in pipe:
        seen.update(tokenizer.decode(t).strip() for t in batch["tokens"])
    assert {c for c in seen if c.startswith("picture 2 ")} == {f"picture 2 take {j}" for j in range(3)}
    assert sum(pipe.bad_records().values()) == 0


def test_evaluate_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a clip_jax training workdir"):
        evaluate.main([f"--workdir={tmp_path}", "--eval=zero_shot=shapes:test"])
    np.save(tmp_path / "w.npy", np.zeros(1))
    with pytest.raises(ValueError, match="pass --model=NAME"):
        evaluate.main([f"--weights={tmp_path / 'w.npy'}", "--eval=zero_shot=shapes:test"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.main([f"--weights={tmp_path / 'missing.safetensors'}", "--eval=zero_shot=shapes:test"])
