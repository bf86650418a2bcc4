"""The input op 'glip_text': GLIP's boxes with their text, a prompt or a caption tokenized with each box's
tokens (microsoft/GLIP's positive map; the construction is clip_jax.phrases).

    BatchInput("boxes", "glip_text", ("objects/bbox", "objects/shape", "objects/color", "caption",
                                      "objects/phrase_span"),
               (("labels", "shape"), ("max_objects", 16), ("exclude", (3, 4)), ("mode", "mix"),
                ("grounding_fraction", 0.5)))

One declaration makes the boxes keys of op 'boxes' (clip_jax.input.detection: K, K/labels, K/valid, K/index,
K/counts for the declared key K, same options, same crop, flip and rules) and, under the option text_key T
(default "glip"), L = length (default 256, GLIP's query length):

- ``T/tokens`` int32 [L]: the query's ids, as the text tower's tokenizer gives them in L (its first and last
  special ids, then padding);
- ``T/token_valid`` bool [L]: the query's ids, specials included (the text tower's attention mask);
- ``T/positive`` bool [M, L]: each box's tokens, row k for box k of ``K``;
- ``T/grounding`` bool []: the record was made in grounding mode;
- ``T/counts`` int32 [4]: (grounding, no_phrase, bad_span, no_token), summed by the stream (tallies).

The text of a record, by its mode (option mode: 'detection', 'grounding' or 'mix', a record grounding with
probability grounding_fraction from its own stateless seed):

- detection: GLIP-T's training prompt of the boxes' class names (phrases.DetectionPrompts.training: the
  image's classes and `negatives` (option, default 85) sampled others, shuffled, joined by ". "), from the
  record's seed. The class list (option classes; the label set's names by default, required for
  labels='record') less the classes of ``exclude``: an excluded class's boxes are dropped (rule 3b) and its
  name is in no detection prompt.
- novel_records='grounding' (option; default 'detection'): under mode='mix' a record holding an object of an
  ``exclude`` class is always made in grounding mode, the others by the draw. As a detection record its novel
  objects would be unlabelled background for every name of the prompt, the opposite of what its caption teaches.
- grounding: the record's caption, each box spanned by its ``objects/phrase_span`` row (its object's, by
  K/index). No class is excluded: the caption names every object, the novel ones too (GLIP learns new words
  from grounding data). The caption as the pipeline picks it (stripped): spans count from its first
  character.

A box left with no token is dropped (not a zero row), counted: ``no_phrase`` (grounding: no span for its object,
or (-1, -1)), ``bad_span`` (grounding: a span that is no [start, end) inside the caption), ``no_token`` (its span
covers no token: truncated past L, or its class cut from a prompt that overflows L). The kept boxes stay first,
in record order, so the K keys read as op 'boxes' (K/valid a prefix, padding zero / -1). The tokenizer is
the pipeline's (the model's text tower's): CLIP's BPE or WordPiece, which give character offsets.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from clip_jax import phrases
from clip_jax.input import detection, ops, shapes

PROMPT_SALT = 22  # the per-example stream of a detection prompt's draws (ops' salts: 3, 4.., 16; noun_prompts': 21)
MODE_SALT = 23  # the per-example draw of a mix record's mode
MODES = ("detection", "grounding", "mix")
TEXT_READS = ("caption", "objects/phrase_span")
TEXT_COUNTS = ("grounding", "no_phrase", "bad_span", "no_token")
TEXT_OPTIONS = ("mode", "grounding_fraction", "novel_records", "length", "negatives", "classes", "text_key")
NOVEL_RECORDS = ("detection", "grounding")


def _text_key(wanted: ops.Wanted) -> str:
    return str(wanted.option("text_key", "glip"))


def _mode(wanted: ops.Wanted) -> str:
    return wanted.option("mode", "detection")


def _query_length(wanted: ops.Wanted) -> int:
    return int(wanted.option("length", phrases.GLIP_QUERY_LENGTH))


def _boxes_wanted(wanted: ops.Wanted) -> ops.Wanted:
    """The declaration as op 'boxes' reads it: the box features alone, num_classes from the class list."""
    options = {k: v for k, v in wanted.options if k not in TEXT_OPTIONS}
    if detection._labels(wanted) == detection.RECORD and "num_classes" not in options and wanted.option("classes"):
        options["num_classes"] = len(wanted.option("classes"))
    reads = tuple(r for r in wanted.reads if r not in TEXT_READS)
    return dataclasses.replace(wanted, op="boxes", reads=reads, options=tuple(sorted(options.items())))


def class_list(wanted: ops.Wanted) -> tuple:
    """The names of the label set's classes, index = K/labels."""
    names = wanted.option("classes")
    if names is not None:
        return tuple(names)
    return tuple(shapes.class_names(detection._labels(wanted)))


def _keys(wanted: ops.Wanted) -> tuple:
    t = _text_key(wanted)
    return detection._keys(wanted) + tuple(f"{t}/{k}" for k in ("tokens", "token_valid", "positive", "grounding",
                                                                "counts"))


def _validate(wanted: ops.Wanted) -> None:
    k, mode = wanted.key, _mode(wanted)
    if mode not in MODES:
        raise ValueError(f"batch key {k!r}: op 'glip_text' has no mode {mode!r}: use 'detection' (class-name prompts), "
                         "'grounding' (the caption and its phrase spans) or 'mix' (with grounding_fraction)")
    f = wanted.option("grounding_fraction", 0.5)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
        raise ValueError(f"batch key {k!r}: grounding_fraction must be a fraction in [0, 1] (the share of records "
                         f"made in grounding mode under mode='mix'), got {f!r}")
    q = wanted.option("length", phrases.GLIP_QUERY_LENGTH)
    if isinstance(q, bool) or not isinstance(q, int) or q < 2:
        raise ValueError(f"batch key {k!r}: length must be an int >= 2 (the query's tokens, specials included; "
                         f"GLIP's is 256), got {q!r}")
    n = wanted.option("negatives", phrases.GLIP_NEGATIVES)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"batch key {k!r}: negatives must be an int >= 0 (negative class names per detection "
                         f"prompt, GLIP-T's 85), got {n!r}")
    text = (TEXT_READS if mode != "detection" else ())
    missing = [r for r in text if r not in wanted.reads]
    if missing:
        raise ValueError(f"batch key {k!r}: mode {mode!r} reads the caption and its spans: add {missing} to the "
                         f"reads {wanted.reads!r}")
    if _text_key(wanted) == k:
        raise ValueError(f"batch key {k!r}: text_key must differ from the boxes key, got {_text_key(wanted)!r}")
    labels = detection._labels(wanted)
    names = wanted.option("classes")
    if names is not None and (not isinstance(names, (tuple, list)) or not all(isinstance(s, str) and s.strip()
                                                                             for s in names)):
        raise ValueError(f"batch key {k!r}: classes must be a tuple of non-empty names, got {names!r}")
    if labels == detection.RECORD and names is None:
        raise ValueError(f"batch key {k!r}: labels='record' needs classes=(name, ...), one per class index of "
                         "objects/label (the converter's classes JSON), for the detection prompts")
    boxes = _boxes_wanted(wanted)
    detection._validate(boxes)  # the label set, box reads and box options
    count = boxes.option("num_classes") if labels == detection.RECORD else len(shapes.class_names(labels))
    if names is not None and len(names) != count:
        raise ValueError(f"batch key {k!r}: classes has {len(names)} names but the labels have {count} classes "
                         f"(labels={labels!r}): give one name per class, in class index order")
    exclude = set(wanted.option("exclude", ()))
    if any(c >= count for c in exclude):
        raise ValueError(f"batch key {k!r}: exclude {sorted(exclude)} names classes past the {count} of "
                         f"labels={labels!r}")
    novel = wanted.option("novel_records", "detection")
    if novel not in NOVEL_RECORDS:
        raise ValueError(f"batch key {k!r}: novel_records={novel!r}: use 'detection' (a record holding an excluded "
                         "class drawn as any other) or 'grounding' (always made in grounding mode under mode='mix')")
    if mode != "grounding" and len(exclude) >= count:
        raise ValueError(f"batch key {k!r}: every class is excluded, so no detection prompt can be made: exclude "
                         "fewer classes or use mode='grounding'")


@functools.lru_cache(maxsize=8)
def _prompts(tokenizer, names: tuple, max_len: int, num_negatives: int):
    return phrases.DetectionPrompts(names, tokenizer, max_len, num_negatives)


class RecordText:
    """The numpy side of one record: its query and its boxes' positive rows."""

    def __init__(self, tokenizer, wanted: ops.Wanted):
        if not hasattr(tokenizer, "encode_with_offsets"):
            raise ValueError(f"op 'glip_text' needs character offsets from the text tower's tokenizer, which "
                             f"{type(tokenizer).__name__} does not give: use CLIP's BPE or WordPiece")
        self.tokenizer, self.max_len = tokenizer, _query_length(wanted)
        names, exclude = class_list(wanted), set(wanted.option("exclude", ()))
        base = [c for c in range(len(names)) if c not in exclude]
        self.to_base = np.full(len(names), -1, np.int64)
        self.to_base[base] = np.arange(len(base))
        self.prompts = None
        if _mode(wanted) != "grounding":
            self.prompts = _prompts(tokenizer, tuple(names[c] for c in base), self.max_len,
                                    int(wanted.option("negatives", phrases.GLIP_NEGATIVES)))

    def __call__(self, labels, valid, index, is_grounding, caption, spans, seed):
        """-> (tokens int32 [L], token_valid bool [L], positive bool [M, L], matched bool [M], counts int32 [4])."""
        valid, index, spans = np.asarray(valid, bool), np.asarray(index, np.int64), np.asarray(spans, np.int64)
        live = np.flatnonzero(valid)
        counts = np.zeros(len(TEXT_COUNTS), np.int32)
        unspanned = np.zeros(len(live), bool)
        if is_grounding:
            counts[0] = 1
            caption = caption.item() if isinstance(caption, np.ndarray) else caption  # eager tf: a 0-d array
            text = caption.decode("utf-8", errors="replace")
            box_spans = np.full((len(live), 2), phrases.NO_PHRASE, np.int64)
            at = index[live]
            has = at < len(spans)
            box_spans[has] = spans.reshape(-1, 2)[at[has]]
            unspanned = (box_spans == phrases.NO_PHRASE).all(-1)
            bad = ~unspanned & ((box_spans[:, 0] < 0) | (box_spans[:, 0] >= box_spans[:, 1])
                                | (box_spans[:, 1] > len(text)))
            box_spans[bad] = phrases.NO_PHRASE
            counts[1], counts[2] = unspanned.sum(), bad.sum()
            unspanned |= bad
        else:
            rng = np.random.default_rng([int(s) % (1 << 63) for s in seed])
            base = self.to_base[np.asarray(labels, np.int64)[live]]
            if (base < 0).any():  # rule 3b dropped them: a detection record never holds one
                raise AssertionError("an excluded class reached a detection prompt")
            prompt = self.prompts.training(base, rng)
            text, box_spans = prompt.text, prompt.spans
        ids, offsets = phrases.query_tokens(self.tokenizer, text, self.max_len)
        pm = phrases.positive_map(offsets, box_spans, self.max_len)
        counts[3] = (~pm.matched & ~unspanned).sum()
        positive = np.zeros((len(valid), self.max_len), bool)
        positive[live] = pm.positive
        matched = np.zeros(len(valid), bool)
        matched[live] = pm.matched
        token_valid = np.arange(self.max_len) < (offsets[:, 1] > 0).sum() + 2  # a text token ends past character 0
        return ids, token_valid, positive, matched, counts


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    tf = ops._tf()
    k, t = wanted.key, _text_key(wanted)
    m, q = detection._max_objects(wanted), _query_length(wanted)
    mode = _mode(wanted)
    boxes_wanted = _boxes_wanted(wanted)
    if mode == "mix":
        draw = tf.random.stateless_uniform([], ctx.seed(MODE_SALT))
        is_grounding = draw < float(wanted.option("grounding_fraction", 0.5))
        if wanted.option("novel_records", "detection") == "grounding" and wanted.option("exclude", ()):
            novel = detection.excluded_objects(detection.object_classes(ex, boxes_wanted), boxes_wanted)
            is_grounding |= tf.reduce_any(novel)
    else:
        is_grounding = tf.constant(mode == "grounding")
    boxes = detection._make(ctx, ex, boxes_wanted, exclude_now=~is_grounding)
    run = RecordText(ctx.tokenizer, wanted)
    caption = ex["caption"] if "caption" in ex else tf.constant(b"")
    spans = ex["objects/phrase_span"] if "objects/phrase_span" in ex else tf.zeros([0, 2], tf.int64)
    tokens, token_valid, positive, matched, counts = tf.numpy_function(
        run, [boxes[f"{k}/labels"], boxes[f"{k}/valid"], boxes[f"{k}/index"], is_grounding, caption, spans,
              ctx.seed(PROMPT_SALT)], [tf.int32, tf.bool, tf.bool, tf.bool, tf.int32], stateful=False)
    # Boxes with no token are dropped; the kept ones move up, in order, so K/valid stays a prefix.
    keep = tf.ensure_shape(boxes[f"{k}/valid"] & matched, [m])
    order = tf.argsort(tf.cast(~keep, tf.int32), stable=True)
    kept = tf.gather(keep, order)
    out = {
        k: tf.where(kept[:, None], tf.gather(boxes[k], order), 0.0),
        f"{k}/labels": tf.where(kept, tf.gather(boxes[f"{k}/labels"], order), -1),
        f"{k}/valid": kept,
        f"{k}/index": tf.where(kept, tf.gather(boxes[f"{k}/index"], order), -1),
        f"{k}/counts": boxes[f"{k}/counts"],
        f"{t}/tokens": tf.ensure_shape(tokens, [q]),
        f"{t}/token_valid": tf.ensure_shape(token_valid, [q]),
        f"{t}/positive": tf.ensure_shape(tf.gather(positive, order) & kept[:, None], [m, q]),
        f"{t}/grounding": is_grounding,
        f"{t}/counts": tf.ensure_shape(counts, [len(TEXT_COUNTS)]),
    }
    return out


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    tf = ops._tf()
    t, m, q = _text_key(wanted), detection._max_objects(wanted), _query_length(wanted)
    return {**detection._blank(ctx, _boxes_wanted(wanted)), f"{t}/tokens": tf.zeros([q], tf.int32),
            f"{t}/token_valid": tf.zeros([q], tf.bool), f"{t}/positive": tf.zeros([m, q], tf.bool),
            f"{t}/grounding": tf.constant(False), f"{t}/counts": tf.zeros([len(TEXT_COUNTS)], tf.int32)}


def _bad_boxes(picked: dict, wanted: ops.Wanted):
    return detection._bad_boxes(picked, _boxes_wanted(wanted))


ops.OPS.register("glip_text")(ops.Op(
    "record", _make, _blank, needs=("image",), checks=(("bad_boxes", _bad_boxes),), joint=True, validate=_validate,
    makes=_keys, tallies=lambda w: {f"{w.key}/counts": tuple(f"{w.key}/{c}" for c in detection.COUNTS),
                                    f"{_text_key(w)}/counts": tuple(f"{_text_key(w)}/{c}" for c in TEXT_COUNTS)}))
