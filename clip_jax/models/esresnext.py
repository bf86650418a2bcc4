"""ESResNeXt-fbsp, the audio tower of AudioCLIP (Guzhov et al. 2021), as its reference code computes it.

waveform [B, C, T] in [-1, 1] -> audio embedding [B, embed_dim] (not normalized):

* the waveform goes to the reference's int16 units (x * 32768) and through its asymmetric rescale
  (x + 32768) * 2 / 65535 - 1, so the tower equals the reference fed x * 32768;
* front end 'fbsp': frames (zero padded at both ends, not centred), a periodic Blackman-Harris window,
  zero padded to n_fft, then LinearFBSP, a learnable "Fourier basis" of n_fft // 2 + 1 rows, each a
  complex exponential at frequency fc times a sinc window of bandwidth fb raised to the power m (the
  only trainable front-end parameters: three vectors); its power in dB, without normalization;
* front end 'logmel': a Hann-window STFT, a mel filterbank (HTK scale, unnormalized triangles) and
  log(x + 1e-6), in the same layout;
* the bins (or mel bands) split into 3 contiguous bands of rows // 3 (the top rows dropped) that are
  the 3 image channels of a torchvision ResNeXt (v1.5 bottlenecks) with 5 attention gates;
* every audio channel goes through the same body separately and the pooled vectors are summed, then
  one Linear maps them to the embedding.

The gradients of m, fb and fc are each divided by their largest magnitude (+1e-8) before they leave
the forward, as the reference's hooks do; `fbsp_regularizer` is the reference's loss_ttf.
BatchNorm is PyTorch's (statistics in ``batch_stats``; ``train=True`` normalizes with the batch's
and updates the running ones, the variance unbiased, momentum 0.1).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.layers import BATCH, Dtype, constrain

FRONT_ENDS = ("fbsp", "logmel")
FBSP_EPS = 1e-8  # the reference's eps: in t, in the sinc's bandwidth and in the gradient scaling
LOG10_FLOOR = 1e-18  # a power <= 0 becomes this before the dB
LOGMEL_EPS = 1e-6

# The reference's tower as AudioCLIP builds it, and a small one for CPU runs of 1 s clips at 16 kHz.
PRESETS = {
    "esresnext-fbsp": dict(sample_rate=44100, n_fft=2048, hop_length=561, win_length=1654,
                           layers=(3, 4, 6, 3), width=64, groups=32, width_per_group=4, embed_dim=1024),
    "esresnext-fbsp-small": dict(sample_rate=16000, n_fft=512, hop_length=320, win_length=512,
                                 layers=(1, 1, 1, 1), width=8, groups=4, width_per_group=16, embed_dim=256),
    # for tests: the fewest channels the body takes, on short frames
    "esresnext-fbsp-test": dict(sample_rate=16000, n_fft=128, hop_length=128, win_length=128,
                                layers=(1, 1, 1, 1), width=8, groups=2, width_per_group=16, embed_dim=64),
}


# -- front end --------------------------------------------------------------------------------------
def blackman_harris(length: int) -> np.ndarray:
    """float32 [length]: the periodic 4-term Blackman-Harris window (scipy's get_window(..., fftbins=True))."""
    a = (0.35875, 0.48829, 0.14128, 0.01168)
    phase = 2 * np.pi * np.arange(length) / length
    return (a[0] - a[1] * np.cos(phase) + a[2] * np.cos(2 * phase) - a[3] * np.cos(3 * phase)).astype(np.float32)


def hann(length: int) -> np.ndarray:
    """float32 [length]: the periodic Hann window."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


def fbsp_bins(n_fft: int) -> int:
    """The number of LinearFBSP rows (one-sided), as the reference counts them."""
    return int(round(n_fft / 2)) + 1


def fbsp_time(n: int) -> np.ndarray:
    """float32 [n]: t = pi * linspace(-1, 1, n) + 1e-8 with torch's float32 rounding (the linspace from both
    ends, each value one rounding of start + step * i), on which the phases of high bins depend."""
    f32 = np.float32
    step = np.float64((f32(1) - f32(-1)) / f32(n - 1)) if n > 1 else 0.0
    i = np.arange(n)
    lin = np.where(i < n // 2, -1.0 + step * i, 1.0 - step * (n - 1 - i)).astype(f32)
    return (f32(np.pi) * lin + f32(FBSP_EPS)).astype(f32)


def frame_signal(x, frame_length: int, hop_length: int, window: np.ndarray):
    """[N, T] -> windowed frames [N, F, frame_length]: F = 1 + ceil((T - L) / hop) (1 when T <= L); the signal
    zero padded to (F - 1) * hop + L, half (rounded down) on the left, the rest on the right."""
    length = x.shape[-1]
    frames = 1 if length <= frame_length else 1 + math.ceil((length - frame_length) / hop_length)
    pad = (frames - 1) * hop_length + frame_length - length
    x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2)))
    index = np.arange(frame_length)[None, :] + hop_length * np.arange(frames)[:, None]
    return x[:, index] * jnp.asarray(window)


@jax.custom_vjp
def scale_grad_by_max(x):
    """Identity; its gradient is divided by (max |gradient| + 1e-8), as the reference's hooks on m, fb, fc."""
    return x


def _scale_fwd(x):
    return x, None


def _scale_bwd(_, g):
    return (g / (jnp.max(jnp.abs(g)) + FBSP_EPS),)


scale_grad_by_max.defvjp(_scale_fwd, _scale_bwd)


def fbsp_weights(m, fb, fc, n: int, normalized: bool = True):
    """LinearFBSP's weights [K, n, 2] (real, imaginary) from its vectors m, fb, fc [K]: sqrt(fb) times a
    sinc window (unnormalized sinc of fb t / m) raised to the complex power m, times exp(-i fc t), over
    sqrt(n) when normalized. Written as the reference writes it, the zero imaginary exponent included."""
    t = jnp.asarray(fbsp_time(n)).reshape(1, -1)
    m, fb, fc = (v.reshape(-1, 1) for v in (m, fb, fc))
    kernel_re, kernel_im = jnp.cos(fc * t), -jnp.sin(fc * t)
    arg = fb * t / (m + FBSP_EPS)
    win = jnp.where(arg == 0, jnp.ones_like(arg), jnp.sin(arg) / arg)
    # win ** m for a real win < 0: magnitude |win| ** m, phase m * pi.
    zero = jnp.zeros_like(m)
    magnitude = (win**2 + jnp.zeros_like(win) ** 2) ** 0.5
    phase = jnp.arctan2(jnp.zeros_like(win), win)
    mag_out = (magnitude**2) ** (0.5 * m) * jnp.exp(-zero * phase)
    angle = m * phase + 0.5 * zero * jnp.log(magnitude**2)
    win_re, win_im = mag_out * jnp.cos(angle), mag_out * jnp.sin(angle)
    scale = jnp.sqrt(fb)
    weights = jnp.stack([scale * (win_re * kernel_re - win_im * kernel_im),
                         scale * (win_re * kernel_im + win_im * kernel_re)], axis=-1)
    return weights / n**0.5 if normalized else weights


def fbsp_regularizer(tower_params, n_fft: int | None = None, normalized: bool = True):
    """The reference's loss_ttf: mean over LinearFBSP's rows of (||W_k|| - 1)^2 (target sqrt(n_fft) when not
    normalized), from m, fb, fc only. `tower_params`: the tower's params (or its variables). n_fft defaults
    to 2 * (rows - 1). In training take the forward's value (with_regularizer=True) instead: there the
    gradient scaling of m, fb, fc sees the sum of both losses' gradients, as in the reference."""
    params = tower_params.get("params", tower_params)
    if "fbsp" not in params:
        raise ValueError("fbsp_regularizer needs the tower's params with its 'fbsp' (m, fb, fc): the 'logmel' "
                         f"front end has none; got the keys {sorted(params)}")
    p = params["fbsp"]
    n = 2 * (p["m"].shape[0] - 1) if n_fft is None else n_fft
    return _ttf_loss(fbsp_weights(p["m"], p["fb"], p["fc"], n, normalized), n, normalized)


def _ttf_loss(weights, n: int, normalized: bool):
    norm = jnp.sqrt(jnp.sum(weights**2, axis=(-1, -2)))
    return jnp.mean((norm - (1.0 if normalized else n**0.5)) ** 2)


class LinearFBSP(nn.Module):
    """frames [..., n] -> (spectrum [..., K, 2], the weights [K, n, 2]); m, fb, fc gradients scaled by max."""

    features: int
    normalized: bool = True

    @nn.compact
    def __call__(self, frames):
        k = self.features
        m = self.param("m", nn.initializers.zeros, (k,), jnp.float32)
        fb = self.param("fb", nn.initializers.ones, (k,), jnp.float32)
        fc = self.param("fc", lambda _, shape, dtype: jnp.arange(shape[0], dtype=dtype), (k,), jnp.float32)
        m, fb, fc = scale_grad_by_max(m), scale_grad_by_max(fb), scale_grad_by_max(fc)
        weights = fbsp_weights(m, fb, fc, frames.shape[-1], self.normalized)
        hi = jax.lax.Precision.HIGHEST  # dB of small bins: no reduced-precision matmul
        spec = jnp.stack([jnp.einsum("...n,kn->...k", frames, weights[..., 0], precision=hi),
                          jnp.einsum("...n,kn->...k", frames, weights[..., 1], precision=hi)], axis=-1)
        return spec, weights


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """float32 [n_fft // 2 + 1, n_mels]: triangles on the HTK mel scale (2595 log10(1 + f / 700)) from 0 Hz to
    sample_rate / 2, each peaking at 1 at its centre, on the rFFT's bin frequencies."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lower) / (centre - lower)
    down = (upper - freqs[:, None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


# -- body ---------------------------------------------------------------------------------------------
def _conv_kernel_init():
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torch's kaiming_normal_(fan_out)


def _torch_default_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv(features: int, kernel: Tuple[int, int], dtype: Dtype, name: str, stride: int = 1,
         padding: Tuple[int, int] = (0, 0), groups: int = 1, bias: bool = False, fan_in: int = 1) -> nn.Conv:
    return nn.Conv(features, kernel, strides=(stride, stride), padding=[(padding[0],) * 2, (padding[1],) * 2],
                   feature_group_count=groups, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=_conv_kernel_init(), bias_init=_torch_default_uniform(fan_in), name=name)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over NHWC: eps 1e-5; in training the batch's biased variance normalizes and the
    running variance takes the unbiased one, with momentum 0.1."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            x32 = x.astype(jnp.float32)
            mu = jnp.mean(x32, axis=(0, 1, 2))
            sigma2 = jnp.mean(jnp.square(x32 - mu), axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.size // c
                mean.value = 0.9 * mean.value + 0.1 * mu
                var.value = 0.9 * var.value + 0.1 * sigma2 * (n / max(n - 1, 1))
        else:
            mu, sigma2 = mean.value, var.value
        y = (x.astype(jnp.float32) - mu) / jnp.sqrt(sigma2 + 1e-5) * scale + bias
        return y.astype(self.dtype)


def adaptive_bins(size_in: int, size_out: int) -> np.ndarray:
    """int [size_out, L]: PyTorch's adaptive pooling bins [floor(i In / Out), ceil((i + 1) In / Out)), overlapping
    where Out does not divide In; a bin shorter than the longest repeats its last index (harmless in a max)."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [((i + 1) * size_in + size_out - 1) // size_out for i in range(size_out)]
    longest = max(e - s for s, e in zip(starts, ends))
    return np.array([[min(s + j, e - 1) for j in range(longest)] for s, e in zip(starts, ends)])


def adaptive_max_pool(x, size: Tuple[int, int]):
    """NHWC [N, H, W, C] -> [N, size[0], size[1], C], PyTorch's adaptive_max_pool2d."""
    x = jnp.max(x[:, adaptive_bins(x.shape[1], size[0])], axis=2)
    return jnp.max(x[:, :, adaptive_bins(x.shape[2], size[1])], axis=3)


class Attention2d(nn.Module):
    """The reference's gate: adaptive max pool of the tensor entering a layer to the layer output's size,
    a depthwise conv, a pointwise conv (both with bias), BatchNorm, sigmoid."""

    features: int
    kernel: Tuple[int, int]
    padding: Tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Tuple[int, int], train: bool):
        c = x.shape[-1]
        x = adaptive_max_pool(x, size)
        x = conv(c, self.kernel, self.dtype, "conv_depth", padding=self.padding, groups=c, bias=True,
                 fan_in=self.kernel[0] * self.kernel[1])(x)
        x = conv(self.features, (1, 1), self.dtype, "conv_point", bias=True, fan_in=c)(x)
        return nn.sigmoid(BatchNorm(self.dtype, name="bn")(x, train))


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck (stride on the grouped 3x3), out = 4 * planes."""

    planes: int
    stride: int = 1
    groups: int = 32
    width_per_group: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
        out = nn.relu(BatchNorm(self.dtype, name="bn1")(conv(width, (1, 1), self.dtype, "conv1")(x), train))
        out = conv(width, (3, 3), self.dtype, "conv2", self.stride, (1, 1), self.groups)(out)
        out = nn.relu(BatchNorm(self.dtype, name="bn2")(out, train))
        out = BatchNorm(self.dtype, name="bn3")(conv(4 * self.planes, (1, 1), self.dtype, "conv3")(out), train)
        identity = x
        if self.stride != 1 or x.shape[-1] != 4 * self.planes:
            identity = conv(4 * self.planes, (1, 1), self.dtype, "downsample_0", self.stride)(x)
            identity = BatchNorm(self.dtype, name="downsample_1")(identity, train)
        return constrain(nn.relu(out + identity), (BATCH, None, None, None))


# (kernel, padding) of the gates after layer1..layer4 and after the average pool.
GATES = (((3, 1), (1, 0)), ((1, 5), (0, 2)), ((3, 1), (1, 0)), ((1, 5), (0, 2)), ((3, 5), (1, 2)))


class ESResNeXtFBSP(nn.Module):
    """waveform [B, C, T] in [-1, 1] -> audio features [B, embed_dim] (not normalized). Every size is a field;
    PRESETS holds the reference's and a small one. `width` is the stem's channels (64 in the reference):
    stage i has planes width * 2^i and outputs 4 * width * 2^i channels."""

    embed_dim: int = 1024
    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 561
    win_length: int = 1654
    layers: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    groups: int = 32
    width_per_group: int = 4
    attention: bool = True
    front_end: str = "fbsp"  # 'fbsp' (the reference's) or 'logmel'
    n_mels: int = 192  # 'logmel': mel bands, 3 contiguous bands of n_mels // 3 as the 3 channels
    normalized: bool = True  # LinearFBSP's 1 / sqrt(n_fft), as AudioCLIP sets it
    dtype: Dtype = jnp.float32  # the body's compute dtype; the front end runs in float32

    def check(self, audio_shape):
        """A clear error for a bad setting or input, before anything is traced."""
        if self.front_end not in FRONT_ENDS:
            raise ValueError(f"front_end={self.front_end!r}: use one of {FRONT_ENDS}")
        if not 0 < self.win_length <= self.n_fft or self.hop_length < 1:
            raise ValueError(f"win_length={self.win_length}, hop_length={self.hop_length}, n_fft={self.n_fft}: the "
                             "window must be 1..n_fft samples and the hop at least 1")
        rows = self.n_mels if self.front_end == "logmel" else fbsp_bins(self.n_fft)
        if rows < 3:
            raise ValueError(f"{rows} spectrogram rows make no 3 bands: raise n_fft or n_mels")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers={tuple(self.layers)}: the body has 4 stages of at least one block")
        if len(audio_shape) != 3 or min(audio_shape) < 1:
            raise ValueError(f"audio of shape {tuple(audio_shape)}: the tower takes a waveform [batch, channels, "
                             "samples] in [-1, 1] (add a channel axis to a mono batch [B, T])")

    def _spectrogram(self, audio):
        """waveform [B, C, T] -> (the body's input [B, C, rows // 3, F, 3] (float32), the front end's
        regularizer (0 for 'logmel')); called inside __call__, which owns the front end's params."""
        b, c, _ = audio.shape
        x = audio.astype(jnp.float32) * 32768.0  # the reference's int16 units ...
        x = ((x - (-32768.0)) * 2.0) / 65535.0 + (-1.0)  # ... and its asymmetric rescale, op for op
        x = x.reshape(b * c, -1)
        pad = self.n_fft - self.win_length
        window = blackman_harris(self.win_length) if self.front_end == "fbsp" else hann(self.win_length)
        frames = frame_signal(x, self.win_length, self.hop_length, window)
        frames = jax.lax.stop_gradient(jnp.pad(frames, ((0, 0), (0, 0), (pad // 2, pad - pad // 2))))
        if self.front_end == "fbsp":
            spec, weights = LinearFBSP(fbsp_bins(self.n_fft), self.normalized, name="fbsp")(frames)
            spec = jnp.swapaxes(spec, 1, 2)  # [N, K, F, 2]
            band = spec.shape[1] // 3
            power = spec[:, : 3 * band, :, 0] ** 2 + spec[:, : 3 * band, :, 1] ** 2
            power = jnp.where(power > 0.0, power, LOG10_FLOOR)
            feats = jnp.log10(power) * 10.0
            loss = _ttf_loss(weights, frames.shape[-1], self.normalized)
        else:
            power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2
            mel = jnp.einsum("nfk,km->nmf", power, mel_filterbank(self.sample_rate, self.n_fft, self.n_mels),
                             precision=jax.lax.Precision.HIGHEST)
            band = self.n_mels // 3
            feats = jnp.log(mel[:, : 3 * band] + LOGMEL_EPS)
            loss = jnp.zeros((), jnp.float32)
        feats = feats.reshape(b, c, 3, band, feats.shape[-1]).transpose(0, 1, 3, 4, 2)
        return feats, loss

    @nn.compact
    def __call__(self, audio, train: bool = False, with_regularizer: bool = False, spectrogram: bool = False):
        """with_regularizer: (features, the front end's regularizer), the one to add to a training loss.
        spectrogram: the front end's output only, [B, C, rows // 3, F, 3] (dB for 'fbsp'), 3 the bands."""
        self.check(audio.shape)
        feats, loss = self._spectrogram(audio)
        if spectrogram:
            return (feats, loss) if with_regularizer else feats
        d = self.dtype
        stem = conv(self.width, (7, 7), d, "conv1", 2, (3, 3))
        stem_bn = BatchNorm(d, name="bn1")
        stages, gates, inplanes = [], [], self.width
        for i, blocks in enumerate(self.layers):
            planes = self.width * 2**i
            stages.append([Bottleneck(planes, 2 if i and not j else 1, self.groups, self.width_per_group, d,
                                      name=f"layer{i + 1}_{j}") for j in range(blocks)])
            if self.attention:
                gates.append(Attention2d(4 * planes, *GATES[i], d, name=f"att{i + 1}"))
            inplanes = 4 * planes
        gate5 = Attention2d(inplanes, *GATES[4], d, name="att5") if self.attention else None
        pooled = []
        for ch in range(feats.shape[1]):  # every audio channel through the same body, as the reference
            x = constrain(feats[:, ch].astype(d), (BATCH, None, None, None))
            x = nn.relu(stem_bn(stem(x), train))
            x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
            for i, blocks in enumerate(stages):
                x_in = x
                for block in blocks:
                    x = block(x, train)
                if self.attention:
                    x = x * gates[i](x_in, x.shape[1:3], train)
            out = jnp.mean(x, axis=(1, 2), keepdims=True)
            if self.attention:
                out = out * gate5(x, (1, 1), train)
            pooled.append(out.reshape(out.shape[0], -1))
        x = sum(pooled[1:], pooled[0])
        features = nn.Dense(self.embed_dim, dtype=d, param_dtype=jnp.float32, name="fc",
                            kernel_init=_torch_default_uniform(x.shape[-1]),
                            bias_init=_torch_default_uniform(x.shape[-1]))(x).astype(jnp.float32)
        return (features, loss) if with_regularizer else features


def esresnext(preset: str = "esresnext-fbsp", **overrides) -> ESResNeXtFBSP:
    """The tower of a PRESETS name, any field overridden (e.g. embed_dim=512, front_end='logmel')."""
    if preset not in PRESETS:
        raise ValueError(f"unknown audio tower preset {preset!r}: use one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in ESResNeXtFBSP.__dataclass_fields__.values()}
                     - {"parent", "name"})
    if unknown:
        raise ValueError(f"ESResNeXtFBSP has no field {unknown}")
    return ESResNeXtFBSP(**{**PRESETS[preset], **overrides})


def dummy_audio(model: ESResNeXtFBSP, batch: int = 1, channels: int = 1):
    """A zero waveform of one frame: enough to init the tower or read its variables' shapes."""
    return jnp.zeros((batch, channels, model.win_length), jnp.float32)
