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
