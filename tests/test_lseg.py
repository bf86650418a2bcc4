"""LSeg: its logits and ignore-index loss against numpy, the DPT head against LSeg's modules written in
torch on the same random weights, the frozen text tower, the 10x head group and the poly schedule
against their closed forms, and a few trainer steps on random masks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import torch_reference
from flax import traverse_util
from tiny import tiny_config, tiny_run

from clip_jax.methods.lseg import (
    HEAD,
    PARAM_GROUPS,
    LSeg,
    masked_cross_entropy,
    pixel_logits,
    tapped_layers,
    vit_intermediates,
)
from clip_jax.methods.run_model import model_from_config
from clip_jax.models import CLIP
from clip_jax.models.dpt import DPTHead
from clip_jax.parallel.sharding import make_mesh
from clip_jax.train.optim import make_optimizer, make_schedule, resolve_param_groups

SMALL = {"features": 8, "stage_features": (8, 8, 16, 16)}


def _config(**lseg):
    c = tiny_config(optimizer="sgd", weight_decay=1e-4, weight_decay_on="all", schedule="poly",
                    learning_rate=0.02, grad_clip_norm=0.0)
    c.method, c.batch_size = "lseg", 4
    c.lseg.update({**SMALL, **lseg})
    return c


def _method(config=None):
    config = config or _config()
    return LSeg(config, model_from_config(config), make_mesh({"data": -1}, jax.devices()[:1]))


def _init(method, seed=0):
    return nn.meta.unbox(jax.jit(method.init)(jax.random.key(seed)))


@pytest.fixture(scope="module")
def lseg():
    method = _method()
    return method, _init(method)


def _masks(n, size, classes, seed):
    """Masks of 8x8 blocks of random classes with some ignore pixels."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, size=(n, size // 8, size // 8))
    mask = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.1] = 255
    return mask


def test_pixel_logits_are_the_fixed_scale_times_cosine_as_numpy():
    rng = np.random.default_rng(0)
    f, t = rng.normal(size=(2, 3, 4, 6)).astype(np.float32), rng.normal(size=(5, 6)).astype(np.float32)
    want = np.einsum("nhwe,ke->nhwk", f / np.linalg.norm(f, axis=-1, keepdims=True),
                     t / np.linalg.norm(t, axis=-1, keepdims=True)) / 0.07
    np.testing.assert_allclose(pixel_logits(f, t, 1 / 0.07), want, rtol=1e-5, atol=1e-5)


def test_cross_entropy_ignores_pixels_labelled_255_as_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=(2, 5, 6))
    labels[rng.random(labels.shape) < 0.3] = 255
    flat, y = logits.reshape(-1, 4).astype(np.float64), labels.reshape(-1)
    keep = y != 255
    logp = flat - np.log(np.exp(flat).sum(-1, keepdims=True))
    want = -logp[keep, y[keep]].mean()
    loss, acc = masked_cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(acc, (flat.argmax(-1)[keep] == y[keep]).mean(), rtol=1e-6)
    assert float(masked_cross_entropy(logits, np.full_like(labels, 255))[0]) == 0.0  # no valid pixel: 0, not NaN


def test_the_tapped_blocks_follow_lsegs_hooks_and_bad_ones_are_refused():
    assert tapped_layers(24) == (6, 12, 18, 24)  # LSeg's [5, 11, 17, 23], 0-based, for ViT-L/16
    assert tapped_layers(12) == (3, 6, 9, 12)  # its [2, 5, 8, 11] for ViT-B/32
    assert tapped_layers(2) == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="4 ascending block numbers"):
        tapped_layers(12, (3, 6, 9, 13))


def test_intermediates_are_the_blocks_outputs_stacked_or_not(lseg):
    """The last block's class token through ln_post and proj is the tower's embedding, and an unscanned
    tower (the same weights one block at a time) gives the same maps."""
    method, variables = lseg
    model = method.model
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    maps, cls = vit_intermediates(model, variables["params"], images, (1, 2, 2, 2))
    assert [m.shape for m in maps] == [(2, 4, 4, 64)] * 4
    v = variables["params"]["visual"]
    ln = jax.nn.standardize(cls[-1], axis=-1, epsilon=1e-5) * v["ln_post"]["scale"] + v["ln_post"]["bias"]
    embed = ln @ v["proj"]
    want = model.apply(variables, images, method="encode_image")
    np.testing.assert_allclose(embed / np.linalg.norm(embed, axis=-1, keepdims=True), want, atol=1e-5)
    assert model.scan  # the config's default: the blocks stacked; the same weights one block at a time next
    stacked = v["transformer"]["resblocks"]
    blocks = {f"resblocks_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(2)}
    params = {**variables["params"], "visual": {**v, "transformer": blocks}}
    maps_s, cls_s = vit_intermediates(CLIP(model.config, scan=False), params, images, (1, 2, 2, 2))
    for a, b in zip(maps + cls, maps_s + cls_s):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_text_tower_gets_no_gradient_and_the_head_does(lseg):
    method, variables = lseg
    batch = {"image": np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32),
             "mask": _masks(2, 32, 7, 3)}
    grads = jax.jit(jax.grad(lambda p: method.loss(p, {k: v for k, v in variables.items() if k != "params"}, batch,
                                           jax.random.key(0))[0]))(variables["params"])
    norms = lambda tree: [float(jnp.abs(g).max()) for g in jax.tree.leaves(tree)]  # noqa: E731
    assert max(norms(grads["text"])) == 0.0
    assert all(n > 0 for n in norms(grads[HEAD]["head1"])) and max(norms(grads["visual"]["transformer"])) > 0
    # and in the trainer's groups the text tower is frozen: no gradient computed, no optimizer state
    shapes = jax.eval_shape(lambda: variables["params"])
    groups = resolve_param_groups(shapes, method.config.optim, method.param_groups())
    frozen = {"/".join(p) for p, f in groups.frozen.items() if f}
    assert {p for p in frozen if not p.startswith("text/")} == {"logit_scale", "visual/ln_post/scale",
                                                                "visual/ln_post/bias", "visual/proj"}
    assert all("/".join(p) in frozen for p in groups.frozen if p[0] == "text")


def test_on_a_resnet_the_head_fuses_its_stages_and_its_batchnorm_stays_frozen():
    """A ModifiedResNet backbone (DPT's hybrid): the head reads the tower's 4 stages (strides 4 to 32, no
    class token), the logits come out at the input's size, the backbone trains but its BatchNorm statistics
    and its unused attention pool do not move."""
    c = _config()
    c.model = "RN-Tiny-test"
    method = _method(c)
    variables = _init(method, 2)
    images = np.random.default_rng(5).normal(size=(2, 64, 64, 3)).astype(np.float32)
    stages = method.model.apply({k: v for k, v in variables.items()}, images, (1, 2, 3, 4),
                                method="encode_image_intermediates")
    assert [s.shape[1] for s in stages] == [16, 8, 4, 2]
    state = {k: v for k, v in variables.items() if k != "params"}
    batch = {"image": images, "mask": _masks(2, 64, 7, 5)}
    (loss, (_, new_state)), grads = jax.jit(jax.value_and_grad(
        lambda p: (lambda out: (out[0], (out[1], out[2])))(method.loss(p, state, batch, jax.random.key(0))),
        has_aux=True))(variables["params"])
    assert np.isfinite(float(loss))
    features, _ = method.dense_features(variables, images)
    assert features.shape == (2, 32, 32, method.model.config.embed_dim)  # 2x the stride-4 stage
    norms = lambda tree: [float(jnp.abs(g).max()) for g in jax.tree.leaves(tree)]  # noqa: E731
    assert max(norms(grads["visual"]["layer1_0"])) > 0 and max(norms(grads["visual"]["attnpool"])) == 0.0
    before, after = state["batch_stats"], new_state["batch_stats"]
    for a, b in zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(after["visual"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state["batch_stats"][HEAD]),
                                                         jax.tree.leaves(new_state["batch_stats"][HEAD])))


def test_a_learned_background_is_class_zero_trained_at_the_heads_rate():
    """config.lseg.background='learned': class 0's embedding is the text tower's plus a trained offset (in the
    head's 10x group, starting at 0), the other rows the frozen text tower's; the segmenter given the foreground
    classes' embeddings puts it first."""
    import re

    from clip_jax.methods.lseg import PARAM_GROUPS

    method = _method(_config(background="learned"))
    variables = _init(method, 3)
    offset = np.random.default_rng(7).normal(size=variables["params"][HEAD]["background"].shape) * 0.1
    assert not np.asarray(variables["params"][HEAD]["background"]).any()  # LSeg's embedding at the start
    variables = {**variables, "params": {**variables["params"], HEAD: {**variables["params"][HEAD],
                                                                       "background": jnp.asarray(offset)}}}
    embeds = np.asarray(method.class_embeddings(variables))
    text = np.asarray(method.model.apply({"params": {k: v for k, v in variables["params"].items() if k != HEAD}},
                                         jnp.asarray(method.tokens), method="encode_text"))
    own = text[0] + offset
    np.testing.assert_allclose(embeds[0], own / np.linalg.norm(own), atol=1e-5)
    np.testing.assert_allclose(embeds[1:], text[1:], atol=1e-6)
    assert [opts for pattern, opts in PARAM_GROUPS if re.fullmatch(pattern, f"{HEAD}/background")] == [
        {"lr_mult": 10.0}]
    state = {k: v for k, v in variables.items() if k != "params"}
    batch = {"image": np.random.default_rng(6).normal(size=(2, 32, 32, 3)).astype(np.float32),
             "mask": _masks(2, 32, 7, 6)}
    grads = jax.grad(lambda p: method.loss(p, state, batch, jax.random.key(0))[0])(variables["params"])
    assert float(jnp.abs(grads[HEAD]["background"]).max()) > 0
    segment = method.predictions()["segment_logits"]
    assert segment.background
    np.testing.assert_allclose(segment.fn(variables, batch["image"], jnp.asarray(text[1:])),
                               segment.fn(variables, batch["image"]), atol=1e-5)


@pytest.mark.parametrize("patch", [8, 16])
def test_the_logits_come_out_at_the_input_resolution(patch):
    c = _config()
    size = 4 * patch  # a 4x4 token grid
    c.model_overrides = ml_collections.ConfigDict({"vision_cfg": {"patch_size": patch, "image_size": size}})
    method = _method(c)
    variables = _init(method, 1)
    images = np.random.default_rng(4).normal(size=(2, size, size, 3)).astype(np.float32)
    segment = method.predictions()["segment_logits"].fn

    @jax.jit
    def run(variables, images):
        embeds = method.class_embeddings(variables)
        return (method.dense_features(variables, images)[0], segment(variables, images),
                segment(variables, images, embeds[:5]))

    features, logits, five = run(variables, images)
    assert features.shape == (2, 32, 32, 32)  # 8x the token grid: half the input at patch 16, as LSeg
    assert logits.shape == (2, size, size, 7)  # every class, the novel ones too
    np.testing.assert_allclose(five, logits[..., :5], atol=1e-5)


def test_novel_classes_pixels_are_ignored_and_out_of_the_training_softmax(lseg):
    method, variables = lseg
    assert method.classes[int(method.train_classes[-1])] == "diamond" and len(method.train_classes) == 5
    novel = [method.classes.index(c) for c in method.config.lseg.novel]
    mask = _masks(2, 32, 7, 5)
    images = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
    state = {k: v for k, v in variables.items() if k != "params"}
    step = jax.jit(lambda m: method.loss(variables["params"], state, {"image": images, "mask": m}, None, False)[:2])
    loss = lambda m: step(m)[0]  # noqa: E731
    ignored = np.where(np.isin(mask, novel), 255, mask).astype(np.uint8)
    assert (ignored != mask).any()
    assert float(loss(mask)) == pytest.approx(float(loss(ignored)), rel=1e-6)
    metrics = step(np.where(mask == 2, 9, mask).astype(np.uint8))[1]
    assert int(metrics["unknown_label_pixels"]) == int((mask == 2).sum()) > 0  # ids past the classes: counted
    with pytest.raises(ValueError, match="not one \\[N, H, W\\] per image"):
        method.loss(variables["params"], state, {"image": images, "mask": mask[:, :16]}, None, False)
    assert float(loss(mask)) != pytest.approx(float(loss(np.where(mask == 1, 255, mask).astype(np.uint8))), rel=1e-4)


def test_the_scratch_group_steps_10x_the_backbone_under_sgd():
    """One SGD step on a toy tree named as LSeg's params, every gradient 1: the head's scratch moves 10x the
    backbone and the head's reassemble ops; the text tower is not in the optimizer."""
    params = {"visual": {"conv1": {"kernel": jnp.zeros((2,))}}, "text": {"w": jnp.zeros((2,))},
              "logit_scale": jnp.zeros(()),
              HEAD: {"reassemble1": {"project": {"kernel": jnp.zeros((2,))}},
                     "layer1_rn": {"kernel": jnp.zeros((2,))}, "refinenet2": {"out_conv": {"bias": jnp.zeros((2,))}},
                     "head1": {"kernel": jnp.zeros((2,))}}}
    c = _config()
    groups = resolve_param_groups(params, c.optim, PARAM_GROUPS)
    trained = groups.trainable(params)
    assert "text" not in trained and "logit_scale" not in trained
    opt = make_optimizer(c.optim, params, 10, groups)
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, trained), opt.init(trained), trained)
    flat = {"/".join(k): float(v.ravel()[0]) for k, v in traverse_util.flatten_dict(updates).items()}
    base = flat["visual/conv1/kernel"]
    assert base == pytest.approx(-0.02)
    assert flat[f"{HEAD}/reassemble1/project/kernel"] == pytest.approx(base)
    for name in ("layer1_rn/kernel", "refinenet2/out_conv/bias", "head1/kernel"):
        assert flat[f"{HEAD}/{name}"] == pytest.approx(10 * base)


def test_the_poly_schedule_is_its_closed_form():
    c = _config()
    c.optim.update(learning_rate=0.004, end_learning_rate=0.0, schedule_every_steps=10)
    schedule = make_schedule(c.optim, 100)
    for step in (0, 9, 10, 55, 99):  # LSeg's LambdaLR per epoch: (1 - epoch / epochs) ** 0.9
        assert float(schedule(step)) == pytest.approx(0.004 * (1 - (step // 10) / 10) ** 0.9, rel=1e-5)
    c.optim.update(schedule_every_steps=1, warmup_steps=4, end_learning_rate=1e-4)
    schedule = make_schedule(c.optim, 100)
    for step in (0, 2, 4, 50):
        want = (1e-4 + (0.004 - 1e-4) * (1 - step / 100) ** 0.9) * min(1.0, step / 4)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_the_dpt_head_equals_lsegs_modules_in_torch():
    """DPTHead on random weights against LSeg's reassemble (project readout, 1x1 conv, resample) and
    scratch (3x3 convs, fusion blocks with BatchNorm, align_corners upsampling, head1) written in torch:
    in inference (random running statistics) and in training (batch statistics)."""
    head = DPTHead(out_dim=6, features=8, stage_features=(4, 8, 12, 12))
    rng = np.random.default_rng(6)
    maps = [rng.normal(size=(2, 4, 4, 10)).astype(np.float32) for _ in range(4)]
    cls = [rng.normal(size=(2, 10)).astype(np.float32) for _ in range(4)]
    variables = head.init(jax.random.key(2), maps, cls)
    stats = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32), variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    ours_eval = head.apply(variables, maps, cls, train=False)
    ours_train, _ = head.apply(variables, maps, cls, train=True, mutable=["batch_stats"])
    assert ours_eval.shape == (2, 32, 32, 6)
    state = {}
    flat = {**traverse_util.flatten_dict(variables["params"]), **traverse_util.flatten_dict(stats)}
    for path, value in flat.items():
        value = np.asarray(value)
        leaf = path[-1]
        name = ".".join(path[:-1])
        if leaf == "kernel" and value.ndim == 4 and path[-2] == "resample" and path[0] in ("reassemble1",
                                                                                            "reassemble2"):
            value = value[::-1, ::-1].transpose(2, 3, 0, 1)  # a transposed conv: torch's [in, out, kh, kw]
        elif leaf == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            value = value.T
        state[f"{name}.{TORCH_NAMES.get(leaf, leaf)}"] = np.ascontiguousarray(value)
    arrays = {"state_" + k.replace(".", "__"): v for k, v in state.items()}
    for i in range(4):
        arrays[f"tokens{i}"] = np.concatenate([cls[i][:, None], maps[i].reshape(2, 16, 10)], axis=1)
    out = torch_reference(TORCH_DPT, **arrays)
    np.testing.assert_allclose(ours_eval, out["eval"].transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours_train, out["train"].transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-4)


TORCH_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}

# LSeg's modules (lseg_vit.py: ProjectReadout and act_postprocess; lseg_blocks.py: _make_scratch,
# ResidualConvUnit_custom and FeatureFusionBlock_custom with bn=True; lseg_net.py: head1), in torch.
TORCH_DPT = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
C, feats, out_dim, stages, g = 10, 8, 6, (4, 8, 12, 12), 4

class Reassemble(nn.Module):
    def __init__(self, w, scale):
        super().__init__()
        self.readout = nn.Linear(2 * C, C)
        self.project = nn.Conv2d(C, w, 1)
        self.scale = scale
        if scale > 1:
            self.resample = nn.ConvTranspose2d(w, w, scale, stride=scale)
        elif scale < 1:
            self.resample = nn.Conv2d(w, w, 3, stride=2, padding=1)
    def forward(self, x):
        readout = x[:, 0].unsqueeze(1).expand_as(x[:, 1:])
        x = F.gelu(self.readout(torch.cat((x[:, 1:], readout), -1)))
        x = x.transpose(1, 2).unflatten(2, (g, g))
        x = self.project(x)
        return self.resample(x) if self.scale != 1 else x

class RCU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(feats, feats, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(feats, feats, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(feats), nn.BatchNorm2d(feats)
    def forward(self, x):
        out = self.bn1(self.conv1(F.relu(x)))
        return self.bn2(self.conv2(F.relu(out))) + x

class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.resConfUnit1, self.resConfUnit2 = RCU(), RCU()
        self.out_conv = nn.Conv2d(feats, feats, 1)
    def forward(self, *xs):
        out = xs[0]
        if len(xs) == 2:
            out = out + self.resConfUnit1(xs[1])
        out = self.resConfUnit2(out)
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)

net = nn.Module()
for k, (w, s) in enumerate(zip(stages, (4, 2, 1, 0.5)), start=1):
    setattr(net, f"reassemble{k}", Reassemble(w, s))
    setattr(net, f"layer{k}_rn", nn.Conv2d(w, feats, 3, padding=1, bias=False))
    setattr(net, f"refinenet{k}", Fusion())
net.head1 = nn.Conv2d(feats, out_dim, 1)
state = {k[len("state_"):].replace("__", "."): torch.from_numpy(v) for k, v in inputs.items() if k.startswith("state_")}
# refinenet4's first unit is built but never run (no skip input), so ours has no params for it
unused = {k for k in net.state_dict() if k.endswith("num_batches_tracked") or k.startswith("refinenet4.resConfUnit1.")}
missing = set(net.state_dict()) - set(state) - unused
assert not missing and not set(state) - set(net.state_dict()), (missing, set(state) - set(net.state_dict()))
net.load_state_dict(state, strict=False)

def forward():
    layers = [getattr(net, f"layer{k}_rn")(getattr(net, f"reassemble{k}")(torch.from_numpy(inputs[f"tokens{k - 1}"])))
              for k in range(1, 5)]
    path = net.refinenet4(layers[3])
    path = net.refinenet3(path, layers[2])
    path = net.refinenet2(path, layers[1])
    path = net.refinenet1(path, layers[0])
    return net.head1(path).detach().numpy()

net.eval()
outputs["eval"] = forward()
net.train()
outputs["train"] = forward()
"""


def test_lseg_refuses_what_it_cannot_do_before_compiling():
    c = _config(layers=(1, 2, 3, 3))
    c.model = "RN-Tiny-test"
    with pytest.raises(ValueError, match="on a ModifiedResNet the DPT head reads its 4 stages"):
        _method(c)
    c = _config()
    c.model = "GroupViT-Shapes"
    with pytest.raises(ValueError, match="pick a ViT or ModifiedResNet preset"):
        _method(c)
    with pytest.raises(ValueError, match="config.lseg.novel"):
        _method(_config(novel=("hexagon",)))
    with pytest.raises(ValueError, match="config.lseg.layers"):
        _method(_config(layers=(1, 2, 3)))


@pytest.mark.slow
def test_a_few_trainer_steps_on_random_masks_lower_the_loss():
    """The trainer's assembly (SGD, poly, groups): a fixed batch of random images and block masks fits."""
    run = tiny_run(_config())
    rng = np.random.default_rng(7)
    batch = jax.device_put({"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
                            "mask": _masks(4, 32, 7, 7)}, run.batch_sharding)
    text = jax.device_get(run.state.params["text"])  # the state is donated to the step
    state, losses = run.state, []
    for _ in range(6):
        state, metrics = run.step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    after = traverse_util.flatten_dict(jax.device_get(state.params["text"]))
    assert all(np.array_equal(v, after[k]) for k, v in traverse_util.flatten_dict(text).items())  # frozen


def test_the_default_classes_are_the_shape_label_sets_and_the_configs_build():
    """config.lseg.classes is the `shape` label set's id order (0 = background); both configs assemble a run
    (abstractly: nothing allocated or compiled)."""

    from clip_jax.input.shapes import NOVEL_SHAPES, class_names
    from clip_jax.methods.lseg import LSEG_DEFAULTS
    from clip_jax.train.build import build

    assert LSEG_DEFAULTS["classes"] == ("background", *class_names("shape"))
    assert LSEG_DEFAULTS["novel"] == tuple(NOVEL_SHAPES)
    from conftest import config_of

    for name, argument in (("lseg", ("ViT-B-32",)), ("smoke_lseg", ())):
        c = config_of(name, *argument)
        if name == "lseg":
            c.lseg.labels, c.lseg.classes = "shape", LSEG_DEFAULTS["classes"]  # ADE20K's names come from a file
        run = build(c, make_mesh({"data": -1}, jax.devices()[:1]), abstract=True)
        assert run.method.layers == ((6, 12, 18, 24) if name == "lseg" else (1, 2, 3, 4))
        lr = {"/".join(p): m for p, m in run.groups.lr_mult.items() if not run.groups.frozen[p]}
        assert lr[f"{HEAD}/head1/kernel"] == 10.0 and lr[f"{HEAD}/reassemble1/project/kernel"] == 1.0
        assert lr.get(f"{HEAD}/background") == (10.0 if name == "smoke_lseg" else None)
    # the mask input each label set reads: a shapes record's objects, or a record's own class ids
    mask = {i.key: i for i in run.method.inputs()}["mask"]
    assert mask.reads == ("segmentation", "objects/shape", "objects/color") and mask.options == (("labels", "shape"),)
    mask = {i.key: i for i in _method(_config(labels="record")).inputs()}["mask"]
    assert mask.reads == ("segmentation_mask",) and dict(mask.options) == {"labels": "record", "num_classes": 7}


@pytest.mark.slow
def test_the_same_losses_on_1_and_8_devices():
    """The head's BatchNorm normalizes over the global batch and the loss averages over its valid pixels,
    so a batch split over 8 devices steps as on one."""
    rng = np.random.default_rng(8)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32), "mask": _masks(8, 32, 7, 8)}
    losses = {}
    for devices in (1, 8):
        c = _config()
        c.batch_size = 8
        run = tiny_run(c, devices=jax.devices()[:devices])
        state, losses[devices] = run.state, []
        for _ in range(2):
            state, metrics = run.step_fn(state, jax.device_put(batch, run.batch_sharding))
            losses[devices].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-4)


def test_the_export_holds_the_towers_and_the_head_beside_them(lseg):
    method, variables = lseg
    state = {k: v for k, v in variables.items() if k != "params"}
    parts = method.export(variables["params"], state)
    assert set(parts) == {"towers", HEAD} and HEAD not in parts["towers"]["params"]
    assert "batch_stats" not in parts["towers"]  # a ViT's towers have no statistics; the head's go with it
    with pytest.raises(ValueError, match="CLIP towers only"):
        method.predictions()["segment_logits"].fn(parts["towers"], np.zeros((1, 32, 32, 3), np.float32))
    assert "params/head1/kernel" in parts[HEAD] and "batch_stats/refinenet1/resConfUnit2/bn1/mean" in parts[HEAD]
