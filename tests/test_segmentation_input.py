"""clip_jax.input.segmentation: the batch key 'mask' of each label set against numpy on the records, the crop
and flip applied jointly to image and mask, class-id records from the converter (VOC, ADE20K), the evaluation
features, and bad masks counted, skipped or named."""

import io
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from clip_jax.input import eval_data, ops, segmentation, shapes, shapes_scenes  # noqa: E402
from clip_jax.input.convert_segmentation import convert  # noqa: E402
from clip_jax.input.pipeline import InputPipeline, NoUsableData  # noqa: E402
from clip_jax.methods.base import BatchInput  # noqa: E402

SIZES = {"train": 24, "validation": 4, "test": 10}
READS = ("segmentation", "objects/shape", "objects/color")


def mask_key(labels="shape", **options):
    return BatchInput("mask", "mask", READS, tuple({"labels": labels, **options}.items()))


def table(objects, labels):
    """Independent of the op: class + 1 of each object index (0 = background)."""
    k = {"shape": lambda o: o["shape"], "color": lambda o: o["color"],
         "combo": lambda o: o["color"] * len(shapes.SHAPE_NAMES) + o["shape"]}[labels]
    return np.array([0] + [k(o) + 1 for o in objects], np.uint8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    paths = shapes_scenes.ensure_scenes_dataset(root, sizes=SIZES)
    config = {"cache_dir": root, "scenes_sizes": SIZES, "shuffle_buffer": 8, "image_dtype": "uint8",
              "resize_method": "nearest"}
    return config, paths, {s: shapes_scenes.read_split(p) for s, p in paths.items()}


def test_the_mask_of_a_label_set_is_the_records_object_map_through_its_classes(scenes):
    config, _, data = scenes
    by_caption = {ex["caption"]: ex for ex in data["train"]}
    assert len(by_caption) == SIZES["train"]
    sets = ("shape", "color", "combo")
    inputs = (BatchInput("image", "crop", ("image",)), BatchInput("caption", "value", ("caption",)),
              *(BatchInput(f"mask_{labels}", "mask", READS, (("labels", labels),)) for labels in sets))
    pipe = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    seen = 0
    for batch in pipe:
        for i, caption in enumerate(batch["caption"]):
            ex = by_caption[caption.decode()]
            for labels in sets:
                mask = batch[f"mask_{labels}"]
                assert mask.shape == (8, 64, 64) and mask.dtype == np.uint8
                np.testing.assert_array_equal(mask[i], table(ex["objects"], labels)[ex["segmentation"]])
                assert len(segmentation.class_names(labels)) == 1 + len(shapes.class_names(labels))
            seen += 1
    assert seen == SIZES["train"]


def test_image_and_mask_are_cropped_and_flipped_together(scenes):
    """Random resized crops and flips: wherever the mask says colour c, the image shows colour c, and the
    background is grey; a mask left unflipped (or cropped elsewhere) would put colours on the wrong pixels."""
    config, _, _ = scenes
    config = dict(config, crop_scale=(0.3, 0.6))
    inputs = (BatchInput("image", "crop", ("image",), (("flip", True),)), mask_key("color"))
    (mask_wanted,) = [w for w, _ in ops.resolve(inputs) if w.key == "mask"]
    assert mask_wanted.option("flip") is True  # the mask takes its image's flip
    pipe = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=32, train=True, num_epochs=1,
                         inputs=inputs)
    plain = InputPipeline("shapes_scenes:train", config, global_batch_size=8, image_size=32, train=True, num_epochs=1,
                          inputs=(BatchInput("image", "crop", ("image",)),))
    flipped = 0
    for batch, unflipped in zip(pipe, plain):
        image, mask = batch["image"].astype(int), batch["mask"]
        grey = image[mask == 0]
        assert (grey.max(-1) - grey.min(-1) <= 16).all()
        for c, name in enumerate(shapes.COLOR_NAMES, 1):
            assert (np.abs(image[mask == c] - np.array(shapes.COLORS[name])) <= 12).all()
        flipped += sum(not np.array_equal(a, b) for a, b in zip(batch["image"], unflipped["image"]))
    assert 0 < flipped < SIZES["train"]


def _example(serialized):
    return tf.train.Example.FromString(serialized)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _write(path, examples):
    with tf.io.TFRecordWriter(path) as w:
        for ex in examples:
            w.write(ex.SerializeToString())


def _bad_records(paths, out):
    """Good scene records and four bad ones: a mask of another size, an unknown shape, no mask, and an object
    index past the record's objects."""
    raw = [r.numpy() for p in paths for r in tf.data.TFRecordDataset(p)]
    good = [_example(r) for r in raw[:6]]
    small, unknown, missing, past = (_example(r) for r in raw[6:10])
    seg = np.asarray(Image.open(io.BytesIO(small.features.feature["segmentation"].bytes_list.value[0])))
    small.features.feature["segmentation"].bytes_list.value[0] = _png(seg[:32, :32])
    unknown.features.feature["objects/shape"].int64_list.value[0] = 9
    del missing.features.feature["segmentation"]
    seg = np.asarray(Image.open(io.BytesIO(past.features.feature["segmentation"].bytes_list.value[0]))).copy()
    seg[:4, :4] = 7  # scenes hold at most 5 objects
    past.features.feature["segmentation"].bytes_list.value[0] = _png(seg)
    _write(out, good + [small, unknown, missing, past])
    return good


def test_bad_masks_are_counted_and_skipped(scenes, tmp_path):
    config, paths, _ = scenes
    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    good = _bad_records(paths["test"], path)
    inputs = (BatchInput("image", "crop", ("image",)), BatchInput("caption", "value", ("caption",)), mask_key())
    pipe = InputPipeline(f"tfrecord:{path}", config, global_batch_size=2, image_size=64, train=False, num_epochs=1,
                         inputs=inputs)
    batches = list(pipe)
    captions = sorted(c.decode() for b in batches for c in b["caption"])
    assert captions == sorted(ex.features.feature["caption"].bytes_list.value[0].decode() for ex in good)
    bad = pipe.bad_records()
    assert (bad["bad_mask"], bad["missing_mask"], bad["undecodable"]) == (2, 1, 1)
    for b in batches:
        assert b["mask"].max() <= len(shapes.SHAPE_NAMES)


def test_evaluation_reads_masks_at_the_models_size_and_skips_bad_ones(scenes, tmp_path):
    config, paths, data = scenes
    info = eval_data.describe("shapes_scenes:test", config)
    for size, labels in ((64, "shape"), (32, "combo")):
        rows = list(eval_data.eval_batches(info, config, batch_size=4, image_size=size, context_length=77,
                                           features=(f"mask/{labels}",)))
        masks = np.concatenate([b[f"mask/{labels}"][b["mask"]] for b in rows])
        want = np.stack([table(ex["objects"], labels)[ex["segmentation"]] for ex in data["test"]])
        if size == 32:  # nearest, half-pixel centres: source pixel 2i + 1
            want = want[:, 1::2, 1::2]
        np.testing.assert_array_equal(masks, want)
    with pytest.raises(ValueError, match="evaluation batches name their real rows 'mask'"):
        eval_data.check_features(info, config, ("mask",))

    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    good = _bad_records(paths["test"], path)
    bad_info = eval_data.describe(f"tfrecord:{path}", config)
    eval_data.check_features(bad_info, config, ("mask/shape",))
    rows = list(eval_data.eval_batches(bad_info, config, batch_size=4, image_size=64, context_length=77,
                                       features=("mask/shape",)))
    assert sum(int(b["mask"].sum()) for b in rows) == len(good)  # the four bad ones skipped (with a warning)


def _folder(tmp_path, masks, layout_suffix=".png", images=None):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, mask in enumerate(masks):
        h, w = mask.shape if images is None else images[i]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(tmp_path / "images" / f"im{i}{'.jpg' if i % 2 else '.png'}")
        palette = Image.fromarray(mask, "P")  # VOC's masks are palette PNGs: their indices are the ids
        palette.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        palette.save(tmp_path / "masks" / f"im{i}{layout_suffix}")
    return str(tmp_path / "images"), str(tmp_path / "masks")


def test_voc_and_ade20k_folders_convert_to_records_the_mask_op_reads(tmp_path):
    rng = np.random.default_rng(1)
    ids = [rng.choice(np.array([0, 1, 2, 255], np.uint8), (16, 20)) for _ in range(3)]
    images, masks = _folder(tmp_path, ids)
    convert(images, masks, str(tmp_path / "voc"), "voc")
    convert(images, masks, str(tmp_path / "ade"), "ade20k")
    inputs = (BatchInput("image", "crop", ("image",)),
              BatchInput("mask", "mask", ("segmentation_mask",), (("labels", "record"), ("num_classes", 3))))
    config = {"resize_method": "nearest", "image_dtype": "uint8"}
    pipe = InputPipeline(f"tfrecord:{tmp_path}/voc/segmentation-*.tfrecord", config, global_batch_size=3,
                         image_size=16, train=False, num_epochs=1, inputs=inputs)
    (batch,) = list(pipe)
    # evaluation crop: shorter side (16) kept, centre 16 of the 20 columns
    np.testing.assert_array_equal(batch["mask"], np.stack([m[:, 2:18] for m in ids]))
    ade = f"{tmp_path}/ade/segmentation-00000-of-00001.tfrecord"
    stored = [_example(r.numpy()) for r in tf.data.TFRecordDataset(ade)]
    for ex, m in zip(stored, ids):
        got = np.asarray(Image.open(io.BytesIO(ex.features.feature["segmentation_mask"].bytes_list.value[0])))
        np.testing.assert_array_equal(got, np.where(m == 0, 255, m.astype(int) - 1).astype(np.uint8))
    # ids outside num_classes: counted and skipped, never a label
    few = (inputs[0], BatchInput("mask", "mask", ("segmentation_mask",), (("labels", "record"), ("num_classes", 2))))
    pipe = InputPipeline(f"tfrecord:{tmp_path}/voc/segmentation-*.tfrecord", config, global_batch_size=1,
                         image_size=16, train=False, num_epochs=1, inputs=few)
    with pytest.raises(NoUsableData, match="0 usable; bad records: undecodable=3"):
        next(pipe)


def test_the_converter_names_bad_pairs(tmp_path):
    images, masks = _folder(tmp_path, [np.zeros((8, 8), np.uint8)], images=[(8, 10)])
    with pytest.raises(ValueError, match="im0.png: mask of 8x8 px for image .* of 10x8 px"):
        convert(images, masks, str(tmp_path / "out"))
    os.remove(os.path.join(masks, "im0.png"))
    with pytest.raises(FileNotFoundError, match="1 images have no mask"):
        convert(images, masks, str(tmp_path / "out"))
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(os.path.join(masks, "im0.png"))
    with pytest.raises(ValueError, match="holds colours, not class indices"):
        convert(images, masks, str(tmp_path / "out"))


def test_bad_declarations_are_named():
    with pytest.raises(ValueError, match="unknown mask label set 'size'"):
        ops.resolve([mask_key("size")])
    with pytest.raises(ValueError, match="reads \\('segmentation', 'objects/shape', 'objects/color'\\)"):
        ops.resolve([BatchInput("mask", "mask", ("segmentation",), (("labels", "shape"),))])
    with pytest.raises(ValueError, match="labels='record' reads \\('segmentation_mask',\\)"):
        ops.resolve([BatchInput("mask", "mask", READS, (("labels", "record"),))])


def test_a_tfds_dataset_with_a_segmentation_mask_is_a_source(tmp_path):
    """tfds' segmentation_mask image (as oxford_iiit_pet's) reaches the training key and the evaluation feature."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(2)
    masks = [rng.integers(0, 4, (12, 12, 1), dtype=np.uint8) for _ in range(4)]

    class TinySegments(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)),
                 "segmentation_mask": tfds.features.Image(shape=(None, None, 1))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, mask in enumerate(masks):
                yield i, {"image": np.repeat(mask * 60, 3, axis=-1), "segmentation_mask": mask}

    TinySegments(data_dir=str(tmp_path)).download_and_prepare()
    config = {"data_dir": str(tmp_path), "resize_method": "nearest", "image_dtype": "uint8"}
    inputs = (BatchInput("image", "crop", ("image",), (("flip", True),)),
              BatchInput("mask", "mask", ("segmentation_mask",), (("labels", "record"), ("num_classes", 4))))
    (batch,) = list(InputPipeline("tfds:tiny_segments:train", config, global_batch_size=4, image_size=12, train=True,
                                  num_epochs=1, inputs=inputs))
    np.testing.assert_array_equal(batch["mask"] * 60, batch["image"][..., 0])  # cropped and flipped together
    info = eval_data.describe("tfds:tiny_segments:train", config)
    (rows,) = list(eval_data.eval_batches(info, config, batch_size=4, image_size=12, context_length=77,
                                          features=("mask/record",)))
    got = rows["mask/record"]
    np.testing.assert_array_equal(got * 60, rows["image"][..., 0])  # uint8 images (image_dtype)
    assert sorted(m.tobytes() for m in got) == sorted(m[..., 0].tobytes() for m in masks)  # tfds' own order
