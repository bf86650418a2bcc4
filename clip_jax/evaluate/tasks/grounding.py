"""grounding=DATA: phrase grounding, each phrase of a record's caption located by a box, scored by Recall@k at
IoU >= 0.5 per phrase (Flickr30k-Entities' protocol: clip_jax.evaluate.grounding_metrics).

Records: a caption with each box's phrase as a character span (clip_jax.input.grounding_records: the embedded
scenes, or convert_grounding's Flickr30k-Entities records). A record's phrases are its distinct spans in box order; a
phrase's true boxes are the boxes of its span. A span outside the caption is an error naming the record; a box of
no phrase (span (-1, -1)) and a phrase whose boxes all fail op 'boxes' rule 1 (no true box) are counted and left
out; a phrase none of whose tokens fit in the query (truncated away) is counted and scored a miss.

Options: predictions=DIR writes DIR/grounding/DATASET.SPLIT/predictions.json ([{key, caption, width, height,
phrases: [{phrase, span, truth: [[x1, y1, x2, y2]] in the record's pixels, boxes: the 10 best candidates likewise,
scores, rank: the first hit's 0-based rank or null}]}]) and picture.png (the first images with each phrase's true
boxes and its best candidate, and the caption); limit.

The grounder is the method's prediction 'ground' (clip_jax.methods.base.Prediction):
fn(variables, images [N, S, S, 3] as the towers take them, tokens [N, L] int32 (the caption by the method's text
tokenizer, clip_jax.phrases.query_tokens), phrases [N, P, L] bool (each phrase's tokens: the positive map
of its span, clip_jax.phrases.positive_map), phrase_valid [N, P] bool (a real phrase that covers a token;
padding and truncated phrases are False)) -> {"boxes": float [N, P, K, 4] (x1, y1, x2, y2) in pixels of the S x S
input, "scores": float [N, P, K]}: K candidates per phrase, ranked by score (best first; ties in the grounder's
order; a non-finite score last). L is the text tower's context length and the tokenizer the one its config names,
unless the Prediction object carries its own `tokenizer` and `query_length` attributes (a BERT language tower).
It runs on the whole record image resized to the model's size ('image/whole'); its boxes are clipped to that input
and scaled to each record's own size (x * W / S, y * H / S). A method without 'ground' is refused before anything
runs; a grounder of another output structure before it compiles.

Metrics: grounding/DATASET.SPLIT/{R1, R5, R10} (k <= K only; a phrase is found when one of its k best candidates
overlaps any of its true boxes at IoU >= 0.5) and R1_merged (its true boxes merged into the one enclosing them, the
protocol's other variant), over the phrases with a true box. Details: the counts above, K and L."""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from clip_jax.evaluate import grounding_metrics
from clip_jax.evaluate.tasks.base import TASKS, Read, Task

BATCH = 64  # images per grounder call (rounded to the mesh)
PICTURE_IMAGES = 6
WRITTEN_CANDIDATES = 10  # candidates per phrase in predictions.json
OUTPUTS = {"boxes": 4, "scores": 3}  # rank of each output: [N, P, K, 4], [N, P, K]


@TASKS.register("grounding")
class Grounding(Task):
    options = frozenset({"limit", "predictions"})
    predictions = ("ground", "image_embeds")

    def reads(self):
        from clip_jax.input.features import FEATURES

        extra = ("key",) if "key" in FEATURES else ()
        # image_embeds: a prediction every method offers (the pass needs one); the grounder runs in evaluate
        return {"data": Read(self.spec.data, self.limit, predictions=("image_embeds",),
                             features=("image/whole", "phrases/caption", "phrases/boxes", "image/size") + extra)}

    def grounder(self, encoder):
        """The method's 'ground' Prediction; a clear error where the method has none."""
        ground = encoder.predictions.get("ground")
        if ground is None:
            offers = sorted(encoder.predictions)
            raise ValueError(f"{self.spec}: the method offers no grounder (its predictions {offers} have no 'ground'; "
                             "two-tower CLIP has none): evaluate a grounding method's run (GLIP) or drop this spec")
        return ground

    def query(self, ground, encoder):
        """(tokenizer with offsets, query length L) of the grounder."""
        from clip_jax.tokenizers import tokenizer_for

        text = encoder.model.config.text
        tokenizer = getattr(ground, "tokenizer", None) or tokenizer_for(text)
        length = int(getattr(ground, "query_length", None) or text.context_length)
        if not hasattr(tokenizer, "encode_with_offsets"):
            raise ValueError(f"{self.spec}: the tokenizer {type(tokenizer).__name__} gives no character offsets, so "
                             "phrase spans cannot be mapped to tokens: ground with a model whose text tokenizer is "
                             "CLIP's BPE or WordPiece, or give the 'ground' Prediction a `tokenizer` that has them")
        return tokenizer, length

    def evaluate(self, features, encoder):
        from clip_jax.input.grounding_records import read_phrase_boxes

        info, feats = self.infos["data"], features["data"]
        ground = self.grounder(encoder)
        tokenizer, length = self.query(ground, encoder)
        images, sizes = feats["image/whole"], np.asarray(feats["image/size"]).reshape(-1, 2)
        keys = [_text(k) for k in feats["key"]] if "key" in feats else [f"{i:06d}" for i in range(len(images))]
        captions = [_text(c) for c in feats["phrases/caption"]]
        rows = [read_phrase_boxes(b) for b in feats["phrases/boxes"]]
        if not len(rows) == len(captions) == len(images) == len(sizes):
            raise ValueError(f"{self.spec}: {len(rows)} box lists, {len(captions)} captions and {len(sizes)} sizes "
                             f"for {len(images)} images")
        cases, counts = phrases_of(keys, captions, rows, str(self.spec))
        if not any(cases):
            raise ValueError(f"{self.spec}: no record of {info.spec} has a phrase with a box ({counts}): grounding "
                             "reads records with a caption and objects/phrase_span per box (the embedded scenes', "
                             "clip_jax.input.convert_grounding's)")
        tokens, masks, valid = query_inputs(tokenizer, captions, cases, length)
        size = encoder.model.config.vision.image_size
        out = GroundingRun(encoder, ground.fn, str(self.spec))(images, tokens, masks, valid)
        k_max = out["scores"].shape[-1]
        scored = score(out, cases, valid, sizes, size)
        figures = dict(grounding_metrics.recall(scored["ranks"], k_max))
        figures["R1_merged"] = grounding_metrics.recall(scored["merged_ranks"], 1)["R1"]
        name = self.named(info.name)
        metrics = {f"grounding/{name}/{k}": v for k, v in figures.items() if v is not None}
        counts.update(phrases_without_tokens=int(sum((~valid[r, : len(c)]).sum() for r, c in enumerate(cases))),
                      non_finite_candidates=scored["non_finite"])
        details = {"records": len(images), "figures": figures, "candidates": int(k_max), "query_length": length,
                   **counts}
        for what in ("phrases_without_box", "boxes_without_phrase", "phrases_without_tokens"):
            if counts[what]:
                self.log(f"  {self.spec}: {counts[what]} {what.replace('_', ' ')}")
        if self.spec.get("predictions"):
            import jax

            if jax.process_index() == 0:
                directory = os.path.join(self.spec.get("predictions"), "grounding", name)
                os.makedirs(directory, exist_ok=True)
                with open(os.path.join(directory, "predictions.json"), "w") as f:
                    json.dump(listing(keys, captions, sizes, cases, scored), f)
                picture(os.path.join(directory, "picture.png"), images[:PICTURE_IMAGES], captions, sizes, cases,
                        scored)
                details["predictions"] = directory
        return metrics, details


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def phrases_of(keys, captions, rows, what: str = "grounding") -> tuple[list, dict]:
    """Per record [(span (start, end), true boxes [t >= 1, 4])] in first-box order, and the counts of boxes of no
    phrase and phrases with no valid box (both left out). A span outside its caption is an error."""
    cases, no_box, no_phrase = [], 0, 0
    for key, caption, own in zip(keys, captions, rows):
        spans, boxes, ok = own["spans"], own["boxes"], own["valid"]
        phrase = ~(spans == -1).all(-1)
        no_phrase += int((~phrase).sum())
        bad = phrase & ((spans[:, 0] < 0) | (spans[:, 0] >= spans[:, 1]) | (spans[:, 1] > len(caption)))
        if bad.any():
            s, e = (int(v) for v in spans[bad][0])
            raise ValueError(f"{what}: record {key!r} has the phrase span ({s}, {e}) outside its {len(caption)}-"
                             f"character caption {caption[:80]!r}: objects/phrase_span must be [start, end) characters "
                             "of the record's 'caption' with 0 <= start < end <= its length, or (-1, -1) for a box of "
                             "no phrase; fix the records (their converter)")
        found: dict = {}
        for span, box, good in zip(map(tuple, spans[phrase].tolist()), boxes[phrase], ok[phrase]):
            found.setdefault(span, [])
            if good:
                found[span].append(box)
        no_box += sum(not b for b in found.values())
        cases.append([(span, np.asarray(b, np.float64).reshape(-1, 4)) for span, b in found.items() if b])
    return cases, {"phrases": sum(len(c) for c in cases), "phrases_without_box": no_box,
                   "boxes_without_phrase": no_phrase}


def query_inputs(tokenizer, captions, cases, length: int):
    """(tokens int32 [N, L], phrases bool [N, P, L], phrase_valid bool [N, P]) of every record, P the most phrases
    of a record (at least 1); a phrase whose span covers no kept token is not valid."""
    from clip_jax.phrases import positive_map, query_tokens

    n, most = len(captions), max([len(c) for c in cases] + [1])
    tokens = np.zeros((n, length), np.int32)
    masks = np.zeros((n, most, length), bool)
    valid = np.zeros((n, most), bool)
    for r, (caption, phrases) in enumerate(zip(captions, cases)):
        tokens[r], offsets = query_tokens(tokenizer, caption, length)
        if phrases:
            spans = np.asarray([span for span, _ in phrases], np.int64)
            mapped = positive_map(offsets, spans, length, text_length=len(caption))
            masks[r, : len(phrases)], valid[r, : len(phrases)] = mapped.positive, mapped.matched
    return tokens, masks, valid


def score(out: dict, cases, valid: np.ndarray, sizes: np.ndarray, size: int) -> dict:
    """Per phrase (record order): its candidates clipped to the S x S input and scaled to the record's pixels,
    ranked by score; the first hit's rank any-box and merged (-1 none; a phrase not valid is a miss)."""
    ranked, ranks, merged_ranks, non_finite = [], [], [], 0
    for r, phrases in enumerate(cases):
        height, width = (float(v) for v in sizes[r])
        factor = np.asarray([width, height, width, height]) / size
        own = []
        for q, (_, truth) in enumerate(phrases):
            boxes = np.asarray(out["boxes"][r, q], np.float64)
            scores = np.asarray(out["scores"][r, q], np.float64)
            finite = np.isfinite(boxes).all(-1)
            non_finite += int((~finite).sum())
            boxes = np.where(finite[:, None], np.clip(boxes, 0.0, size), np.nan) * factor
            best = grounding_metrics.order(scores)
            boxes, scores = boxes[best], scores[best]
            hit = [grounding_metrics.hit_ranks(boxes[None], scores[None], [truth], merge=m)[0] for m in (False, True)]
            if not valid[r, q]:  # the grounder was not asked: a miss
                hit = [-1, -1]
            ranks.append(hit[0])
            merged_ranks.append(hit[1])
            own.append({"boxes": boxes, "scores": scores, "rank": int(hit[0])})
        ranked.append(own)
    return {"ranked": ranked, "ranks": np.asarray(ranks, np.int64), "merged_ranks": np.asarray(merged_ranks, np.int64),
            "non_finite": non_finite}


class GroundingRun:
    """A grounder over host inputs: rows split over the encoder's mesh, outputs gathered on every process; its
    output structure is checked (jax.eval_shape) before anything compiles."""

    def __init__(self, encoder, ground: Callable, what: str = "grounding"):
        import jax

        from clip_jax.parallel import distributed
        from clip_jax.preprocessing import model_images

        self.encoder, self.what = encoder, what
        self._fn = lambda variables, images, tokens, phrases, valid: ground(variables, model_images(images), tokens,
                                                                            phrases, valid)
        self._step = distributed.compile_together(jax.jit(self._fn, out_shardings=encoder.sharding), "ground_task")

    def check(self, inputs: tuple) -> None:
        """An error naming what the grounder returns where it is not the 'ground' interface's dict."""
        import jax
        import jax.numpy as jnp

        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs]
        out = jax.eval_shape(self._fn, self.encoder.variables, *specs)
        n, p = inputs[2].shape[:2]
        problem = None
        if not isinstance(out, dict) or set(out) != set(OUTPUTS):
            problem = f"{type(out).__name__} {sorted(out) if isinstance(out, dict) else ''}"
        else:
            k = out["scores"].shape[2] if out["scores"].ndim == 3 else None
            for name, want in (("boxes", (n, p, k, 4)), ("scores", (n, p, k))):
                got = out[name]
                if k is None or got.shape != want or not jnp.issubdtype(got.dtype, jnp.floating):
                    problem = f"{name!r} {got.dtype} {list(got.shape)}"
                    break
        if problem:
            raise ValueError(f"{self.what}: the method's 'ground' returned {problem} for {n} images of {p} phrases; it "
                             "must return {'boxes': float [N, P, K, 4], 'scores': float [N, P, K]} "
                             "(clip_jax.evaluate.tasks.grounding): fix the method's grounder")

    def __call__(self, images: np.ndarray, tokens: np.ndarray, phrases: np.ndarray, valid: np.ndarray) -> dict:
        """{boxes [n, P, K, 4], scores [n, P, K]} of every row, as numpy on every process."""
        import jax

        from clip_jax.evaluate.features import host_copy

        encoder = self.encoder
        batch = encoder.round_batch(min(BATCH, max(len(images), 1)))
        inputs = (images, np.asarray(tokens, np.int32), np.asarray(phrases, bool), np.asarray(valid, bool))
        self.check(tuple(np.empty((batch,) + a.shape[1:], a.dtype) for a in inputs))
        parts = []
        for start in range(0, len(images), batch):
            chunks = [a[start : start + batch] for a in inputs]
            n = len(chunks[0])
            if n < batch:  # padding rows: their outputs are dropped
                chunks = [np.concatenate([c, np.repeat(c[-1:], batch - n, 0)]) for c in chunks]
            arrays = [jax.make_array_from_callback(c.shape, encoder.sharding, lambda idx, a=c: a[idx]) for c in chunks]
            out = host_copy(self._step(encoder.variables, *arrays))
            parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}


# -- predictions and picture --------------------------------------------------------------------------
def listing(keys, captions, sizes, cases, scored) -> list:
    """predictions.json's entries, one per record."""
    out = []
    for r, phrases in enumerate(cases):
        height, width = (int(v) for v in sizes[r])
        entry = {"key": keys[r], "caption": captions[r], "width": width, "height": height, "phrases": []}
        for ((start, end), truth), got in zip(phrases, scored["ranked"][r]):
            top = slice(0, WRITTEN_CANDIDATES)
            entry["phrases"].append({
                "phrase": captions[r][start:end], "span": [int(start), int(end)], "truth": truth.tolist(),
                "boxes": [[None if not np.isfinite(v) else float(v) for v in b] for b in got["boxes"][top]],
                "scores": [float(s) if np.isfinite(s) else None for s in got["scores"][top]],
                "rank": got["rank"] if got["rank"] >= 0 else None})
        out.append(entry)
    return out


def picture(path: str, images: np.ndarray, captions, sizes, cases, scored, scale: int = 3) -> None:
    """Rows of (the image with each phrase's true boxes, the image with each phrase's best candidate, the caption
    and the phrases in their colours, marked hit or miss at R@1), as a PNG."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from clip_jax.evaluate.tasks.segmentation import palette, pixels

    most = max([len(c) for c in cases[: len(images)]] + [1])
    colours = [tuple(int(c) for c in rgb) for rgb in palette(most + 1)[1:]]
    size = images.shape[1] if len(images) else 32
    side = min(max(size * scale, 160), 320)
    font = ImageFont.load_default()
    text_width = 300
    canvas = Image.new("RGB", (2 * (side + 6) + 6 + text_width, 18 + len(images) * (side + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(("true", "predicted (best candidate)", "caption, phrases (R@1)")):
        draw.text((6 + j * (side + 6), 3), title, fill="black", font=font)

    def tile(image, boxes, height, width):
        out = Image.fromarray(pixels(image)).resize((side, side), Image.BILINEAR)
        pen = ImageDraw.Draw(out)
        factor = np.asarray([side / width, side / height, side / width, side / height])
        for q, own in enumerate(boxes):
            for box in own:
                if np.isfinite(box).all():
                    x1, y1, x2, y2 = (float(v) for v in np.asarray(box) * factor)
                    pen.rectangle((x1, y1, max(x2, x1), max(y2, y1)), outline=colours[q], width=2)
        return out

    for i in range(len(images)):
        y = 18 + i * (side + 6)
        height, width = (int(v) for v in sizes[i])
        phrases, got = cases[i], scored["ranked"][i]
        canvas.paste(tile(images[i], [truth for _, truth in phrases], height, width), (6, y))
        canvas.paste(tile(images[i], [g["boxes"][:1] for g in got], height, width), (12 + side, y))
        x, line = 18 + 2 * side, y
        for part in textwrap.wrap(captions[i], text_width // 6 - 2):
            draw.text((x, line), part, fill="black", font=font)
            line += 12
        for q, ((start, end), _) in enumerate(phrases):
            line += 2
            draw.rectangle((x, line + 1, x + 9, line + 10), fill=colours[q])
            mark = "hit" if got[q]["rank"] == 0 else "miss"
            draw.text((x + 14, line), f"{captions[i][start:end]} ({mark})", fill="black", font=font)
            line += 12
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


__all__ = ["Grounding", "GroundingRun", "phrases_of", "query_inputs", "score"]
