"""Few-shot adaptation steps: seconds per step, images/s and the compiled step's memory per
device, for each method at each batch size, side by side in one process (random weights and
images: the cost, not the accuracy).

    python -m clip_jax.benchmark adapt --model=ViT-B-16 --classes=100 --batches=1,8,32 \
        --methods=coop,cocoop,maple,clip_adapter,tip_adapter_f
"""

from __future__ import annotations

import time

import jax
import numpy as np


def bench_adapt(args) -> list:
    from clip_jax.adapt.config import adapt_config, method_config
    from clip_jax.adapt.method import build_adaptation, row_weights, towers_variables
    from clip_jax.adapt.methods import make_adapter
    from clip_jax.adapt.train import Runner, make_optimizer
    from clip_jax.benchmark.memory import step_memory
    from clip_jax.models import create_model, init_variables
    from clip_jax.parallel.sharding import make_mesh

    model = create_model(args.model, dtype=args.dtype)
    runner = Runner(adapt_config(), model, init_variables(model, jax.random.key(0)), make_mesh({"data": -1}))
    classnames = [f"class {i}" for i in range(args.classes)]
    prompts = [[f"a photo of a {n}."] for n in classnames]
    size = model.config.vision.image_size
    rows = []
    for method in args.methods.split(","):
        settings = method_config(method)
        if method == "maple":
            depth = min(model.config.text.layers, model.config.vision.layers)
            settings.prompt_depth = min(int(settings.prompt_depth), depth)
        adapter = make_adapter(settings, runner.model, runner.variables, classnames, prompts)
        if method.startswith("tip"):
            n = args.classes * 2
            adapter.build_cache(np.random.default_rng(0).standard_normal((1, n, model.config.embed_dim)),
                                np.arange(n) % args.classes)
        optimizer, _ = make_optimizer(settings, 10, 10)
        for batch in (int(b) for b in args.batches.split(",")):
            # the trainer's step: the towers a frozen group of its state (a fresh one each time: it is donated)
            run = build_adaptation(adapter, optimizer, runner.variables, runner.mesh, crop_scale=settings.crop_scale,
                                   seed=0)
            n = runner.pad(batch)
            data = {"image": runner.shard(np.random.default_rng(1).integers(0, 256, (n, size, size, 3), np.uint8)),
                    "label": runner.shard(np.arange(n, dtype=np.int32) % args.classes),
                    "weight": runner.shard(row_weights(batch, n))}
            state = run.state
            compiled = run.step_fn.lower(state, data).compile()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - start) / args.steps)
            runner.variables = adapter.variables = towers_variables(state.params, state.model_state)
            seconds = float(np.median(times))
            row = {"method": method, "batch": batch, "classes": args.classes, "s_per_step": seconds,
                   "images_per_s": batch / seconds, **step_memory(compiled)}
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="few-shot adaptation steps per method and batch: s/step, images/s, memory")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--classes", type=int, default=100, help="classes (CoCoOp's memory grows with them)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--methods", default="coop,cocoop,maple,clip_adapter,tip_adapter_f")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=bench_adapt)
