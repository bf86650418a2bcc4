"""The data conversion scripts, run as a user runs them, with their TFRecords read back.

Each test builds a few 8x8 images, runs one script in a subprocess and checks that every
good pair arrives byte for byte and every bad one is skipped and reported under its reason.
"""

import csv
import glob
import io
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def encoded(fmt: str, color=(200, 30, 30)) -> bytes:
    """A tiny image in ``fmt`` (JPEG, PNG, WEBP, GIF)."""
    return encode(Image.new("RGB", (8, 8), color), fmt)


def noisy_jpeg(size: int = 64) -> bytes:
    """A JPEG several tar blocks long (noise does not compress), to cut in the middle."""
    return encode(Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)), "JPEG")


def run_script(script, *args, read_back=True):
    """Run data/<script> with ``args``; the CompletedProcess (stdout/stderr as text)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.join("data", script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if read_back:
        # Importing TensorFlow takes seconds, in the script as here (for read_records):
        # overlap the two.
        import tensorflow  # noqa: F401

    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_records(pattern):
    """{key: (image bytes, caption)} of all records in the files matching ``pattern``."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("image", "caption", "key")}
    out = {}
    for path in sorted(glob.glob(pattern)):
        compression = "GZIP" if path.endswith(".gz") else ""
        for raw in tf.data.TFRecordDataset(path, compression_type=compression):
            ex = tf.io.parse_single_example(raw, spec)
            key = ex["key"].numpy().decode()
            assert key not in out, f"{key} written twice"
            out[key] = (ex["image"].numpy(), ex["caption"].numpy().decode("utf-8"))
    return out


def report_line(stdout, source):
    """What the report says about ``source``, after 'SOURCE: '."""
    return next(line[len(source) + 2 :] for line in stdout.splitlines() if line.startswith(f"{source}: "))


def totals_line(stdout):
    return [line for line in stdout.splitlines() if line.startswith("written:")][-1]


# ---------------------------------------------------------------- WebDataset


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path, members, compress=False):
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def cut_inside(path, member, keep):
    """Truncate the tar at ``path`` ``keep`` bytes into the data of ``member``."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    path.write_bytes(path.read_bytes()[: offset + keep])


def test_webdataset_to_tfrecord(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    jpeg, png, webp = encoded("JPEG"), encoded("PNG", (10, 200, 10)), encoded("WEBP", (1, 2, 250))
    # Good samples, gzipped; .json members are ignored, and a .jpeg/.webp key works too.
    write_tar(
        src / "a_good.tar.gz",
        [
            ("00/k0.jpg", jpeg), ("00/k0.txt", b"a red square\n"), ("00/k0.json", b"{}"),
            ("00/k1.png", png), ("00/k1.txt", "un carr\u00e9 vert".encode()),
            ("00/k2.webp", webp), ("00/k2.txt", b"a blue square"),
        ],
        compress=True,
    )
    # One good sample, every kind of bad sample, then another good one: the bad ones are
    # skipped and the conversion goes on.
    write_tar(
        src / "b_bad_members.tar",
        [
            ("g0.jpeg", jpeg), ("g0.txt", b"good before"),
            ("corrupt.jpg", b"this is not a JPEG"), ("corrupt.txt", b"caption"),
            ("cut.jpg", jpeg[: len(jpeg) // 2]), ("cut.txt", b"half a JPEG"),
            ("gif.png", encoded("GIF")), ("gif.txt", b"a GIF named .png"),
            ("empty.jpg", jpeg), ("empty.txt", b"  \n\t"),
            ("noimage.txt", b"a caption alone"), ("noimage.json", b"{}"),
            ("nocaption.jpg", jpeg),
            ("utf8.jpg", jpeg), ("utf8.txt", b"caf\xe9 latin-1"),
            ("g1.png", png), ("g1.txt", b"good after"),
        ],
    )
    # Two good samples, then a file cut in the middle of an image several blocks long.
    write_tar(src / "c_truncated.tar", [("t0.jpg", jpeg), ("t0.txt", b"t zero"), ("t1.png", png),
                                        ("t1.txt", b"t one"), ("t2.jpg", noisy_jpeg()), ("t2.txt", b"t two")])
    cut_inside(src / "c_truncated.tar", "t2.jpg", keep=3000)
    # A file cut in a caption whose image came whole: that sample is lost too.
    write_tar(src / "c_truncated_caption.tar", [("u0.jpg", jpeg), ("u0.txt", b"u zero"),
                                                ("u1.jpg", jpeg), ("u1.txt", b"u one, cut" * 20)])
    cut_inside(src / "c_truncated_caption.tar", "u1.txt", keep=50)
    (src / "d_not_a_tar.tar").write_bytes(b"garbage " * 300)

    out = tmp_path / "out"
    proc = run_script(
        "webdataset_to_tfrecord.py", f"--input={src}/*.tar*", f"--output={out}",
        "--processes=2", "--shards_per_file=2", "--compress", "--prefix=wds",
    )
    assert proc.returncode == 0, proc.stderr

    # 5 inputs x 2 shards; the unreadable tar (the last) has none. No temporary file left.
    assert sorted(os.listdir(out)) == [f"wds-{i:05d}-of-00010.tfrecord.gz" for i in range(8)]
    got = read_records(f"{out}/*")
    assert got == {
        "00/k0": (jpeg, "a red square"),
        "00/k1": (png, "un carr\u00e9 vert"),
        "00/k2": (webp, "a blue square"),
        "g0": (jpeg, "good before"),
        "g1": (png, "good after"),
        "t0": (jpeg, "t zero"),
        "t1": (png, "t one"),
        "u0": (jpeg, "u zero"),
    }

    def line(name):
        return report_line(proc.stdout, f"{src}/{name}")

    assert line("a_good.tar.gz") == f"wrote 3, skipped 0 -> {out}/wds-00000-of-00010.tfrecord.gz, " + (
        f"{out}/wds-00001-of-00010.tfrecord.gz"
    )
    assert line("b_bad_members.tar").startswith(
        "wrote 2, skipped 7 (bad_utf8_caption=1, corrupt_image=2, empty_caption=1, missing_caption=1, "
        "missing_image=1, unsupported_format=1) -> "
    )
    assert line("c_truncated.tar").startswith("wrote 2, skipped 1 (broken_member=1) -> ")
    assert line("c_truncated_caption.tar").startswith("wrote 1, skipped 1 (broken_member=1) -> ")
    assert line("d_not_a_tar.tar") == "wrote 0, skipped 0 -> no output"
    assert totals_line(proc.stdout) == (
        "written: 8 skipped: 9 (bad_utf8_caption=1, broken_member=2, corrupt_image=2, "
        "empty_caption=1, missing_caption=1, missing_image=1, unsupported_format=1)"
    )
    assert f"{src}/c_truncated.tar: t2.jpg: unexpected end of data" in proc.stderr
    assert f"{src}/c_truncated_caption.tar: u1.txt: unexpected end of data" in proc.stderr
    assert f"{src}/d_not_a_tar.tar: cannot open" in proc.stderr


def test_webdataset_glob_matching_nothing_fails(tmp_path):
    proc = run_script(
        "webdataset_to_tfrecord.py", f"--input={tmp_path}/none/*.tar", f"--output={tmp_path}/out", read_back=False
    )
    assert proc.returncode != 0
    assert f"no input file matches --input='{tmp_path}/none/*.tar'" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CSV and folder


def test_csv_to_tfrecord(tmp_path):
    jpeg, png = encoded("JPEG"), encoded("PNG")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg)
    (tmp_path / "imgs" / "b.png").write_bytes(png)
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    rows = [
        ("imgs/a.jpg", 'a "quoted", tabbed\ttitle'),
        ("imgs/b.png", " spaced "),
        ("imgs/missing.jpg", "no such file"),
        ("imgs/bad.jpg", "corrupt"),
        ("imgs/a.jpg", ""),
        (str(tmp_path / "imgs" / "b.png"), "absolute path"),
    ]
    with open(tmp_path / "pairs.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title", "other"])
        writer.writerows([(path, title, "x") for path, title in rows])
    with open(tmp_path / "pairs.tsv", "ab") as f:
        f.write(b"imgs/a.jpg\t\xff\xfe broken\tx\n")

    out = tmp_path / "out"
    proc = run_script(
        "folder_to_tfrecord.py", f"--csv={tmp_path}/pairs.tsv", f"--output={out}",
        "--num_shards=3", "--processes=2", "--prefix=csv",
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == [f"csv-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert read_records(f"{out}/*") == {
        "imgs/a.jpg": (jpeg, 'a "quoted", tabbed\ttitle'),
        "imgs/b.png": (png, "spaced"),
        str(tmp_path / "imgs" / "b.png"): (png, "absolute path"),
    }
    assert totals_line(proc.stdout) == (
        "written: 3 skipped: 4 (bad_utf8_caption=1, corrupt_image=1, empty_caption=1, missing_image=1)"
    )
    # 3 shards over 2 processes: shard 0, and shards 1 and 2.
    assert report_line(proc.stdout, "shard 0").endswith(f"-> {out}/csv-00000-of-00003.tfrecord")
    assert report_line(proc.stdout, "shards 1-2").endswith(
        f"-> {out}/csv-00001-of-00003.tfrecord, {out}/csv-00002-of-00003.tfrecord"
    )


def test_csv_missing_column_fails(tmp_path):
    (tmp_path / "pairs.csv").write_text("path,caption\na.jpg,x\n")
    proc = run_script("folder_to_tfrecord.py", f"--csv={tmp_path}/pairs.csv", f"--output={tmp_path}/out",
                      read_back=False)
    assert proc.returncode != 0
    assert "no column 'filepath', 'title'" in proc.stderr


def test_folder_to_tfrecord(tmp_path):
    jpeg, png, webp = encoded("JPEG"), encoded("PNG"), encoded("WEBP")
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.jpg": jpeg, "a.txt": b"top level\n",
        "sub/b.PNG": png, "sub/b.txt": b"upper-case extension",
        "sub/deeper/c.webp": webp, "sub/deeper/c.txt": b"deep",
        "sub/nocaption.jpg": jpeg,
        "sub/noimage.txt": b"orphan caption",
        "sub/empty.jpg": jpeg, "sub/empty.txt": b"\n",
        "utf8.png": png, "utf8.txt": b"\xc3\x28",
        "corrupt.jpg": jpeg[:40], "corrupt.txt": b"cut JPEG",
        "notes.md": b"not a pair",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)

    out = tmp_path / "out"
    proc = run_script("folder_to_tfrecord.py", f"--folder={root}", f"--output={out}", "--processes=1")
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(out) == ["data-00000-of-00001.tfrecord"]
    assert read_records(f"{out}/*") == {
        "a.jpg": (jpeg, "top level"),
        "sub/b.PNG": (png, "upper-case extension"),
        "sub/deeper/c.webp": (webp, "deep"),
    }
    assert totals_line(proc.stdout) == (
        "written: 3 skipped: 5 (bad_utf8_caption=1, corrupt_image=1, empty_caption=1, "
        "missing_caption=1, missing_image=1)"
    )


def test_empty_folder_fails(tmp_path):
    proc = run_script("folder_to_tfrecord.py", f"--folder={tmp_path}", f"--output={tmp_path}/out", read_back=False)
    assert proc.returncode != 0
    assert "no image-caption pair in" in proc.stderr


def test_atomic_shards_leave_nothing_on_error(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "data"))
    try:
        import _convert_common as common
    finally:
        sys.path.pop(0)
    paths = [str(tmp_path / f"x-{i}.tfrecord") for i in range(2)]
    with pytest.raises(RuntimeError):
        with common.AtomicShards(paths, compressed=False) as out:
            out.write(encoded("PNG"), "caption", "key")
            raise RuntimeError("crash halfway")
    assert os.listdir(tmp_path) == []
    with common.AtomicShards(paths, compressed=False) as out:
        out.write(encoded("PNG"), "caption", "key")
        assert not any(os.path.exists(p) for p in paths)  # not under the final names before the end
    assert sorted(os.listdir(tmp_path)) == ["x-0.tfrecord", "x-1.tfrecord"]
    assert list(read_records(paths[0])) == ["key"]

