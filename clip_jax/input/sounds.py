"""Sounds of the embedded shapes: a clip for a scene of coloured shapes that a listener can map back to it.

The rule: colour is pitch, shape is timbre and rhythm.

- Colour -> the fundamental, one note of a chain of fourths from C4 (PITCH_HZ): red C4 261.6 Hz, green F4,
  blue A#4, yellow D#5, purple G#5, orange C#6 1108.7 Hz. Neighbours lie a third apart in frequency (the
  notes are told apart after a network's first strides), no note is within 5% of a partial of another, and
  the strongest spectral peak of a one-object clip is its colour's note.
- Shape -> the partials over that fundamental and a pulse rate (VOICES): a circle is a steady sine; a square
  odd partials at 1/k, pulsing twice a second; a triangle odd partials at 1/k^2, 3 a second; a star every
  partial at 1/k, 4 a second; a cross the fundamental and its octave, 5 a second; a diamond the fundamental
  and its twelfth, 6 a second. A pulse is a raised cosine of the amplitude, so the clip's energy envelope
  peaks at the shape's rate. Partials at or above half the sample rate are left out, as a recording's
  anti-alias filter would.
- A scene sums its objects' sounds, each at its own loudness, then scales the sum to a peak of 0.9.

Deterministic per seed: each object's partials start at phases drawn from the seed, its pitch is detuned by
at most DETUNE, and white noise NOISE below the peak is added, so two clips of one scene differ sample by
sample but never in what they say.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from clip_jax.input.shapes import COLOR_NAMES, SHAPE_NAMES

PITCH_HZ = {name: 261.63 * 2.0 ** (5 * k / 12) for k, name in enumerate(COLOR_NAMES)}
# shape -> ((amplitude of partial 1, 2, ...), pulses per second; 0 = steady)
VOICES = {
    "circle": ((1.0,), 0.0),
    "square": (tuple(1.0 / k if k % 2 else 0.0 for k in range(1, 10)), 2.0),
    "triangle": (tuple((-1.0) ** (k // 2) / k**2 if k % 2 else 0.0 for k in range(1, 10)), 3.0),
    "star": (tuple(1.0 / k for k in range(1, 10)), 4.0),
    "cross": ((1.0, 0.5), 5.0),
    "diamond": ((1.0, 0.0, 0.6), 6.0),
}
DETUNE = 0.005  # at most half a percent off the note
NOISE = 0.01  # white noise, as a fraction of the clip's peak
PEAK = 0.9


def object_sound(shape: int, color: int, seconds: float, rate: int, rng: np.random.Generator,
                 loudness: float = 1.0) -> np.ndarray:
    """float64 [round(seconds * rate)]: one object's sound (unit loudness: its fundamental's amplitude)."""
    if not 0 <= int(shape) < len(SHAPE_NAMES) or not 0 <= int(color) < len(COLOR_NAMES):
        raise ValueError(f"a sound needs a shape index in [0, {len(SHAPE_NAMES)}) and a colour index in "
                         f"[0, {len(COLOR_NAMES)}), got shape {shape} and colour {color}")
    partials, pulses = VOICES[SHAPE_NAMES[int(shape)]]
    f0 = PITCH_HZ[COLOR_NAMES[int(color)]] * (1.0 + rng.uniform(-DETUNE, DETUNE))
    if f0 >= rate / 2:
        raise ValueError(f"a sample rate of {rate} Hz cannot carry the note of {f0:.0f} Hz: use at least "
                         f"{int(2 * f0) + 1} Hz")
    t = np.arange(int(round(seconds * rate))) / rate
    phases = rng.uniform(0, 2 * np.pi, len(partials))
    tone = sum(a * np.sin(2 * np.pi * f0 * (k + 1) * t + p) for k, (a, p) in enumerate(zip(partials, phases))
               if a and f0 * (k + 1) < rate / 2)
    envelope = 0.5 * (1.0 - np.cos(2 * np.pi * pulses * t)) if pulses else np.ones_like(t)
    return loudness * envelope * tone


def scene_sound(objects: Sequence[Tuple[int, int, float]], seed: int, seconds: float = 1.0,
                rate: int = 16_000) -> np.ndarray:
    """float32 [round(seconds * rate)] in [-1, 1]: the sum of the objects' sounds ((shape, colour, loudness)
    each), scaled to a peak of PEAK, with white noise; the same for the same seed."""
    if not objects:
        raise ValueError("a scene's sound needs at least one object (shape, colour, loudness)")
    if seconds <= 0 or int(rate) <= 0:
        raise ValueError(f"a clip needs a positive length and sample rate, got {seconds} s at {rate} Hz")
    rng = np.random.default_rng([int(seed) % (1 << 63), 31])
    clip = sum(object_sound(s, c, seconds, int(rate), rng, float(loud)) for s, c, loud in objects)
    clip = PEAK * clip / max(np.abs(clip).max(), 1e-12)
    clip += NOISE * PEAK * rng.standard_normal(clip.shape)
    return np.clip(clip, -1.0, 1.0).astype(np.float32)
