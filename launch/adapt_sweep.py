"""The few-shot tables of docs/adaptation.md, in one command: each benchmark's runs (every method at
1/4/16 shots and seeds 1/2/3, each in its own workdir, one JSON line per run), the frozen smoke
models they adapt trained first where missing, then the tables.

    python launch/adapt_sweep.py            # every benchmark, resumable, then every table
    python launch/adapt_sweep.py sweep --benchmark count [--methods coop ...] [--shots 1 2 ...] [--seeds 1 2 3]
    python launch/adapt_sweep.py table      # the tables from the jsonl files

The benchmarks (BENCHMARKS): "count" (the default of configs/adapt: the count of objects on the
shapes train split, partitioned, one image distribution throughout; RN-Shapes-S), "composition"
(shape labels, the held-out colour-shape combinations as test, base-to-novel at 16 shots) and
"maple" (MaPLe prompts a ViT: the count benchmark on the ViT smoke model). Each setting is
configs/adapt/METHOD.py's get_config() with weights, dataset, label_key, shots, seed and
data.cache_dir set; a run whose OUT/.../results.json exists is skipped, so the sweep resumes. Each
finished run appends its results dict, with "wall_s" and the run's "batch_size", to its jsonl.
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

METHODS = ("coop", "cocoop", "clip_adapter", "tip_adapter", "tip_adapter_f")
SHOTS = (1, 4, 16)  # the references also run 2 and 8 shots: --shots 1 2 4 8 16
SEEDS = (1, 2, 3)
B2N_METHODS = ("coop", "cocoop", "maple", "clip_adapter")  # Tip-Adapter's cache holds the base classes' labels
B2N_SHOTS = 16
NAMES = {"zero_shot": "zero-shot", "linear_probe": "linear probe", "coop": "CoOp", "cocoop": "CoCoOp",
         "maple": "MaPLe", "clip_adapter": "CLIP-Adapter", "tip_adapter": "Tip-Adapter",
         "tip_adapter_f": "Tip-Adapter-F"}
# frozen model -> its config and overrides: the tables were made on RN-Shapes-S, the smoke model until 2026-12-06
SMOKE = {"/tmp/smoke_en": ("configs/smoke.py", ["--config.model=RN-Shapes-S", "--config.total_steps=600",
                                                "--config.optim.learning_rate=1e-3", "--config.eval_every_steps=150",
                                                "--config.checkpoint_every_steps=150"]),
         "/tmp/smoke_vit": ("configs/smoke_vit.py", [])}
BENCHMARKS = {
    "count": dict(weights="/tmp/smoke_en", dataset="shapes:train", label_key="label_count", methods=METHODS,
                  base_to_novel=False, results="docs/adapt_results.jsonl"),
    "composition": dict(weights="/tmp/smoke_en", dataset="shapes", label_key="label_shape", methods=METHODS,
                        base_to_novel=True, results="docs/adapt_results_composition.jsonl"),
    # MaPLe's 5 epochs are 40 steps at 16 shots of 2 classes (the reference's ImageNet: 20,000): 50 here
    "maple": dict(weights="/tmp/smoke_vit", dataset="shapes:train", label_key="label_count", methods=("maple",),
                  base_to_novel=False, results="docs/adapt_results_vit.jsonl", overrides={"epochs": 50}),
}


def settings_for(args, method: str, shots: int, seed: int, base_to_novel: bool):
    c = method_config(method)
    c.weights = args.weights
    c.dataset = args.dataset
    c.label_key = args.label_key
    c.shots = shots
    c.seed = seed
    c.base_to_novel = base_to_novel
    c.data.cache_dir = args.cache_dir
    for key, value in getattr(args, "overrides", {}).items():
        c[key] = value
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


def ensure_weights(weights: str) -> None:
    """Train the smoke model a benchmark adapts (SMOKE) where its workdir holds no checkpoint yet."""
    import subprocess

    if os.path.isdir(os.path.join(weights, "checkpoints")) or weights not in SMOKE:
        return
    config, overrides = SMOKE[weights]
    print(f"training the frozen model first: {config} {' '.join(overrides)} -> {weights}", flush=True)
    subprocess.run([sys.executable, "-m", "clip_jax.train", f"--config={os.path.join(ROOT, config)}",
                    f"--workdir={weights}", "--config.summary_png=False", *overrides], cwd=ROOT, check=True)


def sweep(args) -> None:
    from clip_jax.adapt.train import run
    from clip_jax.parallel import distributed

    distributed.initialize()
    import jax

    ensure_weights(args.weights)
    from clip_jax.adapt import data

    data.keep_reads()  # the runs read the same splits again and again

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
        if i < len(todo) and todo[i][0] != method:  # a method's runs share compiled programs; the next one's do not
            jax.clear_caches()
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
    few = [r for r in rows if "hm" not in r and r["shots"] in args.shots]
    b2n = [r for r in rows if "hm" in r]
    shots = sorted({r["shots"] for r in few})
    methods = [m for m in NAMES if any(r["method"] == m for r in few)]
    lines = ["| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
             "| --- |" + " --- |" * len(shots)]
    # zero-shot and the linear probe: the frozen model on the same shots and test set, one value per
    # (shots, seed) (every method's run computes the same)
    for key, name in (("zero_shot_top1", "zero_shot"), ("linear_probe_top1", "linear_probe")):
        per = {}
        for r in few:
            if key in r:
                per.setdefault((r["shots"], r["seed"]), []).append(r[key])
        if per:
            values = {k: [sum(v) / len(v) for (kk, _), v in sorted(per.items()) if kk == k] for k in shots}
            lines.append(f"| {NAMES[name]} | " + " | ".join(cell(values[k]) for k in shots) + " |")
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
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    print(f"\n{len(rows)} runs, {wall:.0f} s ({wall / 3600:.2f} h) of run wall time in all.")


def benchmark_args(args, name: str) -> argparse.Namespace:
    """The command line's settings over one benchmark's (BENCHMARKS)."""
    bench = dict(BENCHMARKS[name])
    bench["results"] = os.path.join(ROOT, bench["results"])
    for key in ("methods", "weights"):
        if getattr(args, key) is not None:
            bench[key] = getattr(args, key)
    if args.no_base_to_novel:
        bench["base_to_novel"] = False
    return argparse.Namespace(**{**vars(args), **bench, "out": os.path.join(args.out, name)})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="all", choices=("all", "sweep", "table"))
    parser.add_argument("--benchmark", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--weights", default=None, help="the frozen CLIP (default: the benchmark's smoke model)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the benchmark's")
    parser.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", default="/tmp/adapt_sweep", help="one workdir per run under OUT/BENCHMARK")
    parser.add_argument("--cache_dir", default="/tmp/adapt_cache", help="the shapes dataset's cache")
    parser.add_argument("--no_base_to_novel", action="store_true",
                        help=f"skip the base-to-novel runs ({B2N_SHOTS} shots, {', '.join(B2N_METHODS)})")
    parser.add_argument("--cocoop_batch_size", type=int, default=0, help="0: CoCoOp's reference batch (1)")
    args = parser.parse_args(argv)
    for name in args.benchmark:
        bench = benchmark_args(args, name)
        if args.command in ("all", "sweep"):
            sweep(bench)
        if args.command in ("all", "table") and os.path.exists(bench.results):
            print(f"\n## {name}: {bench.dataset} @ {bench.label_key}, {bench.weights}\n")
            table(bench)


if __name__ == "__main__":
    main()
