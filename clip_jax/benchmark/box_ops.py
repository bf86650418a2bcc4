"""Detection ops beside torchvision's on this host: RoIAlign on a training-size batch and NMS over
an RPN's proposals, each jitted, median seconds and the ratio jax / torchvision.

    python -m clip_jax.benchmark box_ops [--images=2 --rois=512 --map=64 --channels=256 --boxes=2000]

torchvision is optional (a test-only reference): without it only the jax figures are printed.
"""

from __future__ import annotations

import time

import numpy as np


def _median_s(fn, min_runs: int, min_seconds: float = 1.0) -> float:
    fn()  # warm-up (and compile)
    times = []
    while len(times) < min_runs or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _inputs(args) -> dict:
    rng = np.random.default_rng(0)
    image = args.map * args.stride
    r = args.images * args.rois
    xy = rng.uniform(-0.1 * image, image, (r, 2))
    wh = rng.uniform(8, 0.6 * image, (r, 2))
    centres = rng.uniform(0, image, (args.boxes // 20, 2))  # proposals cluster on objects, as an RPN's do
    pick = centres[rng.integers(0, len(centres), args.boxes)] + rng.normal(0, 12, (args.boxes, 2))
    size = rng.uniform(16, 0.4 * image, (args.boxes, 2))
    return {"features": rng.standard_normal((args.images, args.map, args.map, args.channels)).astype(np.float32),
            "rois": np.concatenate([xy, xy + wh], 1).astype(np.float32),
            "roi_batch": np.repeat(np.arange(args.images), args.rois).astype(np.int32),
            "boxes": np.concatenate([pick - size / 2, pick + size / 2], 1).astype(np.float32),
            "scores": rng.permutation(args.boxes).astype(np.float32) / args.boxes,
            "classes": np.zeros(args.boxes, np.int32)}


def bench_box_ops(args) -> dict:
    import functools

    import jax

    from clip_jax.models import box_ops

    x = _inputs(args)
    scale = 1.0 / args.stride
    roi = jax.jit(functools.partial(box_ops.roi_align, output_size=args.output, spatial_scale=scale,
                                    sampling_ratio=args.sampling_ratio, aligned=True))
    nms = jax.jit(functools.partial(box_ops.batched_nms, iou_threshold=args.iou_threshold,
                                    max_outputs=args.max_outputs))
    device = {k: jax.device_put(v) for k, v in x.items()}
    valid = jax.device_put(np.ones(args.boxes, bool))
    out = {"rois": args.images * args.rois, "feature_map": f"{args.images}x{args.map}x{args.map}x{args.channels}",
           "output": f"{args.output}x{args.output}", "nms_boxes": args.boxes}
    out["roi_align_jax_s"] = _median_s(lambda: jax.block_until_ready(
        roi(device["features"], device["rois"], device["roi_batch"])), args.runs)
    keep, ok = nms(device["boxes"], device["scores"], device["classes"], valid)
    out["nms_kept"] = int(np.asarray(ok).sum())
    out["nms_jax_s"] = _median_s(lambda: jax.block_until_ready(
        nms(device["boxes"], device["scores"], device["classes"], valid)), args.runs)
    try:
        import torch
        import torchvision
    except ImportError:
        out["torchvision"] = "not installed (pip install -r tests/references.txt): jax figures only"
        _print(out)
        return out
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    features = t["features"].permute(0, 3, 1, 2).contiguous()  # torchvision's NCHW
    rois = torch.cat([t["roi_batch"].float()[:, None], t["rois"]], 1)
    with torch.inference_mode():
        out["roi_align_torch_s"] = _median_s(lambda: torchvision.ops.roi_align(
            features, rois, args.output, scale, args.sampling_ratio, True), args.runs)
        keep_t = torchvision.ops.batched_nms(t["boxes"], t["scores"], t["classes"], args.iou_threshold)
        out["nms_torch_s"] = _median_s(lambda: torchvision.ops.batched_nms(
            t["boxes"], t["scores"], t["classes"], args.iou_threshold), args.runs)
    n = min(len(keep_t), args.max_outputs)
    out["nms_same_kept"] = bool(np.array_equal(np.asarray(keep)[:n], keep_t[:n].numpy()))
    out["roi_align_jax_over_torch"] = out["roi_align_jax_s"] / out["roi_align_torch_s"]
    out["nms_jax_over_torch"] = out["nms_jax_s"] / out["nms_torch_s"]
    out["torch_threads"] = torch.get_num_threads()
    _print(out)
    return out


def _print(figures: dict) -> None:
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)


def add_parser(sub) -> None:
    p = sub.add_parser("box_ops", help="RoIAlign and NMS (clip_jax.models.box_ops) beside torchvision's: s, ratio")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--rois", type=int, default=512, help="RoIs per image")
    p.add_argument("--map", type=int, default=64, help="feature map height and width")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--stride", type=int, default=16, help="image pixels per map pixel (spatial_scale = 1/stride)")
    p.add_argument("--output", type=int, default=7, help="RoIAlign output size")
    p.add_argument("--sampling_ratio", type=int, default=2)
    p.add_argument("--boxes", type=int, default=2000, help="boxes into NMS")
    p.add_argument("--iou_threshold", type=float, default=0.7)
    p.add_argument("--max_outputs", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5, help="timed runs at least (and at least 1 s); the median")
    p.set_defaults(fn=bench_box_ops)
