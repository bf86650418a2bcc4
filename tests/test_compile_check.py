"""clip_jax.compile_check: the trainer's step compiled ahead of time for a TPU topology on this CPU
host (libtpu describes the chips; nothing runs). Skips where libtpu is not installed."""

import importlib.util

import pytest
from tiny import tiny_config

from clip_jax import compile_check as cc

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install -e ".[tpu]"): TPU topologies cannot be described here')


def test_collectives_are_read_from_the_program_text():
    hlo = "\n".join([
        "  %all-gather.1 = bf16[64,512]{1,0} all-gather(bf16[16,512]{1,0} %p), replica_groups=[1,4]<=[4]",
        "  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %x), to_apply=%add",
        "  %cp = f32[2,3]{1,0} collective-permute(f32[2,3]{1,0} %y), source_target_pairs={{0,1}}",
        "  %ard = f32[8]{0} all-reduce-done((f32[8]{0}, f32[8]{0}) %ars)",  # the done half is not a second op
        "  %dot = f32[4,4]{1,0} dot(f32[4,4]{1,0} %a, f32[4,4]{1,0} %b)",
    ])
    assert cc.collectives(hlo) == {"all-gather": (1, 64 * 512 * 2), "all-reduce": (1, 32),
                                   "collective-permute": (1, 24)}


def test_an_out_of_memory_refusal_is_read_as_figures():
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "the total memory required for HLO temporaries (41.04G) exceeds available HBM (15.75G)")
    got = cc._refusal(message)
    assert got == {"temp_gib": pytest.approx(41.04), "limit_gib": pytest.approx(15.75)}
    assert cc._refusal("INVALID_ARGUMENT: something else") is None


def test_a_program_the_compiler_accepts_does_not_fit_when_its_total_passes_the_limit():
    """The TPU compiler bounds the temporaries alone: RN50x16 on v5e-256 compiled with 15.03 GiB of
    temporaries and 15.77 GiB in all, over the 15.75 GiB a v5e program may use."""
    from types import SimpleNamespace

    gib = 2**30
    memory = SimpleNamespace(argument_size_in_bytes=int(0.55 * gib), temp_size_in_bytes=int(15.03 * gib),
                             output_size_in_bytes=int(0.55 * gib), alias_size_in_bytes=int(0.36 * gib))
    compiled = SimpleNamespace(memory_analysis=lambda: memory, cost_analysis=lambda: {"flops": 1.0},
                               as_text=lambda: "")
    step = SimpleNamespace(lower=lambda *args: SimpleNamespace(compile=lambda: compiled))
    report = cc._compile(step, (), limit_gib=15.75)
    assert report["total_gib"] == pytest.approx(15.77, abs=1e-6)
    assert report["fits"] is False and report["over_gib"] == pytest.approx(0.02, abs=1e-6)
    assert cc._compile(step, (), limit_gib=16.0)["fits"] is True


def test_an_unknown_topology_is_named():
    if importlib.util.find_spec("libtpu") is None:
        with pytest.raises(SystemExit, match="libtpu is not installed"):
            cc.topology_devices("v5e:2x2")
        return
    with pytest.raises(ValueError, match="cannot describe TPU topology 'v9x:3x3'"):
        cc.topology_devices("v9x:3x3")


def _check(loss="softmax", data=4, fsdp=1):
    c = tiny_config(loss=loss)
    c.batch_size = 256  # 64 per chip
    c.mesh.data, c.mesh.fsdp = data, fsdp
    return cc.compile_check(c, "v5e:2x2")


@needs_libtpu
def test_the_step_compiles_for_a_tpu_topology_with_the_losses_collectives():
    softmax = _check("softmax")
    assert softmax["devices"] == 4 and softmax["device_kind"] == "TPU v5 lite" and softmax["fits"] is True
    # fits is judged against what the compiler lets a program use, not the chip's whole HBM
    assert (softmax["hbm_gib"], softmax["limit_gib"]) == (16.0, 15.75)
    for key in ("argument_gib", "temp_gib", "output_gib"):
        assert softmax[key] > 0
    assert softmax["flops_per_step"] > 0
    # Params are replicated on a data-only mesh: the all-gathers are the loss's (embeddings), the
    # all-reduce the gradients'.
    assert softmax["collectives"]["all-gather"][0] >= 2
    assert softmax["collectives"]["all-reduce"][0] >= 1
    assert "collective-permute" not in softmax["collectives"]
    ring = _check("sigmoid")  # the chunked sigmoid loss passes text chunks round the ring
    assert "collective-permute" in ring["collectives"] and "all-gather" not in ring["collectives"]
    text = cc.format_report(softmax)
    assert "fits: true" in text and "collective all-gather:" in text and "temp_gib:" in text


@needs_libtpu
def test_fsdp_keeps_the_activations_batch_sharded():
    """Under FSDP each chip computes its own share of the batch, as on a data-only mesh (without the
    models' activation constraints XLA splits the embed dim instead and each chip does far more)."""
    data, fsdp = _check(data=4, fsdp=1), _check(data=1, fsdp=4)
    assert fsdp["argument_gib"] < 0.5 * data["argument_gib"]  # params and moments are split
    assert fsdp["flops_per_step"] < 1.1 * data["flops_per_step"]


@needs_libtpu
def test_flips_unmasked_tuning_step_is_checked_too():
    c = tiny_config()
    c.batch_size, c.clip.patch_dropout, c.clip.unmasked_from_step = 64, 0.5, 5
    report = cc.compile_check(c, "v5e:2x2")
    # the tuning step keeps every token: more activations than the masked step
    assert report["unmasked_fits"] is True and report["unmasked_temp_gib"] > report["temp_gib"]


@needs_libtpu
def test_a_few_shot_adaptation_step_compiles_for_a_small_topology():
    from clip_jax.adapt.config import adapt_config

    settings = adapt_config()
    settings.method, settings.model, settings.batch_size = "coop", "ViT-Tiny-test", 8
    report = cc.compile_adapt(settings, "v5e:2x2", classes=10)
    assert report["devices"] == 4 and report["global_batch"] == 8 and report["fits"]
    assert report["argument_gib"] > 0 and report["total_gib"] >= report["argument_gib"]
    # the gradient of the replicated context is summed over the chips' rows
    assert "all-reduce" in report["collectives"]


def test_the_paper_plans_are_the_sweeps_choices():
    """configs/clip_paper.py's PLANS are what launch/compile_sweep.py picks from the recorded
    compiles (docs/scaling_results.jsonl), judged by the compiler's limit: none set by hand."""
    import os
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    sys.path.insert(0, os.path.join(root, "launch"))
    try:
        import compile_sweep
    finally:
        sys.path.pop(0)
    spec = importlib.util.spec_from_file_location("clip_paper", os.path.join(root, "configs", "clip_paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    rows = [r for r in compile_sweep._read(os.path.join(root, "docs", "scaling_results.jsonl")) if "error" not in r]
    picked = {key: (paper.FSDP if r["mesh"].startswith("data=1 ") else paper.DATA, r["remat"], r["accum_steps"])
              for key, r in compile_sweep.chosen(rows).items()}
    plans = {(model, topology): plan for topology, by_model in paper.PLANS.items() for model, plan in by_model.items()}
    assert picked == plans
