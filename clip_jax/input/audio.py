"""Audio clips as a record feature and a batch key (AudioCLIP's input).

Record feature ``audio``: the bytes of an encoded clip, a RIFF/WAVE file (any sample rate, any channel
count; 8/16/24/32-bit integer PCM or 32/64-bit float, WAVE_FORMAT_EXTENSIBLE included), or raw
little-endian PCM with ``audio/format`` ('pcm_s16le', 'pcm_s24le', 'pcm_s32le' or 'pcm_f32le'),
``audio/rate`` and ``audio/channels`` beside it (its value is then that PCM under a WAV header). The
embedded sources (shapes, shapes_scenes) store no audio: their value is a float WAV synthesized from
the record (clip_jax.input.sounds, `embedded_sound`), the rule in docs/audio.md.

Batch key (training):

    BatchInput(key="audio", op="audio", reads=("audio",),
               options=(("rate", 44100), ("samples", 220500), ("channels", 1), ("augment", True)))

gives float32 [B, channels, samples] in [-1, 1]: decoded, integer PCM scaled by 1/2^(bits-1) (8-bit:
(x - 128)/128), channels mixed (to mono: their mean; to stereo: a mono clip twice, else the first two),
resampled to `rate` by the polyphase Kaiser-windowed sinc of scipy.signal.resample_poly, then fitted
to `samples` by AudioCLIP's RandomPadding and RandomCrop (random offsets in training, centred at
evaluation); in training with augment=True, its RandomScale before the fit and its RandomNoise after.
Every draw comes from the record's stateless seed (ops.AUDIO_SALT). Options left out take the data
settings audio_rate, audio_samples and audio_channels; evaluation's record feature ``audio`` is the
centred, unaugmented clip at those settings.

Bad records (pipeline.BAD_KINDS): no audio bytes (missing_audio), bytes that are no WAV of a supported
format (bad_audio), a clip of no samples (empty_audio), a float clip holding NaN or Inf
(nonfinite_audio); each is counted and skipped. Another rate or channel count is converted.
"""

from __future__ import annotations

import hashlib
import struct
import weakref

import numpy as np

from clip_jax.input import features as features_lib
from clip_jax.input import ops
from clip_jax.input.features import Feature

EMBEDDED = ("shapes", "shapes_scenes")
# (WAVE format tag, bits per sample) -> the decode branch: ints scaled to [-1, 1), floats as they are
_FORMATS = ((1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64))
PCM_FORMATS = {"pcm_s16le": (1, 16), "pcm_s24le": (1, 24), "pcm_s32le": (1, 32), "pcm_f32le": (3, 32)}
_EXTENSIBLE = 0xFFFE
_MAX_CHUNKS = 64  # RIFF chunks walked before the data chunk (a file with more is 'bad_audio')
# AudioCLIP's augmentation (utils/transforms.py of the reference)
MAX_SCALE = 1.5  # RandomScale: time stretched by MAX_SCALE ** U(-1, 1)
NOISE_P = 0.25  # RandomNoise: applied where U[0, 1) <= NOISE_P
SNR_DB = (10.0, 120.0)  # RandomNoise: SNR ~ U[low, high + 1) dB
KAISER_BETA = 5.0  # resample_poly's window
ZERO_CROSSINGS = 10  # resample_poly's half filter length, in periods of the lower rate


def _tf():
    from clip_jax.input.tf_runtime import import_tensorflow

    return import_tensorflow()


# -- WAV bytes ---------------------------------------------------------------------------------------
def wav_bytes(samples: np.ndarray, rate: int, bits: int = 16, float_format: bool = False) -> bytes:
    """A WAV file of samples [T] or [T, C] (floats in [-1, 1], or integers as they are): integer PCM of `bits`,
    or IEEE float (float_format, 32 or 64 bits)."""
    x = np.asarray(samples)
    x = x[:, None] if x.ndim == 1 else x
    channels = x.shape[1]
    if float_format:
        data = x.astype("<f4" if bits == 32 else "<f8").tobytes()
        tag = 3
    else:
        ints = x if np.issubdtype(x.dtype, np.integer) else np.round(np.clip(x, -1, 1) * (2 ** (bits - 1) - 1))
        ints = ints.astype(np.int64)
        if bits == 8:
            data = (ints + 128).astype(np.uint8).tobytes()
        elif bits == 24:
            data = (ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()
        else:
            data = ints.astype(f"<i{bits // 8}").tobytes()
        tag = 1
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, int(rate), int(rate) * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _u8(data, pos, n: int):
    """uint8 [n] of data[pos:pos + n], zeros past the end (never raises)."""
    tf = _tf()
    pos = tf.clip_by_value(pos, 0, tf.cast(tf.strings.length(data), tf.int64))
    raw = tf.io.decode_raw(tf.strings.substr(data, pos, n), tf.uint8)
    return tf.pad(raw, [[0, n - tf.shape(raw)[0]]])


def _le(u8, start: int, n: int):
    """The little-endian unsigned integer of u8[start:start + n], int64."""
    tf = _tf()
    value = tf.constant(0, tf.int64)
    for i in reversed(range(n)):
        value = value * 256 + tf.cast(u8[start + i], tf.int64)
    return value


def _chunk(data, length, state):
    """One step of the RIFF chunk walk: state = (pos, fmt_pos, fmt_size, data_pos, data_size), -1 = not seen."""
    tf = _tf()
    pos, fmt_pos, fmt_size, data_pos, data_size = state
    chunk = tf.strings.substr(data, tf.minimum(pos, length), 4)
    size = _le(_u8(data, pos + 4, 4), 0, 4)
    here = pos + 8 <= length
    is_fmt, is_data = here & tf.equal(chunk, "fmt "), here & tf.equal(chunk, "data")
    return (tf.where(here, pos + 8 + size + size % 2, pos), tf.where(is_fmt, pos + 8, fmt_pos),
            tf.where(is_fmt, size, fmt_size), tf.where(is_data, pos + 8, data_pos), tf.where(is_data, size, data_size))


def _walk(data):
    """(fmt_pos, fmt_size, data_pos, data_size) of a RIFF file: its first two chunks straight (a plain WAV: 'fmt '
    then 'data'), the rest, where 'data' is not among them, by a loop (tf.data pays per loop iteration)."""
    tf = _tf()
    length = tf.cast(tf.strings.length(data), tf.int64)
    minus = tf.constant(-1, tf.int64)
    state = (tf.constant(12, tf.int64), minus, minus, minus, minus)
    for _ in range(2):
        state = _chunk(data, length, state)

    def loop():
        return tf.while_loop(lambda *s: (s[0] + 8 <= length) & (s[3] < 0), lambda *s: _chunk(data, length, s), state,
                             maximum_iterations=_MAX_CHUNKS)

    return tf.cond(state[3] >= 0, lambda: state, loop)[1:]


# per graph: {clip tensor: its wav_info}, so a record's checks and decode parse its header once
_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def wav_info(data) -> dict:
    """What a clip's RIFF header says, never raising: ok (a WAV of a supported format with a data chunk), branch
    (the index in _FORMATS), channels, rate, block (bytes per frame), offset (of the samples), frames (whole frames
    present: a data chunk that runs past the file's end is read as far as it goes)."""
    tf = _tf()
    graph = getattr(data, "graph", None)
    cache = _INFO.setdefault(graph, {}) if graph is not None else {}
    if data.ref() in cache:
        return cache[data.ref()]
    length = tf.cast(tf.strings.length(data), tf.int64)
    riff = (tf.equal(tf.strings.substr(data, 0, 4), "RIFF")
            & tf.equal(tf.strings.substr(data, tf.minimum(length, 8), 4), "WAVE"))
    fmt_pos, fmt_size, data_pos, data_size = _walk(data)
    fmt = _u8(data, fmt_pos, 26)
    tag, channels, rate = _le(fmt, 0, 2), _le(fmt, 2, 2), _le(fmt, 4, 4)
    block, bits = _le(fmt, 12, 2), _le(fmt, 14, 2)
    tag = tf.where(tf.equal(tag, _EXTENSIBLE) & (fmt_size >= 40), _le(fmt, 24, 2), tag)  # the sub-format's tag
    branch = tf.constant(-1, tf.int64)
    for k, (t, b) in enumerate(_FORMATS):
        branch = tf.where(tf.equal(tag, t) & tf.equal(bits, b), tf.constant(k, tf.int64), branch)
    ok = (riff & (fmt_pos >= 0) & (fmt_size >= 16) & (data_pos >= 0) & (branch >= 0) & (channels >= 1)
          & (rate >= 1) & tf.equal(block, channels * bits // 8))
    available = tf.maximum(tf.minimum(data_size, length - data_pos), 0)
    frames = tf.where(ok, available // tf.maximum(block, 1), tf.constant(0, tf.int64))
    info = {"ok": ok, "branch": branch, "channels": channels, "rate": rate, "block": block, "offset": data_pos,
            "frames": frames}
    cache[data.ref()] = info
    return info


def _samples_of(data, info, branch: int):
    """float32 [frames * channels] of a clip whose format is _FORMATS[branch]."""
    tf = _tf()
    raw = tf.strings.substr(data, info["offset"], info["frames"] * info["block"])
    tag, bits = _FORMATS[branch]
    if tag == 3:  # floats past [-1, 1] are clipped to it
        out = tf.io.decode_raw(raw, tf.float32 if bits == 32 else tf.float64, little_endian=True)
        return tf.clip_by_value(tf.cast(out, tf.float32), -1.0, 1.0)
    if bits == 8:
        return (tf.cast(tf.io.decode_raw(raw, tf.uint8), tf.float32) - 128.0) / 128.0
    if bits == 24:
        b = tf.cast(tf.reshape(tf.io.decode_raw(raw, tf.uint8), [-1, 3]), tf.int32)
        v = b[:, 0] + b[:, 1] * 256 + b[:, 2] * 65536
        v = tf.bitwise.right_shift(tf.bitwise.left_shift(v, 8), 8)  # sign-extended (an arithmetic shift)
        return tf.cast(v, tf.float32) / float(2 ** 23)
    out = tf.io.decode_raw(raw, tf.int16 if bits == 16 else tf.int32, little_endian=True)
    return tf.cast(out, tf.float32) / float(2 ** (bits - 1))


def nonfinite(data, info=None):
    """Whether a float clip holds NaN or Inf (integer clips cannot: no decode then); never raises."""
    tf = _tf()
    info = wav_info(data) if info is None else info
    is_float = info["ok"] & (info["frames"] > 0) & (info["branch"] >= 4)
    return tf.cond(is_float, lambda: tf.logical_not(tf.reduce_all(tf.math.is_finite(tf.switch_case(
        tf.cast(info["branch"] - 4, tf.int32), [lambda: _samples_of(data, info, 4), lambda: _samples_of(data, info, 5)]
    )))), lambda: tf.constant(False))


def _fails_unless(problems):
    """float32 0, or an InvalidArgumentError quoting the first problem whose check is False (a pure op: tf.data
    keeps optimizing around it)."""
    tf = _tf()
    text = tf.constant("0")
    for ok, message in reversed(problems):
        text = tf.where(ok, text, tf.constant(f"bad audio clip: {message}"))
    return tf.strings.to_number(text, tf.float32)


def decode(data):
    """(float32 [C, T] in [-1, 1], rate int64) of a WAV clip; raises (InvalidArgumentError) where the bytes are no
    WAV of a supported format, hold no samples or hold NaN / Inf."""
    tf = _tf()
    info = wav_info(data)
    checked = _fails_unless([
        (info["ok"], "no RIFF/WAVE file of 8/16/24/32-bit integer or 32/64-bit float PCM"),
        (info["frames"] > 0, "no samples"),
    ])
    flat = tf.switch_case(tf.cast(tf.maximum(info["branch"], 0), tf.int32),
                          [lambda k=k: _samples_of(data, info, k) for k in range(len(_FORMATS))])
    flat = flat + checked + _fails_unless([(tf.logical_not(nonfinite(data, info)), "NaN or Inf samples")])
    channels = tf.cast(info["channels"], tf.int32)
    clip = tf.cond(tf.equal(channels, 1), lambda: flat[None], lambda: tf.transpose(tf.reshape(flat, [-1, channels])))
    return clip, info["rate"]


def mix_channels(clip, channels: int):
    """[C, T] -> [channels, T]: mono is the channels' mean; stereo is a mono clip twice, or the first two."""
    tf = _tf()
    if channels == 1:
        return tf.reduce_mean(clip, axis=0, keepdims=True)
    return tf.cond(tf.equal(tf.shape(clip)[0], 1), lambda: tf.tile(clip, [2, 1]), lambda: clip[:2])


# -- resampling ------------------------------------------------------------------------------------
def _gcd(a, b):
    tf = _tf()
    _, g, _ = tf.while_loop(lambda b, a, i: b > 0, lambda b, a, i: (a % b, b, i + 1), (b, a, tf.constant(0)))
    return g


def resample(clip, rate_in, rate_out: int):
    """[C, T] at rate_in (an int64 tensor) -> [C, ceil(T * up / down)] at rate_out: scipy.signal.resample_poly's
    filter (firwin of 2 * ZERO_CROSSINGS * max(up, down) + 1 taps, Kaiser beta 5, cutoff 1 / max(up, down), unit
    DC gain, times up), applied polyphase: each output sums ~2 * ZERO_CROSSINGS inputs. up / down = rate_out /
    rate_in in lowest terms; the clip is taken as zeros outside itself."""
    tf = _tf()
    rate_out_t = tf.constant(int(rate_out), tf.int64)
    g = _gcd(rate_in, rate_out_t)
    up, down = rate_out_t // g, rate_in // g
    most = tf.maximum(up, down)
    half = ZERO_CROSSINGS * most
    cutoff = 1.0 / tf.cast(most, tf.float64)

    def taps(m):  # the filter at offsets m (int64), before its DC normalization
        mf = tf.cast(m, tf.float64)
        x = cutoff * mf
        sinc = tf.where(tf.equal(m, 0), tf.ones_like(x), tf.sin(np.pi * x) / (np.pi * tf.where(tf.equal(m, 0),
                                                                                               tf.ones_like(x), x)))
        ratio = mf / tf.cast(half, tf.float64)
        inside = tf.abs(m) <= half
        window = tf.math.bessel_i0(KAISER_BETA * tf.sqrt(tf.maximum(1.0 - ratio * ratio, 0.0))) / np.i0(KAISER_BETA)
        return tf.where(inside, cutoff * sinc * window, tf.zeros_like(x))

    total = tf.reduce_sum(taps(tf.range(-half, half + 1, dtype=tf.int64)))
    k0 = (half + up - 1) // up  # ceil(half / up): taps left of an output's position
    width = 2 * k0 + 2
    k = tf.range(width, dtype=tf.int64)
    phases = tf.range(up, dtype=tf.int64)
    table = taps(phases[:, None] - (k[None, :] - k0) * up) * tf.cast(up, tf.float64) / total  # [up, width]
    length = tf.cast(tf.shape(clip)[1], tf.int64)
    n_out = (length * up + down - 1) // down
    n = tf.range(n_out, dtype=tf.int64) * down
    base, phase = n // up, n % up
    index = base[:, None] + k[None, :]  # inputs base - k0 + k, in the clip padded by k0 on the left
    padded = tf.pad(clip, [[0, 0], [k0, k0 + 2]])
    gathered = tf.gather(padded, index, axis=1)  # [C, n_out, width]
    weights = tf.cast(tf.gather(table, phase), tf.float32)
    return tf.reduce_sum(gathered * weights[None], axis=-1)


# -- AudioCLIP's fitting and augmentation -----------------------------------------------------------
def random_scale(clip, factor):
    """RandomScale at a given factor: [C, int(T * factor)], each channel sampled at arange / factor (float32
    positions) by linear interpolation between its neighbouring samples (the last one held)."""
    tf = _tf()
    length = tf.shape(clip)[1]
    n = tf.cast(tf.floor(tf.cast(length, tf.float64) * factor), tf.int32)
    at = tf.range(n, dtype=tf.float32) / tf.cast(factor, tf.float32)
    left = tf.minimum(tf.cast(tf.floor(at), tf.int32), length - 1)
    w = at - tf.cast(left, tf.float32)
    right = tf.minimum(left + 1, length - 1)
    return tf.gather(clip, left, axis=1) * (1.0 - w) + tf.gather(clip, right, axis=1) * w


def _std(x):
    """The unbiased standard deviation of every sample (torch's Tensor.std())."""
    tf = _tf()
    n = tf.cast(tf.size(x), tf.float32)
    mean = tf.reduce_mean(x)
    return tf.sqrt(tf.reduce_sum(tf.square(x - mean)) / tf.maximum(n - 1, 1.0))


def pad(clip, samples: int, left):
    """RandomPadding: [C, T < samples] -> [C, samples] with `left` values before the clip, each the channels' mean
    of its first sample, and the rest after it, the channels' mean of its last."""
    tf = _tf()
    length = tf.shape(clip)[1]
    right = samples - left - length
    channels = tf.shape(clip)[0]
    first = tf.fill([channels, left], tf.reduce_mean(clip[:, 0]))
    last = tf.fill([channels, right], tf.reduce_mean(clip[:, -1]))
    return tf.concat([first, clip, last], axis=1)


def crop(clip, samples: int, left):
    """RandomCrop: [C, T > samples] -> [C, samples] from `left`; where that window's std is below half the clip's,
    the first `samples` instead, and where that is still below half but above the window's, the last."""
    tf = _tf()
    half_std = _std(clip) * 0.5
    window = clip[:, left:left + samples]
    window_std = _std(window)
    out = tf.cond(window_std < half_std, lambda: clip[:, :samples], lambda: window)
    out_std = _std(out)
    return tf.cond((half_std > out_std) & (out_std > window_std), lambda: clip[:, -samples:], lambda: out)


def fit(clip, samples: int, train: bool, seed=None):
    """Padding, then cropping, to [C, samples]: offsets uniform in [0, |T - samples|) in training (seed: int64 [2]),
    round(0.5 * |T - samples|) at evaluation."""
    tf = _tf()
    length = tf.shape(clip)[1]
    pad_seed, crop_seed = (None, None) if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def offset(room, s):
        if train:
            return tf.random.stateless_uniform([], s, 0, tf.maximum(room, 1), dtype=tf.int32)
        return tf.cast(tf.round(0.5 * tf.cast(room, tf.float64)), tf.int32)  # half-to-even, as Python's round

    clip = tf.cond(length < samples, lambda: pad(clip, samples, offset(samples - length, pad_seed)), lambda: clip)
    length = tf.shape(clip)[1]
    return tf.cond(length > samples, lambda: crop(clip, samples, offset(length - samples, crop_seed)), lambda: clip)


def _normal(shape, seed):
    """Standard normal samples by Box-Muller from stateless uniforms (faster here than stateless_normal)."""
    tf = _tf()
    n = tf.reduce_prod(shape)
    u = tf.random.stateless_uniform([2, (n + 1) // 2], seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
    radius, angle = tf.sqrt(-2.0 * tf.math.log(u[0])), 2.0 * np.pi * u[1]
    return tf.reshape(tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)[:n], shape)


def add_noise(clip, seed):
    """RandomNoise: with probability NOISE_P, Gaussian noise at an SNR ~ U[SNR_DB[0], SNR_DB[1] + 1) dB of the
    clip's mean power."""
    tf = _tf()
    s_apply, s_snr, s_noise = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    apply = tf.random.stateless_uniform([], s_apply, dtype=tf.float32) <= NOISE_P
    snr = tf.random.stateless_uniform([], s_snr, dtype=tf.float32) * (SNR_DB[1] - SNR_DB[0] + 1.0) + SNR_DB[0]

    def noisy():
        power = tf.reduce_mean(tf.square(clip))
        std = tf.sqrt(power / 10.0 ** (snr / 10.0))
        return clip + std * _normal(tf.shape(clip), s_noise)

    return tf.cond(apply, noisy, lambda: clip)


def transform(data, rate: int, samples: int, channels: int, train: bool = False, augment: bool = False,
              seed=None):
    """float32 [channels, samples] in [-1, 1] of one WAV clip: decode, mix, resample, (RandomScale), fit,
    (RandomNoise). Raises on a clip that decode rejects."""
    tf = _tf()
    clip, rate_in = decode(realize(data))
    clip = mix_channels(clip, channels)
    clip = tf.cond(tf.equal(rate_in, rate), lambda: clip, lambda: resample(clip, rate_in, rate))
    augment = bool(train and augment)
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3)) if train else (None, None, None)
    if augment:
        u = tf.random.stateless_uniform([], seeds[0], -1.0, 1.0, dtype=tf.float64)
        clip = random_scale(clip, tf.pow(tf.constant(MAX_SCALE, tf.float64), u))
    clip = fit(clip, samples, train, seeds[1])
    if augment:
        clip = add_noise(clip, seeds[2])
    return tf.reshape(tf.clip_by_value(clip, -1.0, 1.0), [channels, samples])


# -- the op --------------------------------------------------------------------------------------
def settings(wanted: ops.Wanted, config) -> tuple:
    """(rate, samples, channels, augment) of a key: its options, else the data settings."""
    return (int(wanted.option("rate", config["audio_rate"])), int(wanted.option("samples", config["audio_samples"])),
            int(wanted.option("channels", config["audio_channels"])), bool(wanted.option("augment", True)))


def check_settings(rate, samples, channels, where: str) -> None:
    for name, value, least in (("rate", rate, 1), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{where}: {name}={value!r} must be an integer >= {least} (Hz for rate, a clip length "
                             "in samples for samples)")
    if channels not in (1, 2):
        raise ValueError(f"{where}: channels={channels!r}: use 1 (mono, the channels' mean) or 2 (stereo)")


def _validate(wanted: ops.Wanted) -> None:
    if tuple(wanted.reads) != ("audio",):
        raise ValueError(f"batch key {wanted.key!r}: op 'audio' reads ('audio',), not {wanted.reads!r}")
    unknown = sorted(set(dict(wanted.options)) - {"rate", "samples", "channels", "augment"})
    if unknown:
        raise ValueError(f"batch key {wanted.key!r}: op 'audio' has no options {unknown}: it takes rate, samples, "
                         "channels and augment")
    check_settings(wanted.option("rate", 1), wanted.option("samples", 1), wanted.option("channels", 1),
                   f"batch key {wanted.key!r} (op 'audio')")


def _make(ctx: ops.OpContext, ex: dict, wanted: ops.Wanted):
    rate, samples, channels, augment = settings(wanted, ctx.config)
    return transform(ex["audio"], rate, samples, channels, ctx.train, augment,
                     ctx.seed(ops.AUDIO_SALT) if ctx.train else None)


def _blank(ctx: ops.OpContext, wanted: ops.Wanted):
    _, samples, channels, _ = settings(wanted, ctx.config)
    return _tf().zeros([channels, samples], _tf().float32)


ops.OPS.register("audio")(ops.Op("record", _make, _blank, validate=_validate))


# -- the record feature -------------------------------------------------------------------------
def embedded_objects(shape_ids, color_ids, boxes) -> list:
    """[(shape, colour, loudness)] of a record's objects: loudness = the square root of its box's area (a share of
    the image), so amplitude grows with the object's linear size."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, 1) * np.clip(boxes[:, 3] - boxes[:, 1], 0, 1)
    return [(int(s), int(c), float(np.sqrt(a))) for s, c, a in zip(shape_ids, color_ids, area)]


def key_seed(key) -> int:
    """A record's sound seed: the first 8 bytes of SHA-256 of its key, little-endian."""
    key = key if isinstance(key, bytes) else str(key).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def embedded_sound(key, shape_ids, color_ids, boxes, seconds: float, rate: int) -> np.ndarray:
    """float32 [round(seconds * rate)]: the sound of an embedded record (sounds.scene_sound of its objects)."""
    from clip_jax.input import sounds

    return sounds.scene_sound(embedded_objects(shape_ids, color_ids, boxes), key_seed(key), seconds, rate)


def _embedded_wav(key, shape_ids, color_ids, boxes, seconds, rate) -> bytes:
    clip = embedded_sound(bytes(key), shape_ids, color_ids, boxes, float(seconds), int(rate))
    return wav_bytes(clip, int(rate), 32, float_format=True)


def _byte_table():
    tf = _tf()
    return tf.constant([bytes([i]) for i in range(256)])


def _pcm_wav(raw, fmt, rate, channels):
    """Raw PCM of a named format under a WAV header (another format: the bytes as they are, so a WAV passes and
    anything else is 'bad_audio')."""
    tf = _tf()
    tag, bits = tf.constant(0, tf.int64), tf.constant(0, tf.int64)
    for name, (t, b) in PCM_FORMATS.items():
        tag = tf.where(tf.equal(fmt, name), tf.constant(t, tf.int64), tag)
        bits = tf.where(tf.equal(fmt, name), tf.constant(b, tf.int64), bits)
    block = channels * bits // 8
    size = tf.cast(tf.strings.length(raw), tf.int64)
    fields = [(4, 36 + size), (4, 16), (2, tag), (2, channels), (4, rate), (4, rate * block), (2, block), (2, bits),
              (4, size)]
    parts = []
    for width, value in fields:
        value = tf.cast(value, tf.int64)
        parts += [tf.math.floormod(tf.bitwise.right_shift(value, 8 * i), 256) for i in range(width)]
    header = tf.gather(_byte_table(), tf.stack(parts))
    h = tf.strings.reduce_join(header)
    wav = tf.strings.join(["RIFF", tf.strings.substr(h, 0, 4), "WAVEfmt ", tf.strings.substr(h, 4, 20), "data",
                           tf.strings.substr(h, 24, 4), raw])
    return tf.where((tag > 0) & (tf.strings.length(raw) > 0), wav, raw)


def _parse(r) -> dict:
    tf = _tf()
    if getattr(r.source, "kind", "") in EMBEDDED:
        return {name: spec for name, feature in features_lib.resolve(("key", "objects/shape", "objects/color",
                                                                      "objects/bbox"))
                for name, spec in feature.parse(r).items()}
    return {"audio": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "audio/format": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "audio/rate": tf.io.FixedLenFeature([], tf.int64, default_value=0),
            "audio/channels": tf.io.FixedLenFeature([], tf.int64, default_value=0)}


# An embedded record's sound as a recipe (its objects, seed and length), made into a WAV only by the op, after the
# shuffle buffer: synthesizing at parse time filled a 5000-record buffer with sounds before the first step.
RECIPE = b"clip_jax/sound\0"


def _recipe(key, shape_ids, color_ids, boxes, seconds: float, rate: int):
    """RECIPE + 'shapes\0colours\0boxes\0seconds\0rate\0key' (comma-separated numbers, the boxes' float32 in 9
    significant digits, which read back to the same float32; the key last, as is)."""
    tf = _tf()
    def join(x, **options):
        return tf.strings.reduce_join(tf.strings.as_string(x, **options), separator=",")

    return tf.strings.join([RECIPE, join(shape_ids), "\0", join(color_ids), "\0",
                            join(tf.reshape(tf.cast(boxes, tf.float32), [-1]), scientific=True, precision=8), "\0",
                            str(float(seconds)), "\0",
                            str(int(rate)), "\0", key])


def _recipe_wav(data: bytes) -> bytes:
    raw = data.item() if isinstance(data, np.ndarray) else bytes(data)  # numpy_function passes a 0-d array
    shapes_, colors, boxes, seconds, rate, key = raw[len(RECIPE):].split(b"\0", 5)
    numbers = lambda b, kind: [kind(x) for x in b.split(b",") if x]  # noqa: E731
    return _embedded_wav(key, numbers(shapes_, int), numbers(colors, int),
                         np.asarray(numbers(boxes, float), np.float32).reshape(-1, 4), float(seconds), int(rate))


def is_recipe(data):
    tf = _tf()
    return tf.equal(tf.strings.substr(data, 0, len(RECIPE)), RECIPE)


def realize(data):
    """A clip's WAV bytes: an embedded record's recipe synthesized, any other value as it is."""
    tf = _tf()
    return tf.cond(is_recipe(data),
                   lambda: tf.reshape(tf.numpy_function(_recipe_wav, [data], tf.string, stateful=False), []),
                   lambda: data)


def _value(parsed, r):
    if getattr(r.source, "kind", "") in EMBEDDED:
        get = features_lib.FEATURES.get
        args = [get(name).value(parsed, r) for name in ("key", "objects/shape", "objects/color", "objects/bbox")]
        return _recipe(*args, float(r.config.get("sounds_seconds", 1.0)), int(r.config.get("sounds_rate", 16000)))
    return _pcm_wav(parsed["audio"], parsed["audio/format"], parsed["audio/rate"], parsed["audio/channels"])


def _prepare(value, image_bytes, image_size, config):
    """Evaluation's clip: centred, unaugmented, at the data settings audio_rate / audio_samples / audio_channels."""
    rate, samples, channels = int(config["audio_rate"]), int(config["audio_samples"]), int(config["audio_channels"])
    check_settings(rate, samples, channels, "data settings audio_rate / audio_samples / audio_channels")
    return transform(value, rate, samples, channels)


def _bad(data):
    tf = _tf()
    return tf.logical_not(wav_info(data)["ok"]) & (tf.strings.length(data) > 0) & tf.logical_not(is_recipe(data))


def _empty(data):
    info = wav_info(data)
    return info["ok"] & _tf().equal(info["frames"], 0)


features_lib.FEATURES.register("audio")(Feature(
    parse=_parse,
    value=_value,
    empty=lambda r: _tf().constant(b""),
    checks=(("missing_audio", lambda data: _tf().equal(_tf().strings.length(data), 0)),
            ("bad_audio", _bad),
            ("empty_audio", _empty),
            ("nonfinite_audio", nonfinite)),
    prepare=_prepare,
))
