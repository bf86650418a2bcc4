"""The input op 'noun_prompts': GroupViT's multi-label prompts from each caption (NVlabs/GroupViT:
datasets/builder.py), tokenized -> [prompts, T] per record, [B, prompts, T] per batch.

From the record's chosen caption: the words of a configured noun vocabulary it contains (each once, in
caption order), `prompts` of them sampled without replacement from the example's own stateless seed, each
filled into a template drawn at random (CLIP's 80 ImageNet templates, the reference's "full" set), and the
remaining slots padded with the raw caption. The reference finds the words with NLTK's POS tagger (nouns and
verbs); its tagger needs a model download, which the input may not do at run time, so the words come from a
vocabulary instead: by default the shape names of the embedded shapes data (clip_jax.input.shapes.SHAPE_NAMES),
not the colours, which are adjectives in every caption; the op's option vocabulary=FILE (one word or phrase a
line; GroupViT's method sets it from `--config.groupvit.noun_vocabulary`) for a user's data.

    BatchInput("prompt_tokens", "noun_prompts", ("caption",), (("prompts", 3), ("vocabulary", "")))
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from clip_jax.input import ops, shapes

NOUN_SALT = 21  # the per-example stream of the noun and template draws (ops' salts are 3, 4.., 16)
DEFAULT_VOCABULARY = tuple(shapes.SHAPE_NAMES)
_TEMPLATES_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "zero_shot", "imagenet.json")


@functools.lru_cache(maxsize=None)
def templates() -> tuple:
    """CLIP's 80 ImageNet prompt templates ('a bad photo of a {}.', ...)."""
    with open(_TEMPLATES_FILE, encoding="utf-8") as f:
        return tuple(json.load(f)["templates"])


def read_vocabulary(path: Optional[str]) -> tuple:
    """The noun vocabulary: the shape names for None or '', else FILE's non-empty lines (lowercased)."""
    if not path:
        return DEFAULT_VOCABULARY
    if not os.path.exists(path):
        raise ValueError(f"noun vocabulary {path!r} does not exist: give a text file of one noun a line, or "
                         "leave it empty for the shape names")
    with open(path, encoding="utf-8") as f:
        words = tuple(dict.fromkeys(w.strip().lower() for w in f if w.strip()))
    if not words:
        raise ValueError(f"noun vocabulary {path!r} holds no words: one noun a line")
    return words


def caption_nouns(caption: str, vocabulary: Sequence[str]) -> list:
    """The vocabulary's words (or phrases) in the caption as whole words, each once, in caption order."""
    text = caption.lower()
    found = []
    for word in vocabulary:
        hit = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text)
        if hit:
            found.append((hit.start(), word))
    return [w for _, w in sorted(found)]


def prompt_texts(caption: str, seed: Sequence[int], vocabulary: Sequence[str], count: int,
                 template_set: Sequence[str]) -> list:
    """`count` texts: up to `count` distinct nouns of the caption, each in a random template, then the caption."""
    rng = np.random.default_rng([int(s) % (1 << 63) for s in seed])
    nouns = caption_nouns(caption, vocabulary)
    picked = [nouns[i] for i in rng.permutation(len(nouns))[:count]]
    texts = [template_set[int(rng.integers(len(template_set)))].format(noun) for noun in picked]
    return texts + [caption] * (count - len(texts))


def _count(wanted: ops.Wanted) -> int:
    return int(wanted.option("prompts", 3))


def _validate(wanted: ops.Wanted) -> None:
    ops._one(wanted)
    if _count(wanted) < 1:
        raise ValueError(f"batch key {wanted.key!r}: op 'noun_prompts' needs prompts >= 1, not {_count(wanted)}")
    read_vocabulary(wanted.option("vocabulary"))  # a missing or empty file fails before any data is read


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    tf = ops._tf()
    count = _count(wanted)
    vocabulary = read_vocabulary(wanted.option("vocabulary"))
    template_set = templates()

    def run(caption, seed):
        caption = caption.item() if isinstance(caption, np.ndarray) else caption  # eager tf hands a 0-d array
        text = caption.decode("utf-8", errors="replace")
        return np.array([t.encode("utf-8") for t in prompt_texts(text, seed, vocabulary, count, template_set)],
                        dtype=object)

    texts = tf.numpy_function(run, [ex[ops._one(wanted)], ctx.seed(NOUN_SALT)], tf.string, stateful=False)
    texts = tf.ensure_shape(texts, [count])
    return ctx.tokenizer.tf_tokenize(texts, ctx.context_length)


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    return ops._tf().zeros([_count(wanted), ctx.context_length], ops._tf().int32)


ops.OPS.register("noun_prompts")(ops.Op("record", _make, _blank, validate=_validate))
