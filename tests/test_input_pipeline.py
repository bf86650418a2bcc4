"""Input pipeline: sources, host sharding, exact resumption, bad records, tokens, global arrays."""

import io
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

import clip_jax  # noqa: E402
from clip_jax.input import records  # noqa: E402
from clip_jax.input.pipeline import InputPipeline, InputState, parse_spec  # noqa: E402


def encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def write_shards(directory, n_shards=4, per_shard=12, seed=0, bad=None):
    """Small JPEG/PNG shards; captions 'item S I' name every pair. `bad`: {(shard, i): kind}."""
    rng = np.random.default_rng(seed)
    bad = bad or {}
    os.makedirs(directory, exist_ok=True)
    for s in range(n_shards):
        with records.ShardWriter(os.path.join(directory, f"part{s}"), 1) as w:
            for i in range(per_shard):
                size = (int(rng.integers(24, 48)), int(rng.integers(24, 48)), 3)
                image = encode(rng.integers(0, 255, size, dtype=np.uint8), "JPEG" if i % 2 else "PNG")
                caption = f"item {s} {i}"
                kind = bad.get((s, i))
                if kind == "missing_image":
                    w.write(records.serialize_example(b"", caption))
                    continue
                if kind == "corrupt_image":
                    image = image[: len(image) // 3]
                if kind == "empty_caption":
                    caption = "   "
                example = records.serialize_example(image, caption, key=f"{s}-{i}")
                if kind == "invalid_utf8_caption":
                    example = example.replace(caption.encode(), b"item \xff\xfe7")  # same length: proto stays valid
                w.write(example)
    return os.path.join(directory, "*.tfrecord")


def captions(batch):
    return [c.decode() for c in batch["caption"]]


def pipeline(glob, config=None, **kw):
    args = dict(global_batch_size=4, image_size=16, train=True, seed=0)
    args.update(kw)
    return InputPipeline("tfrecord:" + glob, config or {}, **args)


def test_spec_parsing():
    assert parse_spec("tfds:coco_captions/2017:train[:10%]").name == "coco_captions/2017"
    assert parse_spec("tfds:coco_captions/2017:train[:10%]").split == "train[:10%]"
    assert parse_spec("tfds:cifar10").split == "train"
    assert parse_spec("shapes:test").split == "test"
    assert parse_spec("tfrecord:gs://b/x-*.tfrecord").name == "gs://b/x-*.tfrecord"
    with pytest.raises(ValueError, match="unknown data spec"):
        parse_spec("webdataset:/x")


def test_tfrecord_batches_and_tokens(tmp_path):
    glob = write_shards(tmp_path)
    p = pipeline(glob, num_epochs=1, train=False)
    batches = list(p)
    assert len(batches) == 12  # 48 pairs / 4
    b = batches[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"], clip_jax.tokenize(captions(b)))
    seen = [c for b in batches for c in captions(b)]
    assert sorted(seen) == sorted(f"item {s} {i}" for s in range(4) for i in range(12))


def test_eval_transform_matches_host_preprocess(tmp_path):
    """In-graph resize + center crop ~ clip_jax.preprocess (PIL bicubic vs TF bicubic)."""
    from clip_jax.input.transforms import decode_and_crop

    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for array, tol in ((smooth, 0.02), (noise, 0.15)):
        got = decode_and_crop(tf.constant(encode(array, "PNG")), 24, False, tf.constant([0, 0], tf.int64), {}).numpy()
        want = clip_jax.preprocess(array, image_size=24)
        assert np.abs(got - want).mean() < tol  # normalized units; TF and PIL bicubic kernels differ slightly


def test_two_hosts_read_disjoint_complete_parts(tmp_path):
    glob = write_shards(tmp_path)
    parts = []
    for index in range(2):
        p = pipeline(glob, num_epochs=1, train=False, global_batch_size=8, process_index=index, process_count=2)
        got = [c for b in p for c in captions(b)]
        assert all(len(b) for b in got)
        parts.append(set(got))
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"item {s} {i}" for s in range(4) for i in range(12)}


def test_resume_mid_epoch_is_exact(tmp_path):
    glob = write_shards(tmp_path, bad={(1, 3): "corrupt_image", (2, 5): "empty_caption"})
    reference = pipeline(glob, config={"shuffle_buffer": 16})
    ref = [next(reference) for _ in range(20)]  # crosses epoch boundaries (46 good pairs / 4)
    first = pipeline(glob, config={"shuffle_buffer": 16})
    for _ in range(7):
        next(first)
    saved = [s.to_dict() for s in first.state()]
    resumed = pipeline(glob, config={"shuffle_buffer": 16}, state=[InputState.from_dict(s) for s in saved])
    for want in ref[7:]:
        got = next(resumed)
        assert captions(got) == captions(want)
        np.testing.assert_array_equal(got["image"], want["image"])  # same crops: seeds from positions
    assert resumed.state() == reference.state()
    # Different epochs see different orders; the same seed gives the same order.
    assert captions(ref[0]) != captions(ref[12])


def test_bad_records_are_skipped_and_counted(tmp_path, capfd):
    bad = {(0, 1): "corrupt_image", (0, 2): "missing_image", (1, 4): "empty_caption", (3, 7): "invalid_utf8_caption"}
    glob = write_shards(tmp_path, bad=bad)
    # A shard truncated mid-record: its readable records are kept, the path is reported.
    path = sorted(tf.io.gfile.glob(glob))[2]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * 0.6)])
    p = pipeline(glob, num_epochs=1, train=False)
    got = [c for b in p for c in captions(b)]
    bad = p.bad_records()
    assert bad["missing_image"] == 1
    assert bad["empty_caption"] == 1
    assert bad["invalid_utf8_caption"] == 1
    assert bad["unreadable_shard"] == 1
    assert bad["undecodable"] == 1
    assert "item 0 1" not in got and "item 0 2" not in got and "item 1 4" not in got
    assert sum(c.startswith("item 2 ") for c in got) >= 5  # the readable prefix of the broken shard
    assert path in capfd.readouterr().err


def test_global_batches_depend_on_streams_not_processes(tmp_path):
    """4 streams on 1, 2 or 4 processes: the same global batches, and a position saved on 1 resumes on 2."""
    glob = write_shards(tmp_path, bad={(1, 3): "corrupt_image", (2, 5): "empty_caption"})
    config = {"streams": 4, "shuffle_buffer": 8}

    def global_batches(processes, steps, state=None):
        pipes = [pipeline(glob, config=config, global_batch_size=8, process_index=i, process_count=processes,
                          state=state) for i in range(processes)]
        out = []
        for _ in range(steps):
            parts = [next(p) for p in pipes]
            out.append({"caption": sum((captions(b) for b in parts), []),
                        "image": np.concatenate([b["image"] for b in parts])})
        return out, [s for p in pipes for s in p.state()]

    one, _ = global_batches(1, 9)  # past an epoch: 46 good pairs, 4 streams of 2 rows each
    for processes in (2, 4):
        many, _ = global_batches(processes, 9)
        for a, b in zip(one, many):
            assert a["caption"] == b["caption"]
            np.testing.assert_array_equal(a["image"], b["image"])
    _, saved = global_batches(1, 4)
    resumed, _ = global_batches(2, 5, state=saved)
    for a, b in zip(one[4:], resumed):
        assert a["caption"] == b["caption"]
    with pytest.raises(ValueError, match="resume with the stream count"):
        pipeline(glob, config={"streams": 2}, global_batch_size=8, state=saved[:3])


def test_batch_must_divide_over_processes(tmp_path):
    glob = write_shards(tmp_path, n_shards=2)
    with pytest.raises(ValueError, match="does not divide over 3 data streams"):
        pipeline(glob, global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="2 files for 3 data streams"):
        pipeline(glob, global_batch_size=9, process_count=3)
    with pytest.raises(ValueError, match="streams=3 does not divide over 2 processes"):
        pipeline(glob, config={"streams": 3}, global_batch_size=12, process_count=2)
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        pipeline(str(tmp_path / "nothing-*.tfrecord"))


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(shape=(None, None, 3)),
                     "captions": tfds.features.Sequence({"text": tfds.features.Text()})}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(0)
            for i in range(n):
                image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
                yield i, {"image": image, "captions": {"text": [f"pic {i} a", f"pic {i} b"]}}

    TinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
    config = {"data_dir": str(tmp_path), "caption_key": "captions/text"}
    parts = []
    for index in range(2):
        p = InputPipeline("tfds:tiny_captions:train", config, global_batch_size=2, image_size=16, train=True,
                          process_index=index, process_count=2, num_epochs=1)
        parts.append([c.decode() for b in p for c in b["caption"]])
    flat = parts[0] + parts[1]
    assert sorted({c.split()[1] for c in flat}) == sorted(str(i) for i in range(10))
    assert all(c.endswith((" a", " b")) for c in flat)


def test_global_array_on_8_devices():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from clip_jax.input.pipeline import to_global_arrays

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = {"image": np.arange(len(devices) * 2 * 3, dtype=np.float32).reshape(len(devices) * 2, 3),
             "tokens": np.ones((len(devices) * 2, 5), np.int32)}
    out = to_global_arrays(batch, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    assert len(out["image"].addressable_shards) == len(devices)


def test_device_prefetch_keeps_order_and_the_position_of_the_steps(tmp_path):
    """Batches come out as the pipeline gives them, already on the mesh; the position saved for a
    checkpoint is the one after the last batch handed to a step, not after the prefetched ones."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from clip_jax.input.pipeline import DevicePrefetch

    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    glob = write_shards(tmp_path)
    reference = pipeline(glob, global_batch_size=8)
    want = [next(reference) for _ in range(5)]
    positions = []
    probe = pipeline(glob, global_batch_size=8)
    for _ in range(5):
        next(probe)
        positions.append(probe.state())
    prefetch = DevicePrefetch(pipeline(glob, global_batch_size=8), sharding, size=2)
    assert prefetch.state() == pipeline(glob, global_batch_size=8).state()  # nothing consumed yet
    for i in range(5):
        got = next(prefetch)
        assert got["image"].sharding == sharding and set(got) == {"image", "tokens"}
        np.testing.assert_array_equal(np.asarray(got["image"]), want[i]["image"])
        np.testing.assert_array_equal(np.asarray(got["tokens"]), want[i]["tokens"])
        assert prefetch.state() == positions[i]
        if i < 4:  # the next batch is read (and on its way to the devices) while this one's step runs
            assert prefetch.pipe.state() == positions[i + 1]
    with pytest.raises(ValueError, match="prefetch size must be >= 1"):
        DevicePrefetch(reference, sharding, size=0)


def test_shapes_source(tmp_path):
    config = {"cache_dir": str(tmp_path), "shapes_sizes": {"train": 40, "validation": 8, "test": 8},
              "label_keys": ["label", "label_color", "label_shape"]}
    p = InputPipeline("shapes:test", config, global_batch_size=4, image_size=32, train=False, num_epochs=1)
    batches = list(p)
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 32, 32, 3)
    from clip_jax.input import shapes

    held_out = {shapes.combo_index(c, s) for c, s in shapes.HELD_OUT}
    for b in batches:
        for (label, color, shape), caption in zip(b["labels"], captions(b)):
            assert label in held_out and label == shapes.combo_index(color, shape)
            assert shapes.COLOR_NAMES[color] in caption and shapes.SHAPE_NAMES[shape] in caption


def test_uint8_output_normalized_on_device_matches_float(tmp_path):
    from clip_jax.preprocessing import normalize_images

    glob = write_shards(tmp_path, n_shards=1, per_shard=4)
    f32 = next(pipeline(glob, train=False, num_epochs=1))
    u8 = next(pipeline(glob, config={"image_dtype": "uint8"}, train=False, num_epochs=1))
    assert u8["image"].dtype == np.uint8
    # uint8 rounding: at most half a level, 0.5 / (255 * min std) in normalized units.
    assert np.abs(np.asarray(normalize_images(u8["image"])) - f32["image"]).max() < 0.5 / (255 * 0.26) + 1e-5


# -- a stream that yields nothing usable stops ----------------------------------------------
def test_a_stream_with_no_usable_record_stops_naming_files_and_counts(tmp_path):
    from clip_jax.input.pipeline import NoUsableData

    garbage = tmp_path / "random.tfrecord"
    garbage.write_bytes(np.random.default_rng(0).bytes(50_000))
    with pytest.raises(NoUsableData, match=r"a whole pass over its files without one usable example.*"
                                           r"unreadable_shard=1\. Files: .*random\.tfrecord"):
        next(pipeline(str(garbage)))
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    with pytest.raises(NoUsableData, match="0 records read .* none of the known kinds"):
        next(pipeline(str(empty)))
    # every record a valid Example whose image does not decode: seen only after the decode
    with records.ShardWriter(str(tmp_path / "undecodable"), 1) as w:
        for i in range(10):
            w.write(records.serialize_example(b"\xff\xd8 not a jpeg " + bytes([i]), f"caption {i}"))
    with pytest.raises(NoUsableData, match="10 records read .*undecodable=10"):
        next(pipeline(str(tmp_path / "undecodable-*.tfrecord")))
    # and every kind the checks flag
    glob = write_shards(tmp_path / "flagged", n_shards=1, per_shard=4,
                        bad={(0, 0): "missing_image", (0, 1): "empty_caption", (0, 2): "invalid_utf8_caption",
                             (0, 3): "corrupt_image"})
    with pytest.raises(NoUsableData, match="empty_caption=1, invalid_utf8_caption=1, undecodable=1"):
        next(pipeline(glob))


def test_a_mostly_bad_stream_trains_and_counts_and_a_bad_run_can_stop_it(tmp_path):
    from clip_jax.input.pipeline import NoUsableData

    bad = {(s, i): "missing_image" for s in range(2) for i in range(12) if i % 6}  # 1 good in 6
    glob = write_shards(tmp_path, n_shards=2, per_shard=12, bad=bad)
    p = pipeline(glob, global_batch_size=2)
    got = [c for _ in range(6) for c in captions(next(p))]  # 3 passes over the 4 good records
    assert sorted(set(got)) == ["item 0 0", "item 0 6", "item 1 0", "item 1 6"]
    assert p.bad_records()["missing_image"] >= 40
    strict = pipeline(glob, config={"max_bad_in_a_row": 5}, train=False, global_batch_size=2)
    with pytest.raises(NoUsableData, match="data.max_bad_in_a_row bad records in a row"):
        for _ in range(10):
            next(strict)


def test_an_evaluation_source_with_no_usable_record_is_diagnosed(tmp_path):
    from clip_jax.input import eval_data

    garbage = tmp_path / "a-random.tfrecord"
    garbage.write_bytes(np.random.default_rng(1).bytes(20_000))
    write_shards(tmp_path, n_shards=1, per_shard=3, bad={(0, 0): "missing_image", (0, 1): "corrupt_image"})
    with open(tmp_path / "b-not-examples.tfrecord", "wb") as f:  # valid framing, bytes of no Example
        with tf.io.TFRecordWriter(f.name) as w:
            w.write(b"\x0a\xff\xff garbage")
    info = eval_data.describe(f"tfrecord:{tmp_path}/*.tfrecord", {})
    batches = list(eval_data.eval_batches(info, {}, batch_size=4, image_size=16, context_length=8))
    assert sum(int(b["mask"].sum()) for b in batches) == 1  # the one good record
    assert eval_data.diagnose(info, {}) == "missing_image=1, not_an_example=1, undecodable=1, unreadable_file=1, " \
                                           "usable=1"
