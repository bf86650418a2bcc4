"""AudioCLIP's method: the loss is the pairs loss of the towers' embeddings plus the fbsp regularizer, the same on 1
and 8 devices; the modalities a batch carries decide the pairs; partial training trains the audio tower alone;
its export is the reference's state dict."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.config import base_config
from clip_jax.methods import audioclip as method
from clip_jax.methods.losses import clamped_scale, make_pairs_loss
from clip_jax.models import create_model, esresnext
from clip_jax.parallel.sharding import BATCH_AXES, make_mesh

SAMPLES = 2048


def config(modalities=("audio", "image", "text")):
    c = base_config()
    c.method = "audioclip"
    c.audioclip.audio_tower = "esresnext-fbsp-test"
    c.audioclip.modalities = modalities
    c.data.audio_rate, c.data.audio_samples = 16000, SAMPLES
    return c


@pytest.fixture(scope="module")
def model():
    return create_model("RN-Tiny-test")


def batch_for(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    size, context = model.config.vision.image_size, model.config.text.context_length
    tokens = rng.integers(1, 400, (n, context)).astype(np.int32)
    tokens[:, 6] = model.config.text.vocab_size - 1  # the end token: pooling reads the highest id
    tokens[:, 7:] = 0
    return {"audio": rng.uniform(-0.5, 0.5, (n, 1, SAMPLES)).astype(np.float32),
            "image": rng.normal(size=(n, size, size, 3)).astype(np.float32), "tokens": tokens}


@pytest.mark.slow  # three compiles of both towers: about a minute on 2 busy cores
def test_the_loss_is_the_pairs_loss_plus_the_regularizer_and_the_same_on_1_and_8_devices(model):
    from jax.sharding import NamedSharding, PartitionSpec

    batch = batch_for(model)
    results = {}
    for devices in (1, 8):
        if devices > len(jax.devices()):
            pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
        mesh = make_mesh({"data": -1}, jax.devices()[:devices])
        m = method.AudioCLIP(config(), model, mesh)
        assert set(m.batch_shapes(8)) == {"audio", "image", "tokens"}
        variables = nn.meta.unbox(m.init(jax.random.key(0)))
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        # the new scales start at log 100; CLIP's keeps its own init
        assert float(params["logit_scale_audio_text"]) == pytest.approx(np.log(100.0))
        sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        step = jax.jit(lambda p, s, b: m.loss(p, s, b, jax.random.key(3), True))
        results[devices] = step(params, state, sharded)
        if devices == 1:  # the loss from the towers applied one by one
            @jax.jit
            def want(params, state, batch):
                clip, audio = m.split({"params": params, **state})
                image = model.apply(clip, batch["image"], True, method="encode_image", mutable=["batch_stats"])[0]
                text = model.apply(clip, batch["tokens"], method="encode_text")
                (feats, reg), _ = m.audio.apply(audio, batch["audio"], train=True, with_regularizer=True,
                                                mutable=["batch_stats"])
                embeds = {"audio": feats / jnp.linalg.norm(feats, axis=-1, keepdims=True), "image": image,
                          "text": text}
                scales = {(a, b): clamped_scale(params[method.scale_param(a, b)]) for a, b in m.pairs}
                return make_pairs_loss(mesh, BATCH_AXES)(embeds, scales)[0] + reg

            np.testing.assert_allclose(float(results[1][0]), float(want(params, state, batch)), rtol=1e-5)
    (loss1, metrics1, state1), (loss8, _, state8) = results[1], results[8]
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    assert set(metrics1) >= {"audio_image_loss", "audio_text_loss", "image_text_loss", "fbsp_regularizer"}
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):  # BatchNorm over the global batch
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_the_modalities_decide_the_batch_and_the_pairs(model):
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    m = method.AudioCLIP(config(("audio", "text")), model, mesh)  # ESC-50's protocol: no images
    assert m.batch_keys == ("audio", "tokens") and m.pairs == (("audio", "text"),)
    assert [b.key for b in m.inputs()] == ["audio", "tokens"]
    variables = nn.meta.unbox(m.init(jax.random.key(0)))
    batch = {k: v for k, v in batch_for(model).items() if k != "image"}
    loss, metrics, _ = jax.jit(lambda v, b: m.loss(v["params"], {k: x for k, x in v.items() if k != "params"}, b,
                                                   None, False))(variables, batch)
    # one pair: the sum of its two directions (divided by 1!), the regularizer 0 at init
    np.testing.assert_allclose(float(loss), float(metrics["audio_text_loss"] + metrics["fbsp_regularizer"]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="name at least two of"):
        method.AudioCLIP.check_config(config(("audio",)))
    bad = config()
    bad.data.audio_rate = 44100
    with pytest.raises(ValueError, match="config.data.audio_rate=44100 but the audio tower"):
        method.AudioCLIP.check_config(bad)


def test_partial_training_trains_the_audio_tower_and_its_scales_only():
    from clip_jax.train.optim import resolve_param_groups

    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    c = config()
    c.model = "RN-Tiny-test"
    c.optim.frozen = "visual/.*|text/.*|logit_scale"
    m = method.AudioCLIP(c, create_model("RN-Tiny-test"), mesh)
    params = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.key(0))))["params"]
    groups = resolve_param_groups(params, c.optim, m.param_groups())
    name = lambda p: p if isinstance(p, str) else "/".join(p)  # noqa: E731
    trained = {name(p) for p in groups.frozen if not groups.frozen[p]}
    decay = {name(p): v for p, v in groups.weight_decay.items()}
    assert trained and all(p.startswith(("audio/", "logit_scale_audio")) for p in trained)
    assert {"logit_scale_audio_image", "logit_scale_audio_text"} <= trained
    # the reference's second group: the fbsp front end and the scales without weight decay
    assert decay["audio/fbsp/m"] == 0.0 and decay["logit_scale_audio_text"] == 0.0


def test_the_export_is_the_reference_state_dict(model):
    from clip_jax.convert_audioclip import expected_keys

    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    m = method.AudioCLIP(config(), model, mesh)
    variables = nn.meta.unbox(m.init(jax.random.key(0)))
    parts = m.export(variables["params"], {k: v for k, v in variables.items() if k != "params"})
    audio = parts[method.AUDIO]
    tower = esresnext.esresnext("esresnext-fbsp-test", embed_dim=model.config.embed_dim)
    want = {f"audio.{k}": shape for k, (_, shape) in expected_keys(tower).items()}
    got = {k: tuple(np.shape(v)) for k, v in audio.items() if k.startswith("audio.")}
    assert {k: v for k, v in got.items() if k in want} == want
    assert set(got) - set(want) <= {"audio.fbsp.bias", "audio.window"} | {
        k for k in got if k.endswith("num_batches_tracked")}
    assert float(audio["logit_scale_at"]) == pytest.approx(np.log(100.0))
    assert "visual" in parts["towers"]["params"] and "audio" not in parts["towers"]["params"]


@pytest.mark.slow  # two towers initialized and converted both ways: about 30 s
def test_init_from_reads_the_references_checkpoint_and_the_exports_audio_part(model, tmp_path):
    """A state dict in AudioCLIP's layout (the CLIP keys, 'audio.*' and the two scales) and the audio part of an
    export are read by the method's `weights` into its variables, leaf for leaf."""
    from flax import traverse_util

    from clip_jax import convert
    from clip_jax.convert_audioclip import audioclip_state_dict

    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    m = method.AudioCLIP(config(), model, mesh)
    source = jax.tree.map(np.asarray, nn.meta.unbox(m.init(jax.random.key(7))))
    source["params"]["logit_scale_audio_text"] = np.float32(2.5)
    clip, audio = m.split(source)
    full = audioclip_state_dict(m.audio, audio, clip, logit_scale_ai=float(source["params"]["logit_scale_audio_image"]),
                                logit_scale_at=2.5)
    convert.write_safetensors(full, str(tmp_path / "audioclip.safetensors"))
    got = traverse_util.flatten_dict(m.weights(str(tmp_path / "audioclip.safetensors")))
    want = traverse_util.flatten_dict(source)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-6, err_msg=str(key))
    part = m.export(source["params"], {k: v for k, v in source.items() if k != "params"})[method.AUDIO]
    convert.write_safetensors({k: np.asarray(v) for k, v in part.items()}, str(tmp_path / "out.audio.safetensors"))
    got = traverse_util.flatten_dict(m.weights(str(tmp_path / "out.audio.safetensors")))
    assert {k[:2] for k in got} == {("params", "audio"), ("batch_stats", "audio"),
                                    ("params", "logit_scale_audio_image"), ("params", "logit_scale_audio_text")}
    for key, value in got.items():
        np.testing.assert_allclose(np.asarray(value), want[key], rtol=1e-6, err_msg=str(key))
    np.testing.assert_allclose(float(got[("params", "logit_scale_audio_text")]), 2.5)
    # a CLIP file is the model's to read
    convert.write_safetensors(convert.variables_to_state_dict(clip), str(tmp_path / "clip.safetensors"))
    assert m.weights(str(tmp_path / "clip.safetensors")) is None
