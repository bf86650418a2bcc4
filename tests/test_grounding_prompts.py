"""GLIP's prompts and positive maps (clip_jax.phrases) against the reference's construction: its
create_positive_map and create_positive_dict transcribed over a HF BertTokenizerFast's char_to_token on the
same vocab; the tokenizers' offsets (ids against the reference corpora, WordPiece offsets against HF's, CLIP
BPE round-trip); detection prompts' spans, negatives and determinism."""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES

from clip_jax import phrases
from clip_jax.input import shapes_scenes
from clip_jax.tokenizers import ZH_VOCAB_PATH, ClipTokenizer, WordPieceTokenizer

pytest.importorskip("tensorflow_text")
transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "person", "tooth", "##brush", "traffic", "light",
         "##s", "hot", "dog", "cat", "teddy", "bear", "a", "an", "red", "blue", "green", "yellow", "circle", "square",
         "star", "cross", "diamond", "triangle", "small", "large", "big", "little", "and", "on", "the", "left",
         "right", "there", "is", "are", "fire", "hydr", "##ant", "side", "at", "top", "bottom", "in", "purple",
         "orange"]


def reference_positive_map(tokenized, tokens_positive):
    """GLIP's create_positive_map (maskrcnn_benchmark/data/datasets/modulated_coco.py), in numpy."""
    positive_map = np.zeros((len(tokens_positive), 256), np.float32)
    for j, tok_list in enumerate(tokens_positive):
        for (beg, end) in tok_list:
            beg_pos = tokenized.char_to_token(beg)
            end_pos = tokenized.char_to_token(end - 1)
            if beg_pos is None:
                try:
                    beg_pos = tokenized.char_to_token(beg + 1)
                    if beg_pos is None:
                        beg_pos = tokenized.char_to_token(beg + 2)
                except Exception:
                    beg_pos = None
            if end_pos is None:
                try:
                    end_pos = tokenized.char_to_token(end - 2)
                    if end_pos is None:
                        end_pos = tokenized.char_to_token(end - 3)
                except Exception:
                    end_pos = None
            if beg_pos is None or end_pos is None:
                continue
            positive_map[j, beg_pos: end_pos + 1] = 1
    return positive_map / (positive_map.sum(-1)[:, None] + np.float32(1e-6))


def reference_label_to_token(tokenized, tokens_positive):
    """GLIP's create_positive_dict (engine/inference.py): label -> its token positions."""
    out = {}
    for j, tok_list in enumerate(tokens_positive):
        for (beg, end) in tok_list:
            beg_pos, end_pos = tokenized.char_to_token(beg), tokenized.char_to_token(end - 1)
            if beg_pos is None:
                try:
                    beg_pos = tokenized.char_to_token(beg + 1)
                    if beg_pos is None:
                        beg_pos = tokenized.char_to_token(beg + 2)
                except Exception:
                    beg_pos = None
            if end_pos is None:
                try:
                    end_pos = tokenized.char_to_token(end - 2)
                    if end_pos is None:
                        end_pos = tokenized.char_to_token(end - 3)
                except Exception:
                    end_pos = None
            if beg_pos is not None and end_pos is not None:
                out.setdefault(j, []).extend(range(beg_pos, end_pos + 1))
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    hf = transformers.BertTokenizerFast.from_pretrained(str(path.parent), do_lower_case=True)
    assert len(hf.get_vocab()) == len(VOCAB)
    return WordPieceTokenizer(str(path), context_length=256), hf


def spans_of(text, *names, nth=0):
    """[start, end) of the nth occurrence of each name."""
    out = []
    for name in names:
        start = -1
        for _ in range(nth + 1):
            start = text.index(name, start + 1)
        out.append((start, start + len(name)))
    return out


PROMPT = "person. toothbrush. traffic lights. hot dog. cat. teddy bear. cat. fire hydrant"
CASES = [  # (text, tokens_positive per box)
    (PROMPT, [[s] for s in spans_of(PROMPT, "person", "toothbrush", "traffic lights", "hot dog", "teddy bear",
                                    "fire hydrant")]),
    # repeated names: both "cat"s, a box on each and one box on both; a box of two spans
    (PROMPT, [spans_of(PROMPT, "cat"), spans_of(PROMPT, "cat", nth=1), spans_of(PROMPT, "cat") +
              spans_of(PROMPT, "cat", nth=1), spans_of(PROMPT, "hot dog", "teddy bear")]),
    # spans starting or ending on whitespace and punctuation, one of whitespace only, one past the end
    ("a  red circle ,  and   a blue square ", [[(1, 13)], [(2, 14)], [(0, 3)], [(24, 37)], [(21, 24)],
                                              [(14, 17)], [(33, 38)], [(36, 37)], [(23, 25)], [(14, 16)]]),
    # unknown words ([UNK] spans the word), upper case, several spaces
    ("A RED zebra   and a Blue okapi.", [[(2, 11)], [(20, 30)], [(6, 11)], [(25, 30)]]),
]


@pytest.mark.parametrize("text,tokens_positive", CASES)
@pytest.mark.parametrize("max_len", [256, 9, 12])
def test_positive_map_equals_reference(tokenizers, text, tokens_positive, max_len):
    ours, hf = tokenizers
    tokenized = hf(text, max_length=max_len, truncation=True)
    ids, offsets = phrases.query_tokens(ours, text, max_len)
    n = len(tokenized["input_ids"])
    assert ids[:n].tolist() == tokenized["input_ids"] and (ids[n:] == 0).all()
    assert ids.tolist() == ours([text], max_len)[0].tolist()
    want = reference_positive_map(tokenized, tokens_positive)
    got = phrases.positive_map(offsets, tokens_positive, max_len)  # (36, 37) and (33, 38) end past the text
    assert got.weights.shape == (len(tokens_positive), max_len) and got.weights.dtype == np.float32
    np.testing.assert_array_equal(got.weights, want[:, :max_len])
    assert not want[:, max_len:].any()
    np.testing.assert_array_equal(got.positive, want[:, :max_len] > 0)
    np.testing.assert_array_equal(got.matched, want.sum(-1) > 0)


def test_shared_characters_go_to_their_first_token():
    """Byte-level BPE splits a character's bytes over tokens that share its span: char_to_token (the tokenizers
    library's, as GLIP's CLIP path uses it) answers the first of them."""
    tokenizers_lib = pytest.importorskip("tokenizers")
    byte_level = tokenizers_lib.pre_tokenizers.ByteLevel
    vocab = {c: i for i, c in enumerate(sorted(byte_level.alphabet()))}
    tok = tokenizers_lib.Tokenizer(tokenizers_lib.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level(add_prefix_space=False)
    text = "aé 你好 b é"
    enc = tok.encode(text)
    boxes = [[(0, 2)], [(1, 2)], [(3, 5)], [(2, 6)], [(4, 9)], [(9, 10)]]
    got = phrases.positive_map(np.array(enc.offsets), boxes, len(enc.offsets))
    np.testing.assert_array_equal(got.weights, reference_positive_map(enc, boxes)[:, : len(enc.offsets)])


def test_truncation_cases_are_exercised(tokenizers):
    """The cases above reach what they are for: a name cut in its middle and names cut whole."""
    ours, hf = tokenizers
    _, offsets = phrases.query_tokens(ours, PROMPT, 9)
    boxes = CASES[0][1]
    got = phrases.positive_map(offsets, boxes, 9)
    # [CLS] person . tooth ##brush . traffic light [SEP]: "lights" loses "##s" but keeps "light" (end - 2)
    assert got.positive[2].nonzero()[0].tolist() == [6, 7]
    assert got.matched.tolist() == [True, True, True, False, False, False]


def test_shapes_scenes_spans_fit(tokenizers):
    ours, hf = tokenizers
    for index in range(4):
        _, caption, objs, _, spans = shapes_scenes.make_example(0, "train", index)
        assert spans.shape == (len(objs), 2)
        tokenized = hf(caption, max_length=256, truncation=True)
        _, offsets = phrases.query_tokens(ours, caption)
        got = phrases.positive_map(offsets, spans, text_length=len(caption))
        np.testing.assert_array_equal(got.weights, reference_positive_map(tokenized, [[s] for s in spans]))
        assert got.matched.all()
        for row, (a, b) in zip(got.positive, spans):
            words = ours.decode(np.asarray(tokenized["input_ids"])[row[: len(tokenized["input_ids"])]])
            assert words == caption[a:b].lower()


def test_no_phrase_and_bad_spans(tokenizers):
    ours, _ = tokenizers
    text = "a red circle"
    _, offsets = phrases.query_tokens(ours, text, 16)
    got = phrases.positive_map(offsets, np.array([[2, 12], [-1, -1]]), 16, text_length=len(text))
    assert got.matched.tolist() == [True, False] and not got.weights[1].any()
    with pytest.raises(ValueError, match="past the end"):
        phrases.positive_map(offsets, [(2, 13)], 16, text_length=len(text))
    with pytest.raises(ValueError, match="0 <= start < end"):
        phrases.positive_map(offsets, [(5, 5)], 16)
    with pytest.raises(ValueError, match="truncate with query_tokens"):
        phrases.positive_map(np.zeros((20, 2)), [(0, 1)], 16)


def test_evaluation_prompt_and_class_scores(tokenizers):
    ours, hf = tokenizers
    names = ["person", "toothbrush", "traffic_light", "hot dog (food)", "teddy bear", "cat"]
    prompts = phrases.DetectionPrompts(names, ours)
    text, spans = prompts.evaluation()
    assert text == "person. toothbrush. traffic light. hot dog . teddy bear. cat"  # GLIP's clean_name
    assert [text[a:b] for a, b in spans] == [phrases.clean_name(n) for n in names]
    _, offsets = phrases.query_tokens(ours, text)
    weights = phrases.class_token_weights(offsets, spans)
    tokenized = hf(text)
    positions = reference_label_to_token(tokenized, [[s] for s in spans])
    scores = np.random.default_rng(0).normal(size=256).astype(np.float32)
    want = [scores[positions[c]].mean() for c in range(len(names))]
    np.testing.assert_allclose(scores @ weights.T, want, rtol=1e-6)
    _, short = phrases.query_tokens(ours, text, 8)
    with pytest.raises(ValueError, match="chunks"):
        phrases.class_token_weights(short, spans, 8)


def test_offset_tokenization_gives_the_reference_ids():
    """encode_with_offsets' ids (a Python path for WordPiece) equal OpenAI's and Chinese-CLIP's on their corpora."""
    with open(f"{FIXTURES}/tokenizer.json", encoding="utf-8") as f:
        clip = json.load(f)
    tok = ClipTokenizer()
    for text, ref in zip(clip["texts"], clip["ids"]):
        ids, offsets = tok.encode_with_offsets(text)
        assert len(offsets) == len(ids) and ([tok.sot_id] + ids + [tok.eot_id])[: len(ref) - 1] == ref[:-1], text
    with open(f"{FIXTURES}/cn_tokenizer.json", encoding="utf-8") as f:
        zh = json.load(f)
    wp = WordPieceTokenizer()
    for text, ref in zip(zh["texts"], zh["ids"]):
        ids, offsets = wp.encode_with_offsets(text)
        assert len(offsets) == len(ids) and [wp.cls_id] + ids[: len(ref) - 2] + [wp.sep_id] == ref, repr(text)


def test_wordpiece_offsets_equal_hf(tmp_path):
    """Offsets into the original text through lower-casing, accent stripping, CJK and dropped characters."""
    shutil.copy(ZH_VOCAB_PATH, tmp_path / "vocab.txt")
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=True)
    wp = WordPieceTokenizer()
    for text in ["一只猫的照片", "A photo of a Café,  naïve   résumé!", "  Hello\tworld\n", "İstanbul straße",
                 "hot-dog (grilled) & fries...", "夏天的海边，有一只狗。", "ﬁnance Ⅻ ①", "x\u0301y\u200bz\x00!"]:
        ids, offsets = wp.encode_with_offsets(text)
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"] and offsets == [tuple(o) for o in enc["offset_mapping"]], repr(text)


def test_clip_offsets_round_trip():
    tok = ClipTokenizer()
    captions = ["A photo of a cat.", "  Two  DOGS,\tplaying   in the\nsnow!!  ", "don't stop-believing: 42x (ok?)",
                "a red circle, a small blue square and a green star on the left", "e.g. U.S.A. -- 3.14%",
                "hello...world;;; foo_bar #tag @user", "MiXeD CaSe\t\t\tTABS"]
    for text in captions:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) and len(offsets) == len(ids)
        assert phrases.query_tokens(tok, text, 12)[0].tolist() == tok([text], 12)[0].tolist()
        covered = np.zeros(len(text), bool)
        for i, (a, b) in zip(ids, offsets):
            assert tok.decode([i]) == text[a:b].lower(), (text, tok.decoder[i], text[a:b])
            covered[a:b] = True
        assert all(covered[k] != text[k].isspace() for k in range(len(text))), text
    ids, offsets = tok.encode_with_offsets("Ünïcode 你好 ΟΔΟΣ")  # several tokens share a character's bytes
    assert ids == tok.encode("Ünïcode 你好 ΟΔΟΣ")
    assert [o for o in offsets if o[0] >= 8] == [(8, 9), (8, 9), (9, 10), (9, 10)] + [(11, 12)] * 2 + \
        [(12, 13)] * 2 + [(13, 14)] * 2 + [(14, 15)] * 2


def test_training_prompts():
    tok = ClipTokenizer()
    names = [f"thing_{k} (kind {k})" if k % 7 == 0 else f"class {k}" for k in range(120)]
    prompts = phrases.DetectionPrompts(names, tok)
    labels = np.array([3, 14, 3, 77, 119, 14])
    for seed in range(30):
        out = prompts.training(labels, np.random.default_rng(seed))
        again = prompts.training(labels, np.random.default_rng(seed))
        assert out.text == again.text and (out.spans == again.spans).all() and (out.classes == again.classes).all()
        assert out.keep.all() and not set(out.negatives) & set(labels)
        assert len(set(out.classes.tolist())) == len(out.classes) and set(labels) <= set(out.classes.tolist())
        assert out.text == ". ".join(prompts.names[c] for c in out.classes)
        for (a, b), label in zip(out.spans, labels):
            assert out.text[a:b] == phrases.clean_name(names[label])
        assert len(tok.encode(out.text)) <= 254  # the negatives screened to fit [SOT] ... [EOT] in 256
    assert len({prompts.training(labels, np.random.default_rng(s)).text for s in range(5)}) == 5
    # Unscreened (a long query): half the draws take all 85 (less the image's classes drawn among them), the
    # rest a uniform count in 1..85.
    long = phrases.DetectionPrompts(names, tok, max_len=4096)
    counts = np.array([len(long.training(labels, np.random.default_rng(s)).negatives) for s in range(200)])
    assert counts.max() <= 85 and 0.4 < np.mean(counts >= 81) < 0.65 and 25 < np.mean(counts[counts < 81]) < 55
    # names past the query's length: their classes cut and their boxes dropped, no negatives left room
    small = phrases.DetectionPrompts(names, tok, max_len=8)
    out = small.training(labels, np.random.default_rng(0))
    assert 0 < len(set(out.classes.tolist())) < 4 and len(out.negatives) == 0
    assert (out.keep == np.isin(labels, out.classes)).all() and (out.spans[~out.keep] == -1).all()
    none = phrases.DetectionPrompts(names, tok, num_negatives=0).training(labels, np.random.default_rng(0))
    assert len(none.negatives) == 0 and sorted(none.classes.tolist()) == sorted(set(labels.tolist()))
    with pytest.raises(ValueError, match="outside the 120 class names"):
        prompts.training([120], np.random.default_rng(0))
