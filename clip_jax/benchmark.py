"""Benchmarks that print figures: ``python -m clip_jax.benchmark tokenizer [--captions=N]``.

Each prints ``key: value`` lines, the headline figure last. TensorFlow is imported only
by the sub-benchmarks that need it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """Alt-text-like captions: Zipf-distributed words of the CLIP vocab, digits, punctuation, casing."""
    from clip_jax.tokenizers import get_tokenizer

    tok = get_tokenizer()
    words = [tok.decode([i]) for i in range(256 * 2, 30000) if tok.decoder[i].endswith("</w>")]
    words = [w for w in words if w.isalpha()]
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.2, size=(n, 40)) - 1, len(words) - 1)
    lengths = rng.integers(3, 40, size=n)
    out = []
    for i in range(n):
        caption = " ".join(words[r] for r in ranks[i, : lengths[i]])
        if rng.random() < 0.3:
            caption = caption.capitalize() + f", {rng.integers(1, 2030)}!"
        out.append(caption)
    return out


def bench_tokenizer(args) -> None:
    from clip_jax.tokenizers import ClipTokenizer

    captions = synthetic_captions(args.captions)
    n_tokens = None
    for label, tok in (("cold cache", ClipTokenizer()), ("warm cache", None)):
        tok = tok or warm
        start = time.perf_counter()
        ids = tok(captions)
        seconds = time.perf_counter() - start
        warm = tok
        n_tokens = int((ids != 0).sum())
        print(f"python {label}: {args.captions / seconds:,.0f} captions/s ({n_tokens / seconds:,.0f} tokens/s)")

    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(args.threads or 0)
    # Steady state of a long pipeline: the tokenizer's word cache is warm.
    ds = tf.data.Dataset.from_tensor_slices(captions).batch(args.batch).map(
        warm.tf_tokenize, num_parallel_calls=tf.data.AUTOTUNE
    )
    for _ in ds.take(1):  # build the graph
        pass
    start = time.perf_counter()
    count = sum(int(b.shape[0]) for b in ds)
    seconds = time.perf_counter() - start
    print(f"tf.data batch {args.batch}: {count / seconds:,.0f} captions/s")
    print(f"captions/s: {count / seconds:,.0f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="CLIP BPE captions/s, in Python and inside tf.data")
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(fn=bench_tokenizer)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
