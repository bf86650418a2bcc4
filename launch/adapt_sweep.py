"""The few-shot adaptation sweep of docs/methods.md, in one process: every method at 1/2/4/8/16 shots and
seeds 1/2/3, plus base-to-novel at 16 shots, each run in its own workdir, one JSON line per run.

    python launch/adapt_sweep.py [--weights /tmp/smoke_en] [--methods coop ...] [--shots 1 2 ...] [--seeds 1 2 3]
    python launch/adapt_sweep.py table   # the markdown tables from docs/adapt_results.jsonl

Each setting is configs/adapt/METHOD.py's get_config() (the references' defaults) with weights,
dataset, label_key, shots, seed and data.cache_dir set; a run whose OUT/.../results.json exists is
skipped, so the sweep resumes. Each finished run appends its results dict, with "wall_s" and the
run's "batch_size", to docs/adapt_results.jsonl. MaPLe prompts a ViT image tower: it is not in
the default grid (the smoke model, RN-Shapes-S, is a ResNet).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

from absl import logging

logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clip_jax.adapt.config import method_config  # noqa: E402  (after the checkout is on the path)

RESULTS = os.path.join(ROOT, "docs", "adapt_results.jsonl")
METHODS = ("coop", "cocoop", "clip_adapter", "tip_adapter", "tip_adapter_f")
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
B2N_METHODS = ("coop", "cocoop", "maple", "clip_adapter")  # Tip-Adapter's cache holds the base classes' labels
B2N_SHOTS = 16
NAMES = {"zero_shot": "zero-shot", "coop": "CoOp", "cocoop": "CoCoOp", "maple": "MaPLe",
         "clip_adapter": "CLIP-Adapter", "tip_adapter": "Tip-Adapter", "tip_adapter_f": "Tip-Adapter-F"}


def settings_for(args, method: str, shots: int, seed: int, base_to_novel: bool):
    c = method_config(method)
    c.weights = args.weights
    c.dataset = args.dataset
    c.label_key = args.label_key
    c.shots = shots
    c.seed = seed
    c.base_to_novel = base_to_novel
    c.data.cache_dir = args.cache_dir
    if method == "cocoop" and args.cocoop_batch_size:
        c.batch_size = args.cocoop_batch_size
    if method == "maple":  # its depth J may not exceed the shallower tower (a smoke model's text tower: 2 layers)
        from clip_jax.adapt.weights import load_frozen

        model, _ = load_frozen(c)
        c.prompt_depth = min(int(c.prompt_depth), model.config.text.layers, model.config.vision.layers)
    return c


def grid(args) -> list:
    """(method, shots, seed, base_to_novel) in run order."""
    runs = [(m, k, s, False) for m in args.methods for k in args.shots for s in args.seeds]
    if args.base_to_novel:
        runs += [(m, B2N_SHOTS, s, True) for m in args.methods if m in B2N_METHODS for s in args.seeds]
    return runs


def sweep(args) -> None:
    from clip_jax.adapt.train import run
    from clip_jax.parallel import distributed

    distributed.initialize()
    import jax

    todo = grid(args)
    started = time.perf_counter()
    for i, (method, shots, seed, b2n) in enumerate(todo, 1):
        workdir = os.path.join(args.out, method + ("_b2n" if b2n else ""), f"shots{shots}", f"seed{seed}")
        name = f"[{i}/{len(todo)}] {method}{' base-to-novel' if b2n else ''} shots={shots} seed={seed}"
        if os.path.exists(os.path.join(workdir, "results.json")):
            print(f"{name}: done before, skipped", flush=True)
            continue
        settings = settings_for(args, method, shots, seed, b2n)
        print(f"{name}: {workdir} (batch {settings.batch_size})", flush=True)
        start = time.perf_counter()
        results = run(settings, workdir, log=lambda line, name=name: print(f"  {name} {line}", flush=True))
        row = dict(results, wall_s=round(time.perf_counter() - start, 1), batch_size=int(settings.batch_size))
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        jax.clear_caches()  # every run jits its own closures: do not keep them all
        gc.collect()
    print(f"sweep done in {time.perf_counter() - started:.0f} s", flush=True)


# -- the tables ---------------------------------------------------------------------------------------
def load_rows(path: str) -> list:
    """The jsonl's rows, the last one of each (method, shots, seed, base-to-novel) kept."""
    latest = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                latest[(row["method"], row["shots"], row["seed"], "hm" in row)] = row
    return list(latest.values())


def _stats(values: list) -> tuple:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def cell(values: list, seeds: int = len(SEEDS)) -> str:
    """'mean +- std' in %, one decimal (population std over seeds); '(n=K)' when seeds are missing."""
    if not values:
        return "-"
    mean, std = _stats([100 * v for v in values])
    return f"{mean:.1f} +- {std:.1f}" + (f" (n={len(values)})" if len(values) != seeds else "")


def _hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0


def table(args) -> None:
    rows = load_rows(args.results)
    few = [r for r in rows if "hm" not in r]
    b2n = [r for r in rows if "hm" in r]
    shots = sorted({r["shots"] for r in few})
    methods = [m for m in NAMES if any(r["method"] == m for r in few)]
    lines = ["| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
             "| --- |" + " --- |" * len(shots)]
    # zero-shot: the frozen model on the same test set, one value per (shots, seed) (every method sees the same)
    zs = {}
    for r in few:
        zs.setdefault((r["shots"], r["seed"]), []).append(r["zero_shot_top1"])
    zero = {k: [sum(v) / len(v) for (kk, _), v in sorted(zs.items()) if kk == k] for k in shots}
    lines.append("| zero-shot | " + " | ".join(cell(zero[k]) for k in shots) + " |")
    for m in methods:
        cells = [cell([r["top1"] for r in few if r["method"] == m and r["shots"] == k]) for k in shots]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    print("Test top-1 (%), mean +- std over seeds:\n")
    print("\n".join(lines))
    if b2n:
        print(f"\nBase-to-novel ({', '.join(sorted({str(r['shots']) for r in b2n}))} shots), test top-1 (%), "
              "mean +- std over seeds:\n")
        print("| method | base | novel | HM | zero-shot base | zero-shot novel | zero-shot HM |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for m in [m for m in NAMES if any(r["method"] == m for r in b2n)]:
            mine = [r for r in b2n if r["method"] == m]
            values = [[r["base_top1"] for r in mine], [r["novel_top1"] for r in mine], [r["hm"] for r in mine],
                      [r["zero_shot_base_top1"] for r in mine], [r["zero_shot_novel_top1"] for r in mine],
                      [_hm(r["zero_shot_base_top1"], r["zero_shot_novel_top1"]) for r in mine]]
            print(f"| {NAMES[m]} | " + " | ".join(cell(v) for v in values) + " |")
    notes = ["MaPLe is not run: it prompts a ViT image tower and RN-Shapes-S is a ResNet."]
    for m in sorted({r["method"] for r in rows}):
        sizes = sorted({r.get("batch_size") for r in rows if r["method"] == m and r.get("batch_size")})
        if m == "cocoop" and sizes and sizes != [method_config("cocoop").batch_size]:
            notes.append(f"CoCoOp ran at batch {', '.join(map(str, sizes))} (its reference: 1), as a run at batch 1 "
                         "took over 10 minutes.")
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    notes.append(f"{len(rows)} runs, {wall:.0f} s ({wall / 3600:.2f} h) of run wall time in all.")
    print("\nNotes: " + " ".join(notes))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="sweep", choices=("sweep", "table"))
    parser.add_argument("--weights", default="/tmp/smoke_en", help="the frozen CLIP: a training workdir or file")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default="/tmp/adapt_sweep", help="one workdir per run under here")
    parser.add_argument("--cache_dir", default="/tmp/adapt_cache", help="the shapes dataset's cache")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--label_key", default="label_shape")
    parser.add_argument("--no_base_to_novel", dest="base_to_novel", action="store_false",
                        help=f"skip the base-to-novel runs ({B2N_SHOTS} shots, {', '.join(B2N_METHODS)})")
    parser.add_argument("--cocoop_batch_size", type=int, default=0, help="0: CoCoOp's reference batch (1)")
    parser.add_argument("--results", default=RESULTS, help="the jsonl the runs append to and the tables read")
    args = parser.parse_args(argv)
    if args.command == "table":
        table(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
