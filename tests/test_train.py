"""End to end: the trainer on the embedded dataset, and a restart that continues exactly."""

import importlib.util
import json
import os

import jax
import numpy as np

from clip_jax import train


def smoke_config(tmp_path, total_steps):
    spec = importlib.util.spec_from_file_location(
        "smoke", os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model = "ViT-Tiny-test"  # the unit-test model: these tests are about the trainer, not the demo
    c.batch_size = 16
    c.total_steps = total_steps
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.shapes_sizes = {"train": 64, "validation": 8, "test": 8}
    c.data.shapes_shards = {"train": 4}
    c.data.shuffle_buffer = 32
    return c


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_restart_continues_exactly_past_a_corrupt_checkpoint(tmp_path, capsys):
    straight = tmp_path / "straight"
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(straight))
    # The run's picture: the curves, and under them the grid of zero-shot predictions on test images.
    from PIL import Image

    from clip_jax.evaluate import summary

    picture = Image.open(straight / "summary.png")
    assert picture.height > summary.PANEL[1] + 100 and picture.width >= 3 * summary.PANEL[0]
    interrupted = tmp_path / "interrupted"
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(interrupted), stop_at=4)  # stops after step 4 ...
    # ... its latest checkpoint (step 4) is damaged: the biggest array file cut in half ...
    latest = interrupted / "checkpoints" / "4"
    data = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capsys.readouterr()
    train.train_and_evaluate(smoke_config(tmp_path, 6), str(interrupted))  # ... a new run resumes from step 2
    out = capsys.readouterr().out
    assert f"checkpoint {latest} is unreadable" in out and "resumed from step 2" in out
    assert (interrupted / "checkpoints" / "4.unreadable").is_dir()  # kept for inspection
    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [m["step"] for m in a] == [1, 2, 3, 4, 5, 6] and [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert set(x) >= {"step", "loss", "learning_rate", "logit_scale", "images_per_sec"}
        np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-6)
    # TensorBoard events hold the same losses.
    import tensorflow as tf

    events = sorted((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    logged = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            if value.tag == "loss":
                logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([logged[s] for s in range(1, 7)], [m["loss"] for m in a], rtol=1e-6)


def test_non_finite_steps_stop_the_run_and_are_never_checkpointed(tmp_path, monkeypatch):
    import jax.numpy as jnp
    import pytest

    from clip_jax.methods import clip as clip_method
    from clip_jax.train import checkpoint

    # Every image becomes NaN inside the step, so every loss and gradient is NaN.
    monkeypatch.setattr(clip_method, "model_images", lambda x: jnp.full(x.shape, jnp.nan, jnp.float32))
    c = smoke_config(tmp_path, 10)
    c.max_nonfinite_steps = 3
    with pytest.raises(train.NonFiniteError, match="3 steps in a row had a non-finite"):
        train.train_and_evaluate(c, str(tmp_path / "w"))
    rows = read_metrics(tmp_path / "w")
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]  # the streak is checked one step behind
    manager = checkpoint.make_manager(str(tmp_path / "w" / "checkpoints"))
    assert 2 in manager.all_steps() and max(manager.all_steps()) == 2  # none after the streak began to count
    import orbax.checkpoint as ocp

    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_init_from_weights_file(tmp_path):
    from clip_jax.api import write_flax_params
    from clip_jax.models import create_model, init_variables

    model = create_model("ViT-Tiny-test", scan=True)
    params = init_variables(model, jax.random.key(42))["params"]
    write_flax_params({"params": params}, str(tmp_path / "w.msgpack"))
    c = smoke_config(tmp_path, 1)
    c.init_from = str(tmp_path / "w.msgpack")
    c.optim.learning_rate = 0.0  # the saved step-1 params are the loaded ones
    train.train_and_evaluate(c, str(tmp_path / "run"))
    import orbax.checkpoint as ocp

    from clip_jax.train import checkpoint

    manager = checkpoint.make_manager(str(tmp_path / "run" / "checkpoints"))
    saved = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c.init_from = str(tmp_path / "missing.msgpack")
    import pytest

    with pytest.raises(FileNotFoundError, match="init_from"):
        train.train_and_evaluate(c, str(tmp_path / "run2"))


def test_paper_configs_for_every_preset():
    import pytest

    spec = importlib.util.spec_from_file_location(
        "paper", os.path.join(os.path.dirname(__file__), "..", "configs", "clip_paper.py")
    )
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    from clip_jax.models import create_model, list_models

    presets = [m for m in list_models()
               if "test" not in m and "-Shapes-" not in m and not m.startswith(("cn-", "GroupViT", "Swin"))
               and "-SigLIP" not in m]
    assert len(presets) == 20  # 10 sizes, each also -quickgelu
    for name in presets:
        c = paper.get_config(name)
        assert c.batch_size == 32768 and c.total_steps in (390625, 12207)
        assert (c.optim.b2, c.optim.eps) == ((0.98, 1e-6) if name.startswith("ViT") else (0.999, 1e-8))
        assert c.optim.weight_decay == 0.2
        create_model(c.model, dtype=c.dtype, remat=c.remat, scan=c.scan)
        with pytest.raises(ValueError, match="data.train is empty"):
            train.validate(c)
        c.data.train = "shapes"
        train.validate(c)
    assert paper.get_config("RN50x64").optim.learning_rate == 3.6e-4
    with pytest.raises(ValueError, match="no paper recipe"):
        paper.get_config("ViT-Tiny-test")
    # Per-hardware plans: 'MODEL,TOPOLOGY' takes the measured one; no topology means v5e:16x16's.
    for topology, plans in paper.PLANS.items():
        assert set(plans) == set(paper.LEARNING_RATE), topology  # every preset measured on every pod
        for name, (mesh, remat, accum) in plans.items():
            c = paper.get_config(f"{name},{topology}")
            assert (c.mesh.to_dict(), c.remat, c.accum_steps) == (mesh, remat, accum)
            assert c.batch_size % accum == 0
    assert paper.get_config("ViT-L-14").mesh.to_dict() == paper.get_config("ViT-L-14,v5e:16x16").mesh.to_dict()
    with pytest.raises(ValueError, match="no plans for topology 'v3:8x8'"):
        paper.get_config("ViT-L-14,v3:8x8")


def test_siglip_config_is_the_paper_recipe_with_the_sigmoid_loss_and_siglip_text_tower():
    import math

    import pytest

    from clip_jax.train.build import model_from_config

    spec = importlib.util.spec_from_file_location(
        "siglip", os.path.join(os.path.dirname(__file__), "..", "configs", "siglip.py"))
    siglip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(siglip)
    c = siglip.get_config("ViT-B-16,v5p:4x4x8")
    assert c.clip.loss == "sigmoid" and c.batch_size == 32768
    model = model_from_config(c)
    assert model.config.init_logit_bias == -10.0 and model.config.init_logit_scale == pytest.approx(math.log(10))
    text = model.config.text
    assert (text.context_length, text.no_causal_mask, text.pool_type) == (64, True, "last")
    assert model.config.vision.pool_type == "map"
    with pytest.raises(ValueError, match="takes a ViT preset"):
        siglip.get_config("RN50")


def test_evaluations_come_at_their_steps_between_log_steps(tmp_path):
    c = smoke_config(tmp_path, 3)
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 1, 3
    c.data.eval = "zero_shot=shapes:validation"
    c.eval_batch_size, c.summary_png = 8, False
    train.train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert all("zero_shot/shapes.validation/color/top1" in m for m in rows)
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == ["step_1.json", "step_2.json",
                                                                            "step_3.json"]
