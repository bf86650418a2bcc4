"""oneDNN matmuls on the CPU: chosen per host as documented, and the same training step as XLA's default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import text_batch as batch
from tiny import tiny_run

from clip_jax.cpu import onednn as xla_cpu


def test_choice_is_checked():
    assert [xla_cpu.check_choice(v) for v in ("auto", "on", "off", None, True, False)] == \
        ["auto", "on", "off", "auto", "on", "off"]
    with pytest.raises(ValueError, match=r"config.cpu_onednn_dots='yes': use one of auto, on, off"):
        xla_cpu.check_choice("yes", "config.cpu_onednn_dots")


@pytest.mark.parametrize("vendor,machine,choice,platform_name,dtype,n_devices,expected", [
    ("GenuineIntel", "x86_64", "auto", "cpu", "float32", 1, True),
    ("GenuineIntel", "x86_64", "auto", "cpu", "bfloat16", 1, False),  # measured in float32 only
    ("GenuineIntel", "x86_64", "auto", "cpu", jnp.float32, 1, True),  # a dtype, not its name
    ("GenuineIntel", "x86_64", "auto", "cpu", jnp.bfloat16, 1, False),
    ("GenuineIntel", "x86_64", "auto", "cpu", "float32", 8, False),  # simulated meshes: never measured
    ("AuthenticAMD", "x86_64", "auto", "cpu", "float32", 1, False),
    ("GenuineIntel", "x86_64", "auto", "gpu", "float32", 1, False),  # never off the CPU
    ("AuthenticAMD", "x86_64", "on", "cpu", "bfloat16", 8, True),
    ("GenuineIntel", "x86_64", "off", "cpu", "float32", 1, False),
    ("", "aarch64", "auto", "cpu", "float32", 1, False),
])
def test_auto_means_float32_single_device_steps_on_intel_cpus(monkeypatch, vendor, machine, choice, platform_name,
                                                               dtype, n_devices, expected):
    monkeypatch.setattr(xla_cpu, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(xla_cpu.platform, "machine", lambda: machine)
    assert xla_cpu.use_onednn_dots(choice, platform_name, dtype, n_devices) is expected
    devices = [type("Device", (), {"platform": platform_name})()] * n_devices
    assert bool(xla_cpu.step_compiler_options(choice, devices, dtype)) is expected


def test_cpu_vendor_reads_cpuinfo():
    vendor = xla_cpu.cpu_vendor()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert vendor == ""
        return
    assert (f": {vendor}" in text) if vendor else ("vendor_id" not in text)


def test_no_experiment_config_names_a_cpu_library():
    """The oneDNN and allocator choices are runtime options of the CPU entry points, not config."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "configs", "*.py")) + [os.path.join(root, "clip_jax", "config.py")]:
        with open(path) as f:
            text = f.read().lower()
        for word in ("onednn", "tcmalloc", "mallopt", "xla_cpu"):
            assert word not in text, (path, word)


def _two_steps(options, name="ViT-Tiny-test"):
    r = tiny_run(model=name, compiler_options=options)
    state, model = r.state, r.model
    compiled = xla_cpu.keep_alive(r.step_fn.lower(state, batch(16, model.config.vision.image_size)).compile(), options)
    losses = []
    for i in range(2):
        state, metrics = compiled(state, batch(16, model.config.vision.image_size, i))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree_util.tree_map(np.asarray, state.params), compiled.as_text()


@pytest.mark.skipif(not xla_cpu.has_onednn() or jax.default_backend() != "cpu", reason="XLA:CPU has oneDNN on x86 only")
def test_onednn_step_equals_default_step():
    """The step through oneDNN's matmuls (the attention cores included) against XLA's default."""
    ref_losses, ref_params, ref_text = _two_steps(None)
    losses, params, text = _two_steps(xla_cpu.step_compiler_options("on", jax.devices()))
    assert "onednn_fusion" in text and "onednn_fusion" not in ref_text  # the option reached the compiler
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_keep_alive_holds_onednn_programs_only():
    import gc
    import weakref

    class Program:  # a stand-in: anything weak-referenceable
        pass

    kept, dropped = Program(), Program()
    refs = (weakref.ref(xla_cpu.keep_alive(kept, dict(xla_cpu.ONEDNN_DOTS))),
            weakref.ref(xla_cpu.keep_alive(dropped, {})))
    del kept, dropped
    gc.collect()
    assert refs[0]() is not None and refs[1]() is None
    assert xla_cpu.keep_alive(None, None) is None and not xla_cpu.is_onednn(None)


@pytest.mark.slow
@pytest.mark.skipif(not xla_cpu.has_onednn() or jax.default_backend() != "cpu", reason="XLA:CPU has oneDNN on x86 only")
def test_onednn_programs_are_never_destroyed(tmp_path):
    """XLA:CPU aborts when a oneDNN program is destroyed right after a run on a busy CPU
    ('object_pool.h: Check failed: available_.size() == num_created_'): the training step and the
    benchmark's matmul peak are kept alive, and a loop that compiles, runs and drops oneDNN
    programs through keep_alive, with every core busy, ends normally (without keep_alive that loop
    can abort)."""
    import os
    import subprocess
    import sys

    from clip_jax.benchmark import bench as benchmark

    step = tiny_run(compiler_options=dict(xla_cpu.ONEDNN_DOTS)).step_fn
    xla_cpu.keep_alive(step, xla_cpu.ONEDNN_DOTS)  # as the train CLI's retain hook does
    assert any(p is step for p in xla_cpu._KEPT)
    before = len(xla_cpu._KEPT)
    benchmark.measure_matmul_peak("float32", 256, 0.01, dict(xla_cpu.ONEDNN_DOTS))
    benchmark.measure_matmul_peak("float32", 256, 0.01, None)
    assert len(xla_cpu._KEPT) == before + 1

    script = tmp_path / "drop.py"
    script.write_text(
        "import gc\nimport jax, jax.numpy as jnp\nfrom clip_jax.cpu import onednn as xla_cpu\n"
        "x = jnp.ones((512, 512), jnp.float32)\n"
        "for i in range(40):\n"
        "    f = jax.jit(lambda x, i=i: x @ x + i).lower(x).compile(compiler_options=dict(xla_cpu.ONEDNN_DOTS))\n"
        "    xla_cpu.keep_alive(f, xla_cpu.ONEDNN_DOTS)\n"
        "    f(x).block_until_ready()\n"
        "    del f\n"
        "    gc.collect()\n"
        "print('ended')\n")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the other core, busy
    try:
        # clip_jax from this checkout, installed or not
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    finally:
        burner.kill()
    assert done.returncode == 0 and "ended" in done.stdout, done.stderr[-2000:]
