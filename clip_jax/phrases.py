"""GLIP's prompts and token positive maps (microsoft/GLIP, maskrcnn_benchmark): pure numpy and Python, for
tf.data through numpy_function.

- ``query_tokens``: a text's ids and each position's character span, truncated to the query length the way
  the tokenizer truncates (first id, body, last id; specials and padding span (0, 0), matching nothing).
- ``positive_map``: GLIP's ``create_positive_map`` (data/datasets/modulated_coco.py). Each box has one or more
  [start, end) character spans; a span covers the tokens from the one holding its first character to the
  one holding its last, with the reference's fallbacks when those are whitespace (start+1, start+2;
  end-2, end-3) and the span skipped when either end still holds no token (truncated away, for one). The
  weights are normalized per box (row / (row sum + 1e-6)); the loss uses them cast to bool.
- ``DetectionPrompts``: detection labels as prompts. Training (``convert_object_detection_to_grounding_
  optimized_for_od`` after ``check_for_positive_overflow``, data/datasets/od_to_grounding.py, as GLIP-T's
  Objects365 data runs it): the image's classes, and negatives sampled from all classes, shuffled together
  and joined by the separator (". " in GLIP-T's config, none after the last name). Evaluation
  (``create_queries_and_maps``, engine/inference.py): every class in order. ``class_token_weights`` is the
  [classes, tokens] matrix whose product with token scores gives a class's mean over its tokens, the
  inference score (``convert_grounding_to_od_logits`` with score_agg MEAN).

Spans are ``objects/phrase_span``'s [n, 2] (one per box, as the embedded scenes carry them) or, as GLIP's
``tokens_positive``, a list per box of (start, end) pairs; a box spanned (-1, -1) has no phrase: a zero row.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

GLIP_QUERY_LENGTH = 256  # MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
GLIP_NEGATIVES = 85  # DATASETS.RANDOM_SAMPLE_NEG of GLIP-T's config
GLIP_SEPARATOR = ". "  # DATASETS.SEPARATION_TOKENS
GLIP_FULL_NEGATIVES_PROB = 0.5  # DATASETS.CONTROL_PROB[2]: all negatives, else a uniform count in 1..all
NO_PHRASE = (-1, -1)


def _specials(tokenizer) -> tuple[int, int, int]:
    """(first, last, pad) ids of a tokenizer with encode_with_offsets: CLIP's SOT/EOT or BERT's [CLS]/[SEP]."""
    if hasattr(tokenizer, "sot_id"):
        return tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id
    if hasattr(tokenizer, "cls_id"):
        return tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    raise TypeError(f"{type(tokenizer).__name__} gives no offsets: use ClipTokenizer or WordPieceTokenizer")


def query_tokens(tokenizer, text: str, max_len: int = GLIP_QUERY_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [max_len], offsets int32 [max_len, 2]): the ids the tokenizer's __call__ gives for ``text``
    in max_len, and each position's [start, end) in ``text``, (0, 0) for the special ids and padding."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 to hold the first and last special ids, got {max_len}")
    first, last, pad = _specials(tokenizer)
    body, spans = tokenizer.encode_with_offsets(text)
    body, spans = body[: max_len - 2], spans[: max_len - 2]
    ids = np.full(max_len, pad, np.int32)
    ids[: len(body) + 2] = [first, *body, last]
    offsets = np.zeros((max_len, 2), np.int32)
    if spans:
        offsets[1 : len(spans) + 1] = spans
    return ids, offsets


def _char_to_token(offsets: np.ndarray) -> np.ndarray:
    """Position of the first token covering each character (start <= c < end), -1 for none."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    table = np.full(int(offsets[:, 1].max(initial=0)), -1, np.int64)
    for t in range(len(offsets) - 1, -1, -1):  # backwards: the first token wins a shared character
        table[offsets[t, 0] : offsets[t, 1]] = t
    return table


def _box_spans(spans) -> list[list[tuple[int, int]]]:
    """Spans per box, from [n, 2] or a list per box of pairs (or one pair), checked."""
    if isinstance(spans, np.ndarray):
        if spans.ndim != 2 or spans.shape[1] != 2:
            raise ValueError(f"spans as an array must be [boxes, 2] (start, end), got shape {spans.shape}")
        spans = spans.tolist()
    boxes = []
    for b, box in enumerate(spans):
        box = [box] if len(box) == 2 and all(np.isscalar(x) for x in box) else box
        pairs = [(int(s), int(e)) for s, e in box]
        for s, e in pairs:
            if (s, e) != NO_PHRASE and not 0 <= s < e:
                raise ValueError(f"box {b}: span ({s}, {e}) is not a [start, end) of characters with 0 <= start < "
                                 f"end; a box without a phrase is spanned {NO_PHRASE}")
        boxes.append([p for p in pairs if p != NO_PHRASE])
    return boxes


def _token_ranges(table: np.ndarray, box: list[tuple[int, int]]):
    """(first, last) token of each span of one box, by the reference's char_to_token fallbacks."""

    def at(c):
        return int(table[c]) if 0 <= c < len(table) and table[c] >= 0 else None

    for beg, end in box:
        beg_pos, end_pos = at(beg), at(end - 1)
        if beg_pos is None:
            beg_pos = at(beg + 1)
            if beg_pos is None:
                beg_pos = at(beg + 2)
        if end_pos is None:
            end_pos = at(end - 2)
            if end_pos is None:
                end_pos = at(end - 3)
        if beg_pos is not None and end_pos is not None:
            yield beg_pos, end_pos


class PositiveMap(NamedTuple):
    weights: np.ndarray  # float32 [boxes, max_len], each box's row normalized to sum ~1 (reference's map)
    positive: np.ndarray  # bool [boxes, max_len], weights > 0: the loss's targets
    matched: np.ndarray  # bool [boxes]: the box covers at least one token (else a zero row)


def positive_map(offsets, spans, max_len: int = GLIP_QUERY_LENGTH, text_length: int | None = None) -> PositiveMap:
    """GLIP's create_positive_map for the positions of ``offsets`` ([L <= max_len, 2], from query_tokens):
    the tokens each box's character spans cover. Spans past ``text_length`` (when given) are an error; a
    span whose tokens were truncated away covers nothing, as in the reference, and a box left with no
    token gets a zero row and matched False (the caller counts and skips those)."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    if len(offsets) > max_len:
        raise ValueError(f"{len(offsets)} token offsets for a query of {max_len}: truncate with query_tokens")
    boxes = _box_spans(spans)
    if text_length is not None:
        past = [(b, s) for b, box in enumerate(boxes) for s in box if s[1] > text_length]
        if past:
            raise ValueError(f"spans past the end of a {text_length}-character text (box, span): {past[:5]}")
    table = _char_to_token(offsets)
    hits = np.zeros((len(boxes), max_len), np.float32)
    for b, box in enumerate(boxes):
        for beg_pos, end_pos in _token_ranges(table, box):
            hits[b, beg_pos : end_pos + 1] = 1
    weights = hits / (hits.sum(-1, keepdims=True) + np.float32(1e-6))
    return PositiveMap(weights, weights > 0, hits.any(-1))


def class_token_weights(offsets, class_spans, max_len: int = GLIP_QUERY_LENGTH) -> np.ndarray:
    """float32 [classes, max_len]: token scores @ weights.T is each class's mean score over its tokens (the
    reference's positive_map_label_to_token, a token counted once per span that covers it). A class with
    no token in the query cannot be scored: an error."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    if len(offsets) > max_len:
        raise ValueError(f"{len(offsets)} token offsets for a query of {max_len}: truncate with query_tokens")
    table = _char_to_token(offsets)
    counts = np.zeros((len(class_spans), max_len), np.float32)
    for c, box in enumerate(_box_spans(class_spans)):
        for beg_pos, end_pos in _token_ranges(table, box):
            counts[c, beg_pos : end_pos + 1] += 1
    missing = np.flatnonzero(counts.sum(-1) == 0)
    if len(missing):
        raise ValueError(f"classes {missing[:10].tolist()} have no token within the query's {max_len}: prompt "
                         "fewer classes at a time (GLIP evaluates LVIS in chunks of 40)")
    return counts / counts.sum(-1, keepdims=True)


def clean_name(name: str) -> str:
    """GLIP's clean_name: a parenthesized part dropped, underscores to spaces, a double space to one."""
    return re.sub(r"  ", " ", re.sub(r"_", " ", re.sub(r"\(.*\)", "", name)))


def join_names(names: Sequence[str], separator: str = GLIP_SEPARATOR) -> tuple[str, np.ndarray]:
    """(names joined by separator, int64 [len(names), 2] span of each name)."""
    text, spans = "", np.zeros((len(names), 2), np.int64)
    for k, name in enumerate(names):
        if k:
            text += separator
        spans[k] = len(text), len(text) + len(name)
        text += name
    return text, spans


class TrainingPrompt(NamedTuple):
    text: str
    spans: np.ndarray  # int64 [boxes, 2]: the box's class name in text, NO_PHRASE where not kept
    keep: np.ndarray  # bool [boxes]: False for boxes of classes cut because their names overflow the query
    classes: np.ndarray  # int64 [names]: the class of each name of the prompt, in prompt order
    negatives: np.ndarray  # int64: the negative classes among them


class DetectionPrompts:
    """Prompts of one label set's class names for one tokenizer (its token counts of "name. " cached)."""

    def __init__(self, class_names: Sequence[str], tokenizer, max_len: int = GLIP_QUERY_LENGTH,
                 num_negatives: int = GLIP_NEGATIVES, full_negatives_prob: float = GLIP_FULL_NEGATIVES_PROB,
                 separator: str = GLIP_SEPARATOR):
        self.names = [clean_name(n) for n in class_names]
        if not self.names or not all(n.strip() for n in self.names):
            raise ValueError(f"class names must be non-empty once cleaned: {list(class_names)[:10]}")
        self.tokenizer, self.max_len, self.separator = tokenizer, max_len, separator
        self.num_negatives, self.full_negatives_prob = num_negatives, full_negatives_prob
        # The reference measures each name with ". " whatever the separator, against max_len - 2.
        self.name_tokens = np.array([len(tokenizer.encode_with_offsets(n + ". ")[0]) for n in self.names])

    def training(self, labels, rng: np.random.Generator) -> TrainingPrompt:
        """The prompt of one image with boxes of classes ``labels`` [boxes], drawn from rng.

        Deviation: negatives exclude every class of the image; the reference excludes only those kept
        after the overflow cut, so a class cut for length could come back as a negative of its own
        (dropped) boxes.
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        num_classes = len(self.names)
        if ((labels < 0) | (labels >= num_classes)).any():
            raise ValueError(f"labels {labels[(labels < 0) | (labels >= num_classes)][:5].tolist()} are outside "
                             f"the {num_classes} class names")
        budget = self.max_len - 2
        present = np.unique(labels)
        kept, length = [], 0  # check_for_positive_overflow: a random order of the classes, cut when full
        for label in rng.permutation(present):
            length += int(self.name_tokens[label])
            if length > budget:
                break
            kept.append(int(label))
        full = min(self.num_negatives, num_classes)
        count = full if rng.random() < self.full_negatives_prob else int(rng.integers(max(1, full))) + 1
        # The reference still draws one negative half the time when asked for none (-1): none here.
        drawn = rng.choice(num_classes, size=min(count, num_classes) if full > 0 else 0, replace=False)
        negatives, room = [], budget - length
        for label in rng.permutation(np.setdiff1d(drawn, present)):
            room -= int(self.name_tokens[label])  # the reference's screen: stop at the first that overflows
            if room <= 0:
                break
            negatives.append(int(label))
        classes = rng.permutation(np.array(negatives + kept, np.int64))
        text, name_spans = join_names([self.names[c] for c in classes], self.separator)
        where = {int(c): k for k, c in enumerate(classes)}
        keep = np.isin(labels, kept)
        spans = np.full((len(labels), 2), NO_PHRASE, np.int64)
        for b in np.flatnonzero(keep):
            spans[b] = name_spans[where[int(labels[b])]]
        return TrainingPrompt(text, spans, keep, classes, np.array(negatives, np.int64))

    def evaluation(self) -> tuple[str, np.ndarray]:
        """(every class name in order joined by the separator, int64 [classes, 2] span of each)."""
        return join_names(self.names, self.separator)
