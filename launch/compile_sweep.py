"""Sweeps of clip_jax.compile_check over Cloud TPU topologies, on a CPU host with libtpu: every
row of docs/scaling.md comes from here, and each result keeps the command that made it.

    python launch/compile_sweep.py plans --out docs/scaling_results.jsonl [--models ViT-L-14 ...]
    python launch/compile_sweep.py losses --out docs/scaling_results.jsonl
    python launch/compile_sweep.py recipes --out docs/scaling_results.jsonl [--only groupvit]   # LiT, FLIP, ...
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
sys.path.insert(0, ROOT)
from clip_jax.compile_check import LIMIT_GIB  # noqa: E402  (stdlib imports only: no jax in this process)

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
          out: str | None = None, config_file: str = "configs/clip_paper.py") -> dict:
    """One compile_check run in a subprocess; the parsed report with its command, date and host."""
    args = ["python", "-m", "clip_jax.compile_check", f"--config={config_file}:{config_arg or model}",
            f"--topology={topology}", "--json"]
    for axis, size in (mesh or {}).items():
        args.append(f"--config.mesh.{axis}={size}")
    for key, value in (("remat", remat), ("accum_steps", accum), ("batch_size", batch), ("clip.loss", loss)):
        if value is not None:
            args.append(f"--config.{key}={value}")
    if loss_only:
        args.append("--loss_only")
    command = " ".join(shlex.quote(a) for a in args)
    start = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    proc = subprocess.run([sys.executable] + args[1:], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode < 0:  # SIGKILL here is most often the kernel's OOM killer: compiles hold GiBs
        report = {"error": f"compile killed by signal {-proc.returncode} (host out of memory?)", "fits": False}
    elif proc.returncode or not lines:
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
    """The loss alone at 32k/64k/128k for each form, and the whole ViT-B-16 step at 32k and 64k with each."""
    for loss in ("softmax", "softmax_ring", "sigmoid"):
        for batch in (32_768, 65_536, 131_072):
            check("ViT-B-16", topology, batch=batch, loss=loss, loss_only=True, config_arg=f"ViT-B-16,{topology}",
                  out=out)
        for batch in (None, 65_536):
            check("ViT-B-16", topology, batch=batch, loss=loss, config_arg=f"ViT-B-16,{topology}", out=out)


# (preset, config file, compile_check options: topology (default v5e:16x16), batch (default the config's), remat)
RECIPES = (
    ("ViT-B-16", "configs/lit.py", {}),
    ("ViT-B-16", "configs/lit.py", {"batch": 32_768}),
    ("ViT-L-14", "configs/flip.py", {}),
    ("ViT-B-16", "configs/flip.py", {}),
    ("ViT-B-16", "configs/siglip.py", {}),
    ("ViT-L-14", "configs/siglip.py", {}),
    ("ViT-B-16", "configs/slip.py", {}),
    ("ViT-B-16", "configs/slip.py", {"batch": 32_768}),
    ("GroupViT-S-16", "configs/groupvit.py", {"topology": "v5e:4x4"}),
    ("GroupViT-S-16", "configs/groupvit.py", {"topology": "v5e:4x4", "remat": "full"}),
    ("GroupViT-S-16", "configs/groupvit.py", {}),
    ("ViT-B-32", "configs/lseg.py", {"topology": "v5e:4x4"}),
    ("ViT-B-32", "configs/lseg.py", {"batch": 256}),  # its 16 does not split over 256 chips: 1 per chip
    ("ViT-B-32", "configs/vild.py", {}),  # the R50 detector at 1024 px, batch 256 (the text tower's the preset's)
    # GLIP-T(B) at its batch of 64: one 800 px image on each of 64 data shards, the tensor axis over the other 4
    ("Swin-T", "configs/glip.py", {"config_arg": "GLIP-T", "mesh": {"tensor": 4}}),
    # AudioCLIP's full training (every tower trained; 5 s clips at 44.1 kHz) at its batch of 64 on a v5e-16
    ("RN50-quickgelu", "configs/audioclip.py", {"config_arg": "full", "topology": "v5e:4x4"}),
)


def recipes(out: str, topology: str = "v5e:16x16", only: str = "") -> None:
    """The method recipes of configs/ as configured (LiT also at the paper's batch, GroupViT and LSeg
    also on a v5e-16); `only`: those whose config file contains it."""
    for model, config_file, options in RECIPES:
        if only in config_file:
            check(model, **{"topology": topology, **options}, config_file=config_file, out=out)


def _read(out: str) -> list[dict]:
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:  # earlier rows judged `fits` against the chip's HBM: judge all by the compiler's limit
        limit = LIMIT_GIB.get(r.get("device_kind"))
        if limit and "total_gib" in r:
            r.update(limit_gib=limit, fits=r["total_gib"] <= limit)
    return rows


def _kind(r: dict) -> str:
    c = r["command"]
    if "--loss_only" in c:
        return "loss"
    if "clip_paper.py" not in c:
        return "recipe"
    if "--config.mesh." in c:
        return "plan"
    if "--config.clip.loss=" in c:
        return "loss_step"
    return "max_batch"


def chosen(rows: list[dict]) -> dict:
    """{(model, topology): the plan row plan() settles on}, by the same preference order."""
    out = {}
    for (model, topology) in dict.fromkeys((r["model"], r["topology"]) for r in rows if _kind(r) == "plan"):
        tried = [r for r in rows if _kind(r) == "plan" and (r["model"], r["topology"]) == (model, topology)]
        levels = VIT_REMAT if model.startswith("ViT") else RESNET_REMAT
        rank = lambda r: (r.get("accum_steps", 1), levels.index(r["remat"]), r["mesh"].startswith("data=1 "))  # noqa: E731
        fits = [r for r in tried if r.get("fits") and "remat" in r]
        if fits:
            out[(model, topology)] = min(fits, key=rank)
    return out


def _gib(r, key):
    return f"{r[key]:.2f}" if key in r else "-"


def _plan_row(r: dict) -> str:
    args = r["command"].replace("python -m clip_jax.compile_check ", "")
    per_chip = r.get("model_flops_per_chip")
    return (f"| {r['model']} | {r['topology']} | {r.get('mesh', '-').replace(' x tensor=1', '')} | "
            f"{r.get('remat', '-')} | {r.get('accum_steps', '-')} | {r.get('per_device_batch', '-')} | "
            f"{_gib(r, 'argument_gib')} | {_gib(r, 'temp_gib')} | {_gib(r, 'total_gib')} | "
            f"{'yes' if r.get('fits') else 'no'} | {f'{per_chip / 1e12:.1f}' if per_chip else '-'} | "
            f"{r.get('compile_s', float('nan')):.0f} | `{args}` |")


PLAN_HEAD = ["| model | topology | mesh | remat | accum | per chip | arguments GiB | temporaries GiB | total GiB | "
             "fits | model TFLOP per chip | compile s | arguments of compile_check |", "|" + " --- |" * 13]


def table(out: str) -> str:
    rows = [r for r in _read(out) if "error" not in r]
    picked = chosen(rows)
    lines = ["### The chosen plans (configs/clip_paper.py PLANS)", ""] + PLAN_HEAD
    lines += [_plan_row(r) for r in sorted(picked.values(), key=lambda r: (r["topology"], r["model"]))]
    lines += ["", "### Every setting tried", ""] + PLAN_HEAD + [_plan_row(r) for r in rows if _kind(r) == "plan"]
    lines += ["", "### The losses", "", "| loss | global batch | loss alone: temporaries GiB | command |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['loss']} | {r['global_batch']} | {r['temp_gib']:.3f} | `{r['command']}` |"
              for r in rows if _kind(r) == "loss"]
    lines += ["", "| loss | global batch | per chip | whole step: temporaries GiB | total GiB | fits | command |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['loss']} | {r['global_batch']} | {r['per_device_batch']} | {_gib(r, 'temp_gib')} | "
              f"{_gib(r, 'total_gib')} | {'yes' if r.get('fits') else 'no'} | `{r['command']}` |"
              for r in rows if _kind(r) == "loss_step"]
    lines += ["", "### Method recipes", ""] + PLAN_HEAD
    for r in rows:
        if _kind(r) == "recipe":
            line = _plan_row(r)
            if "unmasked_temp_gib" in r:
                line += f" unmasked tuning step: {r['unmasked_temp_gib']:.2f} GiB temporaries"
            lines.append(line)
    probes = [r for r in rows if _kind(r) == "max_batch"]
    lines += ["", "### Largest global batch", "", "| model | topology | largest that fits | smallest refused |",
              "| --- | --- | --- | --- |"]
    for model, topology in dict.fromkeys((r["model"], r["topology"]) for r in probes):
        tried = [r for r in probes if (r["model"], r["topology"]) == (model, topology)]
        fit = max((r["global_batch"] for r in tried if r.get("fits")), default="-")
        refused = min((r["global_batch"] for r in tried if not r.get("fits")), default="-")
        lines.append(f"| {model} | {topology} | {fit} | {refused} |")
    lines += ["", "| model | topology | global batch | per chip | fits | temporaries GiB | total GiB | command |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['topology']} | {r.get('global_batch', '-')} | {r.get('per_device_batch', '-')} | "
              f"{'yes' if r.get('fits') else 'no'} | {_gib(r, 'temp_gib')} | {_gib(r, 'total_gib')} | "
              f"`{r['command']}` |"
              for r in sorted(probes, key=lambda r: (r["topology"], r["model"], r["global_batch"]))]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["plans", "losses", "recipes", "max_batch", "table"])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scaling_results.jsonl"))
    p.add_argument("--models", nargs="*", default=list(VITS + RESNETS))
    p.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    p.add_argument("--only", default="", help="recipes: only the config files containing this")
    a = p.parse_args()
    if a.what == "table":
        print(table(a.out))
    elif a.what == "losses":
        losses(a.out)
    elif a.what == "recipes":
        recipes(a.out, only=a.only)
    else:
        for topology in a.topologies:
            for model in a.models:
                (plan if a.what == "plans" else max_batch)(model, topology, a.out)


if __name__ == "__main__":
    main()
