"""python -m clip_jax.export: a training workdir -> open_clip .safetensors + JSON + Flax .msgpack,
which clip_jax.load reads back bit for bit; clear errors for a workdir it cannot use."""

import jax
import numpy as np
import pytest
from test_train import smoke_config

import clip_jax
from clip_jax import export, train


def test_export_of_a_trained_run_loads_back(tmp_path, capsys):
    c = smoke_config(tmp_path, 2)
    train.train_and_evaluate(c, str(tmp_path / "run"))
    model, trained, step = export.load_run(str(tmp_path / "run"))
    assert step == 2
    export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out' / 'tiny'}"])
    assert "exported step 2" in capsys.readouterr().out
    for name, path in ((str(tmp_path / "out" / "tiny.json"), tmp_path / "out" / "tiny.safetensors"),
                       ("ViT-Tiny-test", tmp_path / "out" / "tiny.msgpack")):
        _, loaded = clip_jax.load(name, str(path))
        for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(trained)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The export holds the trained run, not a fresh init.
    fresh = clip_jax.init_variables(model, jax.random.key(c.seed))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(trained)))


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a clip_jax training workdir"):
        export.load_run(str(tmp_path))
    (tmp_path / "config.json").write_text(smoke_config(tmp_path, 1).to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export.load_run(str(tmp_path))
