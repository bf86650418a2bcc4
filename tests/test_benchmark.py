"""The train benchmark runs on the CPU and prints every figure (the figures themselves live in the README)."""

import math

import jax
import pytest

from clip_jax.benchmark.bench import largest_fitting, main

FIGURES = ["step_s", "images/s", "images/s/device", "mfu", "memory_gib", "tflop/s", "compile_s"]


def run(capsys, *args):
    # --keep_freed_memory=0: the allocator setting is process-wide and must not reach the other
    # tests of this worker (tests/test_host_memory.py checks it in a subprocess).
    out = main(["train", "--model=ViT-Tiny-test", "--steps=1", "--repeats=1", "--warmup=1", "--keep_freed_memory=0",
                *args])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    return out, printed


def test_train_benchmark_prints_every_figure(capsys):
    out, printed = run(capsys, "--batch=16", "--devices=1")
    for key in FIGURES:
        assert key in printed and float(printed[key]) > 0, key
    assert out["images/s"] == pytest.approx(16 / out["step_s"])
    assert 0 < out["mfu"] < 1
    # The compiled step's arguments hold at least params + two Adam moments in float32.
    from clip_jax.models import create_model, variable_shapes

    shapes = variable_shapes(create_model("ViT-Tiny-test"))
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert out["arguments_gib"] * 2**30 >= 3 * 4 * n_params
    assert out["memory_gib"] >= out["arguments_gib"]
    assert out["keep_freed_memory"] is False and out["host_page_faults_per_step"] >= 0
    assert out["host_user_s_per_step"] + out["host_sys_s_per_step"] > 0


@pytest.mark.slow
def test_memory_per_device_stays_flat_as_the_global_batch_grows_8x(capsys):
    """A fixed per-device batch of 64: 1 device (global 64) vs 8 devices (global 512).

    The loss sees the full 512 x 512 similarity matrix, yet each device holds only its
    64 rows of it and the gathered 512 x d embeddings. (Going from one device to several
    adds one fixed buffer, for the gradient all-reduce, the size of the gradients.)
    """
    assert jax.device_count() >= 8
    one, _ = run(capsys, "--batch=64", "--devices=1")
    eight, _ = run(capsys, "--batch=512", "--devices=8")
    assert eight["devices"] == 8 and eight["images/s/device"] > 0
    assert eight["memory_gib"] == pytest.approx(one["memory_gib"], rel=0.10), (one["memory_gib"], eight["memory_gib"])


def test_train_benchmark_bad_batch_errors_before_compiling(capsys):
    with pytest.raises(ValueError, match="does not divide"):
        main(["train", "--model=ViT-Tiny-test", "--batch=12", "--devices=8"])


def test_ab_variant_specs_are_checked_before_any_compile():
    from clip_jax.benchmark.bench import parse_variant

    assert parse_variant("base:") == ("base", {}, {})
    assert parse_variant("r: remat=full, scan=1, accum_steps=2, xla_cpu_use_onednn=true") == (
        "r", {"remat": "full", "scan": True, "accum_steps": 2}, {"xla_cpu_use_onednn": True})
    for spec, message in [("base", "NAME:key=value"), ("x:remat", "not key=value"), ("x:colour=red", "unknown setting"),
                          ("x:dtype=float16", "not one of"), ("x:scan=maybe", "not a boolean"),
                          ("x:accum_steps=0", "not a positive integer")]:
        with pytest.raises(ValueError, match=message):
            parse_variant(spec)
    with pytest.raises(ValueError, match="distinct names"):
        main(["ab", "--model=ViT-Tiny-test", "--variant=a:", "--variant=a:remat=full"])


def test_ab_refuses_xla_options_that_xla_does_not_take_before_compiling_a_step(monkeypatch):
    import clip_jax.benchmark.bench as benchmark

    def no_step(*args, **kwargs):
        raise AssertionError("a step was compiled before the options were checked")

    monkeypatch.setattr(benchmark, "BenchStep", no_step)
    for option, message in [("xla_cpu_no_such_option=true", "No such compile option"),
                            ("xla_cpu_enable_fast_min_max=maybe", "not a valid bool"),
                            ("xla_cpu_opt_preset=BOGUS", "not a valid enum")]:
        with pytest.raises(ValueError, match=f"variant 'bad': XLA does not take .*{message}"):
            main(["ab", "--model=ViT-Tiny-test", "--variant=base:", f"--variant=bad:{option}"])
    benchmark.check_compiler_options("fine", {"xla_cpu_enable_fast_min_max": True})  # a real option passes


@pytest.mark.slow
def test_ab_compiles_each_variant_with_its_settings_and_pairs_the_rounds(capsys):
    """Two variants that must differ in compiled memory (4 microbatches hold a quarter of the
    activations at a time) run alternately; the baseline's paired speedup against itself is 1."""
    out = main(["ab", "--model=ViT-Tiny-test", "--batch=128", "--devices=1", "--rounds=2", "--warmup=1",
                "--keep_freed_memory=0", "--variant=whole:", "--variant=micro:accum_steps=4"])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    whole, micro = out["variants"]["whole"], out["variants"]["micro"]
    assert whole["speedup"] == 1.0 and printed["whole.speedup_range"] == "1.000-1.000"
    assert micro["settings"] == {"accum_steps": 4}
    assert micro["temp_gib"] < 0.6 * whole["temp_gib"], (micro["temp_gib"], whole["temp_gib"])
    assert micro["arguments_gib"] == pytest.approx(whole["arguments_gib"])  # the same params and moments
    for name in ("whole", "micro"):
        for key in ("step_s", "images/s", "mfu", "speedup", "memory_gib", "compile_s"):
            assert float(printed[f"{name}.{key}"]) > 0, (name, key)
    assert printed["fastest"].split()[0] in ("whole", "micro")


@pytest.mark.slow
def test_parts_prints_where_the_step_time_goes(capsys):
    out = main(["parts", "--model=ViT-Tiny-test", "--batch=16", "--devices=1", "--rounds=2", "--warmup=1",
                "--keep_freed_memory=0"])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    for key in ("forward_s", "forward_backward_s", "step_s", "forward_mfu", "forward_backward_mfu", "step_mfu"):
        assert float(printed[key]) > 0, key
    assert out["backward_s"] == pytest.approx(out["forward_backward_s"] - out["forward_s"])
    assert out["update_s"] == pytest.approx(out["step_s"] - out["forward_backward_s"])
    # forward MFU counts a third of the step's FLOPs in the forward's time
    assert out["forward_mfu"] == pytest.approx(out["step_mfu"] * out["step_s"] / out["forward_s"] / 3)


@pytest.mark.slow
def test_dots_times_every_matmul_of_the_step(capsys):
    """The step's matmuls are the forward's and the backward's: at most two backward dots per
    forward dot (dX and dW; the pixels' dX is never taken), so between 1x and 1.5x of the
    forward + one backward dot, i.e. within (2/3, 1] of the 3 x forward model FLOPs."""
    out = main(["dots", "--model=ViT-Tiny-test", "--batch=16", "--devices=1", "--top=3"])
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("matmul_") for line in printed) == 3
    assert out["distinct_matmuls"] <= out["all_matmuls_per_step"]
    assert out["dense_matmuls_per_step"] + out["batched_matmuls_per_step"] == out["all_matmuls_per_step"]
    assert 2 / 3 * out["model_tflop_per_step"] < out["all_tflop_per_step"] <= out["model_tflop_per_step"]
    assert out["dense_tflop_per_step"] + out["batched_tflop_per_step"] == pytest.approx(out["all_tflop_per_step"])
    assert out["batched_tflop_per_step"] > 0  # the per-head attention dots
    assert out["all_s_per_step"] == pytest.approx(out["dense_s_per_step"] + out["batched_s_per_step"])
    assert out["mfu_ceiling"] == pytest.approx(
        out["model_tflop_per_step"] / out["all_s_per_step"] / out["peak_tflop/s"]
    )
    with pytest.raises(ValueError, match="--devices=1"):  # the traced shapes would be global ones
        main(["dots", "--model=ViT-Tiny-test", "--batch=16", "--devices=8"])


@pytest.mark.slow
def test_max_batch_finds_the_largest_batch_that_fits(capsys):
    """With a memory budget between two batches' compiled footprints, the search lands on the
    larger batch that fits; the footprints are cross-checked against the train benchmark's
    own memory figure for those batches (compiled separately, with real inputs)."""
    tiny = ["--model=ViT-Tiny-test", "--devices=2", "--keep_freed_memory=0"]
    at = {b: run(capsys, f"--batch={2 * b}", "--devices=2")[0]["memory_gib"] for b in (40, 48)}
    assert at[40] < at[48]
    budget = (at[40] + at[48]) / 2
    out = main(["max_batch", *tiny, f"--memory_gib={budget}", "--multiple=8", "--start=8"])
    printed = capsys.readouterr().out
    assert out["max_batch_per_device"] == 40 and out["max_global_batch"] == 80
    assert out["memory_gib"] == pytest.approx(at[40], rel=1e-6) and not out["at_limit"]
    assert "probe: batch/device=48" in printed and "max_batch_per_device: 40" in printed
    # doubling 8 -> 16 -> 32 -> 64, then bisecting 32..64 in steps of 8: few compiles
    assert out["probes"] <= 7


@pytest.mark.parametrize("largest,start,multiple,limit", [(1000, 8, 8, 1 << 16), (1000, 64, 64, 1 << 16),
                                                         (8, 8, 8, 1 << 16), (5000, 8, 8, 1024), (1023, 256, 1, 4096),
                                                         (5000, 8, 8, 1000)])
def test_largest_fitting_search_against_a_known_threshold(largest, start, multiple, limit):
    """Batches up to `largest` fit: the search returns the largest multiple of `multiple` (from
    `start`) at or under it, or the last doubling under `limit`, and probes each batch once."""
    probed = []

    def fits(b):
        probed.append(b)
        return b <= largest

    low, high = largest_fitting(fits, start, multiple, limit)
    if largest >= limit:  # the doubling stops at the limit
        assert high is None and low == start * 2 ** int(math.log2(limit // start))
    else:
        expected = start + (largest - start) // multiple * multiple
        assert low == expected and high is not None and high - low <= multiple and not fits(high)
        probed.pop()
    assert len(probed) == len(set(probed)) and all(b % multiple == 0 for b in probed)


def test_max_batch_needs_a_memory_figure_on_the_cpu_and_a_fitting_start():
    with pytest.raises(ValueError, match="--memory_gib"):
        main(["max_batch", "--model=ViT-Tiny-test", "--devices=1"])
    with pytest.raises(ValueError, match="multiple of --multiple"):
        main(["max_batch", "--model=ViT-Tiny-test", "--memory_gib=1", "--start=12", "--multiple=8"])
    with pytest.raises(ValueError, match="already needs"):
        main(["max_batch", "--model=ViT-Tiny-test", "--devices=1", "--memory_gib=0.001", "--keep_freed_memory=0"])
