"""AudioCLIP's audio tower (clip_jax.models.esresnext) against the reference code's outputs, recorded by
tests/fixtures/make_audioclip_fixtures.py on the same seeded weights (tests/fixtures/audioclip_weights.py),
and its checkpoint import/export (clip_jax.convert_audioclip)."""

import json
import os

import audioclip_weights as W
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from clip_jax import convert
from clip_jax.convert_audioclip import (
    audio_state_dict,
    audio_variables,
    expected_keys,
    from_torch_layout,
    load_audioclip,
    reference_key,
)
from clip_jax.models.esresnext import (
    Attention2d,
    ESResNeXtFBSP,
    esresnext,
    fbsp_regularizer,
    mel_filterbank,
    scale_grad_by_max,
)

FIXTURE = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "audioclip_reference.npz"))
CASES = json.loads(str(FIXTURE["cases"]))
KEYS = json.loads(str(FIXTURE["keys"]))
SMALL_REFERENCE = dict(layers=(1, 1, 1, 1), embed_dim=CASES["small_embed"])  # the reference's body, 1 block a stage


def wave(case):
    seed, shape = CASES[case]
    return jnp.asarray(W.waveform(tuple(shape), seed))


def reference_variables(model, which, seed):
    variables, skipped = audio_variables(W.state_dict(KEYS[which], seed), model)
    assert not skipped
    return variables


def close(ours, reference, rtol=1e-5):
    """Within rtol of the reference, relative to its largest magnitude where single values are near zero."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=rtol, atol=rtol * np.abs(reference).max())


@pytest.fixture(scope="module")
def small_reference():
    model = ESResNeXtFBSP(**SMALL_REFERENCE)
    return model, reference_variables(model, "small", CASES["seed_small"])


def test_front_end_regularizer_and_gradient_scaling_match_the_reference(small_reference):
    model, variables = small_reference
    x = wave("front_end_wave")

    def loss(params):
        db, ttf = model.apply({**variables, "params": params}, x, with_regularizer=True, spectrogram=True)
        return jnp.mean(10.0 ** (db / 10.0)) + ttf, (db, ttf)  # as the fixture's loss

    grads, (db, ttf) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    # ours [B, C, bins, frames, band], the reference's [B, C, band, bins, frames]
    close(np.transpose(db, (0, 1, 4, 2, 3)), FIXTURE["front_end_db"])
    close(ttf, FIXTURE["front_end_ttf"])
    close(fbsp_regularizer(variables["params"]), FIXTURE["front_end_ttf"])
    for name in ("m", "fb", "fc"):  # each divided by its max |grad| by the reference's hooks
        close(grads["fbsp"][name], FIXTURE[f"front_end_grad_{name}"], rtol=1e-4)  # sums of 2048-term products
        assert np.abs(grads["fbsp"][name]).max() == pytest.approx(1.0, abs=1e-4)  # max / (max + 1e-8)


def test_attention_gate_with_a_non_divisible_pool_matches_the_reference():
    seed, shape = CASES["gate_input"]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    gate = Attention2d(8, (3, 1), (1, 0))
    size = tuple(CASES["gate_size"])
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    shapes = jax.eval_shape(lambda: gate.init(jax.random.key(0), nhwc, size, False))
    weights = W.state_dict(KEYS["gate"], CASES["seed_gate"])
    flat = {p: from_torch_layout(weights[reference_key(p)]) for p in traverse_util.flatten_dict(shapes)}
    assert {reference_key(p) for p in flat} == {k for k in KEYS["gate"] if not k.endswith("num_batches_tracked")}
    out = gate.apply(traverse_util.unflatten_dict(flat), nhwc, size, False)
    close(np.transpose(out, (0, 3, 1, 2)), FIXTURE["gate"])


def test_tower_matches_the_reference_on_mono_and_stereo(small_reference):
    model, variables = small_reference
    apply = jax.jit(model.apply)
    # float32 through the body from dB-scale inputs: 2.6e-5 of the largest output here
    close(apply(variables, wave("small_mono")), FIXTURE["small_mono"], rtol=1e-4)
    close(apply(variables, wave("small_stereo")), FIXTURE["small_stereo"], rtol=1e-4)


@pytest.mark.slow
def test_reference_preset_matches_the_reference_on_mono_and_stereo():
    model = esresnext()
    variables = reference_variables(model, "full", CASES["seed_full"])
    apply = jax.jit(model.apply)
    # 16 blocks of random weights amplify float32 rounding: 5e-4 of the largest output here, while the
    # reference's own float32 output is 6e-3 from its float64 one on these weights
    close(apply(variables, wave("full_mono")), FIXTURE["full_mono"], rtol=2e-3)
    close(apply(variables, wave("full_stereo")), FIXTURE["full_stereo"], rtol=2e-3)


def test_export_has_the_reference_keys_and_loads_into_it_strictly():
    assert FIXTURE["export_loads_strict"] and FIXTURE["export_round_trips"] and FIXTURE["window_is_scipys"]
    model = esresnext()
    ours = {k: s for k, (_, s) in expected_keys(model).items()}
    reference = {k: tuple(s) for k, s in KEYS["full"].items()}
    by_rule = {k for k in reference if k.endswith("num_batches_tracked")} | {"fbsp.bias", "window"}
    assert ours == {k: s for k, s in reference.items() if k not in by_rule}
    assert reference["fbsp.bias"] == (0,)


def test_gradient_scaling_is_an_identity_forward():
    g = jax.grad(lambda v: jnp.sum(scale_grad_by_max(v) * jnp.array([2.0, -4.0, 1.0])))(jnp.ones(3))
    np.testing.assert_allclose(g, np.array([2.0, -4.0, 1.0]) / (4.0 + 1e-8), rtol=1e-7)
    # at the init (m = 0, fb = 1, fc = arange) every row is a unit-norm DFT-like row
    k = 257
    init = {"fbsp": {"m": jnp.zeros(k), "fb": jnp.ones(k), "fc": jnp.arange(k, dtype=jnp.float32)}}
    assert float(fbsp_regularizer(init)) < 1e-10


def test_window_exponent_gradient_is_ill_conditioned_near_its_init():
    """The reason AudioCLIP's layouts agree only with m frozen (tests/test_multiprocess.py): near m = 0 the
    window sinc(fb t / m) ** m moves little with m while its max-scaled m gradient turns with a relative change
    of m a million times smaller than the turn; at m = 1 the same change barely moves it."""
    from clip_jax.models.esresnext import fbsp_weights

    k, n = 65, 128
    fb, fc = jnp.ones(k), jnp.arange(k, dtype=jnp.float32)
    probe = jnp.asarray(np.random.default_rng(0).standard_normal((k, n, 2)), jnp.float32)

    def turn(m0, rel=1e-5):
        grad = jax.grad(lambda m: jnp.sum(fbsp_weights(m, fb, fc, n) * probe))
        a, b = (grad(jnp.full((k,), m0 * (1 + d), jnp.float32)) for d in (0.0, rel))
        return float(jnp.abs(a / jnp.abs(a).max() - b / jnp.abs(b).max()).max()) / rel

    assert turn(7e-4) > 1e3 and turn(1.0) < 30


# -- checkpoint layouts ------------------------------------------------------------------------------------
# the small preset as these tests were written for (its sizes are for step time and may move)
SMALL = dict(embed_dim=32, hop_length=160, win_length=400, width=16, groups=8, width_per_group=8)


def small_audio(seed=5, **fields):
    model = esresnext("esresnext-fbsp-small", **{**SMALL, **fields})
    shapes = {k[len("audio."):]: np.shape(v) for k, v in audio_state_dict(model, _zeros(model)).items()}
    return model, W.state_dict(shapes, seed)


def _zeros(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, model.win_length)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def audioclip_state_dict():
    """A whole AudioCLIP state dict (Full and Partial training share it) with a small tower and a tiny CLIP."""
    model, audio = small_audio()
    clip_shapes = convert.expected_state_dict_shapes(_clip())
    rng = np.random.default_rng(0)
    sd = {"audio." + k: v for k, v in audio.items()}
    sd.update({k: rng.standard_normal(s).astype(np.float32) for k, s in clip_shapes.items()})
    sd.update(logit_scale_ai=np.array(4.5, np.float32), logit_scale_at=np.array(4.25, np.float32))
    return model, sd


def _clip():
    from clip_jax.models import create_model

    return create_model("RN-Tiny-test")


@pytest.mark.parametrize("name", ["AudioCLIP-Full-Training", "AudioCLIP-Partial-Training"])
def test_audioclip_checkpoint_uses_every_key(audioclip_state_dict, name):
    model, sd = audioclip_state_dict
    out = load_audioclip(sd, audio_model=model, clip_model=_clip())
    assert out["layout"] == "audioclip" and out["skipped"] == []
    assert (out["logit_scale_ai"], out["logit_scale_at"]) == (4.5, 4.25)
    back = audio_state_dict(model, out["audio"])
    assert set(back) == {k for k in sd if k.startswith("audio.")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    clip_back = convert.variables_to_state_dict(out["clip"])
    assert set(clip_back) == set(sd) - set(back) - {"logit_scale_ai", "logit_scale_at"}
    np.testing.assert_array_equal(clip_back["visual.conv1.weight"], sd["visual.conv1.weight"])


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("audio.layer2.0.conv2.weight"), "missing keys: audio.layer2.0.conv2.weight"),
    (lambda sd: sd.update({"audio.layer9.0.conv1.weight": np.zeros(3)}), "unexpected keys: layer9.0.conv1.weight"),
    (lambda sd: sd.update({"audio.fbsp.m": np.zeros(7, np.float32)}), "fbsp.m: got (7,), expected (257,)"),
    (lambda sd: sd.pop("logit_scale_at"), "missing keys: logit_scale_at"),
    (lambda sd: sd.pop("visual.conv1.weight"), "missing keys: visual.conv1.weight"),
    (lambda sd: sd.update({"audio.window": np.ones(400, np.float32)}), "Blackman-Harris"),
])
def test_audioclip_checkpoint_names_what_does_not_fit(audioclip_state_dict, change, named):
    model, sd = audioclip_state_dict
    sd = dict(sd)
    change(sd)
    with pytest.raises(ValueError) as err:
        load_audioclip(sd, audio_model=model, clip_model=_clip())
    assert named.replace("audio.", "") in str(err.value).replace("audio.", "")


def test_esrnxfbsp_checkpoint_keeps_the_body_and_reports_the_fc():
    model, sd = small_audio()
    fbsp_only = small_audio(embed_dim=527)[1]  # the AudioSet classifier of ESRNXFBSP.pt
    sd = {**sd, "fc.weight": fbsp_only["fc.weight"], "fc.bias": fbsp_only["fc.bias"]}
    out = load_audioclip(sd, audio_model=model)
    assert out["layout"] == "esrnxfbsp" and out["clip"] is None
    assert len(out["skipped"]) == 1 and "fc.weight (527, 512)" in out["skipped"][0]
    back = audio_state_dict(model, out["audio"], prefix="")
    assert back["fc.weight"].shape == (32, 512)
    for k, v in sd.items():
        if not k.startswith("fc."):
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    with pytest.raises(ValueError, match=r"fc\.weight \(527, 512\)"):
        load_audioclip(sd, audio_model=model, fc="raise")
    del sd["att3.bn.running_var"]
    with pytest.raises(ValueError, match=r"missing keys: att3\.bn\.running_var"):
        load_audioclip(sd, audio_model=model)


# -- the small preset and the log-mel front end -------------------------------------------------------------
def test_small_preset_runs_forward():
    model, sd = small_audio()
    variables, _ = audio_variables(sd, model)
    features = jax.jit(model.apply)(variables, jnp.asarray(W.waveform((2, 2, 16000), 21)))
    assert features.shape == (2, 32) and np.isfinite(np.asarray(features)).all()


@pytest.mark.slow  # the backward's compile: about 25 s on 2 shared cores
def test_small_preset_trains_on_cpu():
    model, sd = small_audio()
    variables, _ = audio_variables(sd, model)
    x = jnp.asarray(W.waveform((2, 1, 16000), 21))  # 1 s at 16 kHz

    def loss(params, stats):
        (f, reg), new = model.apply({"params": params, "batch_stats": stats}, x, train=True, with_regularizer=True,
                                    mutable=["batch_stats"])
        return jnp.mean(f**2) + reg, (f, new)

    (value, (features, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], variables["batch_stats"])
    assert features.shape == (2, 32) and np.isfinite(float(value))
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["fbsp"]["m"]).max() == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(new["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_logmel_front_end_is_a_mel_power_spectrogram_in_three_bands():
    model = esresnext("esresnext-fbsp-small", front_end="logmel", n_mels=48, **SMALL)
    x = np.asarray(wave("front_end_wave"))[:1, :1, :2000]
    feats = model.apply({}, jnp.asarray(x), spectrogram=True)
    # numpy: the int16 rescale, frames zero padded at both ends, Hann window, centred in n_fft, |rFFT|^2
    s = ((x[0, 0].astype(np.float64) * 32768 + 32768) * 2 / 65535 - 1)
    frames = 1 + int(np.ceil((len(s) - 400) / 160))
    pad = (frames - 1) * 160 + 400 - len(s)
    s = np.pad(s, (pad // 2, pad - pad // 2))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    spec = np.abs(np.fft.rfft(np.stack([s[i * 160:i * 160 + 400] * hann for i in range(frames)]), n=512,
                              axis=-1)) ** 2  # rfft with n pads at the end; a centred pad only changes phases
    fb = np.zeros((257, 48))  # HTK mel triangles, written out
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(8000), 50) / 2595) - 1)
    for j in range(48):
        for k, f in enumerate(np.arange(257) * 8000 / 256):
            if edges[j] < f < edges[j + 2]:
                fb[k, j] = (f - edges[j]) / (edges[j + 1] - edges[j]) if f <= edges[j + 1] else \
                    (edges[j + 2] - f) / (edges[j + 2] - edges[j + 1])
    np.testing.assert_allclose(mel_filterbank(16000, 512, 48), fb, atol=1e-6)
    expected = np.log(spec @ fb + 1e-6).T.reshape(3, 16, frames).transpose(1, 2, 0)
    np.testing.assert_allclose(np.asarray(feats)[0, 0], expected, rtol=1e-4, atol=1e-4)


def test_bad_input_is_named_before_tracing():
    model = esresnext("esresnext-fbsp-small")
    with pytest.raises(ValueError, match=r"\[batch, channels, samples\]"):
        model.check((2, 16000))
    with pytest.raises(ValueError, match="front_end"):
        esresnext("esresnext-fbsp-small", front_end="stft").check((1, 1, 16000))
    with pytest.raises(ValueError, match="no field"):
        esresnext(hop=3)
