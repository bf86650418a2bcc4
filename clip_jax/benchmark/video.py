"""The frames op's throughput: ``python -m clip_jax.benchmark video_input`` reads clips of 8 PNG frames of 64 px
(the embedded clips' drawing, written once to /tmp) through the input pipeline with op 'frames', in training
(TSN random sampling, random resized crop, one flip per clip) and at evaluation (uniform sampling, centre crop),
and prints clips/s, per core and per CPU-second used."""

from __future__ import annotations

import os
import tempfile
import time


def _rate(spec: str, args, train: bool) -> tuple:
    """(clips/s, clips per CPU-second) of the pipeline in one mode."""
    from clip_jax.input import ops
    from clip_jax.input.pipeline import InputPipeline

    options = (("flip", train), ("frames", args.frames), ("sampling", "random" if train else "uniform"))
    config = {"shuffle_buffer": 256, "threads": args.threads, "image_dtype": args.dtype}
    pipe = InputPipeline(spec, config, global_batch_size=args.batch, image_size=args.size, train=train,
                         inputs=(ops.Wanted("frames", "frames", ("frames",), options),))
    try:
        for _ in range(args.warmup):
            next(pipe)
        start, cpu = time.perf_counter(), time.process_time()
        clips = sum(next(pipe)["frames"].shape[0] for _ in range(args.steps))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        pipe.close()
    return clips / seconds, clips / cpu


def bench_video_input(args) -> None:
    import glob

    spec = args.data
    if not spec:
        directory = os.path.join(tempfile.gettempdir(), f"clip_jax_bench_clips_{args.clips}_{args.stored}")
        pattern = os.path.join(directory, "bench-*.tfrecord")
        if len(glob.glob(pattern)) != 4:
            from clip_jax.input import video

            video.write_embedded_clips(os.path.join(directory, "bench"), args.clips, args.stored, shards=4)
        spec = "tfrecord:" + pattern
    cores = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"data: {spec}")
    print(f"clip: {args.frames} frames of {args.size} px ({args.dtype}), batch: {args.batch}, cores: {cores}")
    for mode in args.modes.split(","):
        per_s, per_cpu = _rate(spec, args, mode == "train")
        what = "random sampling + random resized crop + flip" if mode == "train" else "uniform sampling + centre crop"
        print(f"{mode} ({what}): clips/s: {per_s:,.0f} (per core: {per_s / cores:,.0f}; per CPU-second used: "
              f"{per_cpu:,.0f})")


def add_parser(sub) -> None:
    p = sub.add_parser("video_input", help="sample + decode + crop clips/s from TFRecords of frames (op 'frames')")
    p.add_argument("--data", default="", help="a data spec with 'frames'; default: embedded clips as TFRecords in /tmp")
    p.add_argument("--clips", type=int, default=512, help="clips written")
    p.add_argument("--stored", type=int, default=64, help="the written frames' size (px)")
    p.add_argument("--frames", type=int, default=8, help="T: frames per clip")
    p.add_argument("--size", type=int, default=64, help="the model's image size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "uint8"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="tf.data's thread pool (0: shared; cores = all)")
    p.add_argument("--modes", default="train,eval", help="comma-separated: train, eval")
    p.set_defaults(fn=bench_video_input)
