"""BERT WordPiece ids (in-graph, tensorflow-text) against Chinese-CLIP's own tokenizer (cn_tokenizer.json)."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import FIXTURES

import clip_jax
from clip_jax.tokenizers import TOKENIZERS, ZH_VOCAB_PATH, WordPieceTokenizer, tokenizer_for

pytest.importorskip("tensorflow_text")

CLS, SEP = 101, 102
CAT_PHOTO = [CLS, 671, 1372, 4344, 4638, 4212, 4275, SEP]  # "一只猫的照片", from cn_clip.clip.tokenize


@dataclasses.dataclass(frozen=True)
class TextStandIn:
    """The fields of a text config the tokenizer registry reads (hashable: tokenizer_for caches on it)."""

    context_length: int = 52
    pad_id: int = 0
    vocab_size: int = 21128
    tokenizer: str = "wordpiece"


@pytest.fixture(scope="module")
def corpus():
    with open(f"{FIXTURES}/cn_tokenizer.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer()


def assert_rows_equal(rows, corpus, context_length=52):
    assert rows.dtype == np.int32 and rows.shape == (len(corpus["texts"]), context_length)
    for text, row, ref in zip(corpus["texts"], rows, corpus["ids"]):
        assert [int(i) for i in row[: len(ref)]] == ref, repr(text)
        assert (row[len(ref) :] == 0).all(), repr(text)


def test_ids_equal_chinese_clip_on_varied_corpus(tok, corpus):
    assert corpus["context_length"] == 52 and len(corpus["texts"]) >= 250
    assert (tok.vocab_size, tok.context_length, tok.pad_id, tok.cls_id, tok.sep_id) == (21128, 52, 0, CLS, SEP)
    assert_rows_equal(tok(corpus["texts"]), corpus)


def test_registry_builds_it_from_the_text_config(corpus):
    text = TextStandIn()
    tok = TOKENIZERS.get("wordpiece")("", text)
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_path == ZH_VOCAB_PATH and tok.vocab_size == 21128
    assert_rows_equal(tok(corpus["texts"]), corpus)
    assert tokenizer_for(text)(["一只猫的照片"])[0].tolist() == CAT_PHOTO + [0] * 44
    single = tok("一只猫的照片")
    assert single.shape == (1, 52) and tok.decode(single[0]) == "一 只 猫 的 照 片"


def test_tokenize_with_cn_model():
    assert "cn-ViT-B-16" in clip_jax.list_models()
    ids = clip_jax.tokenize(["一只猫的照片"], model="cn-ViT-B-16")
    assert ids.dtype == np.int32 and ids.shape == (1, 52)
    assert ids[0].tolist() == CAT_PHOTO + [0] * 44


def test_tf_data_pipeline_gives_same_tokens(tok, corpus):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(corpus["texts"]).batch(64).map(tok.tf_tokenize)
    assert_rows_equal(np.concatenate([b.numpy() for b in ds]), corpus)
    # Per-example (scalar string) mapping works too.
    one = tf.data.Dataset.from_tensor_slices(corpus["texts"][:3]).map(tok.tf_tokenize)
    assert [e.shape for e in one] == [(52,)] * 3


@pytest.mark.parametrize("context_length", [52, 8])
def test_truncation_keeps_sep_last(tok, corpus, context_length):
    texts = [t for t, ids in zip(corpus["texts"], corpus["ids"]) if len(ids) == 52]
    assert len(texts) >= 5
    rows = tok(texts, context_length)
    assert rows.shape == (len(texts), context_length) and (rows != 0).all()
    refs = [corpus["ids"][corpus["texts"].index(t)] for t in texts]
    for row, ref in zip(rows, refs):
        assert row.tolist() == ref[: context_length - 1] + [SEP]
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        tok(["a"], 1)


def test_custom_vocab_path_and_vocab_size_check(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cat", "##s", "dog", "猫", ","]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    text = TextStandIn(context_length=10, vocab_size=len(vocab), tokenizer=f"wordpiece:{path}")
    tok = tokenizer_for(text)
    assert tok.vocab_size == 9 and (tok.cls_id, tok.sep_id) == (2, 3)
    assert tok(["Cats, DOG 猫猫 bird"]).tolist() == [[2, 4, 5, 8, 6, 7, 7, 1, 3, 0]]
    assert tok(["cat"], 4).tolist() == [[2, 4, 3, 0]]
    with pytest.raises(ValueError, match=r"has 9 ids.*embeds 21128"):
        tokenizer_for(dataclasses.replace(text, vocab_size=21128))
