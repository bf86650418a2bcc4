"""CLIP_benchmark (a test-only reference: tests/references.txt) on clip_jax's data and models:
the webdataset layout holds exactly the records of its split; its result files are CLIP_benchmark's
(its `build` reads them); and docs/evaluation.md's commands, run as written on a tiny trained model,
give CLIP_benchmark's zero-shot top-1 and retrieval Recall@5 within 0.5 points of clip_jax's own."""

import csv
import glob
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_jax.input import clip_benchmark, shapes, wds_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 64, "validation": 12, "test": 30}


def doc_commands() -> list[str]:
    """The bash block after the marker in docs/evaluation.md, one command a line (continuations joined)."""
    with open(os.path.join(ROOT, "docs", "evaluation.md")) as f:
        text = f.read()
    block = re.search(r"<!-- clip_benchmark commands -->\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _samples(folder, split):
    """{key: {extension: bytes}} of a written split, read back with tarfile (shard order)."""
    with open(os.path.join(folder, split, "nshards.txt")) as f:
        n = int(f.read())
    out = {}
    for i in range(n):
        with tarfile.open(os.path.join(folder, split, f"{i}.tar")) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_written_datasets_hold_exactly_the_records_of_their_split(tmp_path):
    config = {"cache_dir": str(tmp_path / "cache"), "shapes_sizes": SIZES}
    shapes.main([f"--out={tmp_path / 'root'}", "--format=clip_benchmark", f"--cache_dir={tmp_path / 'cache'}",
                 *(f"--{split}={n}" for split, n in SIZES.items())])
    from clip_jax.input.pipeline import shapes_files

    # the converter from any evaluation source writes the same split as the embedded dataset's own writer
    generic = clip_benchmark.convert("shapes:test", str(tmp_path / "generic" / "shapes_color"), config=config,
                                     label_key="label_color", log=lambda *a: None)
    assert _samples(generic["folder"], "test") == _samples(str(tmp_path / "root" / "shapes_color"), "test")
    for split in ("validation", "test"):
        records = shapes.read_split(shapes_files(split, config))
        for name, label_key in shapes.CLIP_BENCHMARK_DATASETS.items():
            folder = tmp_path / "root" / name
            got = _samples(str(folder), split)
            assert list(got) == [r["key"] for r in records]  # every record once, in order, nothing else
            for r in records:
                sample = got[r["key"]]
                assert sample["txt"].decode() == r["caption"]
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")), r["image"])
                if label_key:
                    assert int(sample["cls"]) == r[label_key]
                else:
                    assert set(sample) == {"png", "txt"}
    for name, task in (("shapes_shape", "shape"), ("shapes_color", "color"), ("shapes_combo", "combo")):
        folder = tmp_path / "root" / name
        assert (folder / "classnames.txt").read_text().splitlines() == shapes.class_names(task)
        with open(tmp_path / "root" / wds_layout.PROMPTS_FILE) as f:
            prompts = json.load(f)[f"wds/{name}"]
        assert list(prompts.values()) == shapes.prompts(task)
        templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
        # shape's prompts are one "{c}" template list (the colour is in the template); colour's and combo's
        # "a"/"an" follows the class name, so only the prompt file words them exactly
        exact = [[t.replace("{c}", n) for t in templates] for n in shapes.class_names(task)] == shapes.prompts(task)
        assert exact == (task == "shape")
    assert (tmp_path / "root" / "shapes_captions" / "dataset_type.txt").read_text().strip() == "retrieval"


def test_result_files_are_clip_benchmarks():
    from clip_jax.evaluate.clip_benchmark import results

    metrics = {"zero_shot/shapes.test/shape/top1": 0.5, "zero_shot/shapes.test/shape/top5": 0.9,
               "zero_shot/shapes.test/shape/mean_per_class": 0.4, "retrieval/shapes.test/text_to_image_R5": 0.3,
               "retrieval/shapes.test/image_to_text_R5": 0.2, "zero_shot/cifar10.test/top1": 0.7,
               "linear_probe/cifar10/top1": 0.8, "linear_probe/cifar10/C": 3.0}
    got = {(r["dataset"], r["task"]): r for r in results(metrics, "RN-Shapes-S", "run step 2")}
    assert got[("wds/shapes_shape", "zeroshot_classification")]["metrics"] == {
        "acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.4}
    assert got[("wds/shapes_captions", "zeroshot_retrieval")]["metrics"] == {
        "image_retrieval_recall@5": 0.3, "text_retrieval_recall@5": 0.2}
    assert got[("wds/cifar10", "zeroshot_classification")]["metrics"] == {"acc1": 0.7}
    assert got[("wds/cifar10", "linear_probe")]["metrics"] == {"lp_acc1": 0.8}
    assert {k for r in got.values() for k in r} == {"dataset", "model", "pretrained", "task", "metrics", "language",
                                                    "split"}


def image_to_text_bounds(model_dir, cache_dir, sizes, k):
    """Image-to-text Recall@k of the exported model on the shapes test split with every tie ordered
    against the image's own caption, and with every tie ordered for it (a plain count of scores)."""
    import clip_jax
    from clip_jax.input.pipeline import shapes_files

    records = shapes.read_split(shapes_files("test", {"cache_dir": cache_dir, "shapes_sizes": sizes}))
    with open(os.path.join(model_dir, "open_clip_config.json")) as f:
        config = json.load(f)["model_cfg"]
    model, params = clip_jax.load(config, os.path.join(model_dir, "open_clip_model.safetensors"))
    images = clip_jax.preprocess([r["image"] for r in records], model.config.vision.image_size)
    tokens = clip_jax.tokenize([r["caption"] for r in records], model.config.text.context_length)
    scores = clip_jax.encode_image(model, params, images) @ clip_jax.encode_text(model, params, tokens).T
    own = np.diag(scores)[:, None]
    above, tied = (scores > own).sum(1), (scores == own).sum(1) - 1
    return float(np.mean(above + tied < k)), float(np.mean(above < k))


@pytest.mark.slow
def test_clip_benchmark_agrees_with_clip_jax_as_the_docs_run_it(tmp_path):
    from conftest import reference
    from test_train import smoke_config

    from clip_jax import train

    for name in ("torch", "open_clip", "clip_benchmark", "webdataset"):
        reference(name, load=False)
    c = smoke_config(tmp_path, 12)
    c.model = "RN-Tiny-test"  # 64 px, the images' size: no resize, so no resampling difference either
    c.data.shapes_sizes = {"train": 256, "validation": 8, "test": 200}
    c.checkpoint_every_steps = 12
    train.train_and_evaluate(c, str(tmp_path / "run"))
    env = {**os.environ, "WORKDIR": str(tmp_path / "run"), "MODEL": str(tmp_path / "model"),
           "ROOT": str(tmp_path / "root"), "RESULTS": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.makedirs(env["RESULTS"])
    for command in doc_commands():
        if command.startswith("python -m clip_jax.input.shapes"):  # the run's splits: its cache and sizes
            command += f" --cache_dir={c.data.cache_dir} --train=256 --validation=8 --test=200"
        command = command.replace("python -m", f"{sys.executable} -m", 1)
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (command, done.stderr[-3000:])

    def figures(pattern):
        (path,) = glob.glob(os.path.join(env["RESULTS"], pattern))
        with open(path) as f:
            return json.load(f)["metrics"]

    for name in ("shapes_shape", "shapes_color", "shapes_combo"):
        theirs = figures(f"{name}_zeroshot_classification.json")
        ours = figures(f"clip_jax/{name}_test_zeroshot_classification.json")
        assert abs(theirs["acc1"] - ours["acc1"]) <= 0.005, (name, theirs, ours)
        assert abs(theirs["mean_per_class_recall"] - ours["mean_per_class_recall"]) <= 0.005, (name, theirs, ours)
    theirs = figures("shapes_captions_zeroshot_retrieval.json")
    ours = figures("clip_jax/shapes_captions_test_zeroshot_retrieval.json")
    assert abs(theirs["image_retrieval_recall@5"] - ours["image_retrieval_recall@5"]) <= 0.005, (theirs, ours)
    # image to text: a caption repeated word for word ties with the image's own, and the two break ties
    # differently (clip_jax by index, CLIP_benchmark as torch.topk does); both lie within the tie order's bounds
    low, high = image_to_text_bounds(env["MODEL"], c.data.cache_dir, c.data.shapes_sizes.to_dict(), 5)
    for figure in (theirs["text_retrieval_recall@5"], ours["text_retrieval_recall@5"]):
        assert low - 1e-9 <= figure <= high + 1e-9, (low, high, theirs, ours)
    with open(os.path.join(env["RESULTS"], "all.csv")) as f:
        rows = list(csv.DictReader(f))
    # CLIP_benchmark's build reads both evaluators' files into one table
    assert {(r["model"], r["dataset"]) for r in rows} == {
        (m, f"wds/{d}") for m in (f"local-dir:{env['MODEL']}", "RN-Tiny-test")
        for d in ("shapes_shape", "shapes_color", "shapes_combo", "shapes_captions")}


def test_any_tfrecord_source_converts_record_for_record(tmp_path):
    """A user's TFRecords: JPEG kept as stored, another format as PNG, keys with dots made webdataset keys,
    class names from a file, several captions a line each, shards of shard_size samples."""
    from clip_jax.input import records

    def encoded(color, fmt):
        out = io.BytesIO()
        Image.new("RGB", (20, 12), color).save(out, format=fmt)
        return out.getvalue()

    pairs = [(encoded((200, 0, 0), "JPEG"), ["red one", "a red thing"], "img.0", 1),
             (encoded((0, 0, 200), "GIF"), ["blue one"], "img.1", 0),
             (encoded((0, 200, 0), "PNG"), ["green one"], "img.2", 1)]
    writer = records.ShardWriter(str(tmp_path / "mine"), 1)
    for image, captions, key, label in pairs:
        writer.write(records.serialize_example(image, captions, key, label))
    writer.close()
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": ["blue", "red"], "templates": ["a {} box."]}))
    spec = f"tfrecord:{tmp_path}/mine-*.tfrecord"
    done = clip_benchmark.convert(spec, str(tmp_path / "root" / "mine"), classes=str(tmp_path / "classes.json"),
                                  shard_size=2, log=lambda *a: None)
    assert (done["split"], done["count"], done["keys"]) == ("test", 3, ["img_0", "img_1", "img_2"])
    assert (tmp_path / "root" / "mine" / "test" / "nshards.txt").read_text().strip() == "2"
    got = _samples(str(tmp_path / "root" / "mine"), "test")
    assert got["img_0"]["jpg"] == pairs[0][0] and got["img_2"]["png"] == pairs[2][0]  # as stored
    assert np.asarray(Image.open(io.BytesIO(got["img_1"]["png"]))).tolist() == \
        np.asarray(Image.open(io.BytesIO(pairs[1][0])).convert("RGB")).tolist()
    assert [int(got[k]["cls"]) for k in ("img_0", "img_1", "img_2")] == [1, 0, 1]
    assert got["img_0"]["txt"].decode().splitlines() == ["red one", "a red thing"]
    assert (tmp_path / "root" / "mine" / "zeroshot_classification_templates.txt").read_text() == "a {c} box.\n"
    retrieval = clip_benchmark.convert(spec, str(tmp_path / "root" / "mine_captions"), task="retrieval",
                                       log=lambda *a: None)
    assert retrieval["keys"] == done["keys"]
    assert set(_samples(str(tmp_path / "root" / "mine_captions"), "test")["img_1"]) == {"png", "txt"}
    with pytest.raises(ValueError, match="names no classes"):
        clip_benchmark.convert(spec, str(tmp_path / "root" / "unnamed"), log=lambda *a: None)
