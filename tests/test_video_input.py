"""clip_jax.input.video, shapes_video and convert_video: frame indices are TSN's (a numpy transcription of its
segment sampling); short clips are padded and masked; every frame of a clip gets one crop and one flip; a seed
gives one clip; bad clips are counted by kind and skipped, bad frames dropped and masked; the embedded clips
are deterministic and show what their captions and labels say; PyAV-made files convert to the frames nearest
the sampled times."""

import csv
import io
import json
import os

import av  # setup.py's data extra installs it: the converter's tests run wherever the input does
import numpy as np
import pytest
from PIL import Image

from clip_jax.input import convert_video, eval_data, records, shapes, shapes_video, video
from clip_jax.input.pipeline import InputPipeline
from clip_jax.input.tf_runtime import import_tensorflow
from clip_jax.methods.base import BatchInput
from clip_jax.preprocessing import MEAN, STD

tf = import_tensorflow()


# -- TSN's sampling, transcribed (tsn-pytorch dataset.py, new_length=1) --------------------------------------
def tsn_test_indices(n, segments):
    tick = n / float(segments)
    return np.array([int(tick / 2.0 + tick * x) for x in range(segments)])


def tsn_train_offsets_ok(picked, n, segments):
    """Whether `picked` is one of TSN's training draws: arange(segments) * (n // segments) + randint(n // segments)."""
    average = n // segments
    r = np.asarray(picked) - np.arange(segments) * average
    return average > 0 and bool(np.all((r >= 0) & (r < average))), r


def png(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def normalized(pixels):
    return (np.asarray(pixels, np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)


def test_sampling_indices_are_tsns():
    for n, t in ((8, 8), (12, 8), (30, 8), (100, 12), (9, 4), (5, 3)):
        np.testing.assert_array_equal(video.sample_indices(n, t, "uniform").numpy(), tsn_test_indices(n, t))
        offsets = set()
        for s in range(40):
            picked = video.sample_indices(n, t, "random", tf.constant([s, 7], tf.int64)).numpy()
            ok, r = tsn_train_offsets_ok(picked, n, t)
            assert ok, (n, t, picked)
            offsets.update(r.tolist())
        assert offsets == set(range(n // t))  # every offset of a segment is drawn
    for sampling in ("uniform", "random"):  # shorter than T: all frames in order, then padding
        np.testing.assert_array_equal(video.sample_indices(3, 5, sampling, tf.constant([1, 2], tf.int64)).numpy(),
                                      [0, 1, 2])


def test_a_short_clip_is_padded_and_masked_after_its_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    clip, mask = video.transform(tf.constant([png(f) for f in frames]), 5, 16, False, "uniform")
    np.testing.assert_array_equal(mask.numpy(), [1, 1, 1, 0, 0])
    np.testing.assert_allclose(clip.numpy()[:3], normalized(frames), atol=1e-5)  # 16 px at 16 px: the frames as they
    assert not clip.numpy()[3:].any()


def test_every_frame_of_a_clip_gets_one_crop_and_one_flip():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    data = tf.constant([png(base)] * 6)
    flips = set()
    for s in range(6):
        seeds = {k: tf.constant([s, i], tf.int64) for i, k in enumerate(("sample", "crop", "flip"))}
        clip, mask = video.transform(data, 6, 24, True, "random", True, seeds)
        clip = clip.numpy()
        for frame in clip[1:]:  # identical frames stay identical: one window and one flip for all
            np.testing.assert_array_equal(frame, clip[0])
        unflipped, _ = video.transform(data, 6, 24, True, "random", False, seeds)
        flipped = np.array_equal(clip, unflipped.numpy()[:, :, ::-1])
        assert flipped or np.array_equal(clip, unflipped.numpy())
        flips.add(flipped)
    assert flips == {True, False}


def test_a_seed_gives_one_clip():
    frames = np.random.default_rng(2).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    data = tf.constant([png(f) for f in frames])

    def clip(s):
        seeds = {k: tf.constant([s, i], tf.int64) for i, k in enumerate(("sample", "crop", "flip"))}
        return video.transform(data, 4, 24, True, "random", True, seeds)[0].numpy()

    np.testing.assert_array_equal(clip(3), clip(3))
    assert any(not np.array_equal(clip(3), clip(s)) for s in range(4, 8))


def test_bad_clips_are_counted_by_kind_and_bad_frames_dropped(tmp_path):
    rng = np.random.default_rng(3)
    good = [png(rng.integers(0, 256, (16, 16, 3))) for _ in range(4)]
    other_size = png(rng.integers(0, 256, (24, 20, 3)))  # resized to the first frame's size
    broken = good[0][:30]  # a PNG signature, then nothing
    kinds = [("good", good), ("sizes", good[:2] + [other_size] + good[2:]), ("one_broken", [good[0], broken, good[1]]),
             ("missing", []), ("garbage", [b"not a frame", b"\x00\x01"]), ("all_broken", [broken, broken])]
    path = str(tmp_path / "clips-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for caption, frames in kinds:
            w.write(records.serialize_clip(frames, [caption]))
    inputs = (BatchInput("frames", "frames", ("frames",), (("frames", 4),)),
              BatchInput("caption", "value", ("caption",)))
    pipe = InputPipeline(f"tfrecord:{path}", {"shuffle_buffer": 2}, global_batch_size=1, image_size=16, train=False,
                         num_epochs=1, inputs=inputs)
    got = {b["caption"][0].decode(): (b["frames"][0], b["frame_mask"][0]) for b in pipe}
    assert sorted(got) == ["good", "one_broken", "sizes"]
    np.testing.assert_array_equal(got["one_broken"][1], [1, 1, 0, 0])  # the broken frame dropped, the others closed up
    decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in good]
    np.testing.assert_allclose(got["one_broken"][0][:2], normalized(decoded[:2]), atol=1e-5)
    np.testing.assert_array_equal(got["sizes"][1], [1, 1, 1, 1])
    assert got["sizes"][0].shape == (4, 16, 16, 3)
    bad = pipe.bad_records()
    assert (bad["missing_frames"], bad["bad_frames"], bad["undecodable"]) == (1, 1, 1)


def test_bad_declarations_are_named():
    from clip_jax.input import ops

    for options, words in (((("frames", 0),), "frames=0"), ((("sampling", "dense"),), "sampling='dense'"),
                           ((("fps", 2),), "no options ['fps']")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            ops.resolve([BatchInput("frames", "frames", ("frames",), options)])


# -- the embedded clips ---------------------------------------------------------------------------------------
def _object(frame, background):
    """(mask of the object's pixels, their mean colour) of a frame on its flat background."""
    here = np.abs(frame.astype(int) - background.astype(int)).sum(-1) > 60
    return here, frame[here].mean(0)


def test_shapes_video_is_deterministic_and_shows_what_its_caption_says():
    assert shapes_video.encoded(0, "test", 5, 64) == shapes_video.encoded(0, "test", 5, 64)
    assert shapes_video.encoded(0, "test", 5, 64) != shapes_video.encoded(1, "test", 5, 64)
    seen = set()
    for i in range(48):
        frames, text, labels = shapes_video.make_clip(0, "validation", i)
        action = shapes_video.ACTIONS[labels["label_action"]]
        seen.add(action)
        color, kind = shapes.COLOR_NAMES[labels["label_color"]], shapes.SHAPE_NAMES[labels["label_shape"]]
        assert f"{color} {kind} " in text, text
        phrase = text.split(f"{color} {kind} ", 1)[1]
        background = frames[0, 0, 0]
        (first, rgb0), (last, rgb1) = _object(frames[0], background), _object(frames[-1], background)
        ys, xs = np.nonzero(first)
        ye, xe = np.nonzero(last)
        if action.startswith("moves"):
            assert phrase.endswith(action)
            dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
            want = {"moves to the left": dx < -10, "moves to the right": dx > 10, "moves up": dy < -10,
                    "moves down": dy > 10}[action]
            assert want and min(abs(dx), abs(dy)) < 2, (text, dx, dy)
        elif action in ("grows", "shrinks"):
            assert phrase.endswith(action)
            assert (last.sum() > 2.5 * first.sum()) if action == "grows" else (first.sum() > 2.5 * last.sum())
        elif action == "rotates":
            assert phrase.endswith(action) and kind != "circle"
            assert abs(int(last.sum()) - int(first.sum())) < 0.25 * first.sum() and (first != last).any()
        else:  # the colour it turns: the named colour's, within the jitter
            target = phrase.split("turns ")[1]
            assert target != color
            assert np.abs(rgb1 - np.array(shapes.COLORS[target])).max() < 20, (text, rgb1)
            assert np.abs(rgb0 - np.array(shapes.COLORS[color])).max() < 20, (text, rgb0)
    assert seen == set(shapes_video.ACTIONS)


def test_shapes_video_trains_through_the_pipeline(tmp_path):
    sizes = {"train": 8, "validation": 4, "test": 4}
    config = {"cache_dir": str(tmp_path), "video_sizes": sizes, "shuffle_buffer": 8, "label_keys": (
        "label_action", "label_color", "label_shape")}
    inputs = (BatchInput("frames", "frames", ("frames",), (("flip", True),)),
              BatchInput("caption", "value", ("caption",)), BatchInput("labels", "value", ("labels",)))

    def first(seed):
        pipe = InputPipeline("shapes_video:train", config, global_batch_size=4, image_size=32, train=True, seed=seed,
                             inputs=inputs)
        batch = next(pipe)
        pipe.close()
        return batch

    a, b = first(0), first(0)
    assert a["frames"].shape == (4, 8, 32, 32, 3) and a["frame_mask"].all()
    np.testing.assert_array_equal(a["frames"], b["frames"])
    assert not np.array_equal(a["frames"], first(1)["frames"])
    by_caption = {}
    for ex in shapes_video.read_split(shapes_video.video_files("train", config)):
        by_caption[ex["caption"]] = ex
    for caption, labels in zip(a["caption"], a["labels"]):
        ex = by_caption[caption.decode()]
        assert list(labels) == [ex["label_action"], ex["label_color"], ex["label_shape"]]
    # evaluation: the test split's clips at their stored size, every frame, labels as the records say
    info = eval_data.describe("shapes_video:test", config)
    (batch,) = list(eval_data.eval_batches(info, config, batch_size=4, image_size=64, context_length=77,
                                           label_keys=["label_action"], features=("frames", "frame_mask"), image=False))
    want = shapes_video.read_split(info.files)
    np.testing.assert_allclose(batch["frames"], normalized([ex["frames"] for ex in want]), atol=1e-5)
    assert batch["frame_mask"].all() and batch["labels"][:, 0].tolist() == [ex["label_action"] for ex in want]


# -- the converter --------------------------------------------------------------------------------------------
COLORS = [(i * 25, 250 - i * 25, 128) for i in range(10)]  # frame i's flat colour


def write_video(path, codec, fps=10, size=(64, 48)):
    """A 1 s video of 10 flat frames, frame i in COLORS[i]."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for rgb in COLORS:
            frame = np.zeros((size[1], size[0], 3), np.uint8)
            frame[:] = rgb
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def colours(ex):
    return [np.asarray(Image.open(io.BytesIO(b))).reshape(-1, 3).mean(0) for b in
            ex.features.feature["frames"].bytes_list.value]


def test_videos_convert_to_the_frames_nearest_the_sampled_times(tmp_path):
    videos = tmp_path / "videos"
    os.makedirs(videos / "juggling balls")
    for name, codec in (("video0.mp4", "mpeg4"), ("video1.webm", "libvpx"), ("video2.avi", "mjpeg")):
        write_video(str(videos / name), codec)
    (videos / "video3.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    write_video(str(videos / "juggling balls" / "abc_000010_000020.mp4"), "mpeg4")
    meta = {"videos": [{"video_id": f"video{i}", "split": "train" if i != 1 else "test"} for i in range(5)],
            "sentences": [{"video_id": f"video{i}", "caption": f"clip {i} take {k}", "sen_id": 2 * i + k}
                          for i in range(5) for k in range(2)]}
    (tmp_path / "msrvtt.json").write_text(json.dumps(meta))
    out = str(tmp_path / "out")
    info = convert_video.convert(convert_video.msrvtt_items(str(tmp_path / "msrvtt.json")), str(videos), out,
                                 layout="msrvtt", frames=4, short_side=32, log=lambda *a, **k: None)
    assert info["splits"] == {"train": 2, "test": 1}
    assert sorted(os.path.basename(s["file"]) for s in info["skipped"]) == ["video3.mp4", "video4.mp4"]
    # reference: frame i shows at i / 10 s; the centres of 4 quarters of 1 s are nearest frames 1, 4, 6, 9
    # (0.375 s lies nearer 0.4 than 0.3)
    times = (np.arange(4) + 0.5) / 4
    want = [int(np.argmin(np.abs(np.arange(10) / 10 - t))) for t in times]
    records = {}
    for split in ("train", "test"):
        for r in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{out}/{split}-*.tfrecord")):
            ex = tf.train.Example.FromString(r.numpy())
            records[ex.features.feature["key"].bytes_list.value[0].decode()] = ex
    assert sorted(records) == ["video0", "video1", "video2"]
    for key, ex in records.items():
        f = ex.features.feature
        captions = [c.decode() for c in f["caption"].bytes_list.value]
        assert captions == [f"clip {key[-1]} take 0", f"clip {key[-1]} take 1"]
        assert f["frames/count"].int64_list.value[0] == 4
        np.testing.assert_allclose(f["frames/time"].float_list.value, np.array(want) / 10, atol=1e-6)
        for got, i in zip(colours(ex), want):
            np.testing.assert_allclose(got, COLORS[i], atol=12)  # lossy codecs on flat colours
        assert Image.open(io.BytesIO(f["frames"].bytes_list.value[0])).size == (43, 32)  # short side 32
    # Kinetics: the class folder, the label's index, the class name as caption
    with open(tmp_path / "k.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        w.writerows([["juggling balls", "abc", 10, 20, "train"], ["abseiling", "gone", 0, 10, "train"]])
    items, classes = convert_video.kinetics_items(str(tmp_path / "k.csv"))
    kin = str(tmp_path / "kin")
    info = convert_video.convert(items, str(videos), kin, layout="kinetics", fps=2, short_side=256, classes=classes,
                                 log=lambda *a, **k: None)
    assert classes == ["abseiling", "juggling balls"] and info["splits"] == {"train": 1}
    assert [os.path.basename(s["file"]) for s in info["skipped"]] == ["gone_000000_000010.mp4"]
    inputs = (BatchInput("frames", "frames", ("frames",), (("frames", 4),)), BatchInput("labels", "value", ("labels",)),
              BatchInput("caption", "value", ("caption",)))
    (batch,) = list(InputPipeline(f"tfrecord:{kin}/train-*.tfrecord", {"shuffle_buffer": 2, "label_keys": ("label",)},
                                  global_batch_size=1, image_size=16, train=False, num_epochs=1, inputs=inputs))
    assert batch["labels"].tolist() == [[1]] and batch["caption"].tolist() == [b"juggling balls"]
    np.testing.assert_array_equal(batch["frame_mask"], [[1, 1, 0, 0]])  # 2 fps of 1 s: 2 frames, padded to 4
