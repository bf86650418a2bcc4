"""Benchmarks that print figures: ``python -m clip_jax.benchmark {tokenizer,input} ...``.

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
    warm = ClipTokenizer()
    for label in ("cold cache", "warm cache"):  # the first pass fills the word cache
        start = time.perf_counter()
        ids = warm(captions)
        seconds = time.perf_counter() - start
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


def write_jpeg_shards(directory: str, n: int = 2000, shards: int = 8, seed: int = 0) -> str:
    """JPEG TFRecords like web data: ~400x300 photos-ish (smooth gradients + noise), q90."""
    import io
    import os

    from PIL import Image

    from clip_jax import records

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = synthetic_captions(n, seed)
    writer = records.ShardWriter(os.path.join(directory, "bench"), shards)
    yy, xx = np.mgrid[0:300, 0:400]
    for i in range(n):
        h, w = int(rng.integers(240, 300)), int(rng.integers(320, 400))
        base = (np.sin(xx[:h, :w] / rng.uniform(10, 60))[..., None] * rng.uniform(40, 120, 3)
                + np.cos(yy[:h, :w] / rng.uniform(10, 60))[..., None] * rng.uniform(40, 120, 3) + 128)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        writer.write(records.serialize_example(buf.getvalue(), captions[i], key=str(i)))
    writer.close()
    return os.path.join(directory, "bench-*.tfrecord")


def bench_input(args) -> None:
    import os
    import tempfile

    from clip_jax.input_pipeline import InputPipeline

    spec = args.data
    if not spec:
        directory = os.path.join(tempfile.gettempdir(), "clip_jax_bench_jpeg")
        glob = os.path.join(directory, "bench-*.tfrecord")
        import glob as globlib

        if len(globlib.glob(glob)) != 8:
            write_jpeg_shards(directory, n=args.images)
        spec = "tfrecord:" + glob
    config = {"shuffle_buffer": 1000, "crop": args.crop, "resize_method": args.resize, "image_dtype": args.dtype}
    pipe = InputPipeline(spec, config, global_batch_size=args.batch, image_size=args.size, train=True)
    for _ in range(args.warmup):
        next(pipe)
    start = time.perf_counter()
    images = 0
    for _ in range(args.steps):
        images += next(pipe)["image"].shape[0]
    seconds = time.perf_counter() - start
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data: {spec}")
    print(f"image_size: {args.size} crop: {args.crop} resize: {args.resize} batch: {args.batch} cores: {cores}")
    print(f"images/s: {images / seconds:,.0f} (per core: {images / seconds / cores:,.0f})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="CLIP BPE captions/s, in Python and inside tf.data")
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(fn=bench_tokenizer)
    p = sub.add_parser("input", help="decode + augment + tokenize images/s from JPEG TFRecords")
    p.add_argument("--data", default="", help="a data spec; default: synthetic JPEG TFRecords in /tmp")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--crop", default="random_resized", choices=["random_resized", "random"])
    p.add_argument("--resize", default="bicubic", choices=["bicubic", "bilinear"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "uint8"])
    p.set_defaults(fn=bench_input)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
