"""clip_jax.input.shapes in Chinese: captions of the same scenes beside the English ones (which did
not change), Chinese class names and prompts, the caption_zh record feature, the lang= option."""

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from clip_jax.input import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit before the Chinese captions: its generator is the reference for everything English.
BEFORE_ZH = "61a5bc85f7370d0b6c1759d4b061f539e898112e"
# sha256 of the first 200 train captions (seed 0), one per line, as that commit wrote them.
EN_TRAIN_200 = "ef96ea92f356751efeef68f8ec3b5b64d5a72475da259cb89dbc3e43f1571759"
EN_TRAIN_FIRST = ["a red circle over a large orange diamond", "a green cross",
                  "a drawing of an orange square above an orange diamond", "a picture of a big orange cross",
                  "a blue star in the middle"]
SIZES = {"train": 60, "validation": 12, "test": 12}

PAIR = re.compile(rf"\b({'|'.join(shapes.COLOR_NAMES)}) ({'|'.join(shapes.SHAPE_NAMES)})\b")
PAIR_ZH = re.compile(f"({'|'.join(shapes.COLOR_NAMES_ZH)})({'|'.join(shapes.SHAPE_NAMES_ZH)})")
# Direction words: an English caption and its Chinese one name the same directions.
DIRECTIONS = {"left": ("left", "左"), "right": ("right", "右"), "up": (r"top|above|over", "上|顶"),
              "down": (r"bottom|below|under|beneath", "下|底"), "middle": (r"center|middle", "中间")}


def mentioned(caption, zh=False):
    """(colour, shape) index pairs a caption names, in order, read from its words alone."""
    colors, kinds = (shapes.COLOR_NAMES_ZH, shapes.SHAPE_NAMES_ZH) if zh else (shapes.COLOR_NAMES, shapes.SHAPE_NAMES)
    return [(colors.index(c), kinds.index(s)) for c, s in (PAIR_ZH if zh else PAIR).findall(caption)]


def directions(caption, zh=False):
    return {d for d, words in DIRECTIONS.items() if re.search(rf"\b({words[0]})\b" if not zh else words[1], caption)}


def _module_at(commit, tmp_path):
    """clip_jax/input/shapes.py as of `commit`, imported as a module of its own (None without git)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:clip_jax/input/shapes.py"], cwd=ROOT, check=True,
                                capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp_path / "shapes_before_zh.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("shapes_before_zh", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_english_captions_images_and_objects_are_unchanged(tmp_path):
    captions = [shapes.make_example(0, "train", i)[1] for i in range(200)]
    assert captions[:5] == EN_TRAIN_FIRST
    assert hashlib.sha256("".join(c + "\n" for c in captions).encode()).hexdigest() == EN_TRAIN_200
    before = _module_at(BEFORE_ZH, tmp_path)
    if before is None:
        pytest.skip(f"no git history here to read shapes.py at {BEFORE_ZH[:8]} from")
    assert before.VERSION == 2
    for split, n in (("train", 200), ("validation", 50), ("test", 50)):
        for i in range(n):
            image, caption, objs = shapes.make_example(0, split, i)
            old_image, old_caption, old_objs = before.make_example(0, split, i)
            assert caption == old_caption and objs == old_objs, (split, i)
            np.testing.assert_array_equal(image, old_image)
    # English stays the default wherever a language can be chosen.
    for task in ("color", "shape", "combo"):
        assert shapes.class_names(task) == before.class_names(task) == shapes.class_names(task, "en")
        assert shapes.prompts(task) == before.prompts(task) == shapes.prompts(task, lang="en")
    assert shapes.prompts("combo", shapes.TEMPLATES[:2]) == before.prompts("combo", before.TEMPLATES[:2])


def test_chinese_captions_describe_the_same_scene():
    checked = {"two": 0, "where": 0, "relation": 0}
    for split, n in (("train", 1500), ("validation", 300), ("test", 300)):
        for i in range(n):
            _, en, objs = shapes.make_example(0, split, i)
            zh = shapes.make_example(0, split, i, lang="zh")[1]
            main = (objs[0]["color"], objs[0]["shape"])
            name = shapes.COLOR_NAMES_ZH[main[0]] + shapes.SHAPE_NAMES_ZH[main[1]]
            assert name == shapes.class_names("combo", "zh")[shapes.combo_index(*main)]
            # Its main object's colour + shape, first; the other one second: the English order.
            assert mentioned(zh, zh=True) == mentioned(en) == [(o["color"], o["shape"]) for o in objs], (en, zh)
            # Sizes, positions, relations, background: named in both or neither.
            assert directions(zh, zh=True) == directions(en), (en, zh)
            assert ("深色背景" in zh) == en.endswith("on a dark background"), (en, zh)
            assert ("浅色背景" in zh) == en.endswith("on a light background"), (en, zh)
            sized = len(re.findall(r"\b(small|little|large|big)\b", en))
            assert len(re.findall("小的|大的", zh)) == sized, (en, zh)
            assert ("和" in zh) == (" and " in en), (en, zh)
            assert len(zh) <= 50 and not re.search(r"[A-Za-z ]", zh), zh
            checked["two"] += len(objs) == 2
            checked["where"] += len(objs) == 1 and bool(directions(en))
            checked["relation"] += len(objs) == 2 and bool(directions(en))
    assert min(checked.values()) > 50, checked


def test_every_chinese_caption_fits_the_context():
    """Every wording the generator can choose, with the longest words: at most 50 characters, so a
    caption and [CLS]/[SEP] fit the Chinese text tower's 52 tokens (its tokenizer splits characters)."""
    longest = max(range(len(shapes.SHAPE_NAMES)), key=lambda s: len(shapes.SHAPE_NAMES_ZH[s]))
    objs = [dict(color=0, shape=longest, size=size) for size in ("small", "large")]
    sizes = [None, 0, 1]
    worst = ""
    for frame, background in itertools.product(range(len(shapes._FRAMES)), (None, "dark", "light")):
        common = dict(frame=frame, background=background)
        for where, size in itertools.product(shapes._WHERE, sizes):
            for variant in [None, *range(len(shapes._WHERE[where]))]:
                words = dict(common, sizes=[size], where=where, where_variant=variant, relation=None, link=None)
                worst = max(worst, shapes._caption_zh(objs[:1], words), key=len)
        for relation, a, b in itertools.product(shapes._RELATIONS, sizes, sizes):
            for link in [None, *range(len(shapes._RELATIONS[relation]))]:
                words = dict(common, sizes=[a, b], where=None, where_variant=None, relation=relation, link=link)
                worst = max(worst, shapes._caption_zh(objs, words), key=len)
    assert len(worst) <= 50, worst


def test_chinese_wordings_translate_the_english_variant_for_variant():
    pairs = [(shapes._SIZE_WORDS, shapes._SIZE_WORDS_ZH), (shapes._WHERE, shapes._WHERE_ZH),
             (shapes._RELATIONS, shapes._RELATIONS_ZH), (shapes._BACKGROUND, shapes._BACKGROUND_ZH)]
    for en, zh in pairs:
        assert list(en) == list(zh) and all(len(en[k]) == len(zh[k]) for k in en if not isinstance(en[k], str))
    assert len(shapes._FRAMES) == len(shapes._FRAMES_ZH)
    assert all(t.count("{}") == 1 for t in shapes._RELATIONS_ZH["below"] + tuple(f for f, _ in shapes._FRAMES_ZH))


def test_chinese_class_names_and_prompts():
    assert shapes.class_names("color", "zh") == ["红色", "绿色", "蓝色", "黄色", "紫色", "橙色"]
    assert shapes.class_names("shape", "zh") == ["圆形", "正方形", "三角形", "星形", "十字形", "菱形"]
    combo = shapes.class_names("combo", "zh")
    assert len(combo) == 36 and combo[0] == "红色圆形" and combo[shapes.combo_index(5, 3)] == "橙色星形"
    assert shapes.held_out_names("zh") == ["红色正方形", "绿色圆形", "蓝色菱形", "黄色十字形", "紫色星形", "橙色三角形"]
    assert len(shapes.TEMPLATES_ZH) == 6 and all(t.count("{}") == 1 for t in shapes.TEMPLATES_ZH)
    prompts = shapes.prompts("combo", lang="zh")
    assert len(prompts) == 36 and all(len(p) == 6 for p in prompts)
    assert prompts[0] == ["红色圆形。", "一个红色圆形。", "一张红色圆形的照片。", "一幅红色圆形的画。",
                          "图中有一个红色圆形。", "红色圆形的图片。"]
    color, shape = shapes.prompts("color", lang="zh"), shapes.prompts("shape", lang="zh")
    assert len(color) == 6 and all(len(p) == 36 for p in color) and all("橙色" in t for t in color[5])
    assert len(shape) == 6 and all(len(p) == 36 for p in shape) and all("菱形" in t for t in shape[5])
    assert shapes.prompts("combo", ["{}"], lang="zh") == [[n] for n in combo]
    for bad in ("fr", "ZH", ""):
        with pytest.raises(ValueError, match="unknown shapes language.*'en', 'zh'"):
            shapes.class_names("combo", bad)
        with pytest.raises(ValueError, match="'en', 'zh'"):
            shapes.prompts("combo", lang=bad)
        with pytest.raises(ValueError, match="'en', 'zh'"):
            shapes.make_example(0, "train", 0, lang=bad)


def test_source_option():
    assert shapes.parse_source("train|lang=zh") == ("train", "zh")
    assert shapes.parse_source("test|lang=en") == ("test", "en")
    assert shapes.parse_source("validation") == ("validation", "en")
    assert shapes.parse_source("") == ("train", "en")
    assert shapes.caption_feature() == "caption" and shapes.caption_feature("zh") == "caption_zh"
    with pytest.raises(ValueError, match="unknown shapes language 'fr'"):
        shapes.parse_source("test|lang=fr")
    with pytest.raises(ValueError, match="unknown shapes option 'language=zh'"):
        shapes.parse_source("test|language=zh")
    with pytest.raises(ValueError, match="shapes split 'dev' not in train, validation, test"):
        shapes.parse_source("dev|lang=zh")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes_zh"))
    return root, shapes.ensure_shapes_dataset(root, seed=0, sizes=SIZES)


def test_records_hold_both_captions(built):
    root, paths = built
    assert f"shapes-v{shapes.VERSION}-" in paths["train"][0] and shapes.VERSION == 4
    info = json.load(open(os.path.join(os.path.dirname(paths["train"][0]), "dataset_info.json")))
    assert info["captions"] == {"caption": "en", "caption_zh": "zh"}
    assert info["class_names_zh"]["combo"] == shapes.class_names("combo", "zh")
    assert info["templates_zh"] == shapes.TEMPLATES_ZH
    for split, paths_ in paths.items():
        for i, ex in enumerate(shapes.read_split(paths_)):
            _, en, objs = shapes.make_example(0, split, i)
            assert ex["key"] == f"{split}-{i:07d}"
            assert ex["caption"] == en and ex["caption_zh"] == shapes.make_example(0, split, i, lang="zh")[1]
            assert mentioned(ex["caption_zh"], zh=True)[0] == (ex["label_color"], ex["label_shape"])
    # serialize -> parse, with and without a Chinese caption (a record of an older version has none)
    obj = dict(color=2, shape=1, size="small", x=20.0, y=30.0, r=6.0)
    mask = shapes._png(Image.fromarray(shapes.segmentation([obj], 64)))
    png = shapes._png(Image.new("RGB", (64, 64), (9, 9, 9)))
    back = shapes.parse(shapes.serialize(png, "a blue square", "k", [obj], mask, 64, caption_zh="一个蓝色正方形"))
    assert (back["caption"], back["caption_zh"], back["label"]) == ("a blue square", "一个蓝色正方形", 13)
    assert shapes.parse(shapes.serialize(png, "a blue square", "k", [obj], mask, 64))["caption_zh"] is None


class _CodepointTokenizer:
    """Tokens = the caption's code points: lets a test read back which captions a pipeline fed."""

    def tf_tokenize(self, texts, context_length):
        import tensorflow as tf

        return tf.strings.unicode_decode(texts, "UTF-8").to_tensor(shape=[None, context_length])


def _texts(tokens):
    return ["".join(map(chr, row[row > 0])) for row in tokens.reshape(-1, tokens.shape[-1])]


def test_eval_data_reads_the_chinese_captions(built):
    """Retrieval on 'shapes:SPLIT|lang=zh' reads caption_zh, and zero-shot gets the Chinese names."""
    from clip_jax.input import eval_data

    root, _ = built
    config = {"cache_dir": root, "shapes_sizes": SIZES}
    en = eval_data.describe("shapes:test", config)
    assert (en.lang, en.caption_key, en.name) == ("en", "caption", "shapes.test")
    assert en.label_names["label"] == shapes.class_names("combo")
    # What describe returns for a source whose language is Chinese (pipeline.Source.lang).
    zh_source = dataclasses.replace(en.source, lang="zh")
    zh = dataclasses.replace(en, source=zh_source, caption_key=shapes.caption_feature("zh"), lang="zh")
    assert eval_data.metric_name(zh_source) == "shapes_zh.test" and eval_data.source_lang(en.source) == "en"
    for info, lang in ((en, "en"), (zh, "zh")):
        batches = list(eval_data.eval_batches(info, config, batch_size=8, image_size=32, context_length=60,
                                              max_captions=1, tokenizer=_CodepointTokenizer()))
        texts = [t for b in batches for t in _texts(b["tokens"][b["mask"]])]
        assert texts == [shapes.make_example(0, "test", i, lang=lang)[1] for i in range(SIZES["test"])]


def test_spec_lang_option_trains_on_the_chinese_captions(built):
    from clip_jax.input.pipeline import InputPipeline, parse_spec

    assert parse_spec("shapes:train|lang=zh").lang == "zh" and parse_spec("shapes:train").lang == "en"
    with pytest.raises(ValueError, match="'en', 'zh'"):
        parse_spec("shapes:train|lang=fr")
    root, _ = built
    config = {"cache_dir": root, "shapes_sizes": SIZES}
    for lang in ("en", "zh"):
        p = InputPipeline(f"shapes:validation|lang={lang}", config, global_batch_size=4, image_size=16, train=False,
                          num_epochs=1, tokenizer=_CodepointTokenizer(), context_length=60)
        fed = [c.decode() for b in p for c in b["caption"]]
        assert fed == [shapes.make_example(0, "validation", i, lang=lang)[1] for i in range(SIZES["validation"])]


def test_spec_lang_option_evaluates_in_chinese(built):
    from clip_jax.evaluate import evaluator

    specs = evaluator.parse_evals("zero_shot=shapes:test|lang=zh,retrieval=shapes:test|lang=zh|max_captions=1,"
                                  "zero_shot=shapes:test")
    assert [str(s) for s in specs] == ["zero_shot=shapes:test|lang=zh",
                                       "retrieval=shapes:test|lang=zh|max_captions=1", "zero_shot=shapes:test"]
    with pytest.raises(ValueError, match="'en', 'zh'"):
        evaluator.parse_evals("zero_shot=shapes:test|lang=fr")
    root, _ = built
    ev = evaluator.Evaluator(specs, {"cache_dir": root, "shapes_sizes": SIZES}, image_size=32, context_length=52)
    infos = {g.data: g.info for g in ev.groups.values()}
    zh, en = infos["shapes:test|lang=zh"], infos["shapes:test"]
    assert (zh.name, zh.lang, zh.caption_key) == ("shapes_zh.test", "zh", "caption_zh")
    assert (en.name, en.lang, en.caption_key) == ("shapes.test", "en", "caption")
    assert zh.label_names["label_color"] == shapes.class_names("color", "zh")
