"""clip_jax.input.prompts (op 'glip_text'): real shapes_scenes batches through the pipeline, against the records
(read back independently) and op 'boxes' on the same crop: each kept box's positive tokens decode to its class
name (detection records) or its caption phrase (grounding records), no held-out name in a detection prompt, the
boxes equal op 'boxes' ones (with the exclusion on detection records, without on grounding ones), truncation
drops and counts boxes as a prefix tokenization says, same seed same batches, a resumed pipeline equals an
uninterrupted one, bad declarations named. CLIP's BPE and WordPiece."""

import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_text")

from clip_jax.input import detection, ops, shapes, shapes_scenes  # noqa: E402
from clip_jax.input.pipeline import InputPipeline  # noqa: E402
from clip_jax.methods.base import BatchInput  # noqa: E402
from clip_jax.tokenizers import ClipTokenizer, WordPieceTokenizer  # noqa: E402

SIZES = {"train": 32, "validation": 4, "test": 4}
READS = ("objects/bbox", "objects/shape", "objects/color", "caption", "objects/phrase_span")
NAMES = shapes.class_names("combo")
NOVEL = tuple(NAMES.index(n) for n in detection.novel_classes("combo"))


def glip_key(**options):
    options = {"labels": "combo", "max_objects": 5, "exclude": NOVEL, **options}
    return BatchInput("boxes", "glip_text", READS, tuple(options.items()))


def boxes_ref(key, **options):
    options = {"labels": "combo", "max_objects": 5, **options}
    return BatchInput(key, "boxes", READS[:3], tuple(options.items()))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    paths = shapes_scenes.ensure_scenes_dataset(root, sizes=SIZES)
    config = {"cache_dir": root, "scenes_sizes": SIZES, "shuffle_buffer": 8, "image_dtype": "uint8",
              "resize_method": "nearest", "crop_scale": (0.3, 0.7)}
    records = shapes_scenes.read_split(paths["train"])
    return config, {ex["caption"]: ex for ex in records}, records


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory, scenes):
    """A BERT vocab of the captions' words (the phrases must not come back as [UNK])."""
    words = {w for ex in scenes[2] for w in re.findall(r"\w+", ex["caption"].lower())}
    words |= {w for n in NAMES for w in n.split()}
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", ","] + sorted(words)) + "\n")
    return WordPieceTokenizer(str(path))


def pipeline(config, inputs, tokenizer=None, seed=0, state=None, train=True, num_epochs=1, batch=8):
    return InputPipeline("shapes_scenes:train", config, global_batch_size=batch, image_size=64, train=train,
                         seed=seed, num_epochs=num_epochs, inputs=inputs, tokenizer=tokenizer, state=state)


def words(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("which", ["clip", "wordpiece"])
def test_mixed_batches_against_the_records_and_op_boxes(scenes, wordpiece, which):
    config, by_caption, _ = scenes
    tok = ClipTokenizer() if which == "clip" else wordpiece
    flip = (("flip", True),)
    inputs = (BatchInput("image", "crop", ("image",), flip), BatchInput("caption", "value", ("caption",)),
              glip_key(mode="mix", grounding_fraction=0.5), boxes_ref("held", exclude=NOVEL), boxes_ref("all"))
    pipe = pipeline(config, inputs, tok)
    modes, novel_grounded = [], 0
    for batch in pipe:
        assert batch["glip/tokens"].shape == (8, 256) and batch["glip/positive"].shape == (8, 5, 256)
        assert batch["glip/tokens"].dtype == np.int32 and batch["glip/positive"].dtype == bool
        for i, caption in enumerate(batch["caption"]):
            caption = caption.decode()
            objects = by_caption[caption]["objects"]
            grounded = bool(batch["glip/grounding"][i])
            modes.append(grounded)
            ref = "all" if grounded else "held"  # op 'boxes' on the same crop and flip
            valid, index = batch["boxes/valid"][i], batch["boxes/index"][i]
            for key in ("", "/labels", "/valid", "/index"):
                np.testing.assert_array_equal(batch["boxes" + key][i], batch[ref + key][i])
            assert grounded or batch["boxes/counts"][i][3] == batch["held/counts"][i][3]
            assert not grounded or batch["boxes/counts"][i][3] == 0  # grounding keeps the held-out classes
            tokens, positive = batch["glip/tokens"][i], batch["glip/positive"][i]
            assert not positive[~valid].any()  # a dropped or padding box has no row
            n = int(batch["glip/token_valid"][i].sum())
            np.testing.assert_array_equal(batch["glip/token_valid"][i], np.arange(256) < n)
            text = words(tok.decode(tokens[:n]))
            for k, label in zip(index[valid], batch["boxes/labels"][i][valid]):
                obj = objects[k]
                assert label == obj["color"] * len(shapes.SHAPE_NAMES) + obj["shape"]
                run = np.flatnonzero(positive[list(index).index(k)])
                assert len(run) and (np.diff(run) == 1).all()  # one name or phrase: consecutive tokens
                got = words(tok.decode(tokens[run]))
                if grounded:
                    a, b = obj["phrase_span"]
                    assert got == words(caption[a:b]), (got, caption[a:b])
                    novel_grounded += label in NOVEL
                else:
                    assert got == NAMES[label]
            if grounded:
                assert text == words(tok.decode(tok(caption, 256)[0]))
            else:  # no held-out name in a detection prompt; names joined by ". "
                for c in NOVEL:
                    assert not re.search(rf"\b{NAMES[c]}\b", text), (NAMES[c], text)
                assert all(words(part) in NAMES for part in text.split(".") if part.strip())
    tallies = pipe.tallies()
    assert 0 < sum(modes) < len(modes) == SIZES["train"]
    assert novel_grounded > 0 and tallies["glip/grounding"] == sum(modes)
    assert tallies["boxes/excluded"] > 0
    assert tallies["glip/no_phrase"] == tallies["glip/bad_span"] == tallies["glip/no_token"] == 0


def test_truncated_phrases_drop_their_boxes(scenes):
    """Query length 8 (6 caption tokens): a box is kept iff its phrase's tokens fit, as the caption's prefix up to
    the phrase's end tokenizes; the others are dropped, counted no_token, the kept ones first in record order."""
    config, by_caption, _ = scenes
    tok = ClipTokenizer()
    inputs = (BatchInput("caption", "value", ("caption",)), glip_key(mode="grounding", length=8, max_objects=5))
    pipe = pipeline(config, inputs, tok, train=False)
    kept = cut = 0
    for batch in pipe:
        for i, caption in enumerate(batch["caption"]):
            caption = caption.decode()
            objects = by_caption[caption]["objects"]
            fits = [k for k, o in enumerate(objects) if len(tok.encode(caption[: o["phrase_span"][1]])) <= 6]
            valid = batch["boxes/valid"][i]
            assert batch["boxes/index"][i][valid].tolist() == fits
            assert valid.tolist() == [j < len(fits) for j in range(5)]
            kept, cut = kept + len(fits), cut + len(objects) - len(fits)
    assert kept > 0 and cut > 0 and pipe.tallies()["glip/no_token"] == cut


def test_prompt_overflow_drops_whole_classes(scenes):
    """Query length 8 holds two "colour shape." names: a record's other classes are cut from its prompt, all their
    boxes dropped (wherever they sit) and counted no_token; the kept boxes move up in record order, each with its
    own name's tokens."""
    config, by_caption, _ = scenes
    tok = ClipTokenizer()
    inputs = (BatchInput("caption", "value", ("caption",)), glip_key(length=8), boxes_ref("held", exclude=NOVEL))
    pipe = pipeline(config, inputs, tok, train=False)
    cut = middle = 0
    for batch in pipe:
        for i in range(8):
            held = batch["held/index"][i][batch["held/valid"][i]].tolist()
            valid, index = batch["boxes/valid"][i], batch["boxes/index"][i]
            kept = index[valid].tolist()
            assert valid.tolist() == [j < len(kept) for j in range(5)] and kept == [k for k in held if k in kept]
            labels = dict(zip(held, batch["held/labels"][i][batch["held/valid"][i]].tolist()))
            assert len({labels[k] for k in kept}) <= 2
            assert all(k in kept for k in held if labels[k] in {labels[j] for j in kept})  # whole classes
            for row, k in enumerate(kept):
                assert words(tok.decode(batch["glip/tokens"][i][batch["glip/positive"][i][row]])) == NAMES[labels[k]]
            cut += len(held) - len(kept)
            middle += any(k not in kept for k in held[: held.index(kept[-1])]) if kept else 0
    assert cut > 0 and middle > 0 and pipe.tallies()["glip/no_token"] == cut


def test_same_seed_same_batches_and_resumption_is_exact(scenes):
    config, _, _ = scenes
    tok = ClipTokenizer()
    inputs = (BatchInput("image", "crop", ("image",), (("flip", True),)), glip_key(mode="mix", grounding_fraction=0.3))
    pipe = pipeline(config, inputs, tok, num_epochs=None)
    batches = [next(pipe) for _ in range(2)]
    state = pipe.state()
    later = [next(pipe) for _ in range(3)]  # crosses into the second epoch
    again = pipeline(config, inputs, tok, num_epochs=None)
    resumed = pipeline(config, inputs, tok, num_epochs=None, state=state)
    other = next(pipeline(config, inputs, tok, seed=1, num_epochs=None))
    for want, got in zip(batches + later, [next(again) for _ in range(5)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for want in later:
        got = next(resumed)
        for key in set(want) - {"counts"}:  # the bad-record counters count from the pipeline's start
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert not np.array_equal(other["glip/tokens"], batches[0]["glip/tokens"])


def test_records_with_novel_objects_can_be_routed_to_grounding(scenes):
    """novel_records='grounding': a record holding an excluded class is always a grounding record (no box is then
    excluded); the others keep the draw they get by default."""
    config, by_caption, _ = scenes
    modes = {}
    for routed in ("detection", "grounding"):
        inputs = (BatchInput("caption", "value", ("caption",)),
                  glip_key(mode="mix", grounding_fraction=0.5, novel_records=routed))
        pipe = pipeline(config, inputs, ClipTokenizer())
        modes[routed] = {c.decode(): bool(g) for batch in pipe for c, g in zip(batch["caption"],
                                                                                batch["glip/grounding"])}
        tallies = pipe.tallies()
        assert (tallies["boxes/excluded"] == 0) == (routed == "grounding")
    has_novel = {c: any(o["color"] * len(shapes.SHAPE_NAMES) + o["shape"] in NOVEL for o in by_caption[c]["objects"])
                 for c in modes["grounding"]}
    assert 0 < sum(has_novel.values()) < len(has_novel)
    for caption, grounded in modes["grounding"].items():
        assert grounded == (has_novel[caption] or modes["detection"][caption]), caption


def test_bad_declarations_are_named(scenes):
    with pytest.raises(ValueError, match="no mode 'caption'"):
        ops.resolve([glip_key(mode="caption")])
    with pytest.raises(ValueError, match="grounding_fraction must be a fraction in \\[0, 1\\]"):
        ops.resolve([glip_key(mode="mix", grounding_fraction=1.5)])
    with pytest.raises(ValueError, match="classes has 6 names but the labels have 36 classes"):
        ops.resolve([glip_key(classes=tuple(shapes.SHAPE_NAMES))])
    with pytest.raises(ValueError, match="labels='record' needs classes"):
        ops.resolve([BatchInput("boxes", "glip_text", ("objects/bbox", "objects/label"),
                                (("labels", "record"), ("num_classes", 3)))])
    with pytest.raises(ValueError, match="classes has 2 names but the labels have 3 classes"):
        ops.resolve([BatchInput("boxes", "glip_text", ("objects/bbox", "objects/label"),
                                (("labels", "record"), ("num_classes", 3), ("classes", ("a", "b"))))])
    with pytest.raises(ValueError, match="reads the caption and its spans: add \\['objects/phrase_span'\\]"):
        ops.resolve([BatchInput("boxes", "glip_text", READS[:4], (("labels", "combo"), ("mode", "grounding")))])
    with pytest.raises(ValueError, match="novel_records='all': use 'detection'"):
        ops.resolve([glip_key(mode="mix", novel_records="all")])
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        ops.resolve([glip_key(length=1)])
    with pytest.raises(ValueError, match="exclude \\[40\\] names classes past the 36"):
        ops.resolve([glip_key(exclude=(40,))])
    (w, _), = ops.resolve([BatchInput("image", "crop", ("image",), (("flip", True),)), glip_key()])[1:]
    assert w.option("flip") is True  # the boxes take their image's flip
    assert set(ops.OPS.get("glip_text").keys(w)) == {"boxes", "boxes/labels", "boxes/valid", "boxes/index",
                                                     "boxes/counts", "glip/tokens", "glip/token_valid",
                                                     "glip/positive", "glip/grounding", "glip/counts"}
    with pytest.raises(ValueError, match="needs character offsets from the text tower's tokenizer"):
        next(pipeline(scenes[0], (glip_key(),), tokenizer=object()))
