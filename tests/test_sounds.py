"""clip_jax.input.sounds: each one-object clip says its colour by its strongest frequency and its shape by the
rate of its energy envelope (closed forms: the note of the whole-tone scale, the pulse rate); a scene carries
every object's note; the same seed gives the same clip, another seed another clip that says the same."""

import numpy as np
import pytest

from clip_jax.input import sounds
from clip_jax.input.shapes import COLOR_NAMES, SHAPE_NAMES

RATE, SECONDS = 16_000, 2.0


def spectrum(x: np.ndarray, rate: int):
    power = np.abs(np.fft.rfft(x)) ** 2
    return np.fft.rfftfreq(len(x), 1 / rate), power


def envelope_rate(x: np.ndarray) -> float:
    """The strongest rate of x's energy between 1 and 10 Hz, or 0 where the energy is steady there."""
    freqs, power = spectrum(x.astype(np.float64) ** 2, RATE)
    band = (freqs >= 1) & (freqs <= 10)
    if power[band].max() < 1e-3 * power[0]:
        return 0.0
    return float(freqs[band][np.argmax(power[band])])


@pytest.mark.parametrize("shape", range(len(SHAPE_NAMES)))
def test_one_object_says_its_colour_by_pitch_and_its_shape_by_rhythm(shape):
    for color, name in enumerate(COLOR_NAMES):
        clip = sounds.scene_sound([(shape, color, 1.0)], seed=color, seconds=SECONDS, rate=RATE)
        assert clip.dtype == np.float32 and clip.shape == (int(SECONDS * RATE),)
        assert np.abs(clip).max() <= 1.0
        freqs, power = spectrum(clip, RATE)
        assert freqs[np.argmax(power)] == pytest.approx(sounds.PITCH_HZ[name], rel=sounds.DETUNE + 0.002)
        assert envelope_rate(clip) == pytest.approx(sounds.VOICES[SHAPE_NAMES[shape]][1], abs=0.5)


def test_notes_are_a_chain_of_fourths_and_none_is_near_a_partial_of_another():
    notes = np.asarray([sounds.PITCH_HZ[n] for n in COLOR_NAMES])
    np.testing.assert_allclose(notes[1:] / notes[:-1], 2 ** (5 / 12), rtol=1e-9)
    ratio = notes[None, :] / notes[:, None]
    above = ratio[ratio > 1.01]
    assert np.abs(above / np.round(above) - 1).min() > 0.05


def test_a_scene_carries_every_objects_note_and_the_seed_fixes_the_clip():
    objects = [(0, 0, 1.0), (3, 4, 0.8)]  # a red circle and a purple star
    clip = sounds.scene_sound(objects, seed=7, seconds=SECONDS, rate=RATE)
    freqs, power = spectrum(clip, RATE)
    # energy within 10 Hz of each colour's note (a pulsing voice spreads into sidebands at its pulse rate)
    energy = [power[np.abs(freqs - sounds.PITCH_HZ[name]) < 10].sum() for name in COLOR_NAMES]
    assert set(np.argsort(energy)[-2:]) == {0, 4}
    assert min(energy[0], energy[4]) > 20 * max(e for c, e in enumerate(energy) if c not in (0, 4))
    np.testing.assert_array_equal(clip, sounds.scene_sound(objects, seed=7, seconds=SECONDS, rate=RATE))
    other = sounds.scene_sound(objects, seed=8, seconds=SECONDS, rate=RATE)
    assert not np.array_equal(clip, other)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="shape index in \\[0, 6\\)"):
        sounds.scene_sound([(6, 0, 1.0)], seed=0)
    with pytest.raises(ValueError, match="at least one object"):
        sounds.scene_sound([], seed=0)
    with pytest.raises(ValueError, match="cannot carry the note"):
        sounds.scene_sound([(3, 5, 1.0)], seed=0, rate=2_000)  # C#6 is 1.1 kHz


def test_partials_above_half_the_rate_are_left_out():
    rate = 9_000
    clip = sounds.scene_sound([(3, 5, 1.0)], seed=0, seconds=SECONDS, rate=rate)  # a star: every partial of C#6
    freqs, power = spectrum(clip, rate)
    f0 = sounds.PITCH_HZ[COLOR_NAMES[5]]
    peaks = [power[np.abs(freqs - k * f0) < 0.01 * k * f0].max() for k in (1, 2, 3, 4)]
    assert min(peaks) > 1e3 * np.median(power)  # the 4 partials under 4.5 kHz sound, none folded back below
    folded = rate - 5 * f0  # where the 5th would alias
    assert power[np.abs(freqs - folded) < 0.01 * folded].max() < 1e-3 * peaks[0]
