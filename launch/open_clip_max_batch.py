"""The largest batch open_clip's training step runs at on one GPU: the other side of
`python -m clip_jax.benchmark max_batch --run`, for the side by side of launch/gpu_bench.sh.

    python3 launch/open_clip_max_batch.py ViT-B-16 [--start=512] [--multiple=64] [--limit=16384]

The step is launch/open_clip_bench.py's GPU step: bf16 autocast, open_clip's ClipLoss, fused
AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2), synthetic images and 77-token captions.
A batch fits when two real steps run without a CUDA out-of-memory error (the second holds
AdamW's moments, made on the first). The search is clip_jax's own (`largest_fitting`), so both
sides are searched alike. Prints `key: value` lines, as the clip_jax benchmark does.
Needs torch with CUDA and open_clip; nothing else of clip_jax's (it imports only the search).
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # open_clip_bench beside this file; clip_jax in the repo root
# Importing clip_jax imports jax: keep it off the GPU, whose memory open_clip is measured on.
os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> dict:
    from open_clip_bench import make_step, synthetic_batch

    from clip_jax.benchmark.bench import largest_fitting

    parser = argparse.ArgumentParser(prog="launch/open_clip_max_batch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--start", type=int, default=512)
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--limit", type=int, default=1 << 14)
    args = parser.parse_args(argv)
    if args.multiple < 1 or args.start % args.multiple:
        raise SystemExit(f"--start={args.start} must be a positive multiple of --multiple={args.multiple}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("open_clip_max_batch needs a CUDA GPU (torch.cuda.is_available() is False)")
    step, size, clear = make_step(args.model, "cuda")
    peaks = {}

    def fits(batch: int) -> bool:
        torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2):
                step(*synthetic_batch(batch, size, "cuda"))
                torch.cuda.synchronize()
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        peaks[batch] = torch.cuda.max_memory_allocated() / 2**30
        clear()
        print(f"probe: batch={batch} peak_gib={peaks[batch]:.4g} fits={ok}", flush=True)
        return ok

    if not fits(args.start):
        raise SystemExit(f"batch {args.start} does not fit: use a smaller --start")
    low, high = largest_fitting(fits, args.start, args.multiple, args.limit)
    out = {"model": args.model, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "max_batch": low, "peak_gib": peaks[low], "probes": len(peaks), "at_limit": high is None,
           "capacity_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    for key, value in out.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return out


if __name__ == "__main__":
    main()
