"""open_clip's training step, timed on one device: the reference clip_jax's benchmark is compared with.

    python3 launch/open_clip_bench.py MODEL:BATCH[:c] [MODEL:BATCH[:c] ...] [--device=auto|cuda|cpu]

    python3 launch/open_clip_bench.py ViT-B-16:256 ViT-B-16:256:c     # a GPU, eager then torch.compile
    python3 launch/open_clip_bench.py ViT-B-32:32 --device=cpu         # the CPU side by side

The step: open_clip's model with untrained weights, its ClipLoss, AdamW (betas 0.9/0.98, eps 1e-6,
weight decay 0.2), on synthetic images and 77-token captions. On a CUDA GPU it runs under bf16
autocast with fused AdamW (``:c`` adds torch.compile): 3 warm-up steps, then the mean of 10. On the
CPU it runs in float32: 2 warm-up steps, then the median of 5 steps timed one by one, since a shared
host's speed drifts within a run.

Prints one JSON line about the machine (torch's own matmul speed included), then one per spec:
step_s, img_per_s and, on a GPU, mfu_vs_989 (against an H100's dense bf16 peak) and peak_mem_gib.
A spec that fails prints {"model", "batch", "error"} and the next one runs. Needs torch and
open-clip-torch; nothing of clip_jax. launch/gpu_bench.sh runs it, and launch/open_clip_max_batch.py
reuses its step.
"""

import argparse
import contextlib
import gc
import json
import statistics
import time

# Forward GFLOP per image-text pair at 224 px, from open_clip's model_profile (2 per multiply-add).
GFLOP_FWD = {"ViT-B-32": 14.78, "ViT-B-16": 41.09, "ViT-L-14": 175.33, "RN50": 18.18}
H100_BF16_FLOPS = 989.4e12  # dense bf16 peak of an H100 SXM: the reference of the GPU targets
EOT = 49407  # CLIP's end-of-text id, the largest: open_clip pools the argmax position


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: str) -> float:
    """torch's own matmul FLOP/s: 8192^3 in bf16 on a GPU, 2048^3 in float32 on the CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def make_step(name: str, device: str, compile_: bool = False):
    """open_clip's model, loss and AdamW on `device`. Returns (step, image_size, clear):
    step(images, tokens) runs one training step and returns the loss; clear() drops what a
    failed step left (gradients, the CUDA allocator's cached blocks)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).to(device).train()
    loss_fn = open_clip.ClipLoss()
    fused = {"fused": True} if device == "cuda" else {}  # the CPU keeps torch's default AdamW
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2,
                                  **fused)
    forward = torch.compile(model) if compile_ else model
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step(images, tokens):
        with autocast():
            out = forward(images, tokens)
            loss = loss_fn(out[0], out[1], out[2])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    return step, size, clear


def synthetic_batch(batch: int, image_size: int, device: str):
    """Normal-noise images [batch, 3, S, S] and random token ids [batch, 77], EOT at index 20."""
    import torch

    images = torch.randn(batch, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, 49000, (batch, 77), device=device)
    tokens[:, 20] = EOT
    return images, tokens


def bench(name: str, batch: int, device: str, compile_: bool = False) -> dict:
    import torch

    step, size, _ = make_step(name, device, compile_)
    images, tokens = synthetic_batch(batch, size, device)
    record = {"model": name, "batch": batch, "device": device, "compiled": compile_}
    if device == "cuda":
        # GPU steps are too short to time one by one without a sync between them.
        for _ in range(3):
            step(images, tokens)
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        steps, start = 10, time.perf_counter()
        for _ in range(steps):
            step(images, tokens)
        sync(device)
        step_s = (time.perf_counter() - start) / steps
        record.update(step_s=round(step_s, 4), img_per_s=round(batch / step_s, 1))
        if name in GFLOP_FWD:  # a training step is 3 x the forward's FLOPs
            record["mfu_vs_989"] = round(batch / step_s * 3 * GFLOP_FWD[name] * 1e9 / H100_BF16_FLOPS, 3)
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        for _ in range(2):
            step(images, tokens)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step(images, tokens).item()
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        record.update(step_s=round(step_s, 4), step_s_min=round(min(times), 4), img_per_s=round(batch / step_s, 2),
                      threads=torch.get_num_threads())
    print(json.dumps(record), flush=True)
    return record


def parse_spec(spec: str):
    """'ViT-B-16:256' or 'ViT-B-16:256:c' -> (model, batch, compiled)."""
    name, _, rest = spec.partition(":")
    batch, _, flag = rest.partition(":")
    if not name or not batch.isdigit() or flag not in ("", "c"):
        raise SystemExit(f"bad spec {spec!r}: use MODEL:BATCH, or MODEL:BATCH:c for torch.compile")
    return name, int(batch), flag == "c"


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="launch/open_clip_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", metavar="MODEL:BATCH[:c]")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    specs = [parse_spec(s) for s in args.specs]  # every spec checked before anything runs
    import open_clip
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda, but torch.cuda.is_available() is False")
    machine = {"device": device, "torch": torch.__version__, "open_clip": open_clip.__version__}
    if device == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(), bf16_matmul_tflops=round(matmul_flops(device) / 1e12, 1))
    else:
        machine.update(threads=torch.get_num_threads(), fp32_matmul_gflops=round(matmul_flops(device) / 1e9, 1))
    print(json.dumps(machine), flush=True)
    records = []
    for name, batch, compile_ in specs:
        try:
            records.append(bench(name, batch, device, compile_))
        except Exception as e:  # an out-of-memory or unknown model: report it, go on with the next spec
            print(json.dumps({"model": name, "batch": batch, "error": repr(e)[:300]}), flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


if __name__ == "__main__":
    main()
