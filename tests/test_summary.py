"""WORKDIR/summary.png: the curves and the prediction grid are drawn from what the run logged."""

import numpy as np
from PIL import Image

from clip_jax.evaluate import summary


def test_summary_draws_every_logged_curve_and_each_prediction(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3 * min(1, s / 2),
             "zero_shot/shapes.validation/color/top1": 0.2 * s, "zero_shot/shapes.test/combo/top1": 0.1 * s}
            for s in range(1, 5)]
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 220
    examples = [
        dict(image=red, label="red circle", top3=[("red circle", 0.9), ("red star", 0.05), ("red cross", 0.01)]),
        dict(image=red, label="red star", top3=[("red circle", 0.6), ("red star", 0.3), ("red cross", 0.1)])]
    path = tmp_path / "summary.png"
    summary.write_summary(str(path), rows, examples, title="test")
    image = np.asarray(Image.open(path).convert("RGB"))
    panels = summary.charts(rows)
    assert len(panels) == 3 and image.shape[1] >= 3 * summary.PANEL[0]
    # every zero-shot curve is drawn in its own colour; the loss and lr curves in the first
    accuracy = np.asarray(panels[2])
    for color in summary.PALETTE[:2]:
        assert (accuracy == color).all(-1).sum() > 20, color
    # the grid: the images pasted (upscaled), the right top-1 in green, the wrong one in red
    grid = np.asarray(summary.prediction_grid(examples))
    assert ((grid == (220, 0, 0)).all(-1)).sum() >= 2 * 32 * 32
    r, g, b = (grid[..., i].astype(int) for i in range(3))
    assert ((g > 90) & (r < 80) & (b < 80)).any()  # green text: a right prediction
    assert ((r > 140) & (g < 80) & (b < 80) & (r != 220)).any()  # red text: a wrong top-1


def test_a_spectrogram_puts_a_tone_at_its_height_and_a_pulse_at_its_times():
    rate = 16000
    t = np.arange(rate) / rate
    image = summary.spectrogram_image(np.sin(2 * np.pi * 1000 * t), rate)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    row = int(np.argmax(image[..., 0].astype(float).mean(axis=1)))
    assert abs(row - round(63 * (1 - 1000 / 4000))) <= 2  # 0 Hz at the bottom row, 4 kHz at the top
    pulsed = np.sin(2 * np.pi * 1000 * t) * (np.sin(2 * np.pi * 2 * t) > 0)  # on in the 1st and 3rd quarter
    columns = summary.spectrogram_image(pulsed, rate)[..., 0].astype(float).mean(axis=0)
    assert columns[8] > 2 * columns[24] and columns[40] > 2 * columns[56]


def test_the_shapes_preview_carries_each_examples_sound(smoke_shapes):
    from clip_jax.input import audio, catalog, shapes
    from clip_jax.input.pipeline import shapes_files
    from clip_jax.input.tf_runtime import import_tensorflow

    config = {"cache_dir": smoke_shapes, "shapes_sizes": {"train": 2560, "validation": 100, "test": 100}}
    preview = catalog.of("shapes:train").preview("shapes:train", config, 4)
    assert preview.rate == 16000 and len(preview.clips) == 4
    tf = import_tensorflow()
    first = shapes.parse(next(iter(tf.data.TFRecordDataset(shapes_files("test", config)))).numpy())
    objs = first["objects"]
    want = audio.embedded_sound(first["key"], [o["shape"] for o in objs], [o["color"] for o in objs],
                                [o["bbox"] for o in objs], 1.0, 16000)
    np.testing.assert_array_equal(preview.clips[0], want)
