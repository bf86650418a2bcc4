"""The input op 'noun_prompts' (clip_jax.input.noun_prompts): GroupViT's multi-label prompts, checked against a
plain Python reading of a few captions (split into words, looked up in the vocabulary) and against the
tokenizer on the texts it says it makes."""

import numpy as np
import pytest

import clip_jax
from clip_jax.input import noun_prompts, ops, shapes

CAPTIONS = [
    "a red circle, a small blue square and a green star.",  # three shape nouns
    "a large yellow triangle on the left and a purple diamond",  # two: padded with the caption once
    "a blurry photo of nothing in particular",  # none: the caption three times
    "a cross, a circle, a square, a star and a triangle in the middle",  # five: three of them drawn
]


def nouns_by_words(caption, vocabulary):
    """The reference: the caption's words, stripped of punctuation, that the vocabulary holds (each once)."""
    words = [w.strip(".,;:!?").lower() for w in caption.split()]
    return {w for w in words if w in vocabulary}


def parse(text, template_set, vocabulary):
    """The vocabulary word a text was made from by one of the templates, or None."""
    for template in template_set:
        head, tail = template.split("{}")
        if text.startswith(head) and text.endswith(tail) and text[len(head): len(text) - len(tail)] in vocabulary:
            return text[len(head): len(text) - len(tail)]
    return None


def test_prompts_are_distinct_caption_nouns_in_templates_then_the_caption():
    vocabulary, template_set = noun_prompts.DEFAULT_VOCABULARY, noun_prompts.templates()
    assert len(template_set) == 80 and vocabulary == tuple(shapes.SHAPE_NAMES)
    drawn = set()
    for caption in CAPTIONS:
        want = nouns_by_words(caption, vocabulary)
        for seed in range(20):
            texts = noun_prompts.prompt_texts(caption, (seed, 7), vocabulary, 3, template_set)
            n = min(3, len(want))
            assert len(texts) == 3 and texts[n:] == [caption] * (3 - n)
            nouns = [parse(t, template_set, vocabulary) for t in texts[:n]]
            assert len(set(nouns)) == n and set(nouns) <= want, (caption, texts)
            if caption == CAPTIONS[3]:
                drawn.update(nouns)
            # deterministic per seed
            assert texts == noun_prompts.prompt_texts(caption, (seed, 7), vocabulary, 3, template_set)
    assert drawn == nouns_by_words(CAPTIONS[3], vocabulary)  # over seeds, every noun of the caption is drawn


def test_whole_words_only_and_a_users_vocabulary_file(tmp_path):
    assert noun_prompts.caption_nouns("starfish by a circles sign", shapes.SHAPE_NAMES) == []
    path = tmp_path / "nouns.txt"
    path.write_text("Dog\n\nred car\ndog\n")
    vocabulary = noun_prompts.read_vocabulary(str(path))
    assert vocabulary == ("dog", "red car")
    assert noun_prompts.caption_nouns("A red car passes a DOG.", vocabulary) == ["red car", "dog"]
    with pytest.raises(ValueError, match="does not exist"):
        noun_prompts.read_vocabulary(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no words"):
        ops.resolve([ops.Wanted("prompt_tokens", "noun_prompts", ("caption",),
                                (("vocabulary", str(tmp_path / "empty.txt")),))])
    with pytest.raises(ValueError, match="prompts >= 1"):
        ops.resolve([ops.Wanted("prompt_tokens", "noun_prompts", ("caption",), (("prompts", 0),))])


def test_the_op_tokenizes_the_texts_of_the_records_own_seed():
    """The op in tf.data's terms: [prompts, T] int32, the tokens of prompt_texts(caption, the example's seed)."""
    from clip_jax.input.tf_runtime import import_tensorflow
    from clip_jax.tokenizers import get_tokenizer

    tf = import_tensorflow()
    tokenizer = get_tokenizer()
    (wanted, op), = ops.resolve([ops.Wanted("prompt_tokens", "noun_prompts", ("caption",), (("prompts", 3),))])
    assert op.stage == "record"
    for i, caption in enumerate(CAPTIONS):
        seeds = {}

        def seed(salt, i=i):
            seeds[salt] = np.array([salt * 1000 + i, 3], np.int64)
            return tf.constant(seeds[salt])

        ctx = ops.OpContext(64, True, {}, tf.uint8, seed, tokenizer, 32)
        got = op.make(ctx, {"caption": tf.constant(caption)}, wanted).numpy()
        texts = noun_prompts.prompt_texts(caption, seeds[noun_prompts.NOUN_SALT], noun_prompts.DEFAULT_VOCABULARY, 3,
                                          noun_prompts.templates())
        assert got.shape == (3, 32) and got.dtype == np.int32
        np.testing.assert_array_equal(got, np.asarray(clip_jax.tokenize(texts, context_length=32)))
        assert op.blank(ctx, wanted).shape == (3, 32)
