"""The audio op's throughput: ``python -m clip_jax.benchmark audio_input`` reads 5 s clips at 44.1 kHz stored as
16-bit WAV in TFRecords (written once to /tmp) through the training pipeline with op 'audio' (decode + fit +
AudioCLIP's augmentation) and prints clips/s, per core and per CPU-second used."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def write_wav_shards(directory: str, n: int, seconds: float, rate: int, shards: int = 4, seed: int = 0) -> str:
    """TFRecords of noisy tones as 16-bit mono WAV clips, lengths within 10% of `seconds`."""
    from clip_jax.input import audio, records

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = records.ShardWriter(os.path.join(directory, "bench"), shards)
    for i in range(n):
        t = np.arange(int(seconds * rate * rng.uniform(0.9, 1.1))) / rate
        clip = 0.5 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        example = tf.train.Example(features=tf.train.Features(feature={
            "audio": tf.train.Feature(bytes_list=tf.train.BytesList(value=[audio.wav_bytes(clip, rate)])),
            records.CAPTION: tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"tone {i}".encode()])),
        }))
        writer.write(example.SerializeToString())
    writer.close()
    return os.path.join(directory, "bench-*.tfrecord")


def bench_audio_input(args) -> None:
    import glob

    from clip_jax.input import ops
    from clip_jax.input.pipeline import InputPipeline

    spec = args.data
    if not spec:
        directory = os.path.join(tempfile.gettempdir(), f"clip_jax_bench_wav_{args.clips}_{args.rate}")
        pattern = os.path.join(directory, "bench-*.tfrecord")
        if len(glob.glob(pattern)) != 4:
            write_wav_shards(directory, args.clips, args.seconds, args.rate)
        spec = "tfrecord:" + pattern
    samples = int(args.seconds * args.rate)
    options = (("augment", not args.no_augment), ("channels", 1), ("rate", args.rate), ("samples", samples))
    config = {"shuffle_buffer": 256, "threads": args.threads}
    pipe = InputPipeline(spec, config, global_batch_size=args.batch, image_size=8, train=True,
                         inputs=(ops.Wanted("audio", "audio", ("audio",), options),))
    for _ in range(args.warmup):
        next(pipe)
    start, cpu = time.perf_counter(), time.process_time()
    clips = sum(next(pipe)["audio"].shape[0] for _ in range(args.steps))
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    cores = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"data: {spec}")
    print(f"clip: {args.seconds} s at {args.rate} Hz, mono, augment: {not args.no_augment}, batch: {args.batch}, "
          f"cores: {cores}")
    print(f"clips/s: {clips / seconds:,.0f} (per core: {clips / seconds / cores:,.0f}; per CPU-second used: "
          f"{clips / cpu:,.0f})")


def add_parser(sub) -> None:
    p = sub.add_parser("audio_input", help="decode + fit + augment audio clips/s from WAV TFRecords (op 'audio')")
    p.add_argument("--data", default="", help="a data spec with 'audio'; default: synthetic WAV TFRecords in /tmp")
    p.add_argument("--clips", type=int, default=512, help="synthetic clips written")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="tf.data's thread pool (0: shared; cores = all)")
    p.add_argument("--no_augment", action="store_true", help="decode + fit only")
    p.set_defaults(fn=bench_audio_input)
