"""Sweeps of clip_jax.compile_check over Cloud TPU topologies, on a CPU host with libtpu: every
row of docs/scaling.md comes from here, and each result keeps the command that made it.

    python launch/compile_sweep.py plans --out docs/scaling_results.jsonl [--models ViT-L-14 ...]
    python launch/compile_sweep.py losses --out docs/scaling_results.jsonl
    python launch/compile_sweep.py max_batch --out docs/scaling_results.jsonl --models ViT-B-16 ViT-L-14
    python launch/compile_sweep.py table --out docs/scaling_results.jsonl   # the markdown tables

plans: for each paper preset and topology at the paper's global batch 32,768, the cheapest
setting that fits, trying remat policies from the least recompute up ('none', then saving the
weight matmuls, then 'full'), at each the FSDP mesh (params and moments split over every chip)
and, where that fits, the data-parallel mesh (params replicated: fewer collectives), then
gradient accumulation. Each compile is a subprocess (a pod-sized compile holds GiBs of host memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("v5e:16x16", "v4:4x4x8", "v5p:4x4x8")
VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")
RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
FSDP, DATA = {"data": 1, "fsdp": -1}, {"data": -1, "fsdp": 1}
# ViT policies from the least recompute to the most; the ResNet tower takes none or full.
VIT_REMAT = ("none", "dots_with_no_batch_dims_saveable", "full")
RESNET_REMAT = ("none", "full")


def _host() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def check(model: str, topology: str, mesh: dict | None = None, remat: str | None = None, accum: int | None = None,
          batch: int | None = None, loss: str | None = None, loss_only: bool = False, config_arg: str | None = None,
          out: str | None = None) -> dict:
    """One compile_check run in a subprocess; the parsed report with its command, date and host."""
    args = ["python", "-m", "clip_jax.compile_check", f"--config=configs/clip_paper.py:{config_arg or model}",
            f"--topology={topology}", "--json"]
    for axis, size in (mesh or {}).items():
        args.append(f"--config.mesh.{axis}={size}")
    for key, value in (("remat", remat), ("accum_steps", accum), ("batch_size", batch), ("loss", loss)):
        if value is not None:
            args.append(f"--config.{key}={value}")
    if loss_only:
        args.append("--loss_only")
    command = " ".join(shlex.quote(a) for a in args)
    start = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    proc = subprocess.run([sys.executable] + args[1:], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        report = {"error": " | ".join(tail)[-600:], "fits": False}
    else:
        report = json.loads(lines[-1])
    report.update(command=command, model=model, wall_s=round(time.perf_counter() - start, 1),
                  date=datetime.date.today().isoformat(), host=_host())
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(report) + "\n")
    print(f"{model} {topology} mesh={mesh} remat={remat} accum={accum} batch={batch} loss={loss}: "
          f"fits={report.get('fits')} temp={report.get('temp_gib', float('nan')):.2f} GiB "
          f"({report['wall_s']} s){' ERROR ' + report['error'] if 'error' in report else ''}", flush=True)
    return report


def plan(model: str, topology: str, out: str) -> dict:
    """The cheapest setting (least recompute, then fewest collectives) that fits."""
    for remat in VIT_REMAT if model.startswith("ViT") else RESNET_REMAT:
        sharded = check(model, topology, FSDP, remat, 1, out=out)
        if sharded.get("fits"):
            replicated = check(model, topology, DATA, remat, 1, out=out)
            return replicated if replicated.get("fits") else sharded
    for accum in (2, 4, 8):
        sharded = check(model, topology, FSDP, "full", accum, out=out)
        if sharded.get("fits"):
            return sharded
    return sharded


def max_batch(model: str, topology: str, out: str, start: int = 32_768) -> int:
    """The largest global batch (a multiple of the chips) whose step fits, by doubling then bisection
    to within an eighth, with the preset's plan for the topology (clip_paper.py), no accumulation."""
    probe = lambda batch: check(model, topology, batch=batch, accum=1, config_arg=f"{model},{topology}", out=out)  # noqa: E731
    first = probe(start)
    chips = first.get("devices", 256)
    low, high = (start, None) if first.get("fits") else (0, start)
    while high is None:
        if probe(2 * low).get("fits"):
            low *= 2
        else:
            high = 2 * low
    while high - low > max(chips, high // 8):  # each probe is a pod-sized compile
        mid = (low + high) // 2 // chips * chips
        if probe(mid).get("fits"):
            low = mid
        else:
            high = mid
    print(f"max batch {model} {topology}: {low} (refused at {high})", flush=True)
    return low


def losses(out: str, topology: str = "v5e:16x16") -> None:
    """The loss alone at 32k/64k/128k for each form, and the whole ViT-B-16 step at 32k with each."""
    for loss in ("softmax", "softmax_ring", "sigmoid"):
        for batch in (32_768, 65_536, 131_072):
            check("ViT-B-16", topology, batch=batch, loss=loss, loss_only=True, config_arg=f"ViT-B-16,{topology}",
                  out=out)
        check("ViT-B-16", topology, loss=loss, config_arg=f"ViT-B-16,{topology}", out=out)


def _read(out: str) -> list[dict]:
    with open(out) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(out: str) -> str:
    rows = _read(out)
    lines = ["| model | topology | mesh | remat | accum | per chip | arguments GiB | temporaries GiB | fits | "
             "compile s | command |", "|" + " --- |" * 11]
    for r in rows:
        if "--loss_only" in r["command"] or "error" in r:
            continue
        lines.append(f"| {r['model']} | {r['topology']} | {r.get('mesh', '')} | {r.get('remat', '')} | "
                     f"{r.get('accum_steps', '')} | {r.get('per_device_batch', '')} | "
                     f"{r.get('argument_gib', float('nan')):.2f} | {r.get('temp_gib', float('nan')):.2f} | "
                     f"{'yes' if r.get('fits') else 'no'} | {r.get('compile_s', float('nan')):.0f} | "
                     f"`{r['command'].replace('python -m clip_jax.compile_check ', '')}` |")
    lines += ["", "| loss | global batch | loss temporaries GiB | command |", "| --- | --- | --- | --- |"]
    for r in rows:
        if "--loss_only" in r["command"] and "error" not in r:
            lines.append(f"| {r['loss']} | {r['global_batch']} | {r['temp_gib']:.3f} | `{r['command']}` |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["plans", "losses", "max_batch", "table"])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scaling_results.jsonl"))
    p.add_argument("--models", nargs="*", default=list(VITS + RESNETS))
    p.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    a = p.parse_args()
    if a.what == "table":
        print(table(a.out))
    elif a.what == "losses":
        losses(a.out)
    else:
        for topology in a.topologies:
            for model in a.models:
                (plan if a.what == "plans" else max_batch)(model, topology, a.out)


if __name__ == "__main__":
    main()
