"""Few-shot adaptation against the references' own definitions: CoOp from "a photo of a" is the
frozen tower's prompt, CoCoOp with a zero meta-net is CoOp, Tip-Adapter with alpha = 0 is
zero-shot, the search grid is the reference's formula, only learned tensors train; the few-shot
protocol; the CLI on 1 and 8 devices and across a kill; bad input."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax.adapt import methods
from clip_jax.adapt.config import adapt_config
from clip_jax.adapt.data import base_and_novel, load_few_shot, per_class
from clip_jax.models import create_model, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["cat", "dog", "school bus", "red circle"]
SIZES = {"train": 400, "validation": 60, "test": 60}


@pytest.fixture(scope="module")
def frozen():
    model = create_model("ViT-Tiny-test")
    return model, init_variables(model, jax.random.key(3))


def settings(**kw):
    c = adapt_config()
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_from_words_is_the_frozen_towers_prompt(frozen, position):
    model, variables = frozen
    s = settings(ctx_init="a photo of a", class_token_position=position)
    coop = methods.CoOp(s, model, variables, NAMES, [[f"a photo of a {n}."] for n in NAMES])
    learned = coop.init(jax.random.key(0))
    assert learned["ctx"].shape == (4, model.config.text.width)
    got = coop.class_embeddings(learned)
    ctx = "a photo of a"
    text = {"end": [f"{ctx} {n}." for n in NAMES], "middle": [f"a photo {n} of a." for n in NAMES],
            "front": [f"{n} {ctx}." for n in NAMES]}[position]
    want = model.apply(variables, jnp.asarray(clip_jax.tokenize(text)), method="encode_text")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_coop_class_specific_context_and_gradients_only_on_ctx(frozen):
    model, variables = frozen
    coop = methods.CoOp(settings(n_ctx=3, csc=True), model, variables, NAMES, [])
    learned = coop.init(jax.random.key(0))
    assert learned["ctx"].shape == (len(NAMES), 3, model.config.text.width)
    features = jax.random.normal(jax.random.key(1), (5, model.config.embed_dim))
    loss = lambda learned, variables: jnp.sum(coop.logits(learned, features) ** 2)  # noqa: E731
    g_learned = jax.grad(loss)(learned, variables)
    assert float(jnp.abs(g_learned["ctx"]).min(axis=(1, 2)).max()) > 0 and bool(jnp.all(jnp.any(
        g_learned["ctx"] != 0, axis=(1, 2))))
    # the tower's own parameters are constants of the adapter: nothing of them is a learned leaf
    assert set(learned) == {"ctx"}


def _one_step_setup(frozen, method="coop", **kw):
    from clip_jax.adapt.method import build_adaptation
    from clip_jax.adapt.train import make_optimizer
    from clip_jax.parallel.sharding import make_mesh

    model, variables = frozen
    s = settings(method=method, n_ctx=2, **kw)
    adapter = methods.make_adapter(s, model, variables, NAMES, [[f"a photo of a {n}."] for n in NAMES])
    optimizer, _ = make_optimizer(s, 1, 5)
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731  (the step donates its state)
    return lambda accum: build_adaptation(adapter, optimizer, copy(variables), make_mesh({"data": -1}),
                                          crop_scale=s.crop_scale, seed=0, accum_steps=accum)


def _batch(model, real: int, rows: int):
    from clip_jax.adapt.method import row_weights

    size = model.config.vision.image_size
    images = np.random.default_rng(0).integers(0, 256, (rows, size, size, 3), np.uint8)
    labels = np.arange(rows, dtype=np.int32) % len(NAMES)
    return {"image": images, "label": labels, "weight": row_weights(real, rows)}


def test_the_adaptation_step_is_the_trainers_with_the_towers_a_frozen_group(frozen):
    model, variables = frozen
    run = _one_step_setup(frozen)(1)
    towers = len(jax.tree_util.tree_leaves(variables["params"]))
    assert run.groups.count() == (1, towers)  # the context trains; every tower tensor is frozen
    moments = jax.tree_util.tree_leaves(run.state.opt_state)
    assert moments and all(m.shape in ((), (2, model.config.text.width)) for m in moments)  # no state for towers
    before = jax.device_get(run.state.params)
    state, metrics = run.step_fn(run.state, _batch(model, 6, 16))
    assert {"loss", "train_top1", "grad_norm", "skipped_steps"} <= set(metrics)
    after = jax.device_get(state.params)
    for a, b in zip(jax.tree_util.tree_leaves(before["towers"]), jax.tree_util.tree_leaves(after["towers"])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(before["learned"]["ctx"], after["learned"]["ctx"])
    assert int(state.step) == 1


def test_padding_rows_and_accumulation_leave_the_gradient_of_the_real_rows(frozen, monkeypatch):
    """Row weights N / real: padded rows change nothing, and 2 microbatches give the whole batch's
    gradient (views made deterministic, so the microbatches' own augmentation keys do not matter)."""
    from clip_jax.adapt import method as adapt_method
    from clip_jax.preprocessing import normalize_images

    monkeypatch.setattr(adapt_method, "augment", lambda images, key, scale, size: normalize_images(images))
    model, _ = frozen
    make = _one_step_setup(frozen, "clip_adapter")
    batch = _batch(model, 8, 16)
    out = {}
    for name, accum, b in (("whole", 1, batch), ("accumulated", 2, batch),
                           ("unpadded", 1, {k: v[:8] if k != "weight" else np.ones(8, np.float32)
                                            for k, v in batch.items()})):
        run = make(accum)
        state, metrics = run.step_fn(run.state, b)
        out[name] = (jax.device_get(state.params["learned"]), float(metrics["loss"]))
    for name in ("accumulated", "unpadded"):
        assert out[name][1] == pytest.approx(out["whole"][1], rel=1e-5), name
        for k in out["whole"][0]:
            np.testing.assert_allclose(out[name][0][k], out["whole"][0][k], rtol=1e-5, atol=1e-7, err_msg=name)


def test_cocoop_with_a_zero_meta_net_is_coop(frozen):
    model, variables = frozen
    s = settings(ctx_init="a photo of a")
    cocoop = methods.CoCoOp(s, model, variables, NAMES, [])
    coop = methods.CoOp(s, model, variables, NAMES, [])
    learned = cocoop.init(jax.random.key(0))
    net = learned["meta_net"]
    net["linear2"] = jax.tree_util.tree_map(jnp.zeros_like, net["linear2"])
    features = jax.random.normal(jax.random.key(1), (3, model.config.embed_dim))
    np.testing.assert_allclose(np.asarray(cocoop.logits(learned, features)),
                               np.asarray(coop.logits({"ctx": learned["ctx"]}, features)), atol=1e-5)
    # a nonzero meta-net conditions the prompts on the image, and it is what the gradient trains
    learned = cocoop.init(jax.random.key(0))
    grads = jax.grad(lambda tensors: jnp.sum(cocoop.logits(tensors, features)))(learned)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_clip_adapter_is_its_formula(frozen):
    model, variables = frozen
    prompts = [[f"a photo of a {n}."] for n in NAMES]
    adapter = methods.ClipAdapter(settings(), model, variables, NAMES, prompts)
    learned = adapter.init(jax.random.key(0))
    f = np.asarray(jax.random.normal(jax.random.key(1), (4, model.config.embed_dim)))
    w1, w2 = np.asarray(learned["fc1"]), np.asarray(learned["fc2"])
    x = np.maximum(np.maximum(f @ w1, 0) @ w2, 0)
    mixed = 0.2 * x + 0.8 * f
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    want = adapter.scale * mixed @ methods.text_classifier(model, variables, prompts).T
    np.testing.assert_allclose(np.asarray(adapter.logits(learned, jnp.asarray(f))), want, rtol=1e-5, atol=1e-5)
    exported = adapter.export(learned)
    assert exported["adapter.fc.0.weight"].shape == (w1.shape[1], w1.shape[0])


def test_tip_adapter_cache_search_and_alpha_zero_is_zero_shot(frozen):
    model, variables = frozen
    prompts = [[f"a photo of a {n}.", f"a drawing of a {n}."] for n in NAMES]
    tip = methods.TipAdapter(settings(), model, variables, NAMES, prompts)
    rng = np.random.default_rng(0)
    passes = rng.standard_normal((3, 8, model.config.embed_dim)).astype(np.float32)
    labels = np.arange(8) % len(NAMES)
    keys = np.asarray(tip.build_cache(passes, labels))
    mean = passes.mean(0)  # averaged first, normalized after
    np.testing.assert_allclose(keys, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    learned = tip.init(None)
    f = rng.standard_normal((5, model.config.embed_dim)).astype(np.float32)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    w = methods.text_classifier(model, variables, prompts)
    # the CLIP term at the frozen model's own scale (the reference's 100 is OpenAI's models' scale)
    scale = min(float(np.exp(np.asarray(variables["params"]["logit_scale"]))), 100.0)
    assert scale < 50 and tip.scale == pytest.approx(scale, rel=1e-6)
    tip.alpha, tip.beta = 0.0, 5.0
    np.testing.assert_allclose(np.asarray(tip.logits(learned, jnp.asarray(f))), scale * fn @ w.T, rtol=1e-5,
                               atol=1e-4)
    tip.alpha, tip.beta = 2.0, 5.0
    onehot = np.eye(len(NAMES))[labels]
    want = scale * fn @ w.T + 2.0 * np.exp(-5.0 * (1 - fn @ keys.T)) @ onehot
    np.testing.assert_allclose(np.asarray(tip.logits(learned, jnp.asarray(f))), want, rtol=1e-5, atol=1e-4)
    # the grid is the reference's formula, and the search returns its best (first in loop order)
    betas, alphas = methods.search_grid((7, 3))
    assert len(betas) == 200 and len(alphas) == 20
    np.testing.assert_allclose(betas, [i * (7 - 0.1) / 200 + 0.1 for i in range(200)])
    np.testing.assert_allclose(alphas, [i * (3 - 0.1) / 20 + 0.1 for i in range(20)])
    val_labels = rng.integers(0, len(NAMES), 5)
    acc, beta, alpha = tip.search(learned, f, val_labels, (7, 3), (20, 5))
    best = -1.0
    for b in methods.search_grid((7, 3), (20, 5))[0]:
        for a in methods.search_grid((7, 3), (20, 5))[1]:
            logits = scale * fn @ w.T + a * np.exp(-b * (1 - fn @ keys.T)) @ onehot
            got = float(np.mean(logits.argmax(1) == val_labels))
            if got > best:
                best, want_ba = got, (b, a)
    assert acc == pytest.approx(best) and (beta, alpha) == pytest.approx(want_ba)


def test_few_shot_protocol(tmp_path):
    data = {"cache_dir": str(tmp_path / "cache"), "shapes_sizes": SIZES}
    a = load_few_shot("shapes", "label_shape", 4, 1, 32, data)
    b = load_few_shot("shapes", "label_shape", 4, 1, 32, data)
    c = load_few_shot("shapes", "label_shape", 4, 2, 32, data)
    assert a.classnames == ["circle", "square", "triangle", "star", "cross", "diamond"]
    assert a.train.images.shape == (24, 32, 32, 3) and a.train.images.dtype == np.uint8
    assert np.bincount(a.train.labels).tolist() == [4] * 6 and np.bincount(a.val.labels).tolist() == [4] * 6
    assert len(a.test) == SIZES["test"]
    np.testing.assert_array_equal(a.train.images, b.train.images)  # the seed fixes the draw
    assert not np.array_equal(a.train.images, c.train.images)
    one = load_few_shot("shapes", "label_shape", 1, 1, 32, data)
    assert np.bincount(one.val.labels).tolist() == [1] * 6  # min(K, 4) per class
    assert base_and_novel(6) == ([0, 1, 2], [3, 4, 5]) and base_and_novel(5) == ([0, 1, 2], [3, 4])
    idx = per_class(np.array([0, 1, 0, 1, 0]), [0, 1], 2, 0, "train", ["a", "b"])
    assert sorted(idx[:2]) == list(idx[:2]) and set(idx[2:]) == {1, 3}


def test_one_split_is_partitioned_per_class_into_fixed_disjoint_parts(tmp_path):
    """The default benchmark: the count of objects on the train split, partitioned 50 / 20 / 30 per class
    (the same parts for every seed) into the shots' pool, the validation pool and the test set."""
    from clip_jax.adapt.data import PARTS, partition
    from clip_jax.adapt.prompts import class_prompts
    from clip_jax.input import dataset_info, shapes

    assert dataset_info.split_specs("shapes:train") == dict.fromkeys(("train", "validation", "test"), "shapes:train")
    with pytest.raises(ValueError, match="shapes split 'nope'"):
        dataset_info.split_specs("shapes:nope")
    data = {"cache_dir": str(tmp_path / "cache"), "shapes_sizes": SIZES}
    a = load_few_shot(adapt_config().dataset, adapt_config().label_key, 4, 1, 32, data)
    assert a.classnames == ["one shape", "two shapes"]
    truth = np.array([len(shapes.make_example(0, "train", i)[2]) - 1 for i in range(SIZES["train"])])
    parts = partition(truth, [0, 1])
    assert sorted(np.concatenate(parts).tolist()) == list(range(SIZES["train"]))  # disjoint, and all of the split
    for c in (0, 1):
        n = int(np.sum(truth == c))
        assert [int(np.sum(truth[p] == c)) for p in parts[:2]] == [round(PARTS[0] * n), round(PARTS[1] * n)]
    np.testing.assert_array_equal(a.test.labels, truth[parts[2]])
    assert np.bincount(a.train.labels).tolist() == [4, 4] and np.bincount(a.val.labels).tolist() == [4, 4]
    tested = {image.tobytes() for image in a.test.images}
    assert not any(image.tobytes() in tested for image in np.concatenate([a.train.images, a.val.images]))
    b = load_few_shot("shapes:train", "label_count", 4, 2, 32, data)
    np.testing.assert_array_equal(b.test.images, a.test.images)  # fixed parts; the seed draws the shots
    assert not np.array_equal(b.train.images, a.train.images)
    prompts = class_prompts(adapt_config(), a.classnames)
    assert prompts == shapes.prompts("count") and "an image of two shapes." in prompts[1]


def test_kept_reads_give_the_same_few_shot_data_without_reading_again(tmp_path, monkeypatch):
    """keep_reads() (a sweep's): a second load of the same split reads no record, and gives what a fresh read gives."""
    from clip_jax.adapt import data as few_shot_data
    from clip_jax.input import eval_data

    data = {"cache_dir": str(tmp_path / "cache"), "shapes_sizes": SIZES}
    fresh = load_few_shot("shapes:train", "label_count", 4, 1, 32, data)
    monkeypatch.setattr(few_shot_data, "_kept_reads", None)  # off again once the test ends
    reads = []
    real = eval_data.read_examples
    monkeypatch.setattr(eval_data, "read_examples", lambda *a, **k: reads.append(a[2]) or real(*a, **k))
    few_shot_data.keep_reads()
    first = load_few_shot("shapes:train", "label_count", 4, 1, 32, data)
    assert len(reads) == 3  # the labels, the shots with the validation set, the test part
    second = load_few_shot("shapes:train", "label_count", 4, 1, 32, data)
    assert len(reads) == 3
    for got in (first, second):
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(got, split).images, getattr(fresh, split).images)
            np.testing.assert_array_equal(getattr(got, split).labels, getattr(fresh, split).labels)
    load_few_shot("shapes:train", "label_count", 4, 2, 32, data)  # another seed: only its shots are read
    assert len(reads) == 4


def test_bad_input_is_named(tmp_path):
    data = {"cache_dir": str(tmp_path / "cache"), "shapes_sizes": SIZES}
    with pytest.raises(ValueError, match=r"class 0 \('red circle'\) has \d+ examples in the train split, fewer "
                                         r"than the 500"):
        load_few_shot("shapes", "label", 500, 1, 32, data)
    with pytest.raises(ValueError, match="the class list has 2 names but .* declares 6 classes"):
        load_few_shot("shapes", "label_shape", 1, 1, 32, data, classnames=["a", "b"])
    with pytest.raises(ValueError, match="config.shots=0 must be >= 1"):
        load_few_shot("shapes", "label_shape", 0, 1, 32, data)
    from clip_jax.adapt.weights import load_frozen

    model = create_model("RN-Tiny-test")
    path = str(tmp_path / "rn.safetensors")
    clip_jax.save_open_clip("RN-Tiny-test", init_variables(model, jax.random.key(0)), path)
    with pytest.raises(ValueError, match="state dict does not match"):
        load_frozen(settings(weights=path, model="ViT-Tiny-test"))
    with pytest.raises(ValueError, match="config.weights is empty"):
        load_frozen(settings())
    from clip_jax.adapt.train import run

    for bound in (dict(method="tip_adapter", base_to_novel=True), dict(method="coop", csc=True, transfer=("shapes",))):
        with pytest.raises(ValueError, match="belong to the training classes"):  # before any weights are read
            run(settings(**bound), str(tmp_path / "bound"))


# -- the CLI: 1 and 8 devices, and a kill -----------------------------------------------------
def _cli(tmp_path, workdir, devices, method="coop", extra=()):
    from clip_jax.api import write_flax_params

    weights = tmp_path / "tiny.msgpack"
    if not weights.exists():
        model = create_model("ViT-Tiny-test")
        write_flax_params(init_variables(model, jax.random.key(5)), str(weights))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "clip_jax.adapt", f"--config={ROOT}/configs/adapt/{method}.py",
            f"--workdir={workdir}", f"--config.weights={weights}", "--config.model=ViT-Tiny-test",
            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.dataset=shapes",
            "--config.label_key=label_shape", "--config.shots=2", "--config.batch_size=8",
            "--config.epochs=3", "--config.checkpoint_every_steps=2", "--config.log_every_epochs=1",
            *[f"--config.data.shapes_sizes.{k}={v}" for k, v in SIZES.items()], *extra], env


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "clip_adapter", "tip_adapter_f"])
def test_one_and_eight_devices_agree_and_a_kill_resumes_exactly(tmp_path, method):
    """1 device vs 8 (4 x 2 data x fsdp: the frozen towers sharded); then stopped right after a
    checkpoint (SIGKILL, or SIGTERM: a preemption notice, which checkpoints and exits) and run
    again: the same tensors as straight through."""
    extra = {"cocoop": ("--config.batch_size=4", "--config.epochs=1"),
             "maple": ("--config.prompt_depth=2", "--config.epochs=2")}.get(method, ())
    results = {}
    for devices in (1, 8):
        mesh = ("--config.mesh.data=4", "--config.mesh.fsdp=2") if devices == 8 else ()
        cmd, env = _cli(tmp_path, tmp_path / f"d{devices}", devices, method, extra + mesh)
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=900)
        results[devices] = json.loads((tmp_path / f"d{devices}" / "results.json").read_text())
    for key in ("zero_shot_top1", "val_top1", "top1", "linear_probe_top1"):
        assert results[8][key] == pytest.approx(results[1][key], abs=1e-4), key
    from safetensors.numpy import load_file

    learned = {d: load_file(str(tmp_path / f"d{d}" / "adapter.safetensors")) for d in (1, 8)}
    for k in learned[1]:
        np.testing.assert_allclose(learned[8][k], learned[1][k], rtol=1e-4, atol=1e-5, err_msg=k)
    stop = signal.SIGTERM if method in ("coop", "clip_adapter") else signal.SIGKILL
    cmd, env = _cli(tmp_path, tmp_path / "killed", 1, method, extra)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = _first_checkpoint(tmp_path / "killed" / "checkpoints", proc)
    proc.send_signal(stop)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == (0 if stop == signal.SIGTERM else -signal.SIGKILL), rest[-2000:]
    if stop == signal.SIGTERM:
        assert "preemption notice (SIGTERM): saved a checkpoint at step" in rest, rest[-2000:]
    assert not (tmp_path / "killed" / "results.json").exists()
    again = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    resumed_at = [int(line.split()[-1]) for line in again.stdout.splitlines() if line.startswith("resumed from step")]
    assert resumed_at and resumed_at[0] >= first, again.stdout[-2000:]  # a resume, not a fresh start
    resumed = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    for k in learned[1]:
        np.testing.assert_array_equal(resumed[k], learned[1][k], err_msg=k)
    figures = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("zero_shot_top1", "val_top1", "top1", "linear_probe_top1"):
        assert figures[key] == results[1][key], key


def _first_checkpoint(directory, proc, timeout=600.0) -> int:
    """The step of the first checkpoint on disk under `directory` (Orbax renames a step's folder to the
    bare step number once it is written), waiting for it while `proc` runs."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = directory.glob("*") if directory.exists() else ()
        steps = [int(p.name) for p in found if p.is_dir() and p.name.isdigit()]
        if steps:
            return min(steps)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before writing a checkpoint"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint under {directory} within {timeout:.0f} s")


@pytest.mark.slow
def test_tip_adapter_and_base_to_novel_end_to_end(tmp_path):
    cmd, env = _cli(tmp_path, tmp_path / "tip", 1, "tip_adapter", ("--config.search_step=(20,5)",))
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=900)
    tip = json.loads((tmp_path / "tip" / "results.json").read_text())
    assert {"zero_shot_top1", "top1", "val_top1", "alpha", "beta"} <= set(tip)
    from safetensors.numpy import load_file

    from clip_jax.export import export

    written = export(str(tmp_path / "tip"), str(tmp_path / "out" / "tip"))
    tensors = load_file(written["adapter_safetensors"])
    assert tensors["cache_keys"].shape == (32, 12) and tensors["cache_values"].shape == (12, 6)  # [E, NK], [NK, C]
    assert tensors["text_features"].shape == (6, 32) and float(tensors["alpha"]) == pytest.approx(tip["alpha"])
    meta = json.loads(open(written["adapter_json"]).read())
    assert meta["classnames"][0] == "circle" and meta["method"] == "tip_adapter"
    loaded, _ = clip_jax.load(written["json"], written["safetensors"])
    assert loaded.config.embed_dim == 32
    cmd, env = _cli(tmp_path, tmp_path / "b2n", 1, "coop", ("--config.base_to_novel=True",
                                                             "--config.transfer=('shapes@label_color',)"))
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=900)
    b2n = json.loads((tmp_path / "b2n" / "results.json").read_text())
    a, b = b2n["base_top1"], b2n["novel_top1"]
    assert b2n["hm"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
    moved = b2n["transfer"]["shapes@label_color"]
    assert moved["classes"] == 6 and 0 <= moved["top1"] <= 1 and 0 <= moved["zero_shot_top1"] <= 1
    # python -m clip_jax.evaluate takes an adaptation workdir (its frozen towers)
    done = subprocess.run([sys.executable, "-m", "clip_jax.evaluate", f"--workdir={tmp_path / 'b2n'}",
                           "--eval=zero_shot=shapes:test|limit=20", f"--data=cache_dir={tmp_path / 'cache'}",
                           f"--data=shapes_sizes={json.dumps(SIZES)}"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


# -- MaPLe ------------------------------------------------------------------------------------
def test_deep_prompts_replace_tokens_at_the_input_of_the_active_layers():
    """The stack with prompts active at layer 1 only equals: layer 0, then tokens 1..n replaced by
    hand, then layer 1 (blocks applied one by one from the stack's own params)."""
    from clip_jax.models.layers import ResidualAttentionBlock, Transformer

    stack = Transformer(layers=2, heads=2)
    x = jax.random.normal(jax.random.key(0), (3, 6, 16))
    params = stack.init(jax.random.key(1), x)["params"]
    values = jax.random.normal(jax.random.key(2), (2, 2, 16))
    got = stack.apply({"params": params}, x, deep_prompts=(values, jnp.array([False, True]), 1))
    block = ResidualAttentionBlock(heads=2, depth=2)
    h = block.apply({"params": params["resblocks_0"]}, x)
    h = h.at[:, 1:3].set(values[1])
    want = block.apply({"params": params["resblocks_1"]}, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_maple_shallow_text_is_the_frozen_prompt_and_scan_equals_per_layer(frozen):
    model, variables = frozen
    names = NAMES[:3]
    one = methods.MaPLe(settings(ctx_init="a photo of a", n_ctx=2, prompt_depth=1), model, variables, names, [])
    learned = one.init(jax.random.key(0))
    want = model.apply(variables, jnp.asarray(clip_jax.tokenize([f"a photo of a {n}." for n in names])),
                       method="encode_text")
    np.testing.assert_allclose(np.asarray(one.class_embeddings(learned)), np.asarray(want), atol=1e-5)
    # depth 2, the scanned towers against the per-layer ones, with the same weights
    from clip_jax import convert

    s = settings(ctx_init="a photo of a", n_ctx=2, prompt_depth=2)
    scanned_model = create_model("ViT-Tiny-test", scan=True)
    scanned_vars = convert.state_dict_to_variables(scanned_model, convert.variables_to_state_dict(variables))
    a = methods.MaPLe(s, model, variables, names, [])
    b = methods.MaPLe(s, scanned_model, scanned_vars, names, [])
    learned = a.init(jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    fa, fb = a.image_features(learned, images), b.image_features(learned, images)
    np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.logits(learned, fa)), np.asarray(b.logits(learned, fb)), atol=1e-4)
    # the deep text prompts reach the image features through the coupling projections
    grad = jax.grad(lambda t: jnp.sum(a.image_features(t, images) ** 2))(learned)
    assert float(jnp.abs(grad["compound_prompts_text"]).max()) > 0
    assert float(jnp.abs(grad["compound_projections"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="MaPLe prompts a ViT"):
        rn = create_model("RN-Tiny-test")
        methods.MaPLe(s, rn, init_variables(rn, jax.random.key(0)), names, [])
