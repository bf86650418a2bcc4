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

import difflib
import functools
import gzip
import html
import os
import re
import string
import unicodedata
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


class _Provenance:
    """A transformed text and, for each of its characters, the [start, end) span of the original text it
    came from: what lets a tokenizer that cleans its input give offsets into the caller's string."""

    def __init__(self, text: str, start: list | None = None, end: list | None = None):
        self.text = text
        self.start = list(range(len(text))) if start is None else start
        self.end = list(range(1, len(text) + 1)) if end is None else end

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Original span of characters [a, b) of this text (b > a)."""
        return min(self.start[a:b]), max(self.end[a:b])

    def sub(self, pattern, repl) -> "_Provenance":
        """pattern.sub(repl, text), each replacement's characters tracing to the whole match."""
        text, start, end, pos = [], [], [], 0
        for m in pattern.finditer(self.text):
            a, b = m.span()
            if a == b:
                continue
            text.append(self.text[pos:a])
            start += self.start[pos:a]
            end += self.end[pos:a]
            new = repl(m) if callable(repl) else repl
            s, e = self.span(a, b)
            text.append(new)
            start += [s] * len(new)
            end += [e] * len(new)
            pos = b
        text.append(self.text[pos:])
        return _Provenance("".join(text), start + self.start[pos:], end + self.end[pos:])

    def map_chars(self, per_char, whole) -> "_Provenance":
        """whole(text), traced character by character through per_char, then aligned by difflib where the
        two differ (str.lower's final sigma, NFD's reordering of combining marks)."""
        pieces = [per_char(c) for c in self.text]
        start = [s for p, s in zip(pieces, self.start) for _ in p]
        end = [e for p, e in zip(pieces, self.end) for _ in p]
        out, new = _Provenance("".join(pieces), start, end), whole(self.text)
        return out if out.text == new else out.align(new)

    def strip(self) -> "_Provenance":
        a = len(self.text) - len(self.text.lstrip())
        b = len(self.text.rstrip())
        return _Provenance(self.text[a:b], self.start[a:b], self.end[a:b]) if b > a else _Provenance("", [], [])

    def align(self, new: str) -> "_Provenance":
        """Provenance of an arbitrary rewrite (ftfy's repairs): unchanged runs keep theirs, each changed
        run traces to the whole run it replaced (an insertion to its neighbour)."""
        start, end = [], []
        for op, a, b, c, d in difflib.SequenceMatcher(None, self.text, new, autojunk=False).get_opcodes():
            if op == "equal":
                start += self.start[a:b]
                end += self.end[a:b]
            elif d > c:
                lo, hi = (a, b) if b > a else (max(a - 1, 0), min(a + 1, len(self.text)))
                s, e = self.span(lo, hi) if hi > lo else (0, 0)
                start += [s] * (d - c)
                end += [e] * (d - c)
        return _Provenance(new, start, end)


def _unescape(p: _Provenance) -> _Provenance:
    """html.unescape with provenance: its own pattern and replacement (CPython's), checked against it."""
    if "&" not in p.text:
        return p
    want = html.unescape(p.text)
    pattern, replace = getattr(html, "_charref", None), getattr(html, "_replace_charref", None)
    if pattern is not None and replace is not None:
        out = p.sub(pattern, replace)
        if out.text == want:
            return out
    return p.align(want)


def clean_text_with_offsets(text: str) -> _Provenance:
    """clean_text(text) with each cleaned character's span in ``text``."""
    p = _Provenance(text)
    if not _ftfy_is_identity(text):
        import ftfy

        p = p.align(ftfy.fix_text(text))
    p = _unescape(_unescape(p)).strip()
    p = p.sub(_whitespace_run(), " ").strip()
    return p.map_chars(str.lower, str.lower)


@functools.lru_cache(maxsize=1)
def _whitespace_run():
    import regex

    return regex.compile(r"\s+")


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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode(text) and each id's [start, end) character span in ``text`` (not the cleaned text).

        A token covers the original characters its bytes came from: several tokens share a character
        whose UTF-8 bytes BPE split, and a character lower-casing or ftfy expanded gives its span to each
        piece. Whitespace, and what the cleaning drops or rewrites away, map to no token.
        """
        p = clean_text_with_offsets(text)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for m in self.word_pattern.finditer(p.text):
            word = m.group()
            byte_char = [i for i, c in enumerate(word) for _ in c.encode("utf-8")]
            pos = 0
            for i in self._word_ids(word):
                symbol = self.decoder[i]
                n = len(symbol) - (4 if symbol.endswith("</w>") else 0)
                ids.append(i)
                offsets.append(p.span(m.start() + byte_char[pos], m.start() + byte_char[pos + n - 1] + 1))
                pos += n
        return ids, offsets

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


@functools.lru_cache(maxsize=None)
def _bert_regex(pattern: str):
    """An RE2 pattern of the in-graph path compiled by Python's regex module (which spells \\x{HHHH} \\UHHHHHHHH)."""
    import regex

    return regex.compile(re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08X}", pattern))


def _bert_words(text: str) -> list[tuple[int, int]]:
    """[start, end) of BERT's words in cleaned text: runs between whitespace and split characters, and each
    split character (tf_text.regex_split with the delimiters kept that ``_wordpieces`` uses)."""
    words, pos = [], 0
    for m in _bert_regex(r"\s+|(" + _BERT_SPLIT + ")").finditer(text):
        if m.start() > pos:
            words.append((pos, m.start()))
        if m.group(1) is not None:
            words.append(m.span())
        pos = m.end()
    if pos < len(text):
        words.append((pos, len(text)))
    return words


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
        self._vocab = vocab
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(list(vocab)), tf.constant(list(vocab.values()), tf.int64)),
            default_value=-1)
        # No vocab entry is longer than this, so longer prefixes need no lookup (only a speed-up).
        longest = max(len(t[2:] if t.startswith("##") else t) for t in tokens)
        self._longest = longest
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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids tf_tokenize gives between [CLS] and [SEP] (untruncated), in Python, with each id's
        [start, end) character span in ``text``.

        The same steps as ``_wordpieces`` with Python's Unicode tables (str.lower, unicodedata, the regex
        module) where TF uses ICU and RE2. A piece of a word covers the original characters it came from
        (an accented letter gives its span to the unaccented one); an [UNK] word covers the whole word.
        Whitespace and what the cleaning drops (control and format characters, accents' combining marks)
        map to no token.
        """
        p = _Provenance(text).sub(_bert_regex(_BERT_DROP), "").sub(_bert_regex(_BERT_SPACE), " ")
        if self.lower_case:
            p = p.map_chars(str.lower, str.lower)
            nfd = functools.partial(unicodedata.normalize, "NFD")
            p = p.map_chars(nfd, nfd).sub(_bert_regex(r"\p{Mn}"), "")
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in _bert_words(p.text):
            word = p.text[a:b]
            pieces = None if b - a > _BERT_MAX_WORD_CHARS else self._word_pieces(word)
            if pieces is None:
                ids.append(self.unk_id)
                offsets.append(p.span(a, b))
                continue
            for i, (s, e) in pieces:
                ids.append(i)
                offsets.append(p.span(a + s, a + e))
        return ids, offsets

    def _word_pieces(self, word: str):
        """Greedy longest-match-first pieces of one word as [(id, (start, end))], None if some rest has none."""
        pieces, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._longest), start, -1):
                i = self._vocab.get(word[start:end] if start == 0 else "##" + word[start:end])
                if i is not None:
                    pieces.append((i, (start, end)))
                    start = end
                    break
            else:
                return None
        return pieces

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
