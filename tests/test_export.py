"""python -m clip_jax.export: a training workdir (read through clip_jax.runs) -> open_clip .safetensors
+ JSON + Flax .msgpack, which clip_jax.load reads back bit for bit; clear errors for a workdir it
cannot use; a damaged newest checkpoint is passed over, and left where it is."""

import jax
import numpy as np
import pytest
from test_train import smoke_config

import clip_jax
from clip_jax import export, runs, train


def test_export_of_a_trained_run_loads_back(tmp_path, capsys):
    c = smoke_config(tmp_path, 4)
    train.train_and_evaluate(c, str(tmp_path / "run"))
    # the newest checkpoint damaged (half its largest file): the run reads as of the one before,
    # and the damaged one stays where it is (reading a workdir changes nothing in it)
    latest = tmp_path / "run" / "checkpoints" / "4"
    data = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    files = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    messages = []
    assert runs.read(str(tmp_path / "run"), log=messages.append).step == 2
    assert "checkpoints/4 is unreadable" in messages[0]
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == files
    with pytest.raises(Exception):  # a step asked for by name is read or fails, never replaced
        runs.read(str(tmp_path / "run"), step=4)
    import shutil

    shutil.rmtree(latest)
    run = runs.read(str(tmp_path / "run"))
    model, trained = run.model, run.variables
    assert (run.kind, run.step) == (runs.TRAINING, 2)
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
        runs.read(str(tmp_path))
    (tmp_path / "config.json").write_text(smoke_config(tmp_path, 1).to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        runs.read(str(tmp_path))
