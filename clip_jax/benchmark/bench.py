"""Benchmarks that print figures: ``python -m clip_jax.benchmark
{train,ab,parts,dots,max_batch,matmul,tokenizer,input,audio_input,video_input,...} ...``.

Each prints ``key: value`` lines, the headline figure last. TensorFlow is imported only
by the sub-benchmarks that need it (``tokenizer``, ``input``): the step's benchmarks need only
jax, flax and optax.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clip_jax.benchmark.memory import step_memory
from clip_jax.cpu import onednn
from clip_jax.methods import METHODS
from clip_jax.methods.losses import LOSSES
from clip_jax.models import DTYPES
from clip_jax.models.layers import ATTN_IMPLS


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

    from clip_jax.input.tf_runtime import import_tensorflow


    tf = import_tensorflow()
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

    from clip_jax.input import records

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

    from clip_jax.input import segmentation
    from clip_jax.input.pipeline import InputPipeline

    spec = args.data or (segmentation.DEFAULT_TRAIN if args.mask else "")
    if not spec:
        directory = os.path.join(tempfile.gettempdir(), "clip_jax_bench_jpeg")
        glob = os.path.join(directory, "bench-*.tfrecord")
        import glob as globlib

        if len(globlib.glob(glob)) != 8:
            write_jpeg_shards(directory, n=args.images)
        spec = "tfrecord:" + glob
    config = {"shuffle_buffer": 1000, "crop": args.crop, "resize_method": args.resize, "image_dtype": args.dtype}
    inputs = None
    if args.mask:  # the default keys plus a segmentation mask of a label set, cropped with the image
        from clip_jax.input import ops

        inputs = ops.DEFAULT_INPUTS + (ops.Wanted("mask", "mask", ("segmentation", "objects/shape", "objects/color"),
                                                  (("labels", args.mask),)),)
    pipe = InputPipeline(spec, config, global_batch_size=args.batch, image_size=args.size, train=True, inputs=inputs)
    for _ in range(args.warmup):
        next(pipe)
    start, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(args.steps):
        images += next(pipe)["image"].shape[0]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu  # every thread of the process: a figure other processes on the host barely move
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data: {spec}")
    print(f"image_size: {args.size} crop: {args.crop} resize: {args.resize} batch: {args.batch} cores: {cores}"
          + (f" mask: {args.mask}" if args.mask else ""))
    print(f"images/s: {images / seconds:,.0f} (per core: {images / seconds / cores:,.0f}; per CPU-second used: "
          f"{images / cpu:,.0f})")



def _print_figures(figures: dict) -> None:
    """One `key: value` line per figure, floats to 4 significant digits."""
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


# -- train: whole training steps, sharded as clip_jax.train shards them --------------------

def measure_matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 2.0,
                        compiler_options: dict | None = None) -> float:
    """FLOP/s of a square matmul on the default device, compiled with `compiler_options`."""
    import jax
    import jax.numpy as jnp

    from clip_jax.cpu import onednn as xla_cpu

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x).lower(a).compile(compiler_options=compiler_options or None)
    xla_cpu.keep_alive(f, compiler_options)  # destroying a oneDNN program can abort XLA:CPU
    f(a).block_until_ready()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        f(a).block_until_ready()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best


def cpu_matmul_peak(dtype: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """The CPU's peak for MFU: the faster of XLA:CPU's matmul libraries on a square matmul
    (YNNPACK, XLA's default, and oneDNN on x86, which the step may use: clip_jax.cpu.onednn)."""
    from clip_jax.cpu import onednn as xla_cpu

    libraries = xla_cpu.matmul_libraries()
    return max(measure_matmul_peak(dtype, n, seconds / len(libraries), options) for options in libraries.values())


def _synthetic_batch(model, batch: int, sharding, seed: int = 0, method=None) -> dict:
    """uint8 images (as the input pipeline feeds them) and tokens with an EOT, placed on the devices;
    with `method`, exactly its batch keys (SLIP's image_views uint8 as images, cached image
    embeddings unit-norm floats)."""
    import jax

    cfg = model.config
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.text.vocab_size - 2, (batch, cfg.text.context_length), dtype=np.int32)
    tokens[:, 0] = cfg.text.vocab_size - 2  # SOT
    lengths = rng.integers(5, cfg.text.context_length, batch)
    tokens[np.arange(batch), lengths] = cfg.text.vocab_size - 1  # EOT: the argmax the text tower pools
    tokens[np.arange(cfg.text.context_length)[None, :] > lengths[:, None]] = 0
    size = cfg.vision.image_size
    shapes = method.batch_shapes(batch) if method is not None else {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8), "tokens": None}
    out = {}
    for key, shape in shapes.items():
        if key == "tokens":
            out[key] = tokens
        elif key in ("image", "image_views"):
            out[key] = rng.integers(0, 256, shape.shape[:-3] + (size, size, 3), dtype=np.uint8)
        else:
            x = rng.normal(size=shape.shape).astype(np.float32)
            out[key] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return {k: jax.device_put(v, sharding) for k, v in out.items()}


def _host_usage() -> dict:
    """This process's CPU seconds (user, system) and minor page faults so far (Unix)."""
    try:
        import resource
    except ImportError:
        return {}
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "page_faults": float(r.ru_minflt)}


def step_config(args):
    """The run config of a benchmark step: the base config with the step's settings (the paper's
    ViT optimizer; its schedule does not change the speed)."""
    from clip_jax.config import base_config

    c = base_config()
    c.model, c.dtype, c.remat, c.scan, c.clip.loss = args.model, args.dtype, args.remat, args.scan, args.loss
    c.attn_impl = args.attn
    c.batch_size, c.accum_steps = args.batch, args.accum_steps
    c.optim.warmup_steps = 10
    c.optim.frozen = args.frozen
    c.clip.patch_dropout = args.patch_dropout
    c.method = args.method
    if args.cached_images:  # LiT from precomputed image embeddings (the batch carries them)
        c.clip.image_embeddings = "synthetic"
    if args.text_context:
        c.model_overrides = {"text_cfg": {"context_length": args.text_context}}
    return c


class BenchStep:
    """One compiled training step with its own state and batch, built as the trainer builds it."""

    def __init__(self, args, compiler_options: dict | None = None, compile: bool = True):
        import jax

        from clip_jax.cpu.onednn import keep_alive, step_compiler_options
        from clip_jax.parallel import sharding
        from clip_jax.train.build import build

        self.devices = jax.devices()[: args.devices] if args.devices else jax.devices()
        mesh_shape = dict(kv.split("=") for kv in args.mesh.split(",")) if args.mesh else {"data": -1}
        mesh = sharding.make_mesh({k: int(v) for k, v in mesh_shape.items()}, self.devices)
        self.mesh = mesh
        sharding.check_batch(args.batch // args.accum_steps, mesh)
        # The same per-host XLA options as the train CLI's step (oneDNN matmuls for float32 on Intel CPUs).
        self.step_options = step_compiler_options(args.onednn_dots, self.devices, args.dtype)
        self.run_ = build(step_config(args), mesh, compiler_options=self.step_options)
        self.state, self.step, self.model = self.run_.state, self.run_.step_fn, self.run_.model
        self.batch_sharding = self.run_.batch_sharding
        self.batch = _synthetic_batch(self.model, args.batch, self.batch_sharding, method=self.run_.method)
        self.metrics = None
        if not compile:  # traced only (bench_dots)
            return
        start = time.perf_counter()
        self.compiled = self.step.lower(self.state, self.batch).compile(compiler_options=compiler_options or None)
        keep_alive(self.compiled, {**self.step_options, **(compiler_options or {})})
        self.compile_s = time.perf_counter() - start

    def memory_at(self, batch: int) -> dict:
        """The per-device memory (``step_memory``) of this step compiled for another global batch,
        from shapes alone: nothing is allocated or run."""
        import jax

        shapes = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=self.batch_sharding)
                  for k, v in self.batch.items()}
        return step_memory(self.step.lower(self.state, shapes).compile())

    def run(self, steps: int) -> float:
        """Seconds per step of `steps` back-to-back steps (the host waits only at the end, as in training)."""
        import jax

        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return (time.perf_counter() - start) / steps


def bench_train(args) -> dict:
    import jax

    from clip_jax.cpu import allocator as host_memory
    from clip_jax.train import flops

    keep_freed = host_memory.keep_freed_memory_on_cpu() if args.keep_freed_memory else False
    train = BenchStep(args)
    compiled, devices, mesh, compile_s = train.compiled, train.devices, train.mesh, train.compile_s
    if args.warmup:
        train.run(args.warmup)
    n = len(devices)
    device = devices[0]
    peak = flops.peak_flops(device)
    times, cpu_peaks = [], []
    usage = dict.fromkeys(_host_usage(), 0.0)  # host time and faults of the timed steps only
    for _ in range(args.repeats):  # back to back, as in training: the host only waits at the end
        before = _host_usage()
        times.append(train.run(args.steps))
        after = _host_usage()
        usage = {k: v + after[k] - before[k] for k, v in usage.items()}
        if peak is None:
            # CPU: a shared host's speed drifts by 10-20% within minutes, so each repeat's MFU
            # divides by a matmul peak measured right after it, not once for the whole run.
            cpu_peaks.append(cpu_matmul_peak(args.dtype, seconds=1.0))
    usage = {k: v / (args.repeats * args.steps) for k, v in usage.items()}
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):  # TensorBoard + Perfetto
            train.run(3)
    step_s = float(np.median(times))
    # the model and config built (overrides; a video method's frames a clip)
    model_flops = flops.method_train_flops(train.model, args.batch, args.method, train.run_.config)
    if peak is not None:
        peak_total, peak_note = peak * n, f"{peak / 1e12:.0f} TFLOP/s per device ({device.device_kind}, bf16 table)"
        mfu = model_flops / step_s / peak_total
    else:  # CPU: the devices share the host's cores, so the peak is the host's measured matmul
        peak_total = float(np.median(cpu_peaks))
        peak_note = (f"{peak_total / 1e12:.3f} TFLOP/s measured {args.dtype} matmul 2048^3 on this host, "
                     "the fastest of XLA:CPU's matmul libraries "
                     f"(median; {min(cpu_peaks) / 1e12:.3f}-{max(cpu_peaks) / 1e12:.3f} after each repeat)")
        mfu = float(np.median([model_flops / t / p for t, p in zip(times, cpu_peaks)]))
    out = {
        "model": args.model, "batch": args.batch, "devices": n, "mesh": dict(mesh.shape), "dtype": args.dtype,
        "remat": args.remat, "scan": args.scan, "loss": args.loss, "frozen": args.frozen, "attn": args.attn,
        "keep_freed_memory": keep_freed,
        "host_allocator": host_memory.allocator(),
        "onednn_dots": "on" if train.step_options else "off",
        "compile_s": compile_s,
        "step_s": step_s, "step_s_min": float(min(times)), "images/s": args.batch / step_s,
        "images/s/device": args.batch / step_s / n, "model_tflop_per_step": model_flops / 1e12,
        "tflop/s": model_flops / step_s / 1e12, "peak": peak_note, "mfu": mfu,
        **step_memory(compiled),
    }
    out["patch_dropout"], out["method"] = args.patch_dropout, args.method
    out["cached_images"] = args.cached_images
    # the model-FLOP count assumes the whole step: no MFU for a partial one
    if args.frozen or args.patch_dropout or args.cached_images:
        for key in ("tflop/s", "mfu"):
            out.pop(key)
    if n == 1 or device.platform == "cpu":  # the host's own work per step: page faults show up here
        out.update({f"host_{k}_per_step": v for k, v in usage.items()})
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    _print_figures(out)
    return out


# What an `ab` variant may set: the train benchmark's options, and XLA compiler options (xla_*).
# The step's choices, read from the library (never re-typed here).
DTYPE_CHOICES = tuple(DTYPES)
LOSS_CHOICES = LOSSES.names()
ATTN_CHOICES = tuple(a for a in ATTN_IMPLS if a)
ONEDNN_CHOICES = onednn.CHOICES

VARIANT_SETTINGS = {
    "dtype": DTYPE_CHOICES,
    "remat": str,  # 'none', 'full' or a jax.checkpoint_policies name (checked when the model is built)
    "scan": bool,
    "loss": LOSS_CHOICES,
    "attn": ATTN_CHOICES,
    "onednn_dots": ONEDNN_CHOICES,
    "accum_steps": int,
    "frozen": str,  # a regex over param paths (config.optim.frozen)
    "patch_dropout": float,
    "method": str,  # checked when the step is built
    "cached_images": bool,
    "text_context": int,
}


def _literal(text: str):
    """An XLA option's value: true/false, an int, a float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """'NAME:key=value,...' -> (name, benchmark settings, XLA compiler options).

    Keys are the train benchmark's options (VARIANT_SETTINGS) or XLA debug options, named as
    in XLA_FLAGS without the dashes (xla_cpu_use_onednn=true). 'base:' is the unchanged step.
    """
    name, colon, body = spec.partition(":")
    if not colon or not name.strip():
        raise ValueError(f"variant {spec!r}: write NAME:key=value,... (e.g. 'base:' or 'full_remat:remat=full')")
    settings, options = {}, {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise ValueError(f"variant {name!r}: {item!r} is not key=value")
        if key.startswith("xla_"):
            options[key] = _literal(value)
            continue
        kind = VARIANT_SETTINGS.get(key)
        if kind is None:
            raise ValueError(f"variant {name!r}: unknown setting {key!r}; use one of {sorted(VARIANT_SETTINGS)} "
                             "or an XLA option such as xla_cpu_use_onednn=true")
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"variant {name!r}: {key}={value!r} is not one of {list(kind)}")
        elif kind is bool:
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"variant {name!r}: {key}={value!r} is not a boolean (0/1/true/false)")
            value = value.lower() in ("1", "true")
        elif kind is int:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"variant {name!r}: {key}={value!r} is not a positive integer")
            value = int(value)
        elif kind is float:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"variant {name!r}: {key}={value!r} is not a number") from None
        settings[key] = value
    return name.strip(), settings, options


def check_compiler_options(name: str, options: dict) -> None:
    """Raise ValueError if XLA does not take `options` (an unknown name or a value of the wrong
    kind), found by compiling a one-op program with them: milliseconds, where the step would
    take seconds to minutes to compile before XLA said so."""
    if not options:
        return
    import jax

    from clip_jax.cpu import onednn as xla_cpu

    try:
        probe = jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=options)
    except Exception as e:  # jax's JaxRuntimeError: INVALID_ARGUMENT
        reason = str(e).rstrip(".")
        raise ValueError(f"variant {name!r}: XLA does not take {options}: {reason}. Check the option's name "
                         "and value (XLA's options are the flags of xla/debug_options_flags.cc, without "
                         "the dashes)") from None
    xla_cpu.keep_alive(probe, options)


def _total_peak(devices, dtype: str) -> float:
    """FLOP/s of all `devices`: the table's peak per device, or on the CPU (devices sharing the
    host's cores) one matmul measurement of the host."""
    from clip_jax.train import flops

    peak = flops.peak_flops(devices[0])
    return peak * len(devices) if peak else cpu_matmul_peak(dtype, seconds=1.0)


def bench_ab(args) -> dict:
    """Variants of the training step compiled side by side in one process, their steps alternated.

    Separate runs drift with the host (10-20% within minutes on a shared CPU); alternating
    single turns of each variant in one process pairs them in time, so the paired ratio
    resolves differences of a few percent. The order flips every round, so neither variant
    always follows the other. Each variant holds its own state (params and moments), so N
    variants need N times the step's memory. MFU divides by the peak of --dtype.
    """
    from clip_jax.cpu import allocator as host_memory
    from clip_jax.train import flops

    variants = [parse_variant(spec) for spec in args.variant]  # every spec checked before any compile
    names = [name for name, _, _ in variants]
    if len(variants) < 2 or len(set(names)) != len(names):
        raise ValueError(f"ab needs at least two variants with distinct names, got {names}: "
                         "e.g. --variant=base: --variant=full_remat:remat=full")
    for name, _, options in variants:
        check_compiler_options(name, options)
    if args.keep_freed_memory:
        host_memory.keep_freed_memory_on_cpu()
    steps = {}
    for name, settings, options in variants:
        steps[name] = BenchStep(argparse.Namespace(**{**vars(args), **settings}), options)
        if args.warmup:
            steps[name].run(args.warmup)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(steps[name].run(args.steps))
    peak = _total_peak(steps[names[0]].devices, args.dtype)
    base = np.array(times[names[0]])
    out = {"model": args.model, "batch": args.batch, "devices": len(steps[names[0]].devices),
           "rounds": args.rounds, "steps_per_turn": args.steps, "peak_tflop/s": peak / 1e12,
           "host_allocator": host_memory.allocator()}
    _print_figures(out)
    results = {}
    for name, settings, options in variants:
        t = np.array(times[name])
        # a variant that skips part of the model (frozen, cached, masked) has no MFU by the full count
        partial = any(settings.get(k) for k in ("frozen", "patch_dropout", "cached_images"))
        model_flops = float("nan") if partial else flops.method_train_flops(
            steps[name].model, args.batch, settings.get("method", args.method), steps[name].run_.config)
        paired = base / t  # > 1: faster than the first variant in the same round
        results[name] = {
            "settings": {**settings, **options}, "step_s": float(np.median(t)), "step_s_min": float(t.min()),
            "images/s": args.batch / float(np.median(t)), "mfu": model_flops / float(np.median(t)) / peak,
            "speedup": float(np.median(paired)), "speedup_range": (float(paired.min()), float(paired.max())),
            "compile_s": steps[name].compile_s, **step_memory(steps[name].compiled),
        }
        for key, value in results[name].items():
            if key == "speedup_range":
                value = f"{value[0]:.3f}-{value[1]:.3f}"
            print(f"{name}.{key}: {value:.4g}" if isinstance(value, float) else f"{name}.{key}: {value}")
    best = max(names, key=lambda n: results[n]["speedup"])
    print(f"fastest: {best} ({results[best]['speedup']:.3f}x {names[0]}, median of {args.rounds} paired rounds)")
    out["variants"] = results
    return out


def bench_parts(args) -> dict:
    """Where a step's time goes: the forward pass (to the loss), forward + backward (the
    gradients) and the whole step, compiled in one process and alternated round by round.
    The backward is the second minus the first, the update (norms, clipping, the guard, AdamW)
    the third minus the second."""
    import jax
    import jax.numpy as jnp

    from clip_jax.cpu import allocator as host_memory
    from clip_jax.cpu import onednn as xla_cpu
    from clip_jax.train import flops

    if args.keep_freed_memory:
        host_memory.keep_freed_memory_on_cpu()
    train = BenchStep(args)
    # Own copies: the step donates (and so deletes) the state it is given.
    params, model_state = jax.tree_util.tree_map(jnp.copy, (train.state.params, train.state.model_state))
    rng = jax.random.key(0)

    def loss(p, batch):  # the method's loss, as the step computes it
        return train.run_.method.loss(p, model_state, batch, rng)[0]

    options = train.step_options or None  # the step's own XLA options, so the parts compare
    forward, gradients = jax.jit(loss, compiler_options=options), jax.jit(jax.grad(loss), compiler_options=options)
    xla_cpu.keep_alive((forward, gradients), options)
    parts = {"forward": lambda: forward(params, train.batch),
             "forward_backward": lambda: gradients(params, train.batch),
             "step": lambda: train.run(1)}
    for run in parts.values():  # compile and warm up
        for _ in range(max(args.warmup, 1)):
            jax.block_until_ready(run())
    times = {name: [] for name in parts}
    for r in range(args.rounds):
        for name in list(parts) if r % 2 == 0 else list(parts)[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(parts[name]())
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    median["backward"] = median["forward_backward"] - median["forward"]
    median["update"] = median["step"] - median["forward_backward"]
    train_flops = flops.clip_forward_flops(args.model, args.batch)["train_step"]
    work = {"forward": train_flops / 3, "forward_backward": train_flops, "step": train_flops,
            "backward": 2 * train_flops / 3, "update": 0.0}
    devices = len(train.devices)
    peak = _total_peak(train.devices, args.dtype)
    out = {"model": args.model, "batch": args.batch, "devices": devices, "rounds": args.rounds,
           "peak_tflop/s": peak / 1e12, "host_allocator": host_memory.allocator()}
    for name in ("forward", "backward", "forward_backward", "update", "step"):
        out[f"{name}_s"] = median[name]
        if work[name]:
            out[f"{name}_mfu"] = work[name] / median[name] / peak
    _print_figures(out)
    return out


def _time_alone(fn, args, min_runs: int = 5, min_seconds: float = 0.2) -> float:
    """Median seconds of fn(*args), compiled, over at least `min_runs` runs and `min_seconds`."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    while len(times) < min_runs or sum(times) < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_dots(args) -> dict:
    """Every matmul (dot_general, convolution) of the training step, each timed alone in its own
    jit with the step's XLA options: how fast the step could be if nothing but its matmuls took
    time. Prints each distinct matmul (how often the step runs it, its shapes, ms and FLOP/s),
    the sum per step, their FLOP-weighted speed against the peak, and `mfu_ceiling`: the
    model FLOPs (3 x forward) over that sum, the MFU of a step whose other work were free.
    Batched matmuls (the per-head attention dots) are summed apart from the dense ones. cuDNN's
    fused attention (on a GPU) is a custom call, not a matmul of the jaxpr, so it is left out."""
    import jax

    from clip_jax.cpu import onednn as xla_cpu
    from clip_jax.train import flops

    n = args.devices or jax.device_count()
    if n != 1:  # the traced step's shapes are global: per device they would be 1/n of them
        raise ValueError(f"dots times the matmuls of a one-device step, and this one has {n} devices: "
                         "pass --devices=1 (and the per-device batch as --batch)")
    step = BenchStep(args, compile=False)
    jaxpr = jax.make_jaxpr(step.step)(step.state, step.batch).jaxpr
    distinct = {}  # the step's order, first occurrence
    for eqn, times in flops.matmul_eqns(jaxpr):
        avals = tuple((v.aval.shape, v.aval.dtype) for v in eqn.invars)
        key = (eqn.primitive.name, avals, repr(sorted(eqn.params.items(), key=lambda kv: kv[0])))
        if key in distinct:
            distinct[key]["count"] += times
        else:
            distinct[key] = {"eqn": eqn, "count": times}
    options = step.step_options or None
    rng = np.random.default_rng(0)
    rows = []
    for entry in distinct.values():
        eqn = entry["eqn"]
        operands = [jax.device_put(rng.standard_normal(v.aval.shape).astype(v.aval.dtype), step.devices[0])
                    for v in eqn.invars]
        fn = jax.jit(lambda *xs, eqn=eqn: eqn.primitive.bind(*xs, **eqn.params), compiler_options=options)
        xla_cpu.keep_alive(fn, options)
        seconds = _time_alone(fn, operands)
        batched = eqn.primitive.name == "dot_general" and bool(eqn.params["dimension_numbers"][1][0])
        rows.append({"count": entry["count"], "flops": flops.eqn_flops(eqn), "s": seconds, "batched": batched,
                     "what": f"{eqn.primitive.name} "
                     + " x ".join(f"{v.aval.dtype}{list(v.aval.shape)}" for v in eqn.invars)})
    peak = _total_peak(step.devices, args.dtype)
    model_flops = flops.clip_forward_flops(args.model, args.batch)["train_step"]
    rows.sort(key=lambda r: -r["count"] * r["s"])
    for i, r in enumerate(rows[: args.top]):
        print(f"matmul_{i}: {r['count']}x {r['what']}: {r['s'] * 1e3:.3f} ms, {r['flops'] / r['s'] / 1e9:.1f} GFLOP/s")
    out = {"model": args.model, "batch": args.batch, "devices": len(step.devices), "distinct_matmuls": len(rows),
           "peak_tflop/s": peak / 1e12}
    for label, chosen in (("dense", [r for r in rows if not r["batched"]]),
                          ("batched", [r for r in rows if r["batched"]]),
                          ("all", rows)):
        seconds = sum(r["count"] * r["s"] for r in chosen)
        work = sum(r["count"] * r["flops"] for r in chosen)
        out[f"{label}_matmuls_per_step"] = sum(r["count"] for r in chosen)
        out[f"{label}_s_per_step"] = seconds
        out[f"{label}_tflop_per_step"] = work / 1e12
        if seconds:
            out[f"{label}_fraction_of_peak"] = work / seconds / peak
    out["model_tflop_per_step"] = model_flops / 1e12
    out["mfu_ceiling"] = model_flops / out["all_s_per_step"] / peak
    _print_figures(out)
    return out


def _capacity_gib(device, memory_gib: float) -> float:
    """The memory one device offers the step: --memory_gib, else what the backend reports."""
    if memory_gib:
        return memory_gib
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 2**30
    raise ValueError(f"the {device.platform} backend reports no memory limit for {device}: "
                     "pass --memory_gib=N (the memory per device to fit in)")


def largest_fitting(fits, start: int, multiple: int, limit: int) -> tuple[int, int | None]:
    """The largest batch `fits` accepts, for a `fits` that holds up to some batch and fails above.

    `start` must fit. Doubles until a batch does not fit (or would pass `limit`), then bisects in
    steps of `multiple`. Returns (largest fitting batch, smallest failing one probed; None when
    the doubling stopped at `limit`). Shared with launch/open_clip_max_batch.py, so both sides
    of the side by side are searched alike.
    """
    low, high = start, None
    while high is None:  # doubling: low fits, 2 low is the next probe
        if 2 * low > limit:
            break
        if fits(2 * low):
            low *= 2
        else:
            high = 2 * low
    if high is not None:  # bisect: low fits, high does not
        while high - low > multiple:
            mid = (low + high) // 2 // multiple * multiple
            mid = max(mid, low + multiple)
            low, high = (mid, high) if fits(mid) else (low, mid)
    return low, high


def bench_max_batch(args) -> dict:
    """The largest per-device batch whose compiled training step fits in a device's memory.

    Each probe compiles the step for a batch (XLA's memory analysis of the executable: params,
    moments, the batch and the temporaries), without running it: doubling until a batch does
    not fit, then bisecting in steps of --multiple. With --run, one real step at the answer
    confirms it (a GPU also needs workspace the analysis does not count); on an out-of-memory
    error the batch steps down by --multiple and runs again.
    """
    import jax

    if args.multiple < 1 or args.start % args.multiple:
        raise ValueError(f"--start={args.start} must be a positive multiple of --multiple={args.multiple}")
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    capacity = _capacity_gib(devices[0], args.memory_gib)  # before any compile
    n = len(devices)
    train = BenchStep(argparse.Namespace(**{**vars(args), "batch": args.start * n}))
    probes = {}

    def fits(per_device: int) -> bool:
        if per_device not in probes:
            probes[per_device] = train.memory_at(per_device * n)["memory_gib"]
            print(f"probe: batch/device={per_device} memory_gib={probes[per_device]:.4g} "
                  f"fits={probes[per_device] <= capacity}", flush=True)
        return probes[per_device] <= capacity

    if not fits(args.start):
        raise ValueError(f"batch {args.start} per device already needs {probes[args.start]:.3g} GiB of "
                         f"{capacity:.3g}: use a smaller --start, --remat=full, --scan or an fsdp mesh")
    low, high = largest_fitting(fits, args.start, args.multiple, args.limit)
    out = {"model": args.model, "dtype": args.dtype, "remat": args.remat, "scan": args.scan, "devices": n,
           "capacity_gib": capacity, "max_batch_per_device": low, "max_global_batch": low * n,
           "memory_gib": probes[low], "probes": len(probes), "at_limit": high is None}
    if args.run:
        # Each try builds its own state: drop the probes' (and a failed try's) first, or the
        # device would hold two copies of the params and moments.
        train = step = None
        while True:
            try:
                step = BenchStep(argparse.Namespace(**{**vars(args), "batch": low * n}))
                step.run(1)
                out["ran_step_s"] = step.run(1)
                break
            except Exception as e:  # noqa: BLE001 (XLA raises its own error types for OOM)
                step = None
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                if low <= args.multiple:
                    raise
                low -= args.multiple
                print(f"ran out of memory; stepping down to batch/device={low}", flush=True)
        out["max_batch_per_device"], out["max_global_batch"] = low, low * n
    _print_figures(out)
    return out


def bench_matmul(args) -> None:
    from clip_jax.cpu import onednn as xla_cpu

    print(f"matmul: {args.n}^3 {args.dtype}")
    peaks = {name: measure_matmul_peak(args.dtype, args.n, compiler_options=options)
             for name, options in xla_cpu.matmul_libraries().items()}
    for name, peak in peaks.items():
        print(f"tflop/s_{name}: {peak / 1e12:.4g}")
    print(f"tflop/s: {max(peaks.values()) / 1e12:.4g}")

def _step_options(p) -> None:
    """The options of the training step that train, ab and parts build (as clip_jax.train builds it)."""
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="compute dtype")
    p.add_argument("--loss", default="softmax", choices=LOSS_CHOICES)
    p.add_argument("--frozen", default="", help="params to freeze, a regex over param paths (config.optim.frozen)")
    p.add_argument("--patch_dropout", type=float, default=0.0, help="FLIP: share of patch tokens dropped (ViTs)")
    p.add_argument("--text_context", type=int, default=0,
                   help="the text tower's context length over the preset's (LiT's texts: 16); 0 keeps it")
    p.add_argument("--method", default="clip", choices=METHODS.names(), help="the training method (config.method)")
    p.add_argument("--cached_images", action="store_true",
                   help="LiT from precomputed image embeddings (config.clip.image_embeddings; needs "
                        "--frozen='visual/.*')")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action="store_true", help="scan the Transformer layers")
    p.add_argument("--attn", default="auto", choices=ATTN_CHOICES,
                   help="attention kernel "
                   "(auto: cuDNN fused on NVIDIA GPUs in bf16, lengths padded to x8; XLA elsewhere)")
    p.add_argument("--mesh", default="", help="e.g. data=-1,fsdp=1,tensor=1 (default: data over all devices)")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (default: all)")
    p.add_argument("--onednn_dots", default="auto", choices=ONEDNN_CHOICES,
                   help="XLA:CPU matmuls through oneDNN "
                   "(auto: float32 steps on one Intel CPU device; clip_jax.cpu.onednn)")
    p.add_argument("--keep_freed_memory", type=int, default=1, choices=[0, 1],
                   help="on the CPU under glibc, reuse freed host memory across steps (clip_jax.cpu.allocator)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m clip_jax.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="whole training steps on synthetic inputs: images/s, MFU, memory per device")
    _step_options(p)
    p.add_argument("--accum_steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 3 more steps here")
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("ab", help="variants of the training step in one process, steps alternated: paired speedups")
    p.add_argument("--variant", action="append", default=[], required=True,
                   help="NAME:key=value,... (repeat; the first is the baseline). Keys: "
                        + ", ".join(VARIANT_SETTINGS) + ", or XLA options xla_*=value")
    _step_options(p)
    p.add_argument("--accum_steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8, help="rounds; each runs every variant once, order flipped")
    p.add_argument("--steps", type=int, default=1, help="back-to-back steps per turn")
    p.add_argument("--warmup", type=int, default=3)
    p.set_defaults(fn=bench_ab)
    p = sub.add_parser("parts", help="forward, forward+backward and the whole step alternated: where the time goes")
    _step_options(p)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.set_defaults(fn=bench_parts, accum_steps=1)
    p = sub.add_parser("dots", help="every matmul of the step timed alone: the step's time if nothing else took any")
    _step_options(p)
    p.add_argument("--top", type=int, default=25, help="print this many matmuls, dearest per step first")
    p.set_defaults(fn=bench_dots, accum_steps=1)
    p = sub.add_parser("max_batch", help="the largest per-device batch whose compiled step fits in memory")
    _step_options(p)
    p.add_argument("--memory_gib", type=float, default=0.0,
                   help="memory per device to fit in (default: the backend's limit; required on the CPU)")
    p.add_argument("--multiple", type=int, default=8, help="batch sizes probed are multiples of this")
    p.add_argument("--start", type=int, default=8, help="first per-device batch probed")
    p.add_argument("--limit", type=int, default=1 << 16, help="stop doubling past this per-device batch")
    p.add_argument("--run", action="store_true", help="confirm the answer by running one step at it")
    p.set_defaults(fn=bench_max_batch, accum_steps=1, batch=0)
    p = sub.add_parser("matmul", help="FLOP/s of a square matmul (the CPU's peak for MFU)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(fn=bench_matmul)
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
    p.add_argument("--mask", default="", choices=["", "shape", "color", "combo"],
                   help="also make the batch key 'mask' of this label set (default: the embedded scenes)")
    p.set_defaults(fn=bench_input)
    from clip_jax.benchmark import adapt, audio, box_ops, video

    adapt.add_parser(sub)
    audio.add_parser(sub)
    box_ops.add_parser(sub)
    video.add_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)
