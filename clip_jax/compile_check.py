"""Compile the trainer's own step for a Cloud TPU topology on this host, and report what it needs.

    python -m clip_jax.compile_check --config=configs/clip_paper.py:ViT-L-14 --topology=v5e:16x16 \
        [--config.mesh.fsdp=4 --config.remat=full ...] [--loss_only] [--json]

Nothing runs and no accelerator is needed: libtpu (`pip install -e ".[tpu]"`) describes the
topology's devices, the step is built as the trainer builds it (clip_jax.train.build, abstract)
over a mesh of those devices, lowered and compiled ahead of time, and the TPU compiler's plan is
printed one `key: value` a line: per-chip memory, whether it fits, the FLOPs and the collectives.
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
import warnings
from typing import Optional

# Per-chip HBM (GiB) by device kind as Cloud lists it, and what a program may use: the limit the
# TPU compiler states in its refusals. `fits` compares a program's total with the limit.
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v6 lite": 32.0}
LIMIT_GIB = {"TPU v4": 30.75, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v5p": 95.74}
INSTALL = 'libtpu is not installed: pip install -e ".[tpu]" (or pip install "jax[tpu]==<installed jax>")'
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as 'v5e:16x16' or 'v4:4x4x8' (v4 and v5p as megacore:
    one device per chip, as jax sees them on the hardware)."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to read here
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several checks at once: no chip is claimed
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL) from None
    from jax.experimental import topologies

    kind = name.split(":")[0]
    options = {"chip_config_name": "megacore"} if kind in ("v4", "v5p") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices)
    except Exception as e:  # noqa: BLE001  (libtpu's errors are plain runtime errors)
        raise ValueError(f"libtpu cannot describe TPU topology {name!r} ({str(e).splitlines()[0]}): names are "
                         "GENERATION:CHIPS, e.g. v5e:2x2, v5e:16x16, v4:4x4x8, v5p:4x4x8, v6e:8x8") from None


def collectives(hlo_text: str) -> dict:
    """{kind: (count, bytes)} of the compiled program's collectives; bytes are each op's largest
    result array. Each op counts once where it sits in the program: an op in a loop body (the
    scanned layers) counts once, not once per iteration."""
    out: dict = collections.defaultdict(lambda: [0, 0])
    pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
                 for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += max(sizes, default=0)
    return {k: tuple(v) for k, v in sorted(out.items())}


def _refusal(message: str) -> Optional[dict]:
    """Figures from the TPU compiler's out-of-memory refusal, or None for another error."""
    if "exceeds available" not in message and "Ran out of memory" not in message:
        return None
    gib = lambda text: float(text[:-1]) * {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}.get(text[-1], 2**-30)  # noqa: E731
    out = {}
    m = re.search(r"HLO temporaries \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)", message)
    if m:
        out = {"temp_gib": gib(m.group(1)), "limit_gib": gib(m.group(2))}
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if m:
        out = {"used_gib": gib(m.group(1)), "limit_gib": gib(m.group(2))}
    return out


def advice(config) -> str:
    """What to try when the step does not fit, cheapest recompute first."""
    tips = []
    if config.remat == "none":
        tips.append("--config.remat=dots_with_no_batch_dims_saveable (or full)")
    elif config.remat != "full":
        tips.append("--config.remat=full")
    if config.mesh.fsdp == 1:
        tips.append("split the params and moments over the chips: --config.mesh.data=1 --config.mesh.fsdp=-1")
    tips.append(f"a smaller batch per chip: --config.accum_steps={2 * config.accum_steps} (same global batch), "
                "or a smaller --config.batch_size")
    if config.clip.loss == "softmax" and config.batch_size >= 65_536:
        tips.append("--config.clip.loss=softmax_ring (the same loss; the gathered [batch per chip, global batch] "
                    "logits grow with the global batch, the ring's do not)")
    return "; ".join(tips)


def compile_check(config, topology: str, devices: Optional[list] = None) -> dict:
    """Build, lower and compile the step of `config` for `topology`; the report as a dict."""
    import jax

    from clip_jax.parallel import sharding
    from clip_jax.train import flops
    from clip_jax.train.build import build

    devices = devices if devices is not None else topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    sharding.check_batch(config.batch_size // config.accum_steps, mesh)
    if config.batch_size % config.accum_steps:
        raise ValueError(f"config.batch_size={config.batch_size} does not split into config.accum_steps="
                         f"{config.accum_steps} microbatches")
    run = build(config, mesh, abstract=True)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
             for k, v in run.method.batch_shapes(config.batch_size).items()}
    kind = devices[0].device_kind
    report = {
        "topology": topology, "devices": len(devices), "device_kind": kind,
        "mesh": " x ".join(f"{a}={n}" for a, n in mesh.shape.items()),
        "global_batch": config.batch_size, "per_device_batch": config.batch_size // sharding.batch_devices(mesh),
        "accum_steps": config.accum_steps, "model": config.model, "method": config.method,
        "loss": config.clip.loss,
        "remat": config.remat, "dtype": config.dtype, **_hbm(kind),
    }
    report.update(_compile(run.step_fn, (run.state, batch), report["limit_gib"]))
    for i, phase in enumerate(run.phases[1:], 1):  # each later phase's program (FLIP's keeps every token)
        later = run if i in run.step_fns else build(config, mesh, abstract=True, phase=i)
        checked = _compile(later.step_fns[i], (later.state, batch), report["limit_gib"])
        report.update({f"{phase.name}_{k}": checked[k] for k in ("temp_gib", "fits", "compile_s") if k in checked})
        report["fits"] = report["fits"] and checked["fits"]
    if not report["fits"]:
        report["advice"] = advice(config)
    if "argument_gib" in report:
        # The compiled count sees each loop body once (scanned layers, accumulation); the model's own
        # matmul FLOPs per chip (3 x forward, no remat; SLIP's extra image passes) compare across settings.
        train_step = flops.method_train_flops(run.model, config.batch_size, config.method, config)
        report["model_flops_per_chip"] = train_step / len(devices)
    return report


def compile_adapt(settings, topology: str, classes: int = 1000, devices: Optional[list] = None) -> dict:
    """A few-shot adaptation step (configs/adapt/METHOD.py with its config.model, config.batch_size,
    config.mesh) over `classes` classes, compiled for `topology`: the trainer's one step with the
    frozen towers a frozen parameter group laid out by their logical axes, the batch over the data
    axes, the learned tensors replicated."""
    import jax
    import numpy as np

    from clip_jax.adapt.method import build_adaptation
    from clip_jax.adapt.methods import make_adapter
    from clip_jax.adapt.train import make_optimizer
    from clip_jax.models import create_model, variable_shapes
    from clip_jax.parallel import sharding

    if not settings.model:
        raise ValueError("set --config.model=NAME: the architecture the adaptation runs on")
    devices = devices if devices is not None else topology_devices(topology)
    mesh = sharding.make_mesh(settings.mesh.to_dict(), devices)
    model = create_model(settings.model, dtype=settings.dtype, remat=settings.remat)
    # The adapter is built on the host with random weights (its constants: word embeddings, the
    # frozen classifier); the compiled step takes the weights as an input.
    host = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(model))
    names = [f"class {i}" for i in range(classes)]
    adapter = make_adapter(settings, model, host, names, [[f"a photo of a {n}."] for n in names])
    if hasattr(adapter, "build_cache"):
        shots = int(settings.shots)
        adapter.build_cache(np.zeros((1, classes * shots, model.config.embed_dim), np.float32),
                            np.arange(classes * shots) % classes)
    optimizer, _ = make_optimizer(settings, 10, 10)
    variables = jax.tree_util.tree_map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                                       variable_shapes(model), sharding.variable_shardings(model, mesh))
    accum = int(settings.accum_steps)
    unit = sharding.batch_devices(mesh) * accum
    batch = -(-int(settings.batch_size) // unit) * unit
    run = build_adaptation(adapter, optimizer, variables, mesh, crop_scale=settings.crop_scale,
                           seed=int(settings.seed), accum_steps=accum, abstract=True)
    batch_args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
                  for k, v in run.method.batch_shapes(batch).items()}
    kind = devices[0].device_kind
    report = {"topology": topology, "devices": len(devices), "device_kind": kind, "method": settings.method,
              "model": settings.model, "classes": classes, "mesh": dict(mesh.shape), "global_batch": batch,
              "dtype": settings.dtype, "remat": settings.remat, **_hbm(kind)}
    report.update(_compile(run.step_fn, (run.state, batch_args), report["limit_gib"]))
    return report


def memory_gib(compiled) -> dict:
    """Per-device GiB of a compiled program (XLA's memory analysis): arguments, temporaries, outputs,
    the outputs aliased to donated arguments, and the total a device must hold ({} where XLA gives
    no analysis)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 2.0**-30
    # Donated arguments: the aliased outputs reuse their buffers, so a device holds the arguments,
    # the temporaries and the outputs that are not aliased.
    total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + getattr(m, "generated_code_size_in_bytes", 0))
    return {"argument_gib": m.argument_size_in_bytes * gib, "temp_gib": m.temp_size_in_bytes * gib,
            "output_gib": m.output_size_in_bytes * gib, "alias_gib": m.alias_size_in_bytes * gib,
            "total_gib": total * gib}


def _hbm(kind: str) -> dict:
    hbm = HBM_GIB.get(kind, float("nan"))
    return {"hbm_gib": hbm, "limit_gib": LIMIT_GIB.get(kind, hbm)}


def _compile(step_fn, args: tuple, limit_gib: float) -> dict:
    """Memory, fit, FLOPs and collectives of one step program (lowered with `args`), or the
    compiler's refusal."""
    start = time.perf_counter()
    lowered = step_fn.lower(*args)
    try:
        with warnings.catch_warnings():
            # A persistent compilation cache (the trainer's) cannot load TPU executables on this host.
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache")
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (XLA raises its runtime error type)
        refused = _refusal(str(e))
        if refused is None:
            raise
        need = refused.get("temp_gib", refused.get("used_gib", float("nan")))
        return {"compile_s": time.perf_counter() - start, "fits": False, **refused,
                "over_gib": need - refused.get("limit_gib", limit_gib)}
    out = {"compile_s": time.perf_counter() - start, **memory_gib(compiled)}
    # The compiler bounds the temporaries alone: a program it accepts can still hold more in all.
    out["fits"] = out["total_gib"] <= limit_gib
    if not out["fits"]:
        out["over_gib"] = out["total_gib"] - limit_gib
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops_per_step"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    out["collectives"] = collectives(compiled.as_text())
    return out


def compile_loss(config, topology: str, devices: Optional[list] = None) -> dict:
    """The contrastive loss alone (value and gradient in the embeddings) of config.clip.loss over
    config.batch_size embeddings of the model's width, compiled for `topology`: the loss's own
    share of a step's memory, measured apart from the towers."""
    import jax
    import jax.numpy as jnp

    from clip_jax.methods.losses import make_loss
    from clip_jax.parallel import sharding
    from clip_jax.train.build import model_from_config

    devices = devices if devices is not None else topology_devices(topology)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    sharding.check_batch(config.batch_size, mesh)
    loss = make_loss(config.clip.loss, mesh, sharding.BATCH_AXES)
    dim = model_from_config(config).config.embed_dim
    embeds = jax.ShapeDtypeStruct((config.batch_size, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(embeds, embeds, scalar, scalar).compile()
    memory = {k: v for k, v in memory_gib(compiled).items() if k in ("argument_gib", "temp_gib", "output_gib")}
    return {"topology": topology, "devices": len(devices), "loss": config.clip.loss, "global_batch": config.batch_size,
            "embed_dim": dim, "compile_s": time.perf_counter() - start, **memory,
            "collectives": collectives(compiled.as_text())}


def format_report(report: dict) -> str:
    lines = []
    for key, value in report.items():
        if key == "collectives":
            for kind, (count, size) in value.items():
                lines.append(f"collective {kind}: {count} ops, {size / 2**20:.1f} MiB")
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, float):
            value = f"{value:.4g}" if "flops" in key else f"{value:.2f}"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def main(argv):
    del argv
    import json

    from absl import flags

    config = flags.FLAGS.config
    if "shots" in config:  # an adaptation config (configs/adapt/METHOD.py)
        report = compile_adapt(config, flags.FLAGS.topology, flags.FLAGS.classes)
    else:
        check = compile_loss if flags.FLAGS.loss_only else compile_check
        report = check(config, flags.FLAGS.topology)
    print(json.dumps(report) if flags.FLAGS.json else format_report(report), flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/clip_paper.py:ViT-L-14,v5e:16x16")
    flags.DEFINE_string("topology", None, "a Cloud TPU topology: v5e:2x2, v5e:16x16, v4:4x4x8, v5p:4x4x8, v6e:8x8")
    flags.DEFINE_bool("loss_only", False, "compile the contrastive loss alone (value and gradient) at the batch")
    flags.DEFINE_bool("json", False, "print the report as one JSON object instead of key: value lines")
    flags.DEFINE_integer("classes", 1000, "an adaptation config's number of classes (ImageNet: 1000)")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
