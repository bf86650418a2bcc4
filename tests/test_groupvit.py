"""GroupViT (clip_jax.models.groupvit, clip_jax.hf_layouts.groupvit, clip_jax.methods.groupvit): parity with
transformers' GroupViTModel on random weights both ways with strict keys, the straight-through assignment,
the projectors' global-batch BatchNorm, and the multi-label loss and segmentation against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_jax
from clip_jax.models import create_model, get_model_config
from clip_jax.models import groupvit as gv
from tests.conftest import reference

EOT = 63  # the tiny vocabulary's last id: the end of text, which both sides pool at
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=EOT, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, depths=[1, 1, 1], num_hidden_layers=3, num_group_tokens=[8, 4, 0],
              num_output_groups=[8, 4, 4], num_attention_heads=2, image_size=32, patch_size=8)


def _hf_model(seed=0):
    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(seed)
    config = transformers.GroupViTConfig(text_config=TEXT, vision_config=VISION, projection_dim=16,
                                         projection_intermediate_dim=48, logit_scale_init_value=2.0)
    model = transformers.GroupViTModel(config).eval()
    with torch.no_grad():  # transformers' init leaves biases, group tokens and BatchNorm plain: randomize all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for bn in (model.visual_projection[1], model.text_projection[1]):
            bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
            bn.num_batches_tracked.fill_(7)
    return model


def _inputs():
    rng = np.random.RandomState(0)
    images = rng.normal(0, 1, (3, 32, 32, 3)).astype(np.float32)  # already normalized, as clip_jax's towers take
    tokens = np.zeros((3, 16), np.int32)
    for row, length in enumerate((16, 9, 4)):
        tokens[row, :length] = rng.randint(2, EOT - 2, length)
        tokens[row, 0], tokens[row, length - 1] = 62, EOT
    return images, tokens


def _hf_outputs(model, images, tokens):
    torch = reference("torch")
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        out = model(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels, output_attentions=True,
                    return_dict=True)
    return (out.image_embeds.numpy(), out.text_embeds.numpy(),
            [a.numpy() for a in out.vision_model_output.attentions])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("groupvit_hf")
    model = _hf_model()
    model.save_pretrained(str(path))
    return path, model


def test_parity_with_transformers(hf_dir):
    """Imported from a GroupViTModel directory: image and text embeddings and both stages' soft assignments
    equal transformers' in evaluation mode (1e-5)."""
    path, hf = hf_dir
    images, tokens = _inputs()
    want_image, want_text, want_assign = _hf_outputs(hf, images, tokens)
    model, variables = clip_jax.load(str(path))
    assert model.config.vision.kind == "groupvit" and model.config.quick_gelu
    assert set(variables) == {"params", "batch_stats"}
    assert int(variables["batch_stats"]["visual"]["projection"]["bn"]["num_batches_tracked"]) == 7
    both = jax.jit(lambda v, x, t: (gv.encode_groups(model, v, x), model.apply(v, t, method="encode_text")))
    out, text = both(variables, jnp.asarray(images), jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out["image_embeds"]), want_image, atol=1e-5)
    np.testing.assert_allclose(np.asarray(text), want_text, atol=1e-5)
    assert [a.shape for a in out["assignments"]] == [(3, 8, 16), (3, 4, 8)]  # 16 patches -> 8 -> 4 segments
    for got, want in zip(out["assignments"], want_assign):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert out["group_embeds"].shape == (3, 4, 16)


def test_export_loads_strictly_in_transformers(hf_dir, tmp_path):
    """save_hf's directory loads in GroupViTModel with no missing or unexpected keys and the same weights and
    BatchNorm statistics, so its embeddings equal the original's."""
    transformers = reference("transformers")
    path, hf = hf_dir
    model, variables = clip_jax.load(str(path))
    clip_jax.save_hf(model, variables, str(tmp_path / "out"), tokenizer=False)
    back, info = transformers.GroupViTModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original = hf.state_dict()
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
    images, tokens = _inputs()
    for got, want in zip(_hf_outputs(back.eval(), images, tokens)[:2], _hf_outputs(hf, images, tokens)[:2]):
        np.testing.assert_array_equal(got, want)


def test_import_names_what_does_not_match(hf_dir):
    from clip_jax.hf_layouts import groupvit as layout

    path, hf = hf_dir
    model, _ = clip_jax.load(str(path))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state.pop("visual_projection.1.running_var")
    with pytest.raises(ValueError, match="visual_projection.1.running_var"):
        layout.variables_from_hf(model, state)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state["vision_model.encoder.stages.0.extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="stages.0.extra"):
        layout.variables_from_hf(model, state)
    with pytest.raises(ValueError, match="assign_eps"):
        layout.config_from_hf({"model_type": "groupvit", "vision_config": {"assign_eps": 0.5}})


def test_straight_through_assignment():
    """Forward: one-hot along the group axis for every token; backward: the soft path's gradient."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    hard = gv.hard_assign(logits, axis=-2)
    np.testing.assert_allclose(np.asarray(hard.sum(-2)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hard), np.asarray(jax.nn.one_hot(logits.argmax(-2), 5, axis=-2)), atol=1e-6)
    weights = jax.random.normal(jax.random.key(1), logits.shape)
    hard_grad = jax.grad(lambda x: (gv.hard_assign(x, axis=-2) * weights).sum())(logits)
    soft_grad = jax.grad(lambda x: (jax.nn.softmax(x, axis=-2) * weights).sum())(logits)
    np.testing.assert_allclose(np.asarray(hard_grad), np.asarray(soft_grad), rtol=1e-6, atol=1e-7)
    # Gumbel noise moves the argmax: (logits + noise), not logits, is what gets one-hot
    noise = jax.random.gumbel(jax.random.key(2), logits.shape)
    want = jax.nn.one_hot((logits + noise).argmax(-2), 5, axis=-2)
    np.testing.assert_allclose(np.asarray(gv.hard_assign(logits, -2, noise)), np.asarray(want), atol=1e-6)


@pytest.mark.slow  # two compiles of a whole model: ~30 s on 2 busy cores
def test_stages_token_counts_init_and_training_noise():
    """GroupViT-Shapes: 64 px / patch 8 = 64 patches -> 16 -> 4 segments; stage 1's group tokens random, stage
    2's zero (its projector adds the previous stage's); training draws Gumbel noise from the 'gumbel' stream."""
    from clip_jax.models import init_variables

    small = {"vision_cfg": {"width": 32, "layers": 3, "stage_depths": [1, 1, 1]},
             "text_cfg": {"vocab_size": 64, "layers": 1}}
    model = create_model(get_model_config("GroupViT-Shapes", small))
    images = jnp.asarray(np.random.RandomState(0).normal(0, 1, (4, 64, 64, 3)), jnp.float32)
    variables = init_variables(model, jax.random.key(0))
    stages = variables["params"]["visual"]
    assert stages["stages_0"]["group_token"].shape == (16, 32) and float(jnp.std(stages["stages_0"]["group_token"])) > 0
    assert not np.any(np.asarray(stages["stages_1"]["group_token"]))
    assert "group_token" not in stages["stages_2"] and "projector_mlp" in stages["stages_1"]

    @jax.jit
    def run(variables, key):
        groups = lambda m, x, train: m.visual(x, train=train, groups=True)  # noqa: E731
        train = model.apply(variables, images, True, method=groups, rngs={"gumbel": key}, mutable=["batch_stats"])
        return model.apply(variables, images, False, method=groups), train[0]["embeds"]

    out, first = run(variables, jax.random.key(1))
    assert [a.shape for a in out["assignments"]] == [(4, 16, 64), (4, 4, 16)]
    assert out["group_embeds"].shape == (4, 4, 64)
    np.testing.assert_allclose(np.asarray(out["assignments"][0].sum(1)), 1.0, atol=1e-5)  # softmax over groups
    np.testing.assert_array_equal(np.asarray(first), np.asarray(run(variables, jax.random.key(1))[1]))
    assert not np.allclose(np.asarray(first), np.asarray(run(variables, jax.random.key(2))[1]))


def test_projector_batchnorm_is_global_over_a_sharded_batch():
    """BatchNorm in training normalizes with the whole batch's statistics when the batch is sharded over 8
    devices (the same output and running statistics as on one device), and updates them as PyTorch."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    proj = gv.Projector(hidden=12, out=5)
    x = np.random.RandomState(0).normal(1.0, 2.0, (16, 6)).astype(np.float32)
    variables = nn.meta.unbox(proj.init(jax.random.key(0), jnp.asarray(x), False))
    step = jax.jit(lambda v, x: proj.apply(v, x, True, mutable=["batch_stats"]))
    single = step(variables, jnp.asarray(x))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = step(variables, jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec("data"))))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        # float32 reassociation: to within 1e-5 of each gradient's largest entry
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    p = variables["params"]
    h = x @ np.asarray(p["linear1"]["kernel"]) + np.asarray(p["linear1"]["bias"])
    mean, var = h.mean(0), h.var(0)
    want = np.maximum((h - mean) / np.sqrt(var + 1e-5), 0) @ np.asarray(p["linear2"]["kernel"])
    np.testing.assert_allclose(np.asarray(single[0]), want + np.asarray(p["linear2"]["bias"]), rtol=1e-4, atol=1e-4)
    stats = single[1]["batch_stats"]["bn"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == 1


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="stage_depths"):
        create_model(get_model_config("GroupViT-Shapes", {"vision_cfg": {"stage_depths": [2, 2]}})).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="projection_hidden"):
        create_model(get_model_config("GroupViT-Shapes", {"projection_hidden": 0})).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 32), jnp.int32))
    assert get_model_config("GroupViT-S-16").to_dict()["vision_cfg"]["group_tokens"] == [64, 8, 0]


def test_presets_round_trip_through_transformers_config():
    """config.json of each preset reads back as the preset (transformers has no stochastic depth field), and
    GroupViT-S-16 is transformers' default GroupViTConfig, the paper's model."""
    import dataclasses

    from clip_jax.hf_layouts import groupvit as layout

    for name in ("GroupViT-S-16", "GroupViT-Shapes"):
        config = get_model_config(name)
        back = layout.config_from_hf(layout.config_to_hf(config))
        assert back == dataclasses.replace(config, vision=dataclasses.replace(config.vision, drop_path=0.0)), name
    paper = layout.config_from_hf({"model_type": "groupvit"})
    s16 = get_model_config("GroupViT-S-16")
    assert paper == dataclasses.replace(s16, vision=dataclasses.replace(s16.vision, drop_path=0.0),
                                        init_logit_scale=paper.init_logit_scale)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_multi_label_loss_against_a_numpy_double_loop():
    from clip_jax.methods import groupvit as method

    rng = np.random.RandomState(0)
    batch, k = 4, 3
    images, texts, prompts = _unit(rng.normal(size=(batch, 8))), _unit(rng.normal(size=(batch, 8))), \
        _unit(rng.normal(size=(batch, k, 8)))
    scale, ml_scale = np.log(10.0), np.log(1 / 0.07)

    def lse(v):
        return np.log(np.sum(np.exp(v - v.max()))) + v.max()

    s = np.exp(ml_scale)
    loss_image = 0.0
    for i in range(batch):
        row = np.array([s * images[i] @ prompts[j, m] for j in range(batch) for m in range(k)])
        loss_image += -sum((1 / k) * (row[i * k + m] - lse(row)) for m in range(k))
    loss_text = 0.0
    for j in range(batch):
        for m in range(k):
            row = np.array([s * prompts[j, m] @ images[b] for b in range(batch)])
            loss_text += -(row[j] - lse(row))
    want_ml = 0.5 * (loss_image / batch + loss_text / (batch * k))
    c = np.exp(scale)
    i2t = sum(-(c * images[i] @ texts[i] - lse(np.array([c * images[i] @ t for t in texts]))) for i in range(batch))
    t2i = sum(-(c * texts[i] @ images[i] - lse(np.array([c * texts[i] @ v for v in images]))) for i in range(batch))
    want_ic = 0.5 * (i2t + t2i) / batch
    total, parts = method.groupvit_loss(jnp.asarray(images), jnp.asarray(texts), jnp.asarray(prompts), scale, ml_scale)
    np.testing.assert_allclose(float(parts["multi_label"]), want_ml, rtol=1e-5)
    np.testing.assert_allclose(float(parts["image_caption"]), want_ic, rtol=1e-5)
    np.testing.assert_allclose(float(total), want_ic + want_ml, rtol=1e-5)
    # the temperature is clamped at 100, as the reference's
    np.testing.assert_allclose(float(method.multi_label_loss(jnp.asarray(images), jnp.asarray(prompts), 6.0)),
                               float(method.multi_label_loss(jnp.asarray(images), jnp.asarray(prompts), np.log(100))),
                               rtol=1e-6)


def _bilinear(maps, size):
    """[grid, grid, G] -> [size, size, G], half-pixel centres, edges clamped (torch's align_corners=False)."""
    grid = maps.shape[0]
    src = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, grid - 1)
    w = src - lo
    rows = maps[lo] * (1 - w)[:, None, None] + maps[hi] * w[:, None, None]
    return rows[:, lo] * (1 - w)[None, :, None] + rows[:, hi] * w[None, :, None]


def test_segmentation_against_numpy():
    """Soft-assignment product, bilinear upsampling, top-k class restriction, affinity times its unmasked
    softmax, per-pixel argmax group, background under the threshold: against a per-image numpy loop."""
    from clip_jax.methods import groupvit as method

    rng = np.random.RandomState(1)
    n, grid, g1, g2, classes, dim, size, top_k, bg = 3, 4, 6, 3, 7, 8, 32, 5, 0.9
    soft = lambda *shape: np.exp(rng.normal(size=shape) * 2) / np.exp(rng.normal(size=shape) * 2).sum(1, keepdims=True)  # noqa: E731,E501
    a1, a2 = soft(n, g1, grid * grid), soft(n, g2, g1)
    groups, images, names = _unit(rng.normal(size=(n, g2, dim))), _unit(rng.normal(size=(n, dim))), \
        _unit(rng.normal(size=(classes, dim)))
    scale = np.log(5.0)
    ids, logits = method.segment((jnp.asarray(a1), jnp.asarray(a2)), jnp.asarray(groups), jnp.asarray(images),
                                 jnp.asarray(names), scale, size, top_k, bg)
    assert ids.shape == (n, size, size) and logits.shape == (n, classes + 1, size, size)

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    s = np.exp(scale)
    seen = []
    for i in range(n):
        product = a1[i].T @ a2[i].T  # [patches, g2]
        maps = _bilinear(product.reshape(grid, grid, g2), size)
        group_logits = s * groups[i] @ names.T
        top = np.argsort(-softmax(s * images[i] @ names.T))[:top_k]
        masked = np.full_like(group_logits, -np.inf)
        masked[:, top] = group_logits[:, top]
        affinity = softmax(masked) * softmax(group_logits)
        scores = affinity[maps.argmax(-1)]  # [H, W, C]
        background = scores.max(-1) < min(bg, affinity.max())
        want = np.where(background, 0, scores.argmax(-1) + 1)
        np.testing.assert_array_equal(np.asarray(ids[i]), want)
        np.testing.assert_allclose(np.asarray(logits[i, 1:]), scores.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)
        seen.append(background.mean())
        assert set(np.unique(want[~background])) <= set(top + 1)
    assert 0 < np.mean(seen) < 1  # background and classes both exercised


@pytest.mark.slow  # three compiles of the tiny model's loss: ~1 to 2 min on 2 busy cores
def test_method_loss_wires_captions_and_prompts_and_is_the_same_on_1_and_8_devices():
    """GroupViT's Method: in evaluation its loss is groupvit_loss of the towers' embeddings of the images,
    captions and prompts; in training (BatchNorm on batch statistics, Gumbel noise) a batch sharded over 8
    devices gives the loss and BatchNorm statistics of 1 device."""
    from jax.sharding import NamedSharding, PartitionSpec

    from clip_jax.config import base_config
    from clip_jax.methods import groupvit as method
    from clip_jax.parallel.sharding import BATCH_AXES, make_mesh

    small = {"vision_cfg": {"width": 32, "layers": 3, "stage_depths": [1, 1, 1]},
             "text_cfg": {"vocab_size": 64, "layers": 1, "context_length": 8}, "projection_hidden": 32}
    model = create_model(get_model_config("GroupViT-Shapes", small))
    rng = np.random.RandomState(0)
    batch = {"image": rng.normal(size=(8, 64, 64, 3)).astype(np.float32),
             "tokens": rng.randint(1, EOT, (8, 8)).astype(np.int32),
             "prompt_tokens": rng.randint(1, EOT, (8, 3, 8)).astype(np.int32)}
    batch["tokens"][:, 5] = EOT
    batch["prompt_tokens"][:, :, 3] = EOT
    results = {}
    for devices in (1, 8):
        mesh = make_mesh({"data": -1}, jax.devices()[:devices])
        m = method.GroupViT(base_config(), model, mesh)
        assert set(m.batch_shapes(8)) == {"image", "tokens", "prompt_tokens"}
        variables = nn.meta.unbox(m.init(jax.random.key(0)))
        params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
        sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        step = jax.jit(lambda p, s, b, train: m.loss(p, s, b, jax.random.key(3), train), static_argnums=3)
        results[devices] = step(params, state, sharded, True)
        if devices == 1:
            @jax.jit
            def evaluated(params, state, batch):
                towers = m.model_variables(params, state)
                image = model.apply(towers, batch["image"], method="encode_image")
                text = model.apply(towers, batch["tokens"], method="encode_text")
                prompts = model.apply(towers, batch["prompt_tokens"].reshape(24, 8), method="encode_text")
                want = method.groupvit_loss(image, text, prompts.reshape(8, 3, -1), params["logit_scale"],
                                            params[method.ML_SCALE])[0]
                return m.loss(params, state, batch, None, False), want

            (loss, metrics, _), want = evaluated(params, state, batch)
            np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
            assert float(metrics["multi_label_loss"]) > 0
    (loss1, _, state1), (loss8, _, state8) = results[1], results[8]
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    assert int(state1["batch_stats"]["text"]["projection"]["bn"]["num_batches_tracked"]) == 1
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_stochastic_depth_drops_whole_residual_branches_per_example_in_training_only():
    block = gv.Block(heads=2, drop_path=0.5)
    x = jax.random.normal(jax.random.key(0), (64, 5, 8))
    variables = block.init(jax.random.key(1), x, False)
    plain = gv.Block(heads=2).apply(variables, x, True)
    np.testing.assert_array_equal(np.asarray(block.apply(variables, x, False)), np.asarray(plain))
    trained = np.asarray(block.apply(variables, x, True, rngs={"dropout": jax.random.key(2)}))
    untouched = np.all(trained == np.asarray(x), axis=(1, 2))  # both branches dropped: x itself
    assert 0 < untouched.sum() < 64 and not np.allclose(trained, np.asarray(plain))
    with pytest.raises(ValueError, match="drop_path"):
        create_model(get_model_config("GroupViT-Shapes", {"vision_cfg": {"drop_path": 1.0}})).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 32), jnp.int32))


def test_segment_logits_score_by_groupvits_own_rule_under_the_segmentation_tasks_threshold(hf_dir):
    """The registered method's 'segment_logits' through the segmentation task's threshold rule (any bg_thresh in
    (1/C, 1)) gives exactly `segment`'s class ids: GroupViT's top-k and background threshold, not the task's."""
    from clip_jax.config import base_config
    from clip_jax.evaluate.tasks.segmentation import class_ids
    from clip_jax.methods import METHODS
    from clip_jax.methods import groupvit as method
    from clip_jax.models.clip import l2_normalize
    from clip_jax.parallel.sharding import make_mesh

    path, _ = hf_dir
    model, variables = clip_jax.load(str(path))
    images, _ = _inputs()
    out = jax.jit(lambda v, x: gv.encode_groups(model, v, x))(variables, jnp.asarray(images))
    # classes near segments that win pixels (image 0: its groups 1 and 2; images 1 and 2: group 3)
    noise = 0.1 * jax.random.normal(jax.random.key(1), (5, 16))
    classes = np.asarray(l2_normalize(out["group_embeds"].reshape(12, 16)[jnp.array([1, 2, 7, 11, 0])] + noise))
    scale = model.apply(variables, method="temperature")[0]
    config = base_config()
    config.method = "groupvit"
    seen = []
    for top_k, bg_thresh in ((2, 0.5), (5, 0.9)):
        config.groupvit.top_k, config.groupvit.bg_thresh = top_k, bg_thresh
        m = METHODS.get("groupvit")(config, model, make_mesh({"data": -1}, jax.devices()[:1]))
        logits = jax.jit(m.predictions()["segment_logits"].fn)(variables, jnp.asarray(images), jnp.asarray(classes))
        assert logits.shape == (3, 32, 32, 5)
        want, _ = method.segment(out["assignments"], out["group_embeds"], out["image_embeds"], jnp.asarray(classes),
                                 jnp.log(scale), 32, top_k, bg_thresh)
        for task_thresh in (0.21, 0.5, 0.99):
            np.testing.assert_array_equal(np.asarray(class_ids(logits, "threshold", task_thresh)), np.asarray(want))
        seen += list(np.unique(np.asarray(want)))
    assert 0 in seen and len(set(seen)) > 2  # background and several classes exercised


def test_configs_parse_validate_and_read_no_masks():
    """configs/groupvit.py is the reference's recipe and configs/smoke_groupvit.py the shapes_scenes smoke run; both
    pass the trainer's checks, and the method's batch keys read the image and caption only."""

    from conftest import config_of

    from clip_jax.input import ops
    from clip_jax.methods import METHODS
    from clip_jax.methods import groupvit as method
    from clip_jax.parallel.sharding import make_mesh
    from clip_jax.train import trainer

    configs = {}
    for name in ("groupvit", "smoke_groupvit"):
        configs[name] = config_of(name)
        trainer.validate(configs[name])
    ref, smoke = configs["groupvit"], configs["smoke_groupvit"]
    assert (ref.method, ref.model, ref.batch_size) == ("groupvit", "GroupViT-S-16", 4096)
    assert (ref.optim.learning_rate, ref.optim.end_learning_rate, ref.optim.weight_decay) == (1.6e-3, 4e-5, 0.05)
    assert (ref.optim.grad_clip_norm, ref.optim.b2, ref.optim.weight_decay_on) == (5.0, 0.999, "matrices")
    assert ref.optim.warmup_steps * 15 == ref.total_steps and ref.groupvit.prompts == 3  # 2 of 30 epochs
    assert smoke.method == "groupvit" and smoke.data.train == "shapes_scenes:train"
    assert "segmentation=shapes_scenes:test" in smoke.data.eval.split(",")
    assert METHODS.get("groupvit") is method.GroupViT
    model = create_model(get_model_config(smoke.model, smoke.model_overrides.to_dict()))
    m = METHODS.get("groupvit")(smoke, model, make_mesh({"data": -1}, jax.devices()[:1]))
    resolved = ops.resolve(m.inputs())
    assert ops.features_read(resolved) == ["image", "caption"]
    ops_by_key = {w.key: w.op for w, _ in resolved}
    assert ops_by_key == {"image": "crop", "tokens": "tokenize", "prompt_tokens": "noun_prompts"}


def test_train_flops_count_the_prompts_through_the_text_tower_and_both_losses():
    """A step's FLOPs: CLIP's forward with 1 + 3 texts per image and the multi-label logits (B x 3B) beside the
    caption ones, times 3 (the backward twice the forward)."""
    from clip_jax.train.flops import clip_forward_flops, method_train_flops

    model = create_model("GroupViT-Shapes")
    one, four = clip_forward_flops(model, 8), clip_forward_flops(model, 32)
    texts = four["text"]  # the text tower on 4 x 8 texts: the captions and their prompts
    want = 3 * (one["image"] + texts + one["logits"] * (1 + 3))
    np.testing.assert_allclose(method_train_flops(model, 8, "groupvit"), want, rtol=1e-3)


@pytest.mark.slow  # two gradient compiles of a whole model: ~60 s on 2 busy cores
def test_remat_reaches_the_image_towers_blocks_and_changes_no_gradient():
    """config.remat rematerializes the image tower's blocks too (the bulk of its activations), with the
    gradients of the tower without remat under the same Gumbel and stochastic-depth draws."""
    small = {"vision_cfg": {"width": 32, "layers": 3, "stage_depths": [1, 1, 1], "drop_path": 0.2},
             "text_cfg": {"vocab_size": 64, "layers": 1}}
    images = jnp.asarray(np.random.RandomState(0).normal(0, 1, (4, 64, 64, 3)), jnp.float32)
    rngs = {"gumbel": jax.random.key(1), "dropout": jax.random.key(2)}

    def grads(remat):
        model = create_model(get_model_config("GroupViT-Shapes", small), remat=remat)
        variables = model.init(jax.random.key(0), images[:1], jnp.zeros((1, 32), jnp.int32))

        def loss(params):
            out, _ = model.apply({**variables, "params": params}, images, True, method=lambda m, x, t: m.visual(x, t),
                                 rngs=rngs, mutable=["batch_stats"])
            return jnp.sum(out**2)

        return jax.grad(loss)(variables["params"]), jax.make_jaxpr(loss)(
            variables["params"])

    plain, plain_jaxpr = grads("none")
    full, full_jaxpr = grads("full")
    assert "remat" in str(full_jaxpr) and "remat" not in str(plain_jaxpr)  # jax.checkpoint's primitive
    # float32 reassociation: to within 1e-5 of the largest gradient entry
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain["visual"]))
    for a, b in zip(jax.tree.leaves(plain["visual"]), jax.tree.leaves(full["visual"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
