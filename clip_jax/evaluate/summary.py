"""WORKDIR/summary.png: a run at a glance. Loss, learning rate and zero-shot top-1 against steps,
and a grid of test images with the model's top-3 zero-shot labels. Drawn with PIL alone (no
plotting library); TensorBoard stays for everything else."""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))
PANEL = (330, 230)  # width, height of one chart in px


def read_rows(metrics_path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a line cut short by a kill is skipped)."""
    from etils import epath

    rows = []
    for line in epath.Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def chart(title: str, series: dict, percent: bool = False, x_label: str = "step") -> Image.Image:
    """One line chart: {name: [(x, value), ...]} in a PANEL-sized image."""
    width, height = PANEL
    left, right, top, bottom = 46, 10, 22, 30
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 4), title, fill="black", font=font)
    points = [p for line in series.values() for p in line]
    if not points:
        draw.text((left, height // 2), "no data", fill="gray", font=font)
        return image
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = (0.0, 1.0) if percent else (min(p[1] for p in points), max(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        label = f"{100 * y:.0f}%" if percent else _fmt(y)
        draw.text((2, sy(y) - 5), label, fill="black", font=font)
        draw.line([(left, sy(y)), (width - right, sy(y))], fill=(230, 230, 230))
    draw.text((left, height - bottom + 4), str(int(x0)), fill="black", font=font)
    draw.text((width - right - 60, height - bottom + 4), f"{x_label} {int(x1)}", fill="black", font=font)
    for k, (name, line) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        xy = [(sx(x), sy(y)) for x, y in sorted(line)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        if len(series) > 1:
            draw.text((left + 4, top + 4 + 11 * k), f"{name} {_fmt(100 * line[-1][1]) + '%' if percent else ''}",
                      fill=color, font=font)
    return image


def charts(rows: Sequence[dict]) -> list[Image.Image]:
    """Loss, learning rate, and every zero-shot top-1 (one line per dataset/task)."""
    line = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    zero_shot = sorted({k for r in rows for k in r if k.startswith(("zero_shot/", "zero_shot_audio/"))
                        and k.endswith("/top1")})
    # an audio task's lines say so: 'audio: DATASET/color'
    accuracy = {k.replace("zero_shot_audio/", "audio: ").replace("zero_shot/", "")[:-len("/top1")]: line(k)
                for k in zero_shot}
    return [chart("loss", {"loss": line("loss")}), chart("learning rate", {"lr": line("learning_rate")}),
            chart("zero-shot top-1", accuracy, percent=True)]


def prediction_grid(examples: Sequence[dict], columns: int = 8, scale: int = 2) -> Image.Image:
    """Images with their true label and the top-3 predictions (green: top-1 right, red: wrong).
    examples: dict(image=uint8 [S, S, 3], label=str, top3=[(name, probability), ...])."""
    font = ImageFont.load_default()
    side = examples[0]["image"].shape[0] * scale
    cell_w, cell_h = max(side, 120) + 8, side + 4 * 12 + 8
    rows = math.ceil(len(examples) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, ex in enumerate(examples):
        x, y = (k % columns) * cell_w + 4, (k // columns) * cell_h + 2
        grid.paste(Image.fromarray(ex["image"]).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x, y + side + 2), f"is: {ex['label']}", fill="black", font=font)
        for j, (name, p) in enumerate(ex["top3"]):
            right = name == ex["label"]
            color = (0, 140, 0) if right else ((200, 0, 0) if j == 0 else (90, 90, 90))
            draw.text((x, y + side + 14 + 12 * j), f"{j + 1}. {name} {100 * p:.0f}%", fill=color, font=font)
    return grid


def compose(panels: Sequence[Image.Image], grid: Optional[Image.Image], title: str,
            grid_title: str = "test images") -> Image.Image:
    font = ImageFont.load_default()
    width = max(sum(p.width for p in panels), grid.width if grid is not None else 0)
    height = 18 + max(p.height for p in panels) + (grid.height + 18 if grid is not None else 0)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    draw.text((6, 3), title, fill="black", font=font)
    x = 0
    for p in panels:
        out.paste(p, (x, 18))
        x += p.width
    if grid is not None:
        y = 18 + max(p.height for p in panels)
        draw.text((6, y + 3), f"{grid_title}: true label, top-3 zero-shot", fill="black", font=font)
        out.paste(grid, (0, y + 18))
    return out


def preview_of(data: str, data_config, n: int = 16):
    """The examples the training source offers for a picture of zero-shot predictions
    (clip_jax.input.catalog.Preview), or None where it offers none."""
    from clip_jax.input import catalog

    return catalog.of(data).preview(data, data_config, n)


def zero_shot_predictions(model, variables, preview, predictions: Optional[dict] = None) -> list[dict]:
    """The preview's images with the model's top-3 zero-shot labels, by the method's predict functions
    (`predictions`; default the towers of a two-tower model), on one device: the model's full
    variables must be addressable here."""
    import jax

    import clip_jax
    from clip_jax.evaluate.zero_shot import classifier_weights
    from clip_jax.methods.base import two_tower_predictions

    predict = {k: p.fn for k, p in (predictions or two_tower_predictions(model)).items()}
    size = model.config.vision.image_size
    images = clip_jax.preprocess([Image.fromarray(image) for image in preview.images], image_size=size)
    weights = classifier_weights(model, variables, preview.prompts,
                                 embed_texts=lambda t: np.asarray(jax.jit(predict["text_embeds"])(variables, t)))
    image_embeds = np.asarray(jax.jit(predict["image_embeds"])(variables, images))
    scale = float(jax.jit(predict["logit_scale"])(variables))
    return top3_examples(preview.images, preview.labels, preview.names, scale * image_embeds @ weights.T)


def top3_examples(pictures, labels, names, logits) -> list[dict]:
    """prediction_grid's examples: each picture with its true label and the softmax's top 3 of its logits."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out = []
    for picture, label, p in zip(pictures, labels, probs):
        top = np.argsort(-p)[:3]
        out.append(dict(image=picture, label=names[label], top3=[(names[i], float(p[i])) for i in top]))
    return out


def spectrogram_image(clip: np.ndarray, rate: int, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: a clip's log-magnitude spectrogram (Hann frames of 32 ms, 0 to 4 kHz bottom to top,
    time left to right), bright where loud."""
    frame = max(16, int(0.032 * rate))
    hop = max(1, (len(clip) - frame) // (size - 1)) if len(clip) > frame else 1
    starts = np.arange(0, max(1, len(clip) - frame + 1), hop)[:size]
    frames = np.stack([np.pad(clip[i:i + frame], (0, max(0, frame - len(clip[i:i + frame])))) for i in starts])
    power = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1)) ** 2  # [time, freq]
    top = max(2, int(4000 * frame / rate))
    db = 10 * np.log10(power[:, :top] + 1e-10)
    db = np.clip((db - (db.max() - 60)) / 60, 0, 1).T[::-1]  # 60 dB of range, low frequencies at the bottom
    grey = (255 * db).astype(np.uint8)
    image = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    return np.stack([image, (0.6 * image).astype(np.uint8), 255 - image], axis=-1)  # loud: orange on blue


def audio_zero_shot_predictions(model, variables, preview, predictions: dict, samples: int) -> list[dict]:
    """The preview's clips as spectrograms with the model's top-3 zero-shot labels from their audio embeddings
    (`predictions`: a method's, with 'audio_embeds' and 'text_embeds'), each clip cut or padded to `samples`."""
    import jax

    from clip_jax.evaluate.zero_shot import classifier_weights

    predict = {k: p.fn for k, p in predictions.items()}
    clips = np.stack([np.pad(c[:samples], (0, max(0, samples - len(c)))) for c in preview.clips])[:, None]
    weights = classifier_weights(model, variables, preview.prompts,
                                 embed_texts=lambda t: np.asarray(jax.jit(predict["text_embeds"])(variables, t)))
    audio = np.asarray(jax.jit(predict["audio_embeds"])(variables, clips.astype(np.float32)))
    scale = 100.0  # AudioCLIP's audio-text scale at its init, where a method names none
    if "logit_scale_audio_text" in predict:
        scale = float(jax.jit(predict["logit_scale_audio_text"])(variables))
    pictures = [spectrogram_image(clip, preview.rate) for clip in preview.clips]
    return top3_examples(pictures, preview.labels, preview.names, scale * audio @ weights.T)


def write_summary(path: str, rows: Sequence[dict], examples: Optional[Sequence[dict]] = None, title: str = "",
                  grid_title: str = "test images") -> None:
    from etils import epath

    image = compose(charts(rows), prediction_grid(examples) if examples else None, title, grid_title)
    with epath.Path(path).open("wb") as f:
        image.save(f, format="PNG")
