"""Bad inputs, generated, through the input pipeline and the folder converter. Each kind must end
in one of three outcomes: used correctly (its pixels equal those of the same picture as a plain
8-bit RGB PNG through the same pipeline; its caption's tokens as the tokenizer's), skipped and
counted under its kind, or a clear error. A hang (time limit), an exception that is not the
expected error, or a wrong tensor fails the test. `pytest -s` prints the table of kinds and
outcomes (docs/robustness.md keeps it)."""

import concurrent.futures
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from clip_jax.input import records  # noqa: E402
from clip_jax.input.pipeline import InputPipeline, NoUsableData  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the pipeline's output; eval transform (resize the shorter side, center crop)
LIMIT_S = 60  # one case's wall time before it counts as a hang
RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, (24, 20, 3), dtype=np.uint8)
_Y, _X = np.mgrid[0:24, 0:20]
SMOOTH = np.stack([_X * 10, _Y * 8, (_X + _Y) * 5], -1).astype(np.uint8)  # for lossy JPEGs: noise amplifies
# the decoders' own differences (TF's fast integer DCT vs PIL's)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png(array) -> bytes:
    return encoded(Image.fromarray(array), "PNG")


def feature(kind: str, values):
    if kind == "bytes":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def example(**features) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def image_kinds() -> dict:
    """name -> (encoded image, the RGB picture it shows: what the pipeline must decode it as)."""
    gray = PICTURE[..., 0]
    out = {
        "rgb_png (control)": (png(PICTURE), PICTURE),
        "grayscale_png": (png(gray), np.repeat(gray[..., None], 3, -1)),
        "grayscale_alpha_png": (encoded(Image.fromarray(np.stack([gray, gray // 2], -1), "LA"), "PNG"),
                                np.repeat(gray[..., None], 3, -1)),
        "rgba_png": (encoded(Image.fromarray(np.concatenate([PICTURE, PICTURE[..., :1]], -1), "RGBA"), "PNG"),
                     PICTURE),  # alpha dropped, as PIL's convert("RGB") (open_clip) does
        "16bit_png": (encoded(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
                      np.repeat(gray[..., None], 3, -1)),
        "palette_png": (encoded(Image.fromarray(PICTURE).quantize(16), "PNG"),
                        np.asarray(Image.fromarray(PICTURE).quantize(16).convert("RGB"))),
        "1x1_png": (png(PICTURE[:1, :1]), PICTURE[:1, :1]),
        "2x400_png": (png(np.repeat(PICTURE[:2, :1], 400, 1)), np.repeat(PICTURE[:2, :1], 400, 1)),
        "gif": (encoded(Image.fromarray(PICTURE).quantize(16), "GIF"),
                np.asarray(Image.fromarray(PICTURE).quantize(16).convert("RGB"))),
        "bmp": (encoded(Image.fromarray(PICTURE), "BMP"), PICTURE),
    }
    cmyk = Image.fromarray(SMOOTH).convert("CMYK")
    out["cmyk_jpeg"] = (encoded(cmyk, "JPEG", quality=100),
                        np.asarray(Image.open(io.BytesIO(encoded(cmyk, "JPEG", quality=100))).convert("RGB")))
    return out


CONTROL_JPEG = encoded(Image.fromarray(PICTURE), "JPEG", quality=90)
# record kind -> (serialized record, expected): "used", or the bad-record kind it is counted under
RECORD_KINDS = {
    "zero_byte_image": (records.serialize_example(b"", "c"), "missing_image"),
    "random_bytes_image": (records.serialize_example(RNG.bytes(300), "c"), "undecodable"),
    "text_as_image": (records.serialize_example(b"hello, not an image", "c"), "undecodable"),
    "truncated_jpeg": (records.serialize_example(CONTROL_JPEG[: len(CONTROL_JPEG) // 2], "c"), "undecodable"),
    "no_image_feature": (example(caption=feature("bytes", [b"c"])), "missing_image"),
    "no_caption_feature": (example(image=feature("bytes", [png(PICTURE)])), "empty_caption"),
    "image_as_int64": (example(image=feature("int", [1, 2]), caption=feature("bytes", [b"c"])), "not_an_example"),
    "caption_as_float": (example(image=feature("bytes", [png(PICTURE)]), caption=feature("float", [1.0])),
                         "not_an_example"),
    "not_an_example": (b"\x0a\xff\xff\x01 certainly not a proto", "not_an_example"),
    "empty_caption": (records.serialize_example(png(PICTURE), ""), "empty_caption"),
    "whitespace_caption": (records.serialize_example(png(PICTURE), " \t\n  "), "empty_caption"),
    "non_utf8_caption": (example(image=feature("bytes", [png(PICTURE)]), caption=feature("bytes", [b"caf\xe9 \xff"])),
                         "invalid_utf8_caption"),
}
LONG_CAPTION = "a very long caption " * 500  # 10,000 characters


def good(caption: str, image: bytes, key: str = "") -> bytes:
    return records.serialize_example(image, caption, key=key)


def write(path, serialized) -> str:
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in serialized:
            w.write(r)
    return str(path)


def one_pass(spec: str) -> dict:
    """{caption: (uint8 image, tokens)} of one eval pass (batch 1), and the bad-record counts."""
    pipe = InputPipeline(spec, {"image_dtype": "uint8"}, global_batch_size=1, image_size=SIZE, train=False,
                         num_epochs=1, context_length=77)
    out = {}
    for batch in pipe:
        caption = batch["caption"][0].decode()
        out.setdefault(caption, []).append((batch["image"][0], batch["tokens"][0]))
    return {"examples": out, "bad": {k: v for k, v in pipe.bad_records().items() if v}}


def within_limit(fn, *args):
    """fn(*args), or an AssertionError naming a hang after LIMIT_S seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=LIMIT_S)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"{fn.__name__}{args} hung past {LIMIT_S} s") from None
    finally:
        pool.shutdown(wait=False)


TABLE = []  # (kind, outcome): printed at the end


def record(kind: str, outcome: str) -> None:
    TABLE.append((kind, outcome))
    print(f"{kind:28s} {outcome}")


def test_fuzz_records_images_and_captions(tmp_path):
    images = image_kinds()
    serialized = [good(f"image {name}", data) for name, (data, _) in images.items()]
    references = [good(f"reference {name}", png(picture)) for name, (_, picture) in images.items()]
    bad = [r for r, _ in RECORD_KINDS.values()]
    extra = [good(LONG_CAPTION, png(PICTURE)), good("dup", png(PICTURE), key="same"),
             good("dup", png(PICTURE[::-1]), key="same")]
    path = write(tmp_path / "fuzz.tfrecord", serialized + references + bad + extra)
    got = within_limit(one_pass, f"tfrecord:{path}")
    examples = got["examples"]
    for name in images:
        (image, _), = examples.pop(f"image {name}")
        (want, _), = examples.pop(f"reference {name}")
        diff = np.abs(image.astype(int) - want.astype(int)).mean()
        tolerance = 2.0 if name == "cmyk_jpeg" else 0.0  # libjpeg's CMYK conversion vs PIL's
        assert diff <= tolerance, f"{name}: mean |difference| {diff:.2f} levels from the same picture as RGB PNG"
        record(name, f"used (mean |diff| to the RGB PNG: {diff:.2f} levels)")
    expected: dict = {}
    for name, (_, kind) in RECORD_KINDS.items():
        expected[kind] = expected.get(kind, 0) + 1
    assert got["bad"] == expected, got["bad"]
    for name, (_, kind) in RECORD_KINDS.items():
        record(name, f"skipped, counted as {kind} ({expected[kind]} of that kind in the pass)")
    (image, tokens), = examples.pop(LONG_CAPTION.strip())
    from clip_jax.tokenizers import get_tokenizer

    want = get_tokenizer()([LONG_CAPTION], 77)[0]
    np.testing.assert_array_equal(tokens, want)
    assert tokens[-1] == want[-1] != 0  # cut to the context, ending in the end-of-text token
    record("10000_char_caption", "used (tokens cut to 77, ending in end-of-text)")
    assert len(examples.pop("dup")) == 2 and not examples, sorted(examples)
    record("duplicate_keys", "used (both records: keys are not read in training)")


def _file_case(tmp_path, name: str, mutate) -> str:
    """A shard of 3 good records mutated by `mutate(bytes) -> bytes`, beside an intact shard."""
    folder = tmp_path / name
    folder.mkdir()
    write(folder / "a-intact.tfrecord", [good(f"intact {i}", png(PICTURE)) for i in range(3)])
    damaged = write(folder / "b-damaged.tfrecord", [good(f"damaged {i}", png(PICTURE)) for i in range(3)])
    data = open(damaged, "rb").read()
    open(damaged, "wb").write(mutate(data))
    return f"tfrecord:{folder}/*.tfrecord"


def _flip(offset):
    def mutate(data: bytes) -> bytes:
        at = offset(len(data))
        return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]
    return mutate


def test_fuzz_files(tmp_path):
    record_len = len(open(write(tmp_path / "one.tfrecord", [good("damaged 0", png(PICTURE))]), "rb").read())
    cases = {  # name -> (mutation, damaged records kept, expected unreadable_shard count)
        "truncated_tfrecord": (lambda d: d[: int(len(d) * 0.6)], 1, 1),
        "bit_flip_in_data": (_flip(lambda n: record_len + record_len // 2), 1, 1),  # the second record's CRC fails
        "bit_flip_in_length": (_flip(lambda n: record_len + 2), 1, 1),
        "zero_byte_tfrecord": (lambda d: b"", 0, 0),
        "jpeg_named_tfrecord": (lambda d: CONTROL_JPEG, 0, 1),
    }
    for name, (mutate, kept, unreadable) in cases.items():
        got = within_limit(one_pass, _file_case(tmp_path, name, mutate))
        captions = sorted(got["examples"])
        assert captions == [f"damaged {i}" for i in range(kept)] + [f"intact {i}" for i in range(3)], (name, captions)
        assert got["bad"].get("unreadable_shard", 0) == unreadable, (name, got["bad"])
        record(name, f"the intact shard used; {kept} damaged-shard record(s) before the damage used"
               + (", the shard counted as unreadable_shard" if unreadable else ""))
    # A shard matched twice would be read twice per pass, silently doubling its weight.
    folder = tmp_path / "truncated_tfrecord"
    with pytest.raises(ValueError, match="a-intact.tfrecord is matched twice .*list each shard once"):
        InputPipeline(f"tfrecord:{folder}/a-*.tfrecord,{folder}/*.tfrecord", {}, global_batch_size=1,
                      image_size=SIZE, train=False)
    record("shard_listed_twice", "error before reading: the file is named, list each shard once")
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(RNG.bytes(10_000))
    with pytest.raises(NoUsableData, match="unreadable_shard=1. Files: .*garbage.tfrecord"):
        within_limit(lambda: next(InputPipeline(f"tfrecord:{garbage}", {}, global_batch_size=4, image_size=SIZE,
                                                train=True)))
    record("all_records_bad", "error: NoUsableData after one pass, naming the files and the counts")


def test_fuzz_the_folder_converter(tmp_path):
    """data/folder_to_tfrecord.py on a folder of every image and caption kind: what it writes reads
    back as the same pictures; what it skips is reported by reason."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    images = image_kinds()
    for i, (name, (data, _)) in enumerate(images.items()):
        ext = "jpg" if "jpeg" in name else "png"
        (folder / f"{i:02d}.{ext}").write_bytes(data)
        (folder / f"{i:02d}.txt").write_text(f"image {name}")
    skipped = {"zero_byte": (b"", "caption"), "random_bytes": (RNG.bytes(300), "caption"),
               "empty_caption": (png(PICTURE), ""), "whitespace_caption": (png(PICTURE), " \n\t"),
               "non_utf8_caption": (png(PICTURE), b"caf\xe9")}
    for name, (data, caption) in skipped.items():
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    out = tmp_path / "out"
    done = within_limit(lambda: subprocess.run(
        [sys.executable, f"{ROOT}/data/folder_to_tfrecord.py", f"--folder={folder}", f"--output={out}"],
        capture_output=True, text=True, timeout=LIMIT_S))
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout + done.stderr
    # GIF and BMP decode but are not among the stored formats; the rest are written as they are
    refused = {"gif", "bmp"}
    written = len(images) - len(refused)
    assert re.search(rf"wrote {written}, skipped {len(skipped) + len(refused)} \(bad_utf8_caption=1, corrupt_image=2, "
                     r"empty_caption=2, unsupported_format=2\)", report), report
    examples = within_limit(one_pass, f"tfrecord:{out}/*.tfrecord")["examples"]
    for name, (_, picture) in images.items():
        if name.split("_")[0] in refused or name in refused:
            assert f"image {name}" not in examples
            continue
        (image, _), = examples[f"image {name}"]
        path = write(tmp_path / f"ref-{len(TABLE)}.tfrecord", [good("ref", png(picture))])
        (want, _), = within_limit(one_pass, f"tfrecord:{path}")["examples"]["ref"]
        tolerance = 2.0 if name == "cmyk_jpeg" else 0.0
        assert np.abs(image.astype(int) - want.astype(int)).mean() <= tolerance, name
    record("converter: image kinds", f"{written} written as they are and read back as their pictures; GIF and BMP "
                                     "skipped as unsupported_format")
    record("converter: bad pairs", "zero-byte and random images skipped as corrupt_image, empty and whitespace "
                                   "captions as empty_caption, non-UTF-8 as bad_utf8_caption, each counted")
