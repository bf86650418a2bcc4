"""Chinese-CLIP's two stages in one run (config.clip.unfreeze_at_step): stage 1 keeps the locked image
tower bit-identical, stage 2 trains it, and a run stopped on either side of the switch (or at it)
resumes to exactly what an uninterrupted run gives."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import smoke_config

from clip_jax import train
from clip_jax.train import checkpoint


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from clip_jax.api import write_flax_params
    from clip_jax.models import create_model, init_variables

    params = init_variables(create_model("cn-ViT-Tiny-test", scan=True), jax.random.key(42))["params"]
    path = str(tmp_path_factory.mktemp("weights") / "cn.msgpack")
    write_flax_params({"params": params}, path)
    return path, params


def config(tmp_path, weights, total=6, switch=3):
    c = smoke_config(tmp_path, total)
    c.model = "cn-ViT-Tiny-test"
    c.init_from, c.init_params, c.optim.frozen = weights, "visual/.*", "visual/.*"
    c.clip.unfreeze_at_step = switch
    c.summary_png, c.keep_checkpoints = False, 10
    return c


def saved(workdir, step):
    manager = checkpoint.make_manager(str(workdir / "checkpoints"))
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def losses(workdir):
    return [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_stage_one_locks_the_image_tower_then_stage_two_trains_it(tmp_path, weights):
    path, loaded = weights
    straight = tmp_path / "straight"
    train.train_and_evaluate(config(tmp_path, path), str(straight))
    stage1, stage2 = saved(straight, 2), saved(straight, 6)
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))  # noqa: E731
                            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert same(stage1["params"]["visual"], loaded["visual"])
    assert not same(stage1["params"]["text"], loaded["text"])
    assert not same(stage2["params"]["visual"], loaded["visual"])
    # Stage 1 holds no optimizer state for the locked tower; stage 2 does, from zero at the switch.
    assert "visual" not in json.dumps(jax.tree_util.tree_map(lambda x: 0, stage1["opt_state"]))
    assert "visual" in json.dumps(jax.tree_util.tree_map(lambda x: 0, stage2["opt_state"]))
    # One run stopped before, at and after the switch in turn, each stop resumed by the next run (one
    # run fewer per stop than a workdir each): every resume must be exact for the losses to be the
    # uninterrupted run's up to the next stop, and for the end to be its end.
    resumed = tmp_path / "stopped"
    for stop in (2, 3, 4):
        train.train_and_evaluate(config(tmp_path, path), str(resumed), stop_at=stop)
        np.testing.assert_allclose(losses(resumed), losses(straight)[:stop], rtol=1e-6, err_msg=f"stopped at {stop}")
    train.train_and_evaluate(config(tmp_path, path), str(resumed))
    np.testing.assert_allclose(losses(resumed), losses(straight), rtol=1e-6, err_msg="resumed from step 4")
    assert same(saved(resumed, 6), stage2)


def test_a_switch_without_a_first_stage_is_refused(tmp_path, weights):
    c = config(tmp_path, weights[0])
    c.optim.frozen = ""
    with pytest.raises(ValueError, match="freezes nothing: set config.optim.frozen"):
        train.train_and_evaluate(c, str(tmp_path / "w"))
    c = config(tmp_path, weights[0], total=6, switch=6)
    with pytest.raises(ValueError, match=r"unfreeze_at_step=6 must be in \(0, total_steps=6\)"):
        train.train_and_evaluate(c, str(tmp_path / "w2"))


def test_chinese_clip_config_is_its_recipe():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("cc", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                      "chinese_clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("cn-ViT-B-16")
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.warmup_steps) == (0.9, 0.98, 1e-6,
                                                                                                 0.2, 500)
    assert c.optim.learning_rate == 5e-4 and c.optim.frozen == "visual/.*"
    assert 0 < c.clip.unfreeze_at_step < c.total_steps
    from clip_jax.train.build import init_sources

    c.init_from = "clip.pt;roberta.bin"
    (a, visual), (b, text) = init_sources(c)
    assert (a, visual, b) == ("clip.pt", "visual/.*", "roberta.bin") and "encoder" in text
    c.init_from = "clip.pt"
    with pytest.raises(ValueError, match="names 1 files but config.init_params has 2"):
        init_sources(c)
