"""CLIP4Clip and ActionCLIP as methods: each loss equals its towers and head applied clip by clip and frame by
frame (numpy's softmax and KL on top), the same on 1 and 8 devices; meanP on one-frame clips is CLIP's loss; the
CLIP weights' parameter group; seqTransf starts from the text tower; the video tasks' figures are numpy's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax.config import base_config
from clip_jax.evaluate.tasks.video import video_retrieval_metrics
from clip_jax.methods import METHODS
from clip_jax.models import create_model
from clip_jax.parallel.sharding import BATCH_AXES, make_mesh
from clip_jax.tokenizers import tokenizer_for
from clip_jax.train.optim import resolve_param_groups

T = 3
MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], np.int32)
CLASSES = ("moves up", "grows", "turns red")


@pytest.fixture(scope="module")
def model():
    return create_model("ViT-Tiny-test")  # embed_dim = text width = 32: seqTransf can start from the text tower


def config(method, frames=T, **section):
    c = base_config()
    c.method = method
    c.data.video_frames = frames
    if method == "actionclip":
        c.data.label_keys = ("label_color", "label_action")
        c.actionclip.classes = CLASSES
    for k, v in section.items():
        setattr(getattr(c, method), k, v)
    METHODS.get(method).check_config(c)
    return c


def build(model, c, devices=1):
    mesh = make_mesh({"data": -1}, jax.devices()[:devices])
    m = METHODS.get(c.method)(c, model, mesh)
    variables = m.start_variables(nn.meta.unbox(jax.jit(m.init)(jax.random.key(0))))
    return m, mesh, variables


def batch_for(model, frames=T, n=8, seed=0):
    rng = np.random.default_rng(seed)
    size, context = model.config.vision.image_size, model.config.text.context_length
    tokens = rng.integers(1, 400, (n, context)).astype(np.int32)
    tokens[:, 6] = model.config.text.vocab_size - 1  # the end token: pooling reads the highest id
    tokens[:, 7:] = 0
    mask = MASK[:n, :frames] if frames > 1 else np.ones((n, 1), np.int32)
    clips = rng.normal(size=(n, frames, size, size, 3)).astype(np.float32) * mask[..., None, None, None]
    labels = np.stack([np.zeros(n), rng.permutation(np.arange(n) % len(CLASSES))], 1).astype(np.int32)
    return {"frames": clips, "frame_mask": mask, "tokens": tokens, "labels": labels}


def losses(m, mesh, variables, batch, rng=3):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    sharded = jax.device_put({k: batch[k] for k in m.batch_keys}, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
    return float(jax.jit(lambda p, s, b: m.loss(p, s, b, jax.random.key(rng), True)[0])(params, state, sharded))


def frame_features(m, model, variables, batch):
    """Each real frame through the image tower alone: [clips][frames, D]."""
    clip, _ = m.split(variables)
    one = jax.jit(lambda x: model.apply(clip, x[None], method=lambda mod, y: mod.visual(y, train=False))[0])
    return [np.stack([np.asarray(one(frame)) for frame, real in zip(clip_frames, mask) if real])
            for clip_frames, mask in zip(batch["frames"], batch["frame_mask"])]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_clip4clip_is_its_towers_and_header_clip_by_clip_and_the_same_on_8_devices(model):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    c = config("clip4clip", sim_header="seqTransf", layers=2)
    batch = batch_for(model)
    m, mesh, variables = build(model, c)
    got = losses(m, mesh, variables, batch)
    # plain: each clip's real frames alone through the header (no mask), numpy's symmetric cross-entropy
    _, head = m.split(variables)
    feats = frame_features(m, model, variables, batch)
    video = np.stack([np.asarray(m.head.apply(head, f[None], np.ones((1, len(f)), np.int32)))[0] for f in feats])
    clip, _ = m.split(variables)
    text = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method="encode_text"))(clip, batch["tokens"]))
    scale = float(np.exp(variables["params"]["logit_scale"]))
    logits = scale * text @ unit(video).T
    labels = np.arange(len(logits))
    want = -(log_softmax(logits)[labels, labels].mean() + log_softmax(logits.T)[labels, labels].mean()) / 2
    np.testing.assert_allclose(got, want, rtol=2e-5)
    m8, mesh8, variables8 = build(model, c, devices=8)
    np.testing.assert_allclose(losses(m8, mesh8, variables8, batch), got, rtol=1e-5)


def test_meanp_on_one_frame_clips_is_clips_loss(model):
    batch = batch_for(model, frames=1)
    m, mesh, variables = build(model, config("clip4clip", frames=1, sim_header="meanP"))
    clip = METHODS.get("clip")(base_config(), model, mesh)
    images = {"image": batch["frames"][:, 0], "tokens": batch["tokens"]}
    want = jax.jit(lambda p, b: clip.loss(p, {}, b, jax.random.key(3), True)[0])(m.split(variables)[0]["params"],
                                                                                  images)
    np.testing.assert_allclose(losses(m, mesh, variables, batch), float(want), rtol=1e-6)


def test_the_clip_weights_train_at_the_scaled_lr_and_seqtransf_starts_from_the_text_tower(model):
    m, _, variables = build(model, config("clip4clip", sim_header="seqTransf", layers=4))
    params = variables["params"]
    groups = resolve_param_groups(params, m.config.optim, m.param_groups())
    for path, mult in groups.lr_mult.items():
        assert mult == (1.0 if path[0] == "video_head" else 1e-3), path
    head, text = params["video_head"], params["text"]
    np.testing.assert_array_equal(head["frame_position_embeddings"]["embedding"], text["positional_embedding"])
    for i in range(model.config.text.layers):  # 2: the other two layers keep their init
        jax.tree_util.tree_map(np.testing.assert_array_equal, head["transformerClip"][f"resblocks_{i}"],
                               text["transformer"][f"resblocks_{i}"])
    fresh = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0)))["params"]["video_head"]["transformerClip"]["resblocks_3"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, head["transformerClip"]["resblocks_3"], fresh)
    # ActionCLIP's fusion trains at 10 x the lr
    a, _, variables = build(model, config("actionclip", fusion="meanP"))
    groups = resolve_param_groups(variables["params"], a.config.optim, a.param_groups())
    assert {m for p, m in groups.lr_mult.items() if p[0] != "video_head"} == {1.0}


def test_actionclip_is_the_kl_of_its_fusion_and_label_prompts_and_the_same_on_8_devices(model):
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    c = config("actionclip", fusion="Transf", fusion_layers=1, label_key="label_action", templates=("a {} clip",))
    batch = batch_for(model)
    m, mesh, variables = build(model, c)
    got = losses(m, mesh, variables, batch)
    _, head = m.split(variables)
    feats = frame_features(m, model, variables, batch)
    video = np.stack([np.asarray(m.head.apply(head, f[None]))[0] for f in feats])
    labels = batch["labels"][:, 1]
    tokens = tokenizer_for(model.config.text)([f"a {CLASSES[k]} clip" for k in labels],
                                               model.config.text.context_length)
    text = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method="encode_text"))(m.split(variables)[0], tokens))
    logits = float(np.exp(variables["params"]["logit_scale"])) * unit(video) @ text.T
    target = log_softmax(10.0 * (labels[:, None] == labels[None, :]))
    kl = [np.sum(np.exp(target) * (target - log_softmax(x))) / len(x) for x in (logits, logits.T)]
    np.testing.assert_allclose(got, np.mean(kl), rtol=2e-5)
    m8, mesh8, variables8 = build(model, c, devices=8)
    np.testing.assert_allclose(losses(m8, mesh8, variables8, batch), got, rtol=1e-5)
    # the 16 templates: in training each clip's text is its own label's name in one drawn from the step's rng
    m16, _, _ = build(model, config("actionclip", fusion="meanP", label_key="label_action"))
    assert m16.tokens.shape[:2] == (len(CLASSES), 16)
    labels = np.arange(64) % len(CLASSES)
    picked = np.asarray(m16.label_tokens(jnp.asarray(labels), jax.random.key(5), True))
    which = [[k for k, t in enumerate(m16.tokens[label]) if (row == t).all()] for row, label in zip(picked, labels)]
    assert all(len(w) == 1 for w in which) and len({w[0] for w in which}) > 8


def test_video_retrieval_figures_are_numpys():
    rng = np.random.default_rng(0)
    video, texts = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(9, 8)))
    owner = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5])  # several captions for some clips
    sims = texts @ video.T
    t2v = np.array([(sims[i] > sims[i, owner[i]]).sum() for i in range(len(texts))])  # 0-based ranks
    v2t = np.array([min((sims[:, v] > sims[i, v]).sum() for i in np.nonzero(owner == v)[0]) for v in range(6)])
    got = video_retrieval_metrics(video, texts, owner)
    for name, rank in (("text_to_video", t2v), ("video_to_text", v2t)):
        for k in (1, 5, 10):
            assert got[f"{name}_R{k}"] == pytest.approx(np.mean(rank < k))
        assert got[f"{name}_MdR"] == pytest.approx(np.median(rank + 1))
        assert got[f"{name}_MnR"] == pytest.approx(np.mean(rank + 1))


def test_bad_settings_are_named_before_anything_compiles(model):
    with pytest.raises(ValueError, match="sim_header"):
        config("clip4clip", sim_header="tightTransf")
    with pytest.raises(ValueError, match="label_keys"):
        config("actionclip", label_key="label_shape")
    from types import SimpleNamespace

    from clip_jax.methods.clip4clip import check_widths

    narrow = SimpleNamespace(embed_dim=16, text=SimpleNamespace(width=32))
    with pytest.raises(ValueError, match="embed_dim"):
        check_widths(narrow, "seqTransf", "config.clip4clip.sim_header")


@pytest.mark.parametrize("method", ["clip4clip", "actionclip"])
def test_model_flops_count_every_frame_through_the_image_tower(model, method):
    from clip_jax.train.flops import clip_forward_flops, method_train_flops

    clips, frames = 4, T
    per_clip, per_frame = clip_forward_flops(model, clips), clip_forward_flops(model, clips * frames)
    want = 3 * (per_frame["image"] + per_clip["text"] + per_clip["logits"])
    np.testing.assert_allclose(method_train_flops(model, clips, method, config(method)), want, rtol=1e-6)
