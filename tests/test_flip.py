"""FLIP: patch dropout in a ViT's training passes (a uniform random subset of patch tokens per
example, the class token kept, the rng from the step), none in evaluation, and the unmasked tuning
phase from a configured step on, resumed exactly across the switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import smoke_config, text_batch, tiny_config, tiny_run

from clip_jax.models import create_model, get_model_config, init_variables
from clip_jax.models.vit import drop_patches


def test_drop_patches_keeps_the_class_token_and_a_uniform_subset_per_example():
    n, length, width = 64, 16, 3
    tokens = np.arange(n * (1 + length), dtype=np.float32).reshape(n, 1 + length, 1) * np.ones(width, np.float32)
    out = np.asarray(drop_patches(jnp.asarray(tokens), 0.5, jax.random.key(0)))
    assert out.shape == (n, 1 + 8, width)
    np.testing.assert_array_equal(out[:, 0], tokens[:, 0])  # the class token, first
    kept = [tuple((out[i, 1:, 0] - tokens[i, 1, 0]).astype(int)) for i in range(n)]  # patch indices kept
    assert all(len(set(k)) == 8 and list(k) == sorted(k) and max(k) < length for k in kept)
    assert len(set(kept)) > n // 2  # a different subset per example
    counts = np.bincount(np.concatenate(kept), minlength=length)
    assert counts.min() > 0.5 * counts.mean()  # every position kept about as often (uniform)
    assert drop_patches(jnp.asarray(tokens), 0.99, jax.random.key(0)).shape[1] == 2  # at least one patch
    again = np.asarray(drop_patches(jnp.asarray(tokens), 0.5, jax.random.key(0)))
    np.testing.assert_array_equal(out, again)


def test_patch_dropout_only_in_training():
    cfg = get_model_config("ViT-Tiny-test", {"vision_cfg": {"patch_dropout": 0.5}})
    model, plain = create_model(cfg), create_model("ViT-Tiny-test")
    variables = init_variables(plain, jax.random.key(0))
    data = text_batch(4, 32)
    rngs = {"dropout": jax.random.key(1)}
    evaluation = model.apply(variables, data["image"], data["tokens"])
    reference = plain.apply(variables, data["image"], data["tokens"])
    np.testing.assert_array_equal(evaluation["image_embeds"], reference["image_embeds"])  # unmasked
    trained = model.apply(variables, data["image"], data["tokens"], train=True, rngs=rngs)
    assert not np.allclose(trained["image_embeds"], reference["image_embeds"], atol=1e-3)
    tuned = model.apply(variables, data["image"], data["tokens"], train=True, mask_patches=False, rngs=rngs)
    np.testing.assert_allclose(tuned["image_embeds"], reference["image_embeds"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="patch_dropout must be in \\[0, 1\\)"):
        init_variables(create_model(get_model_config("ViT-Tiny-test", {"vision_cfg": {"patch_dropout": 1.0}})),
                       jax.random.key(0))


def test_the_step_masks_with_the_steps_rng_and_the_unmasked_phase_does_not():
    c = tiny_config()
    c.clip.patch_dropout, c.clip.unmasked_from_step = 0.5, 1
    r = tiny_run(c)
    assert [p.name for p in r.phases] == ["train", "unmasked"]
    assert r.step_for(0) is r.step_fn and r.step_for(1) is r.step_fns[1] is not r.step_fn
    data = text_batch(8, 32)
    copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)  # noqa: E731  (the steps donate their input)
    masked = [float(r.step_fn(copy(r.state), data)[1]["loss"]) for _ in range(2)]
    assert masked[0] == masked[1]  # the mask comes from (seed, step): the same step, the same mask
    unmasked = float(r.step_fns[1](copy(r.state), data)[1]["loss"])
    plain = tiny_run()
    assert unmasked == pytest.approx(float(plain.step_fn(plain.state, data)[1]["loss"]), rel=1e-6)
    assert masked[0] != pytest.approx(unmasked, rel=1e-4)


def test_resume_across_the_unmasked_switch_is_exact(tmp_path):
    from clip_jax import train

    def config(steps):
        c = smoke_config()
        c.model, c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = "ViT-Tiny-test", 16, 4, 1, 2
        c.eval_every_steps, c.compilation_cache_dir, c.summary_png = 0, "none", False
        c.clip.patch_dropout, c.clip.unmasked_from_step = 0.5, 3
        c.data.cache_dir = str(tmp_path / "cache")
        c.data.shapes_sizes = {"train": 64, "validation": 8, "test": 8}
        c.data.shapes_shards = {"train": 4}
        c.data.shuffle_buffer = 32
        return c

    import json

    rows = lambda d: [json.loads(x)["loss"] for x in open(d / "metrics.jsonl")]  # noqa: E731
    train.train_and_evaluate(config(4), str(tmp_path / "straight"))
    train.train_and_evaluate(config(4), str(tmp_path / "resumed"), stop_at=2)
    train.train_and_evaluate(config(4), str(tmp_path / "resumed"))
    np.testing.assert_allclose(rows(tmp_path / "resumed"), rows(tmp_path / "straight"), rtol=1e-6)


def test_flip_config_is_flips_recipe():
    import importlib.util
    import os

    from clip_jax import train
    from clip_jax.train.build import model_from_config

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "flip.py")
    spec = importlib.util.spec_from_file_location("flip", path)
    flip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flip)
    c = flip.get_config("ViT-B-16")
    assert c.batch_size == 65536 and c.clip.patch_dropout == 0.5 and c.optim.b2 == 0.95
    assert c.optim.learning_rate == pytest.approx(4e-6 * 65536 / 256)
    assert c.clip.unmasked_from_step == 12_800_000_000 // 65536 < c.total_steps
    model = model_from_config(c).config
    assert (model.vision.pool_type, model.vision.patch_dropout, model.text.context_length) == ("avg", 0.5, 32)
    assert model.init_logit_scale == pytest.approx(np.log(100.0))
    c.data.train = "shapes"
    train.validate(c)
    with pytest.raises(ValueError, match="not a ViT preset"):
        flip.get_config("RN50")
    c.clip.patch_dropout = 1.0
    with pytest.raises(ValueError, match="config.clip.patch_dropout=1.0"):
        train.validate(c)


def test_patch_dropout_on_a_resnet_is_refused():
    c = tiny_config("RN-Tiny-test")
    c.clip.patch_dropout = 0.5
    with pytest.raises(ValueError, match="drops a ViT's patch tokens; this image tower is a ModifiedResNet"):
        tiny_run(c)
