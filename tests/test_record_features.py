"""Records as named features: a feature the CLIP method does not read is one registration, declared
beside CLIP's inputs by a method-like declaration, and arrives in the batch with the right values;
the joint crop gives a label map the image's geometry; a bad declaration is named early."""

import io

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from clip_jax.input.features import FEATURES, Feature  # noqa: E402
from clip_jax.methods.base import BatchInput  # noqa: E402
from clip_jax.methods.clip import CLIP_INPUTS  # noqa: E402

# The one registration: how many objects a record shows, from its per-object shape labels.
if "test_num_objects" not in FEATURES:
    FEATURES.register("test_num_objects")(Feature(
        parse=lambda reading: {"objects/shape": tf.io.VarLenFeature(tf.int64)},
        value=lambda parsed, reading: tf.size(parsed["objects/shape"].values, out_type=tf.int32),
        empty=lambda reading: tf.constant(0, tf.int32),
    ))


class CountingMethod:
    """What a method declares to read the new feature: CLIP's inputs and the count, passed through."""

    def inputs(self):
        return CLIP_INPUTS + (BatchInput("num_objects", "value", ("test_num_objects",)),
                              BatchInput("caption", "value", ("caption",)))


def _config(tmp_path):
    return {"cache_dir": str(tmp_path), "shapes_sizes": {"train": 40, "validation": 8, "test": 8},
            "shapes_shards": {"train": 2, "validation": 1, "test": 1}, "shuffle_buffer": 16}


def test_a_new_record_feature_is_one_registration_and_reaches_the_batch(tmp_path):
    from clip_jax.input.pipeline import InputPipeline, shapes_files

    config = _config(tmp_path)
    pipe = InputPipeline("shapes:train", config, global_batch_size=8, image_size=32, train=True, num_epochs=1,
                         inputs=CountingMethod().inputs())
    batches = list(pipe)
    assert len(batches) == 5
    first = batches[0]
    assert set(first) - {"epoch", "position", "counts"} == {"image", "tokens", "num_objects", "caption"}
    assert first["image"].shape == (8, 32, 32, 3) and first["tokens"].shape == (8, 77)
    assert first["num_objects"].dtype == np.int32
    got = sorted((c.decode(), int(n)) for b in batches for c, n in zip(b["caption"], b["num_objects"]))
    # The same counts, parsed independently from the records' bytes, paired with each record's caption.
    want = []
    for path in shapes_files("train", config):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            f = tf.train.Example.FromString(record).features.feature
            want.append((f["caption"].bytes_list.value[0].decode(), len(f["objects/shape"].int64_list.value)))
    assert got == sorted(want)
    assert {n for _, n in want} == {1, 2}  # training images hold one or two objects: the count is not constant



def png(array):
    """A uint8 array [H, W] or [H, W, 3] as PNG bytes in a tf string."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return tf.constant(buf.getvalue())

@pytest.mark.parametrize("train, crop", [(True, "random_resized"), (True, "random"), (False, "random_resized")])
def test_a_label_map_is_cropped_with_the_images_geometry(train, crop):
    """The image's first channel, stored as a label map, comes out of the mask crop exactly as out of
    the image crop (both nearest-neighbour here): one window, one seed."""
    from clip_jax.input.settings import data_settings
    from clip_jax.input.transforms import crop_mask, crop_pixels

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    config = data_settings({"crop": crop, "resize_method": "nearest", "crop_scale": (0.3, 0.6)})
    for s in range(4):
        seed = tf.constant([7, s], tf.int64)
        image = crop_pixels(png(pixels), 24, train, seed, config).numpy()
        mask = crop_mask(png(pixels[..., 0]), png(pixels), 24, train, seed, config).numpy()
        assert mask.shape == (24, 24) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, image[..., 0].astype(np.uint8))


def test_the_crop_op_flips_the_image_and_its_label_map_together():
    """options flip=True: one flip decision per record for every spatial key (and some records flip)."""
    from clip_jax.input import ops
    from clip_jax.input.settings import data_settings

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)

    ex = {"image": png(pixels), "segmentation": png(pixels[..., 0])}
    config = data_settings({"resize_method": "nearest", "image_dtype": "uint8"})
    flips = set()
    for s in range(8):
        ctx = ops.OpContext(20, True, config, tf.uint8, seed=lambda salt, s=s: tf.constant([salt, s], tf.int64))
        image, mask, plain = (ops.OPS.get("crop").make(ctx, ex, ops.Wanted(key, "crop", (name,), options))
                              for key, name, options in (("image", "image", (("flip", True),)),
                                                         ("segmentation", "segmentation", (("flip", True),)),
                                                         ("plain", "image", ())))
        np.testing.assert_array_equal(mask.numpy(), image.numpy()[..., 0])
        flips.add(not np.array_equal(image.numpy(), plain.numpy()))
    assert flips == {True, False}


def test_the_segmentation_comes_with_the_image_in_the_batch(tmp_path):
    from clip_jax.input.pipeline import InputPipeline

    inputs = CLIP_INPUTS + (BatchInput("segmentation", "crop", ("segmentation",)),)
    batch = next(InputPipeline("shapes:validation", _config(tmp_path), global_batch_size=4, image_size=32,
                               train=True, inputs=inputs))
    seg = batch["segmentation"]
    assert seg.shape == (4, 32, 32) and seg.dtype == np.uint8
    # validation images hold one object: index 1 on a background of 0, both in every crop of 90% or more
    assert set(np.unique(seg)) == {0, 1}


def test_bad_declarations_are_named():
    from clip_jax.input import ops

    with pytest.raises(ValueError, match="unknown input op 'blur'"):
        ops.resolve([BatchInput("image", "blur", ("image",))])
    with pytest.raises(ValueError, match="unknown record feature 'depth'"):
        ops.resolve([BatchInput("depth", "crop", ("depth",))])
    with pytest.raises(ValueError, match="declared twice"):
        ops.resolve(CLIP_INPUTS + (BatchInput("image", "value", ("image",)),))
    with pytest.raises(ValueError, match="bookkeeping"):
        ops.resolve([BatchInput("position", "value", ("labels",))])
    with pytest.raises(ValueError, match="from that one store"):
        ops.resolve(CLIP_INPUTS + (BatchInput("image_embeds", "cached", options=(("directory", "d"),)),))


def test_every_method_declares_exactly_its_batch_keys():
    """What the input makes for a method is what its step reads."""
    from clip_jax.input import ops
    from clip_jax.methods.clip import Clip
    from clip_jax.methods.slip import Slip

    class Config:
        class clip:
            image_embeddings = ""

    for cls in (Clip, Slip):
        method = cls.__new__(cls)  # the declaration needs no model
        method.config, method.cached_images = Config(), False
        assert tuple(w.key for w, _ in ops.resolve(method.inputs())) == cls.batch_keys
    lit = Clip.__new__(Clip)
    lit.config, lit.cached_images = Config(), True
    lit.config.clip.image_embeddings = "/cache"
    resolved = ops.resolve(lit.inputs())
    assert [w.key for w, _ in resolved] == ["image_embeds", "tokens"]
    assert ops.store_of(resolved).option("directory") == "/cache"
