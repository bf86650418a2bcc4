"""The table of launch/gpu_bench.sh: its runs' logs in, figures.json and summary.md out.

    python3 launch/gpu_bench_summary.py LOGS_DIR OUTDIR

LOGS_DIR holds one log per run: clip_<i>_<model>_<batch>.log (`python -m clip_jax.benchmark
train`'s `key: value` lines), open_clip.log (launch/open_clip_bench.py's JSON lines) and
max_batch_clip.log / max_batch_open_clip.log, and ab.log (`benchmark ab`'s paired variants).
Standard library only.
"""

import glob
import json
import os
import sys

# The GPU targets on one H100-class GPU (images/s), by model.
TARGETS = {"ViT-B-16": 4400, "ViT-B-32": 7800, "ViT-L-14": 1030, "RN50": 2000}


def key_values(path: str) -> dict:
    """The `key: value` lines of a log (the first of each key), skipping the script's own lines."""
    out = {}
    for line in open(path, errors="replace"):
        if ": " in line and not line.startswith(("==", "probe:", " ", "\t")):
            key, value = line.rstrip("\n").split(": ", 1)
            out.setdefault(key, value)
    return out


def collect(logs: str) -> dict:
    figures = {"clip": [], "open_clip": [], "max_batch": {}, "ab": {}}
    for path in sorted(glob.glob(os.path.join(logs, "clip_*.log"))):
        name = os.path.basename(path)[len("clip_"):-len(".log")].split("_", 1)[-1]
        kv = key_values(path)
        figures["clip"].append({"run": name, **kv} if "step_s" in kv else
                               {"run": name, "error": open(path, errors="replace").read()[-600:]})
    path = os.path.join(logs, "open_clip.log")
    if os.path.exists(path):
        figures["open_clip"] = [json.loads(line) for line in open(path) if line.startswith("{")]
    for side in ("clip", "open_clip"):
        path = os.path.join(logs, f"max_batch_{side}.log")
        if os.path.exists(path):
            figures["max_batch"][side] = key_values(path)
    path = os.path.join(logs, "ab.log")
    if os.path.exists(path):
        figures["ab"] = key_values(path)
    return figures


def table(figures: dict) -> str:
    open_clip = {(r["model"], int(r["batch"]), bool(r["compiled"])): float(r["img_per_s"])
                 for r in figures["open_clip"] if "img_per_s" in r}
    rows = ["| model | batch | clip_jax img/s | MFU | memory GiB | compile s | open_clip eager | open_clip compiled "
            "| x eager | x compiled | target img/s |", "|" + " --- |" * 11]
    for r in figures["clip"]:
        if "error" in r:
            rows.append(f"| {r['run']} | failed: see bench.log |" + " |" * 9)
            continue
        model, batch, ips = r["model"], int(r["batch"]), float(r["images/s"])
        eager, compiled = open_clip.get((model, batch, False)), open_clip.get((model, batch, True))
        shown = lambda x: f"{x:,.0f}" if x else "-"
        ratio = lambda x: f"{ips / x:.2f}" if x else "-"
        memory = f"{float(r['memory_gib']):.2f}" if "memory_gib" in r else "-"
        rows.append(f"| {model} | {batch} | {ips:,.0f} | {float(r['mfu']):.1%} | {memory} "
                    f"| {float(r['compile_s']):.0f} | {shown(eager)} | {shown(compiled)} "
                    f"| {ratio(eager)} | {ratio(compiled)} | {shown(TARGETS.get(model))} |")
    lines = ["\n".join(rows)] if figures["clip"] else []
    for r in figures["open_clip"]:
        if "error" in r:
            lines.append(f"open_clip {r['model']} batch {r['batch']} failed: {r['error']}")
    for side, kv in figures["max_batch"].items():
        batch = kv.get("max_batch_per_device", kv.get("max_batch"))
        if batch is None:
            lines.append(f"largest batch, {side}: none (failed or skipped: see bench.log)")
        else:
            memory = kv.get("memory_gib", kv.get("peak_gib"))
            lines.append(f"largest batch, {side}: {batch} ({kv['model']}, {memory} GiB"
                         + (", confirmed by a step" if "ran_step_s" in kv else "") + ")")
    ab = figures["ab"]
    variants = [key[: -len(".settings")] for key in ab if key.endswith(".settings")]
    if variants:
        lines.append("\n".join([f"paired rounds ({ab.get('model', '?')}, batch {ab.get('batch', '?')}):"] + [
            f"- {v} {ab[v + '.settings']}: {float(ab[v + '.images/s']):,.0f} img/s, {ab.get(v + '.speedup', '1')} x "
            f"the first ({ab.get(v + '.speedup_range', '-')})" for v in variants if v + ".images/s" in ab]))
    elif ab:
        lines.append("paired rounds: failed or skipped (see bench.log)")
    return "\n\n".join(lines)


def main(argv) -> str:
    logs, outdir = argv
    figures = collect(logs)
    with open(os.path.join(outdir, "figures.json"), "w") as f:
        json.dump(figures, f, indent=1)
    summary = table(figures)
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
