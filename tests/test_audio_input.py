"""clip_jax.input.audio and convert_audio: WAV / PCM clips decode to the samples written; resampling is
scipy.signal.resample_poly's; the fitting rules are a numpy transcription of AudioCLIP's RandomPadding and
RandomCrop; embedded records sound as sounds.scene_sound says; bad clips are counted by kind and skipped;
a seed gives one augmented clip."""

import csv
import json
import os
import struct

import numpy as np
import pytest

from clip_jax.input import audio, convert_audio, eval_data, records, shapes, sounds
from clip_jax.input.pipeline import InputPipeline
from clip_jax.input.tf_runtime import import_tensorflow
from clip_jax.methods.base import BatchInput

tf = import_tensorflow()
scipy_signal = pytest.importorskip("scipy.signal")


def wav(samples, rate, bits=16, float_format=False):
    """An independent WAV writer: int PCM (8-bit unsigned) or IEEE float, with a LIST chunk before 'data'."""
    x = np.asarray(samples)
    x = x[:, None] if x.ndim == 1 else x
    if float_format:
        data, tag = x.astype(f"<f{bits // 8}").tobytes(), 3
    elif bits == 8:
        data, tag = (x + 128).astype(np.uint8).tobytes(), 1
    elif bits == 24:
        data, tag = b"".join(int(v).to_bytes(3, "little", signed=True) for v in x.reshape(-1)), 1
    else:
        data, tag = x.astype(f"<i{bits // 8}").tobytes(), 1
    block = x.shape[1] * bits // 8
    fmt = struct.pack("<HHIIHH", tag, x.shape[1], rate, rate * block, block, bits)
    body = (b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"LIST" + struct.pack("<I", 5) + b"INFOx\0"
            + b"data" + struct.pack("<I", len(data)) + data)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def decoded(data):
    clip, rate = audio.decode(tf.constant(data))
    return clip.numpy(), int(rate)


@pytest.mark.parametrize("bits,float_format,scale", [(8, False, 128), (16, False, 32768), (24, False, 2 ** 23),
                                                     (32, False, 2 ** 31), (32, True, 1)])
def test_wav_decodes_to_the_written_samples(bits, float_format, scale):
    rng = np.random.default_rng(bits)
    for channels, rate in ((1, 8000), (2, 44100), (2, 22050)):
        if float_format:
            x = rng.uniform(-1, 1, (300, channels)).astype(np.float32)
        else:
            x = rng.integers(-(scale - 1), scale - 1, (300, channels), endpoint=True)
        clip, got_rate = decoded(wav(x, rate, bits, float_format))
        assert got_rate == rate and clip.shape == (channels, 300)
        np.testing.assert_allclose(clip, x.T / scale, rtol=0, atol=1e-7)


def test_raw_pcm_records_decode_to_the_written_samples(tmp_path):
    x = np.random.default_rng(0).integers(-32768, 32767, (500, 2)).astype("<i2")
    example = tf.train.Example(features=tf.train.Features(feature={
        "audio": tf.train.Feature(bytes_list=tf.train.BytesList(value=[x.tobytes()])),
        "audio/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"pcm_s16le"])),
        "audio/rate": tf.train.Feature(int64_list=tf.train.Int64List(value=[16000])),
        "audio/channels": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a"]))}))
    path = str(tmp_path / "pcm-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(example.SerializeToString())
    inputs = (BatchInput("audio", "audio", ("audio",), (("rate", 16000), ("samples", 500), ("channels", 2))),)
    (batch,) = list(InputPipeline(f"tfrecord:{path}", {"shuffle_buffer": 2}, global_batch_size=1, image_size=8,
                                  train=False, num_epochs=1, inputs=inputs))
    np.testing.assert_allclose(batch["audio"][0], x.T / 32768.0, atol=1e-7)


@pytest.mark.parametrize("rate_in,rate_out", [(48000, 44100), (22050, 44100), (44100, 16000), (16000, 22050)])
def test_resampling_is_resample_poly(rate_in, rate_out):
    x = np.random.default_rng(rate_in).standard_normal((2, 2000))
    got = audio.resample(tf.constant(x, tf.float32), tf.constant(rate_in, tf.int64), rate_out).numpy()
    want = scipy_signal.resample_poly(x, rate_out, rate_in, axis=1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)  # float32 arithmetic against scipy's float64


# -- AudioCLIP's RandomPadding / RandomCrop, transcribed (numpy; offsets given) --------------------------------
def ref_pad(x, out, left):
    right = out - left - x.shape[-1]
    return np.concatenate([np.full((x.shape[0], left), x[:, 0].mean()), x, np.full((x.shape[0], right),
                                                                                    x[:, -1].mean())], 1)


def ref_crop(x, out, left):
    orig = x.std(ddof=1) * 0.5
    y = x[:, left:left + out]
    out_std = y.std(ddof=1)
    if out_std < orig:
        y = x[:, :out]
    new = y.std(ddof=1)
    if orig > new > out_std:
        y = x[:, -out:]
    return y


def test_eval_padding_and_cropping_are_centred_as_audioclips():
    rng = np.random.default_rng(1)
    for length, out in ((1000, 1301), (1001, 1300), (1300, 1000), (1301, 1000), (1000, 1000)):
        x = rng.uniform(-1, 1, (2, length)).astype(np.float32)
        left = int(round(0.5 * abs(out - length)))
        want = ref_pad(x, out, left) if length < out else ref_crop(x, out, left) if length > out else x
        np.testing.assert_allclose(audio.fit(tf.constant(x), out, False).numpy(), want, atol=1e-6)


def test_a_quiet_crop_falls_back_as_audioclips():
    x = np.zeros((1, 3000), np.float32)
    loud_start = x.copy()
    loud_start[0, :800] = np.sin(np.arange(800))  # centre crop silent: the first samples instead
    loud_end = x.copy()
    loud_end[0, -800:] = np.sin(np.arange(800))  # centre silent, start quiet: the last samples
    loud_end[0, :500] = 0.01 * np.sin(np.arange(500))
    for clip in (loud_start, loud_end):
        for left in (0, 1000, 1999):
            want = ref_crop(clip, 1000, left)
            np.testing.assert_allclose(audio.crop(tf.constant(clip), 1000, left).numpy(), want)
    assert np.abs(audio.crop(tf.constant(loud_end), 1000, 1000).numpy()[0, -800:]).max() > 0.5


def test_training_pads_at_a_random_offset_with_the_edge_means():
    x = np.random.default_rng(2).uniform(-1, 1, (2, 700)).astype(np.float32)
    lefts = set()
    for s in range(12):
        y = audio.fit(tf.constant(x), 1000, True, tf.constant([s, 5], tf.int64)).numpy()
        left = int(np.argmax(np.all(np.isclose(y[:, :, None], x[:, :1, None]), axis=0)[:, 0]))
        np.testing.assert_allclose(y, ref_pad(x, 1000, left), atol=1e-6)
        lefts.add(left)
    assert len(lefts) > 6 and max(lefts) < 300


def test_random_scale_is_linear_interpolation_at_arange_over_the_factor():
    x = np.random.default_rng(3).uniform(-1, 1, (1, 500)).astype(np.float32)
    for factor in (0.7, 1.0, 1.43):
        n = int(500 * factor)
        ref = np.arange(n, dtype=np.float32) / np.float32(factor)
        i0 = ref.astype(np.int64)
        i1 = np.minimum(i0 + 1, 499)
        r = ref - i0
        want = x[:, i0] * (1 - r) + x[:, i1] * r
        got = audio.random_scale(tf.constant(x), tf.constant(factor, tf.float64)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_seed_gives_one_augmented_clip():
    data = tf.constant(audio.wav_bytes(np.random.default_rng(4).uniform(-0.5, 0.5, 3000), 8000))

    def clip(s):
        return audio.transform(data, 8000, 2000, 1, True, True, tf.constant([s, 9], tf.int64)).numpy()

    np.testing.assert_array_equal(clip(1), clip(1))
    assert any(not np.array_equal(clip(1), clip(s)) for s in range(2, 6))
    assert clip(1).shape == (1, 2000) and np.abs(clip(1)).max() <= 1


# -- the pipeline ------------------------------------------------------------------------------------------
SIZES = {"train": 6, "validation": 2, "test": 2}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    paths = shapes.ensure_shapes_dataset(root, sizes=SIZES)
    config = {"cache_dir": root, "shapes_sizes": SIZES, "shuffle_buffer": 8, "sounds_rate": 8500,
              "sounds_seconds": 0.25}
    return config, paths


def test_shapes_records_sound_as_scene_sound_says(shapes_data):
    import hashlib

    config, paths = shapes_data
    by_key = {ex["key"]: ex for ex in shapes.read_split(paths["train"])}
    inputs = (BatchInput("audio", "audio", ("audio",), (("rate", 8500), ("samples", 2125), ("augment", False))),
              BatchInput("key", "value", ("key",)))
    batches = list(InputPipeline("shapes:train", config, global_batch_size=3, image_size=8, train=True, num_epochs=1,
                                 inputs=inputs))
    assert sum(len(b["key"]) for b in batches) == SIZES["train"]
    for batch in batches:
        assert batch["audio"].shape == (3, 1, 2125) and batch["audio"].dtype == np.float32
        for key, clip in zip(batch["key"], batch["audio"]):
            ex = by_key[key.decode()]
            objects = []
            for o in ex["objects"]:  # loudness: the square root of the box's area
                ymin, xmin, ymax, xmax = (float(v) for v in o["bbox"])
                objects.append((o["shape"], o["color"], np.sqrt((ymax - ymin) * (xmax - xmin))))
            seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
            want = sounds.scene_sound(objects, seed, 0.25, 8500)
            np.testing.assert_allclose(clip[0], want, atol=1e-7)


def _example(data: bytes, caption: str) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        "audio": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
    })).SerializeToString()


def test_bad_clips_are_counted_by_kind_and_skipped(tmp_path):
    good = wav(np.arange(100, dtype=np.int16), 8000)
    other = wav(np.full((50, 2), 1000, np.int16), 16000)  # another rate and channel count: converted, used
    nan = wav(np.array([0.1, np.nan, 0.2], np.float32), 8000, 32, True)
    kinds = [("good", good), ("other", other), ("missing", b""), ("bad", b"RIFF\x10\x00\x00\x00WAVEjunk"),
             ("empty", wav(np.zeros(0, np.int16), 8000)), ("nan", nan), ("bad2", b"not a wav at all")]
    path = str(tmp_path / "clips-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for caption, data in kinds:
            w.write(_example(data, caption))
    inputs = (BatchInput("audio", "audio", ("audio",), (("rate", 8000), ("samples", 120), ("channels", 1))),
              BatchInput("caption", "value", ("caption",)))
    pipe = InputPipeline(f"tfrecord:{path}", {"shuffle_buffer": 2}, global_batch_size=1, image_size=8, train=False,
                         num_epochs=1, inputs=inputs)
    batches = {b["caption"][0].decode(): b["audio"][0] for b in pipe}
    assert sorted(batches) == ["good", "other"]
    mono = scipy_signal.resample_poly(np.full((1, 50), 1000 / 32768), 1, 2, axis=1)  # stereo to mono, half the rate
    np.testing.assert_allclose(batches["other"], ref_pad(mono, 120, 48), atol=1e-6)
    bad = pipe.bad_records()
    assert (bad["missing_audio"], bad["bad_audio"], bad["empty_audio"], bad["nonfinite_audio"]) == (1, 2, 1, 1)
    assert bad["undecodable"] == 0


def test_bad_declarations_are_named():
    from clip_jax.input import ops

    for options, words in (((("channels", 3),), "channels=3"), ((("rate", 0),), "rate=0"),
                           ((("speed", 2),), "speed")):
        with pytest.raises(ValueError, match=words):
            ops.resolve([BatchInput("audio", "audio", ("audio",), options)])


# -- the converter and evaluation ----------------------------------------------------------------------------
def _folder(root, layout):
    rng = np.random.default_rng(5)
    rows, names = [], ["dog", "chirping_birds", "car_horn"]
    for i in range(6):
        fold, target = 1 + i % 2, i % 3
        name = f"{i}-clip.wav"
        folder = os.path.join(root, "audio", f"fold{fold}" if layout == "us8k" else "")
        os.makedirs(folder, exist_ok=True)
        rate = (44100, 22050, 48000)[i % 3]
        data = b"broken" if i == 5 else wav(rng.integers(-3000, 3000, (rate // 20, 1 + i % 2)), rate, (16, 24)[i % 2])
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        rows.append((name, fold, target, names[target]))
    meta = os.path.join(root, "meta.csv")
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        if layout == "esc50":
            w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
            w.writerows([(n, fold, t, c, False, "x", "A") for n, fold, t, c in rows])
        else:
            w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
            w.writerows([(n, 1, 0.0, 1.0, 1, fold, t, c) for n, fold, t, c in rows])
    return meta, os.path.join(root, "audio"), rows


@pytest.mark.parametrize("layout", ["esc50", "us8k"])
def test_folders_convert_to_folds_that_evaluation_reads(tmp_path, layout):
    meta, audio_dir, rows = _folder(str(tmp_path), layout)
    out = str(tmp_path / "out")
    warnings = []
    info = convert_audio.convert(meta, audio_dir, out, layout, log=warnings.append)
    assert info["classes"] == ["dog", "chirping_birds", "car_horn"] and info["skipped"] == [
        os.path.join("fold2" if layout == "us8k" else "", "5-clip.wav")]
    assert len(warnings) == 1 and "5-clip.wav" in warnings[0]
    assert json.load(open(os.path.join(out, "dataset_info.json")))["folds"] == {"1": 3, "2": 2}
    config = {"audio_rate": 16000, "audio_samples": 800, "audio_channels": 2}
    split = eval_data.describe(f"tfrecord:{out}/fold2-*.tfrecord", config)
    batches = list(eval_data.eval_batches(split, config, batch_size=4, image_size=8, context_length=8,
                                          label_keys=("label",), features=("audio",), image=False))
    (batch,) = batches
    assert batch["audio"].shape == (4, 2, 800) and "image" not in batch
    assert batch["mask"].tolist() == [True, True, False, False]
    assert batch["labels"][:2, 0].tolist() == [rows[1][2], rows[3][2]]
    ex = next(iter(tf.data.TFRecordDataset(f"{out}/fold1-00000-of-00001.tfrecord")))
    feats = tf.train.Example.FromString(ex.numpy()).features.feature
    assert feats[records.CAPTION].bytes_list.value[0] == b"dog"
    first = os.path.join(audio_dir, "fold1" if layout == "us8k" else "", rows[0][0])
    assert feats["audio"].bytes_list.value[0] == open(first, "rb").read()
    caption = tf.train.Example.FromString(list(tf.data.TFRecordDataset(f"{out}/fold2-00000-of-00001.tfrecord"))[0]
                                          .numpy()).features.feature[records.CAPTION].bytes_list.value[0]
    assert caption == b"chirping birds"
