"""CLIP BPE ids against OpenAI's (open_clip's tokenizer fixture); tf.data path; SentencePiece."""

import json

import numpy as np
import pytest
from conftest import FIXTURES

import clip_jax
from clip_jax.tokenizers import ClipTokenizer, SentencePieceTokenizer, get_tokenizer

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def corpus():
    with open(f"{FIXTURES}/tokenizer.json", encoding="utf-8") as f:
        return json.load(f)


def test_ids_equal_openai_on_varied_corpus(corpus):
    ids = clip_jax.tokenize(corpus["texts"], context_length=corpus["context_length"])
    assert ids.dtype == np.int32 and ids.shape == (len(corpus["texts"]), 77)
    for text, row, ref in zip(corpus["texts"], ids, corpus["ids"]):
        # id 0 is "!" as well as padding: compare the prefix, then require zeros after it.
        assert [int(i) for i in row[: len(ref)]] == ref, repr(text)
        assert (row[len(ref) :] == 0).all(), repr(text)


def test_special_cases():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408
    empty = clip_jax.tokenize([""])[0]
    assert list(empty[:3]) == [SOT, EOT, 0]
    long = clip_jax.tokenize(["word " * 200])[0]
    assert long[0] == SOT and long[-1] == EOT and (long != 0).all()
    short_ctx = clip_jax.tokenize(["a photo of a cat sitting on a mat"], context_length=5)[0]
    assert short_ctx.shape == (5,) and short_ctx[-1] == EOT
    assert tok.decode(clip_jax.tokenize(["Hello,  World!"])[0]) == "hello , world !"
    with pytest.raises(TypeError, match="expected str"):
        clip_jax.tokenize(["ok", None])
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        clip_jax.tokenize(["a"], context_length=1)


def test_tf_data_pipeline_gives_same_tokens(corpus):
    tf = pytest.importorskip("tensorflow")
    texts = corpus["texts"][:64]
    tok = ClipTokenizer()
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(16).map(tok.tf_tokenize)
    got = np.concatenate([b.numpy() for b in ds])
    np.testing.assert_array_equal(got, clip_jax.tokenize(texts))
    # Per-example (scalar string) mapping works too.
    one = tf.data.Dataset.from_tensor_slices(texts[:3]).map(tok.tf_tokenize)
    assert [e.shape for e in one] == [(77,)] * 3


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    lines = [f"a {c} {s} {p} of the picture" for c in ("red", "green", "blue", "yellow", "purple")
             for s in ("circle", "square", "triangle", "star") for p in ("left", "right", "top", "bottom")]
    (d / "corpus.txt").write_text("\n".join(lines * 5))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=32, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2, minloglevel=2,
    )
    return str(d / "m.model"), spm.SentencePieceProcessor(model_file=str(d / "m.model"))


def test_sentencepiece_in_graph_matches_sentencepiece_library(sp_model):
    path, ref = sp_model
    tok = SentencePieceTokenizer(path, context_length=8, add_eos=True)
    texts = ["a red circle", "a purple triangle at the bottom of the picture, twice: a purple triangle", ""]
    got = tok(texts)
    assert got.dtype == np.int32 and got.shape == (3, 8)
    for row, text in zip(got, texts):
        want = ref.encode(text)
        want = (want[:7] + [2]) if len(want) >= 8 else want + [2]
        assert list(row[: len(want)]) == want and (row[len(want) :] == 0).all(), text
    plain = SentencePieceTokenizer(path, context_length=8, add_eos=False)
    for text in texts:
        want = ref.encode(text)[:8]
        assert list(plain([text])[0]) == want + [0] * (8 - len(want)), text


def test_ftfy_fast_path_is_exact():
    """The tokenizer skips ftfy for printable ASCII without '&': ftfy must not change such text."""
    import ftfy

    from clip_jax.tokenizers import _ftfy_is_identity

    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r", "\x00", "\x1b", "&", "é"]
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 80))) for _ in range(3000)]
    fast = [t for t in texts if _ftfy_is_identity(t)]
    assert len(fast) > 300
    for t in fast:
        assert ftfy.fix_text(t) == t, repr(t)
    assert not _ftfy_is_identity("a &amp; b") and not _ftfy_is_identity("caf\u00e9") and not _ftfy_is_identity("a\rb")
