"""The one trainer and its seams: parameter groups (frozen, learning-rate multiplier, weight decay),
partial initialization, and a second method trained through the same trainer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from tiny import smoke_config, text_batch, tiny_config, tiny_run

from clip_jax.methods import METHODS
from clip_jax.methods.clip import Clip
from clip_jax.models import create_model, variable_shapes
from clip_jax.train.optim import make_optimizer, resolve_param_groups


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


# -- parameter groups --------------------------------------------------------------------
def test_group_errors_name_the_problem_before_anything_compiles():
    params = variable_shapes(create_model("ViT-Tiny-test", scan=True))["params"]
    with pytest.raises(ValueError, match=r"config.optim.frozen: '\(' is not a valid regex"):
        resolve_param_groups(params, {"frozen": "("})
    with pytest.raises(ValueError, match=r"config.optim.frozen='vision/.\*' matches no parameter"):
        resolve_param_groups(params, {"frozen": "vision/.*"})
    with pytest.raises(ValueError, match=r"param_groups\[0\] \('text'\) matches no parameter"):
        resolve_param_groups(params, {"param_groups": (("text", {"lr_mult": 0.1}),)})  # a whole path must match
    with pytest.raises(ValueError, match="unknown settings \\['lr'\\]"):
        resolve_param_groups(params, {"param_groups": (("text/.*", {"lr": 0.1}),)})
    with pytest.raises(ValueError, match="nothing is left to train"):
        resolve_param_groups(params, {"frozen": ".*"})
    with pytest.raises(ValueError, match="nothing is left to train"):
        resolve_param_groups(params, {"frozen": "visual/.*", "param_groups": (("text/.*|logit_scale", {"frozen": 1}),)})
    groups = resolve_param_groups(params, {"frozen": ""})
    assert groups.count() == (len(_flat(params)), 0)


def test_group_learning_rate_and_decay_by_hand():
    """First match wins; lr_mult scales the step, weight_decay replaces the coefficient (on decayed
    names only): one AdamW step checked against numpy."""
    params = {"a": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
              "b": {"kernel": jnp.full((2, 2), 2.0)}}
    grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.5), params)
    cfg = {"learning_rate": 0.1, "warmup_steps": 0, "weight_decay": 0.2, "grad_clip_norm": 0.0,
           "param_groups": (("a/.*", {"lr_mult": 0.5, "weight_decay": 0.0}), ("b/.*", {"weight_decay": 1.0}))}
    groups = resolve_param_groups(params, cfg)
    opt = make_optimizer(cfg, params, total_steps=100, groups=groups)
    updates, _ = opt.update(grads, opt.init(params), params)
    lr = float(optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, 100)(0))
    adam = (0.1 * 0.5 / 0.1) / (np.sqrt(0.02 * 0.25 / 0.02) + 1e-6)  # bias-corrected first step
    np.testing.assert_allclose(updates["a"]["kernel"], -0.5 * lr * adam, rtol=1e-5)  # no decay, half the rate
    np.testing.assert_allclose(updates["a"]["bias"], -0.5 * lr * adam, rtol=1e-5)
    np.testing.assert_allclose(updates["b"]["kernel"], -lr * (adam + 1.0 * 2.0), rtol=1e-5)


def test_frozen_params_get_no_gradient_no_state_and_never_change():
    full = tiny_run()
    r = tiny_run(tiny_config(frozen="visual/.*"))
    trained_count, frozen_count = r.groups.count()
    assert frozen_count == len([k for k in _flat(r.state.params) if k.startswith("visual/")]) and trained_count > 0
    # No optimizer state for frozen params: Adam's moments cover the text tower and the temperature only.
    moments = [s for s in jax.tree_util.tree_leaves(r.state.opt_state,
                                                    is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)][0]
    assert set(_flat(moments.mu)) == {k for k in _flat(r.state.params) if not k.startswith("visual/")}
    # No gradient computed: the compiled step does no backward pass through the image tower.
    data = text_batch(8, 32)
    flops = lambda run: run.step_fn.lower(run.state, data).compile().cost_analysis()["flops"]  # noqa: E731
    assert flops(r) < 0.8 * flops(full)
    before = _flat(r.state.params)
    state = r.state
    for i in range(3):
        state, metrics = r.step_fn(state, text_batch(8, 32, i))
    after = _flat(state.params)
    for k in before:
        if k.startswith("visual/"):
            assert before[k].tobytes() == after[k].tobytes(), k  # bit for bit
    assert not np.array_equal(before["text/text_projection"], after["text/text_projection"])


# -- a second method through the same trainer --------------------------------------------
@METHODS.register("clip_align_test")
class ClipWithAlignment(Clip):
    """CLIP plus a second loss term on an extra param: a learned scalar gate times the mean squared
    distance of paired embeddings. Shows extra variables, named metrics and a summed loss."""

    weight = 0.5

    def init(self, rng):
        variables = dict(super().init(rng))
        variables["params"] = dict(variables["params"], align_gate=jnp.ones((), jnp.float32))
        return variables

    def loss(self, params, model_state, batch, rng, train=True):
        clip_params = {k: v for k, v in params.items() if k != "align_gate"}
        out, model_state = self.embed(clip_params, model_state, batch, train)
        clip = self.loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        align = jnp.mean(jnp.sum((out["image_embeds"] - out["text_embeds"]) ** 2, -1)) * params["align_gate"]
        return clip + self.weight * align, {"clip_loss": clip, "align": align}, model_state

    def param_groups(self):
        return (("align_gate", {"lr_mult": 10.0}),)

    def model_variables(self, params, model_state):
        return {"params": {k: v for k, v in params.items() if k != "align_gate"}, **model_state}


def _smoke(tmp_path, steps, **changes):
    c = smoke_config()
    c.model = "ViT-Tiny-test"
    c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 16, steps, 1, steps
    c.eval_every_steps, c.compilation_cache_dir = 0, "none"
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.shapes_sizes = {"train": 64, "validation": 8, "test": 8}
    c.data.shapes_shards = {"train": 4}
    c.data.shuffle_buffer = 32
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_methods_train_through_the_same_trainer(tmp_path):
    from clip_jax import train

    train.train_and_evaluate(_smoke(tmp_path, 3), str(tmp_path / "clip"))
    train.train_and_evaluate(_smoke(tmp_path, 3, method="clip_align_test"), str(tmp_path / "align"))
    clip, align = _rows(tmp_path / "clip"), _rows(tmp_path / "align")
    assert "align" not in clip[0] and {"clip_loss", "align", "grad_norm"} <= set(align[0])
    for row in align:  # the trainer logs the summed loss the method returned, and its named terms
        np.testing.assert_allclose(row["loss"], row["clip_loss"] + 0.5 * row["align"], rtol=1e-5)
    # Same data and init: the first step's CLIP term equals plain CLIP's loss.
    np.testing.assert_allclose(align[0]["clip_loss"], clip[0]["loss"], rtol=1e-5)
    assert align[2]["clip_loss"] != pytest.approx(clip[2]["loss"], rel=1e-6)  # the extra term changed training
    with pytest.raises(ValueError, match="unknown method 'nope': choose one of clip, "):
        train.validate(_smoke(tmp_path, 3, method="nope"))


# -- partial initialization and freezing from weights ------------------------------------
def _weights(tmp_path, seed=42):
    from clip_jax.api import write_flax_params
    from clip_jax.models import init_variables

    params = init_variables(create_model("ViT-Tiny-test", scan=True), jax.random.key(seed))["params"]
    path = str(tmp_path / "w.msgpack")
    write_flax_params({"params": params}, path)
    return params, path


def test_init_params_takes_only_the_matching_params(tmp_path):
    loaded, path = _weights(tmp_path)
    fresh = _flat(tiny_run().state.params)
    c = tiny_config()
    c.init_from, c.init_params = path, "visual/.*"
    got = _flat(tiny_run(c).state.params)
    want = _flat(loaded)
    for k in got:
        np.testing.assert_array_equal(got[k], want[k] if k.startswith("visual/") else fresh[k], err_msg=k)
    c.init_params = "vision/.*"
    with pytest.raises(ValueError, match="init_params='vision/.\\*' matches no parameter"):
        tiny_run(c)
    c.init_params = "("
    with pytest.raises(ValueError, match="not a valid regex"):
        tiny_run(c)
    c.init_params = ".*"
    c.model_overrides = {"text_cfg": {"width": 64, "heads": 2}}  # a wider text tower than the file's
    with pytest.raises(ValueError, match=r"init_from=.*: params 'text/[a-z_/]+' has shape \((\d+, )?32,?\) in "
                                         r"the weights, the model's is \((\d+, )?64,?\)"):
        tiny_run(c)


@pytest.mark.slow
def test_lit_style_frozen_image_tower_from_weights_exports_it_bit_for_bit(tmp_path):
    """Freeze visual/.* loaded from a weights file, train, export: the exported visual.* tensors are
    the loaded ones bit for bit, the text tower's are not, and the checkpoint holds no moments for
    the frozen params (it is smaller than an unfrozen run's by about twice their bytes)."""
    from safetensors.numpy import load_file

    from clip_jax import convert, export, train

    loaded, path = _weights(tmp_path)
    frozen = _smoke(tmp_path, 3, init_from=path, **{"optim.frozen": "visual/.*"})
    train.train_and_evaluate(frozen, str(tmp_path / "lit"))
    train.train_and_evaluate(_smoke(tmp_path, 3, init_from=path), str(tmp_path / "full"))
    model = create_model("ViT-Tiny-test", scan=True)
    want = convert.variables_to_state_dict({"params": loaded})
    out = export.export(str(tmp_path / "lit"), str(tmp_path / "out" / "lit"))
    got = load_file(out["safetensors"])
    visual = [k for k in got if k.startswith("visual.")]
    assert visual and all(np.asarray(want[k]).tobytes() == got[k].tobytes() for k in visual)
    text = [k for k in got if k.startswith(("transformer.", "token_embedding", "text_projection"))]
    assert text and sum(not np.array_equal(np.asarray(want[k]), got[k]) for k in text) >= len(text) - 2
    del model

    def size(run):
        root = tmp_path / run / "checkpoints" / "3"
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    frozen_bytes = sum(v.size * 4 for k, v in _flat(loaded).items() if k.startswith("visual/"))
    saved = size("full") - size("lit")
    assert 1.6 * frozen_bytes < saved < 2.4 * frozen_bytes, (saved, frozen_bytes)


def test_init_params_from_an_open_clip_safetensors_file(tmp_path):
    """The same partial initialization from open_clip's layout (the converter reads only the taken keys)."""
    from clip_jax.api import save_open_clip

    loaded, _ = _weights(tmp_path)
    path = str(tmp_path / "w.safetensors")
    save_open_clip("ViT-Tiny-test", {"params": loaded}, path)
    c = tiny_config()
    c.init_from, c.init_params = path, "text/.*|logit_scale"
    got, want, fresh = _flat(tiny_run(c).state.params), _flat(loaded), _flat(tiny_run().state.params)
    for k in got:
        np.testing.assert_array_equal(got[k], fresh[k] if k.startswith("visual/") else want[k], err_msg=k)
    c.model_overrides = {"text_cfg": {"width": 64, "heads": 2}}
    with pytest.raises(ValueError, match=r"params 'text/[a-z_/]+' has shape \((\d+, )?32,?\) in the weights \(key"):
        tiny_run(c)


def test_a_locked_resnet_image_tower_keeps_its_batchnorm_statistics():
    """LiT with a ResNet: the frozen image tower runs in inference mode, so its BatchNorm statistics
    stay bit-identical too; unfrozen, they move."""
    locked, free = tiny_run(tiny_config("RN-Tiny-test", frozen="visual/.*")), tiny_run(tiny_config("RN-Tiny-test"))
    assert locked.method.image_locked and not free.method.image_locked
    for r, moves in ((locked, False), (free, True)):
        before = _flat(r.state.model_state)
        state = r.state
        for i in range(2):
            state, _ = r.step_fn(state, text_batch(8, 64, i))
        after = _flat(state.model_state)
        changed = [k for k in before if before[k].tobytes() != after[k].tobytes()]
        assert bool(changed) == moves, changed[:3]


def test_lit_config_locks_the_loaded_image_tower(tmp_path):
    """configs/lit.py: visual/.* taken from init_from and frozen; without weights it refuses to start."""
    import importlib.util

    from clip_jax import train

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lit.py")
    spec = importlib.util.spec_from_file_location("lit", path)
    lit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lit)
    c = lit.get_config("ViT-Tiny-test")
    c.data.train = "shapes"
    with pytest.raises(ValueError, match="locks weights that are never loaded: set --config.init_from"):
        train.validate(c)
    loaded, c.init_from = _weights(tmp_path)
    c.batch_size, c.total_steps = 8, 10
    r = tiny_run(c)
    got, want = _flat(r.state.params), _flat(loaded)
    assert all(np.array_equal(got[k], want[k]) for k in got if k.startswith("visual/"))
    assert r.groups.count()[1] == sum(k.startswith("visual/") for k in got)
    assert float(r.state.params["logit_scale"]) == pytest.approx(np.log(10.0))


@pytest.mark.slow
def test_lit_from_cached_image_embeddings_gives_the_online_losses(tmp_path):
    from clip_jax import train
    from clip_jax.embed import embed

    _, weights = _weights(tmp_path)
    lit = {"init_from": weights, "init_params": "visual/.*", "optim.frozen": "visual/.*"}
    cache = str(tmp_path / "embeds")
    from_cache = {"clip.image_embeddings": cache}
    train.train_and_evaluate(_smoke(tmp_path, 4, **lit), str(tmp_path / "online"))
    manifest = embed(_smoke(tmp_path, 4, **lit), cache, chunk_steps=3, log=lambda message: None)
    assert manifest["steps"] == 4 and sorted(os.listdir(cache)) == [
        "embeds-00000000.npz", "embeds-00000003.npz", "manifest.json"]
    # stopped after 2 steps and resumed: the cache's position is checkpointed as a pipeline's is
    train.train_and_evaluate(_smoke(tmp_path, 4, **from_cache, **lit), str(tmp_path / "cached"), stop_at=2)
    train.train_and_evaluate(_smoke(tmp_path, 4, **from_cache, **lit), str(tmp_path / "cached"))
    online, cached = _rows(tmp_path / "online"), _rows(tmp_path / "cached")
    assert [r["step"] for r in cached] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in cached], [r["loss"] for r in online], rtol=1e-5)
    # a cache made with other settings, a tower not locked, too few steps: refused, the setting named
    with pytest.raises(ValueError, match="other settings than this run's.*seed: cache 0, run 1"):
        train.train_and_evaluate(_smoke(tmp_path, 4, **from_cache, seed=1, **lit), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="image tower must be locked"):
        train.train_and_evaluate(_smoke(tmp_path, 4, **from_cache, init_from=weights,
                                        init_params="visual/.*"), str(tmp_path / "y"))
    with pytest.raises(ValueError, match="holds 4 steps but config.total_steps=5"):
        train.train_and_evaluate(_smoke(tmp_path, 5, **from_cache, **lit), str(tmp_path / "z"))


@pytest.mark.parametrize("model,loss,patch_dropout", [("ViT-Tiny-test", "softmax_ring", 0.5),
                                                      ("RN-Tiny-test", "sigmoid", 0.0),
                                                      ("cn-ViT-Tiny-test", "softmax_ring", 0.0)])
def test_ring_losses_run_the_text_backward_first_without_changing_the_step(model, loss, patch_dropout):
    """With a ring loss the towers are applied one by one (the image cotangent held back until the
    text gradient is complete); loss, metrics, gradients, BatchNorm statistics and the patch
    dropout's and the BERT tower's dropout draws equal those of the one joint apply the other
    losses use."""
    config = tiny_config(model=model, loss=loss)
    config.clip.patch_dropout = patch_dropout
    r = tiny_run(config)
    method = r.method
    assert method.text_backward_first
    batch = text_batch(8, method.model.config.vision.image_size, model=model if model.startswith("cn-") else None)
    rng = jax.random.key(3)

    def run(ordered):
        method.text_backward_first = ordered

        def f(params):
            loss, metrics, state = method.loss(params, r.state.model_state, batch, rng, train=True)
            return loss, (metrics, state)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(r.state.params)

    (loss_ordered, aux_ordered), grads_ordered = run(True)
    if "ring" in loss:  # the ordering is in the program: a barrier on the cotangents
        method.text_backward_first = True
        hlo = jax.jit(jax.grad(lambda p: method.loss(p, r.state.model_state, batch, rng)[0])).lower(
            r.state.params).as_text()
        assert "optimization_barrier" in hlo
    (loss_joint, aux_joint), grads_joint = run(False)
    np.testing.assert_allclose(loss_ordered, loss_joint, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((aux_ordered, grads_ordered)),
                    jax.tree_util.tree_leaves((aux_joint, grads_joint))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    if model.startswith("RN"):
        assert jax.tree_util.tree_leaves(aux_ordered[1])  # BatchNorm statistics came back
