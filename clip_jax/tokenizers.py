"""Tokenizers: CLIP's byte-level BPE (OpenAI's exact ids), BERT's WordPiece (Chinese-CLIP's exact
ids) and SentencePiece.

All give int32 arrays [N, context_length], zero padded, usable from Python and
inside a tf.data pipeline (``tf_tokenize``). TensorFlow is imported lazily so the
model and training code run where TensorFlow is not installed.

Why the CLIP BPE runs as Python inside tf.data rather than as TF ops: OpenAI's
text cleaning starts with ``ftfy.fix_text`` (mojibake repair), which has no TF
equivalent, and tensorflow-text has no op for byte-level BPE merges with ranks.
Re-implementing either in-graph would give *nearly* OpenAI's ids; we want exactly
them. So ``tf_tokenize`` wraps the exact tokenizer in ``tf.numpy_function`` over a
whole batch of captions (one Python call per batch, not per caption) with a cache
of BPE'd words. ``python -m clip_jax.benchmark tokenizer`` measures captions/s.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import string
from typing import Iterable, Sequence

import numpy as np

from clip_jax.registry import Registry

VOCAB_PATH = os.path.join(os.path.dirname(__file__), "assets", "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# Number of BPE merges OpenAI's vocab uses: 49408 = 2 * 256 bytes + 48894 merges + 2 specials.
_NUM_MERGES = 49152 - 256 - 2
# Pre-tokenisation pattern of the OpenAI release (a fact of the format we must match).
_WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the others (control chars, space,
    ...) are shifted to code points 256+ so that no BPE symbol is whitespace.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _ftfy_is_identity(text: str) -> bool:
    """Printable ASCII without '&': every ftfy fix (mojibake, entities, control chars, widths,
    ligatures, NFC, line breaks) leaves it unchanged, so ftfy (a third of the cost) is skipped.
    tests/test_tokenizers.py checks this claim against ftfy itself."""
    return text.isascii() and "&" not in text and all(" " <= c <= "~" or c in "\t\n" for c in text)


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ftfy repair, double html unescape, whitespace collapse, lowercase."""
    import ftfy
    import regex

    if not _ftfy_is_identity(text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's byte-level BPE with a vocabulary of 49408 ids (SOT 49406, EOT 49407, pad 0)."""

    def __init__(self, vocab_path: str = VOCAB_PATH, context_length: int = 77, cache_size: int = 1 << 18):
        import regex

        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        byte_chars = list(_byte_to_unicode().values())
        symbols = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        symbols += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.word_pattern = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self.context_length = context_length
        self.vocab_size = len(self.encoder)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.pad_id = 0
        self._cache: dict[str, tuple[int, ...]] = {SOT_TOKEN: (self.sot_id,), EOT_TOKEN: (self.eot_id,)}
        self._cache_size = cache_size

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until none applies."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        inf = len(self.merge_rank)
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.merge_rank.get(p, inf))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(self.encoder[s] for s in self._bpe(mapped))
            if len(self._cache) < self._cache_size:
                self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        ids: list[int] = []
        for word in self.word_pattern.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of ids: after SOT, up to EOT (id 0 is "!", so padding is only cut at EOT)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        words = "".join(self.decoder[i] for i in ids).split("</w>")
        raw = b" ".join(bytes(self.byte_decoder[c] for c in w) for w in words)
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """SOT + ids + EOT per text, truncated so the last kept id is EOT, zero padded."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        if ctx < 2:
            raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {ctx}")
        out = np.zeros((len(texts), ctx), dtype=np.int32)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out

    def tf_tokenize(self, texts, context_length: int | None = None):
        """In a tf.data pipeline: string tensor [N] (utf-8) -> int32 tensor [N, context_length].

        Undecodable bytes become U+FFFD; the input pipeline drops such captions before
        they get here (and counts them).
        """
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        ctx = context_length or self.context_length

        def _run(batch: np.ndarray) -> np.ndarray:
            return self([t.decode("utf-8", errors="replace") for t in batch.reshape(-1)], ctx)

        texts = tf.convert_to_tensor(texts, tf.string)
        squeeze = texts.shape.rank == 0
        batch = tf.reshape(texts, [-1])
        tokens = tf.numpy_function(_run, [batch], tf.int32, stateful=False)
        tokens = tf.ensure_shape(tokens, [None, ctx])
        return tokens[0] if squeeze else tokens


class SentencePieceTokenizer:
    """A SentencePiece model run in-graph by tensorflow-text, for models with their own vocab.

    Output: ids (optionally + EOS), truncated to context_length keeping EOS last, padded
    with pad_id. Its model's text tower needs a pooling that suits the vocabulary: 'first'
    with text_cfg no_causal_mask=True (bidirectional), or 'last' (see ``TextTransformer``).
    """

    def __init__(
        self,
        model_path: str,
        context_length: int = 64,
        add_eos: bool = True,
        lowercase: bool = False,
        pad_id: int = 0,
        canonicalize: bool = False,
    ):
        """canonicalize: SigLIP's text cleaning (open_clip's 'canonicalize', transformers' SiglipTokenizer):
        lowercase, ASCII punctuation removed, each run of whitespace one space, none at the ends."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        import tensorflow_text as tf_text

        with tf.io.gfile.GFile(model_path, "rb") as f:
            model = f.read()
        self._sp = tf_text.SentencepieceTokenizer(model=model, add_eos=add_eos, out_type=tf.int32)
        self.context_length = context_length
        self.add_eos = add_eos
        self.lowercase = lowercase or canonicalize
        self.canonicalize = canonicalize
        self.pad_id = pad_id
        self.vocab_size = int(self._sp.vocab_size())
        self.eos_id = int(self._sp.string_to_id("</s>")) if add_eos else None

    def tf_tokenize(self, texts, context_length: int | None = None):
        """String tensor [N] -> int32 tensor [N, context_length], in-graph."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        ctx = context_length or self.context_length
        texts = tf.convert_to_tensor(texts, tf.string)
        squeeze = texts.shape.rank == 0
        texts = tf.reshape(texts, [-1])
        if self.lowercase:
            texts = tf.strings.lower(texts, encoding="utf-8")
        if self.canonicalize:
            texts = tf.strings.regex_replace(texts, "[" + re.escape(string.punctuation) + "]", "")
            texts = tf.strings.strip(tf.strings.regex_replace(texts, r"\s+", " "))
        ragged = self._sp.tokenize(texts)
        if self.add_eos:
            # Truncation keeps EOS as the last id, like CLIP keeps EOT.
            body = ragged[:, :-1][:, : ctx - 1]
            eos = tf.fill([tf.shape(texts)[0], 1], tf.constant(self.eos_id, tf.int32))
            ragged = tf.concat([body, tf.RaggedTensor.from_tensor(eos)], axis=1)
        else:
            ragged = ragged[:, :ctx]
        tokens = ragged.to_tensor(default_value=self.pad_id, shape=[None, ctx])
        return tokens[0] if squeeze else tokens

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        return np.asarray(self.tf_tokenize(list(texts), context_length), dtype=np.int32)


ZH_VOCAB_PATH = os.path.join(os.path.dirname(__file__), "assets", "bert_zh_vocab.txt")
# BERT's basic tokenizer (Chinese-CLIP's bert_tokenizer.py) as RE2 classes: control and format
# characters, NUL and U+FFFD are dropped (\t \n \r are whitespace there), and these are whitespace:
# Zs, plus U+2028/U+2029 which its str.split() splits on.
_BERT_DROP = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F\p{Cf}\x{FFFD}]"
_BERT_SPACE = r"[\t\n\r\p{Zs}\x{2028}\x{2029}]"
# Its word splits: each punctuation character (all non-alphanumeric ASCII and \p{P}) and each CJK
# ideograph is a word of its own.
_BERT_SPLIT = (r"[!-/:-@\[-`{-~\p{P}\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
               r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]")
_BERT_MAX_WORD_CHARS = 200  # longer words are one [UNK]
_UNK_TOKEN, _CLS_TOKEN, _SEP_TOKEN = "[UNK]", "[CLS]", "[SEP]"


def _read_bert_vocab(path: str) -> tuple[list[str], dict[str, int]]:
    """Lines of a BERT vocab file and token -> id, read as BERT's load_vocab reads them: universal
    newlines, each line stripped, a repeated token keeping its last line."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokens = [line.strip() for line in lines]
    return tokens, {t: i for i, t in enumerate(tokens)}


class WordPieceTokenizer:
    """BERT's tokenizer (basic tokenizer + greedy longest-match WordPiece), in-graph by tensorflow-text,
    giving exactly Chinese-CLIP's ids: [CLS] + tokens[:context_length - 2] + [SEP], padded with pad_id.

    tensorflow_text.BertTokenizer's own lower_case=True folds case with NFKC_Casefold, which also maps
    full-width forms, ligatures and superscripts to ASCII (and "ß" to "ss") where BERT's Python code
    only lower-cases; it turns control characters into spaces where BERT drops them; and it cuts words
    at 100 bytes where BERT cuts them at 200 characters. So the text is cleaned, lower-cased (ICU, like
    str.lower), NFD-normalized and stripped of Mn marks by TF ops, split into words by BERT's rules
    (tf_text.regex_split, as tf_text's basic tokenizer does), words past 200 characters become [UNK],
    and tf_text's WordpieceTokenizer looks the rest up. Characters that Python's Unicode database
    (14.0 in Python 3.11) leaves unassigned but TF's newer ICU/RE2 tables know may differ.
    """

    def __init__(self, vocab_path: str = ZH_VOCAB_PATH, context_length: int = 52, lower_case: bool = True,
                 pad_id: int = 0):
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        import tensorflow_text as tf_text

        tokens, vocab = _read_bert_vocab(vocab_path)
        missing = [t for t in (_UNK_TOKEN, _CLS_TOKEN, _SEP_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"the WordPiece vocab {vocab_path} lacks {', '.join(missing)}")
        self.vocab_path = vocab_path
        self.context_length = context_length
        self.lower_case = lower_case
        self.vocab_size = len(tokens)
        self.pad_id = pad_id
        self.unk_id, self.cls_id, self.sep_id = (vocab[t] for t in (_UNK_TOKEN, _CLS_TOKEN, _SEP_TOKEN))
        self._tokens = tokens
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(list(vocab)), tf.constant(list(vocab.values()), tf.int64)),
            default_value=-1)
        # No vocab entry is longer than this, so longer prefixes need no lookup (only a speed-up).
        longest = max(len(t[2:] if t.startswith("##") else t) for t in tokens)
        self._wordpiece = tf_text.WordpieceTokenizer(
            table, suffix_indicator="##", max_bytes_per_word=4 * _BERT_MAX_WORD_CHARS, max_chars_per_token=longest,
            token_out_type=tf.int32, unknown_token=_UNK_TOKEN, split_unknown_characters=False)

    def _wordpieces(self, texts):
        """String tensor [N] -> ragged int32 [N, (tokens)], without [CLS]/[SEP]."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        import tensorflow_text as tf_text

        # BERT decodes bytes with errors="ignore": undecodable bytes become U+FFFD, dropped next.
        texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
        texts = tf.strings.regex_replace(texts, _BERT_DROP, "")
        texts = tf.strings.regex_replace(texts, _BERT_SPACE, " ")
        if self.lower_case:
            # ICU's lower-casing follows the process locale (Turkish: "I" -> "ı"); ASCII first keeps it Python's.
            texts = tf.strings.lower(tf.strings.lower(texts), encoding="utf-8")
            texts = tf_text.normalize_utf8(texts, "NFD")
            texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
        words = tf_text.regex_split(texts, r"\s+|" + _BERT_SPLIT, _BERT_SPLIT)
        too_long = tf.strings.length(words.flat_values, unit="UTF8_CHAR") > _BERT_MAX_WORD_CHARS
        words = words.with_flat_values(tf.where(too_long, _UNK_TOKEN, words.flat_values))
        return self._wordpiece.tokenize(words).merge_dims(1, 2)

    def tf_tokenize(self, texts, context_length: int | None = None):
        """String tensor [N] (utf-8) -> int32 tensor [N, context_length], in-graph ([context_length] for a scalar)."""
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        ctx = context_length or self.context_length
        if ctx < 2:
            raise ValueError(f"context_length must be >= 2 to hold [CLS] and [SEP], got {ctx}")
        texts = tf.convert_to_tensor(texts, tf.string)
        squeeze = texts.shape.rank == 0
        texts = tf.reshape(texts, [-1])
        body = self._wordpieces(texts)[:, : ctx - 2]
        n = tf.shape(texts, out_type=tf.int64)[0]
        cls = tf.RaggedTensor.from_tensor(tf.fill([n, 1], tf.constant(self.cls_id, tf.int32)))
        sep = tf.RaggedTensor.from_tensor(tf.fill([n, 1], tf.constant(self.sep_id, tf.int32)))
        tokens = tf.concat([cls, body, sep], axis=1).to_tensor(default_value=self.pad_id, shape=[None, ctx])
        return tokens[0] if squeeze else tokens

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
        return np.asarray(self.tf_tokenize(list(texts), context_length), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one row of ids: its word pieces between [CLS] and [SEP], "##" pieces joined to the previous."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.cls_id:
            ids = ids[1:]
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        return " ".join(self._tokens[i] for i in ids if i != self.pad_id).replace(" ##", "").strip()


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> ClipTokenizer:
    return ClipTokenizer(context_length=context_length)


# A text config's `tokenizer` is NAME or NAME:ARGUMENT; each entry builds one from (argument, text config).
TOKENIZERS: Registry = Registry("tokenizer")
TOKENIZERS.register("clip_bpe")(lambda argument, text: get_tokenizer())
TOKENIZERS.register("sentencepiece")(
    lambda argument, text: SentencePieceTokenizer(argument, context_length=text.context_length, pad_id=text.pad_id,
                                                  canonicalize=text.kind == "siglip"))
TOKENIZERS.register("wordpiece")(
    lambda argument, text: WordPieceTokenizer(argument or ZH_VOCAB_PATH, context_length=text.context_length,
                                              pad_id=text.pad_id))


@functools.lru_cache(maxsize=8)
def tokenizer_for(text_config):
    """The tokenizer a model's text tower was built for (its config's `tokenizer`), checked
    against the tower's vocabulary: ids past the embedding table would be clamped silently."""
    name, _, argument = text_config.tokenizer.partition(":")
    if name == "sentencepiece" and not argument:
        raise ValueError("text_cfg tokenizer 'sentencepiece' needs the model file: 'sentencepiece:PATH'")
    tokenizer = TOKENIZERS.get(name)(argument, text_config)
    if tokenizer.vocab_size != text_config.vocab_size:
        raise ValueError(f"the tokenizer {text_config.tokenizer!r} has {tokenizer.vocab_size} ids but the text tower "
                         f"embeds {text_config.vocab_size} (text_cfg vocab_size): make them equal")
    return tokenizer


def tokenize(texts: str | Sequence[str], context_length: int | None = None, model=None) -> np.ndarray:
    """Tokens of ``texts``: int32 [N, context_length]. By default CLIP's BPE (exactly OpenAI's
    ids) in 77 tokens; with `model` (a preset name or model config) that model's own tokenizer
    and context length."""
    if model is None:
        return get_tokenizer()(texts, context_length or 77)
    from clip_jax.models.config import get_model_config

    text = get_model_config(model).text
    return tokenizer_for(text)(texts, context_length or text.context_length)
