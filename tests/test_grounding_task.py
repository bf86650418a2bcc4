"""The grounding evaluation: Recall@k against a plain Python computation on hand-built and random cases, the task
end to end with a grounder that returns the true boxes (R@1 = 1), shifted ones (0) or the truth ranked fourth by
its scores, the phrase token masks against the tokenizer's own decoding, Flickr30k-Entities-style annotations
through the converter and back, and bad input named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

import clip_jax  # noqa: E402
from clip_jax.evaluate import features, grounding_metrics  # noqa: E402
from clip_jax.evaluate.evaluator import Evaluator, parse_evals  # noqa: E402
from clip_jax.evaluate.tasks import grounding  # noqa: E402
from clip_jax.input import convert_grounding, shapes_scenes  # noqa: E402
from clip_jax.methods.base import Prediction, two_tower_predictions  # noqa: E402
from clip_jax.parallel import sharding  # noqa: E402
from clip_jax.preprocessing import normalize_images  # noqa: E402

SIZES = {"train": 2, "validation": 2, "test": 8}
RECORD_SIZE = 48  # the records' pixels; the model reads 32: every box is scaled by 1.5 on its way out
K = 10


# -- the metric against plain Python --------------------------------------------------------------------
def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def _reference(boxes, scores, truth, merge=False):
    """Per phrase: the rank of the first candidate (by score, ties in order) at IoU >= 0.5 with a true box, -1 for
    none, None for a phrase without a true box."""
    out = []
    for cands, own_scores, own in zip(boxes, scores, truth):
        if not len(own):
            out.append(None)
            continue
        own = [list(map(float, b)) for b in own]
        if merge:
            own = [[min(b[0] for b in own), min(b[1] for b in own), max(b[2] for b in own), max(b[3] for b in own)]]
        ranked = sorted(range(len(cands)), key=lambda i: -own_scores[i])
        rank = -1
        for r, i in enumerate(ranked):
            c = [float(v) for v in cands[i]]
            if all(np.isfinite(c)) and any(_iou(c, t) >= 0.5 for t in own):
                rank = r
                break
        out.append(rank)
    return out


def _recall(ranks, k):
    scored = [r for r in ranks if r is not None]
    return sum(0 <= r < k for r in scored) / len(scored)


def test_recall_equals_plain_python_on_hand_built_and_random_cases():
    t = [0.0, 0.0, 10.0, 10.0]
    boxes = np.asarray([
        [t, [20, 20, 30, 30], [0, 0, 1, 1]],            # hit at rank 0
        [[20, 20, 30, 30], [0, 0, 10, 4.9], t],          # IoU 0.49 then the truth: rank 2 (scores in order)
        [[40, 0, 50, 10], [0, 0, 1, 1], [0, 0, 1, 1]],   # the second true box: any-box hit, merged miss
        [t, t, t],                                       # no true box: skipped
        [[0, 0, 10, 20], [np.nan, 0, 10, 10], t],        # IoU exactly 0.5: a hit; NaN box never hits
        [[np.inf, 0, 9, 9], [5, 5, 15, 15], [0, 0, 9, 9]],  # by score: [0,0,9,9] (0.81) first
        [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]],      # a miss
    ], np.float64)
    scores = np.asarray([[3, 2, 1], [3, 2, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0], [0.9, 0.5, 0.95], [1, 1, 1]])
    truth = [[t], [t], [t, [40, 0, 50, 10]], [], [t], [t], [t]]
    ranks = grounding_metrics.hit_ranks(boxes, scores, truth)
    want = _reference(boxes, scores, truth)
    assert want == [0, 2, 0, None, 0, 0, -1]
    assert ranks.tolist() == [-2 if w is None else w for w in want]
    merged = grounding_metrics.hit_ranks(boxes, scores, truth, merge=True)
    assert merged.tolist() == [-2 if w is None else w for w in _reference(boxes, scores, truth, merge=True)]
    assert merged[2] == -1
    figures = grounding_metrics.recall(ranks, k_max=3, ks=(1, 3, 5))
    assert set(figures) == {"R1", "R3"}  # k past the candidates: no figure
    assert figures["R1"] == pytest.approx(_recall(want, 1)) == pytest.approx(4 / 6)
    assert figures["R3"] == pytest.approx(_recall(want, 3))
    assert grounding_metrics.recall(np.asarray([-2, -2]), 3)["R1"] is None

    rng = np.random.default_rng(0)
    q, k = 200, 6
    corner = rng.uniform(0, 20, (q, k, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 10, (q, k, 2))], -1)
    scores = rng.integers(0, 4, (q, k)).astype(float)  # ties
    truth = []
    for i in range(q):
        n = int(rng.integers(0, 4))
        own = boxes[i, rng.integers(0, k, n)] + rng.normal(0, 1.5, (n, 4))
        truth.append(np.concatenate([np.minimum(own[:, :2], own[:, 2:]), np.maximum(own[:, :2], own[:, 2:])], -1))
    for merge in (False, True):
        want = _reference(boxes, scores, truth, merge)
        got = grounding_metrics.hit_ranks(boxes, scores, truth, merge=merge)
        assert got.tolist() == [-2 if w is None else w for w in want]
        for kk in (1, 5):
            assert grounding_metrics.recall(got, k, ks=(kk,))[f"R{kk}"] == pytest.approx(_recall(want, kk))


def test_phrases_of_groups_spans_and_counts_what_it_leaves_out():
    caption = "a red circle and a blue star"
    rows = {"boxes": np.asarray([[0, 0, 5, 5], [6, 6, 9, 9], [1, 1, 2, 2], [3, 3, 4, 4], [0, 0, 1, 1]], np.float32),
            "spans": np.asarray([[2, 12], [2, 12], [19, 28], [-1, -1], [17, 18]]),
            "valid": np.asarray([True, True, False, True, False])}
    cases, counts = grounding.phrases_of(["k"], [caption], [rows])
    ((span, truth),) = cases[0]  # 'blue star' (invalid box) and 'a' (invalid box) have no true box
    assert span == (2, 12) and caption[2:12] == "red circle" and truth.tolist() == [[0, 0, 5, 5], [6, 6, 9, 9]]
    assert counts == {"phrases": 1, "phrases_without_box": 2, "boxes_without_phrase": 1}
    bad = dict(rows, spans=np.asarray([[2, 12], [2, 12], [19, 29], [-1, -1], [17, 18]]))
    with pytest.raises(ValueError, match=r"record 'k' has the phrase span \(19, 29\) outside its 28-character"):
        grounding.phrases_of(["k"], [caption], [bad])


# -- the task end to end ------------------------------------------------------------------------------
def _encoder(model, variables, predictions=None):
    mesh = sharding.make_mesh({"data": -1})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return features.Encoder(model, jax.device_put(variables, replicated), mesh, predictions=predictions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    config = {"cache_dir": str(root), "scenes_sizes": SIZES, "image_dtype": "uint8",
              "shapes_image_size": RECORD_SIZE}
    model = clip_jax.create_model("ViT-Tiny-test")
    variables = clip_jax.init_variables(model, jax.random.key(0))
    out = root / "pred"
    evaluator = Evaluator(f"grounding=shapes_scenes:test|predictions={out}", config, image_size=32,
                          context_length=77, log=lambda *_: None)
    (group,) = evaluator.groups.values()
    feats = evaluator._extract(_encoder(model, variables), group, 8)
    records = shapes_scenes.read_split(shapes_scenes.scenes_files("test", config))
    return dict(model=model, variables=variables, evaluator=evaluator, task=evaluator.tasks[0], feats=feats,
                records=records, out=out / "grounding" / "shapes_scenes.test", config=config)


def oracle(images_of, truth_of, shift=False, rank=0, size=32):
    """A grounder that knows the records: it finds each input among their images (the nearest) and gives phrase q
    the q-th truth box in the model's pixels (shifted by its own width: IoU 0) at candidate `rank` by score,
    after K - 1 decoys far from every object."""
    stored = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in images_of])
    stored = np.asarray(normalize_images(jnp.asarray(stored)))
    most = max(len(t) for t in truth_of)
    boxes = np.tile(np.asarray([0.0, 0.0, 0.5, 0.5], np.float32), (len(truth_of), most, K, 1))
    ordered = np.linspace(1.0, 0.1, K, dtype=np.float32)
    scores = np.tile(ordered, (len(truth_of), most, 1))
    for i, own in enumerate(truth_of):
        for q, box in enumerate(own):
            box = np.asarray(box, np.float32) * size
            if shift:
                box = box + np.asarray([1, 0, 1, 0]) * (box[2] - box[0])
            boxes[i, q, 0] = box
            scores[i, q, 0], scores[i, q, 1:] = ordered[rank], np.delete(ordered, rank)  # the truth ranks `rank`

    def ground(variables, images, tokens, phrases, valid):
        p = phrases.shape[1]
        assert tokens.dtype == jnp.int32 and phrases.shape[2] == tokens.shape[1] and valid.shape == phrases.shape[:2]
        row = jnp.argmin(((images[:, None] - stored[None]) ** 2).sum((2, 3, 4)), axis=1)
        pad = max(p - most, 0)
        b = jnp.pad(jnp.asarray(boxes), ((0, 0), (0, pad), (0, 0), (0, 0)))[:, :p]
        s = jnp.pad(jnp.asarray(scores), ((0, 0), (0, pad), (0, 0)))[:, :p]
        return {"boxes": b[row], "scores": s[row]}

    return ground


def _scenes_oracle(setup, **kw):
    # truth as [x1, y1, x2, y2] in [0, 1]; shapes_scenes' phrases are its objects, in order
    truth = [[o["bbox"][[1, 0, 3, 2]] for o in r["objects"]] for r in setup["records"]]
    return oracle([r["image"] for r in setup["records"]], truth, **kw)


def _run(setup, ground, task=None):
    predictions = {**two_tower_predictions(setup["model"]), "ground": Prediction(ground, "image", 3)}
    task = task or setup["task"]
    return task.evaluate({"data": setup["feats"]}, _encoder(setup["model"], setup["variables"], predictions))


def test_true_boxes_recall_one_shifted_zero_and_ranked_by_score(setup):
    predictions = {**two_tower_predictions(setup["model"]), "ground": Prediction(_scenes_oracle(setup), "image", 3)}
    metrics, details = setup["evaluator"].run(_encoder(setup["model"], setup["variables"], predictions), batch_size=8)
    key = "grounding/shapes_scenes.test/"
    assert {k: metrics[key + k] for k in ("R1", "R5", "R10", "R1_merged")} == {"R1": 1.0, "R5": 1.0, "R10": 1.0,
                                                                            "R1_merged": 1.0}
    (details,) = details.values()
    n = sum(len(r["objects"]) for r in setup["records"])
    assert details["phrases"] == n and details["phrases_without_box"] == 0 and details["candidates"] == K
    # predictions.json: boxes in the records' 48 px (the grounder answered in 32 px), phrases as the records spell
    written = json.loads((setup["out"] / "predictions.json").read_text())
    by_key = {r["key"]: r for r in setup["records"]}
    for entry in written:
        record = by_key[entry["key"]]
        assert entry["caption"] == record["caption"] and (entry["width"], entry["height"]) == (48, 48)
        for phrase, obj in zip(entry["phrases"], record["objects"]):
            s, e = obj["phrase_span"]
            assert phrase["phrase"] == record["caption"][s:e] and phrase["rank"] == 0
            np.testing.assert_allclose(phrase["boxes"][0], obj["bbox"][[1, 0, 3, 2]] * RECORD_SIZE, atol=1e-3)
            np.testing.assert_allclose(phrase["truth"], [obj["bbox"][[1, 0, 3, 2]] * RECORD_SIZE], atol=1e-3)
    assert Image.open(setup["out"] / "picture.png").size[1] > 6 * 160

    shifted, _ = _run(setup, _scenes_oracle(setup, shift=True))
    assert shifted[key + "R1"] == 0.0 and shifted[key + "R10"] == 0.0
    fourth, _ = _run(setup, _scenes_oracle(setup, rank=3))
    assert (fourth[key + "R1"], fourth[key + "R5"], fourth[key + "R10"]) == (0.0, 1.0, 1.0)


def test_phrase_masks_are_the_phrase_tokens(setup):
    """query_inputs' masks pick the tokens that the tokenizer decodes back to each phrase."""
    from clip_jax.tokenizers import tokenizer_for

    tokenizer = tokenizer_for(setup["model"].config.text)
    records = setup["records"][:4]
    captions = [r["caption"] for r in records]
    cases = [[(o["phrase_span"], np.zeros((1, 4))) for o in r["objects"]] for r in records]
    tokens, masks, valid = grounding.query_inputs(tokenizer, captions, cases, 77)
    assert tokens.dtype == np.int32 and masks.shape == (4, max(len(c) for c in cases), 77)
    np.testing.assert_array_equal(tokens, tokenizer(captions, 77))
    for r, record in enumerate(records):
        assert valid[r].tolist() == [q < len(record["objects"]) for q in range(masks.shape[1])]
        for q, o in enumerate(record["objects"]):
            s, e = o["phrase_span"]
            assert tokenizer.decode(tokens[r][masks[r, q]]) == record["caption"][s:e]
    # a query that ends with the first phrase's last token: the last phrase is truncated away, not valid
    length = int(np.flatnonzero(masks[0, 0]).max()) + 2
    _, short_masks, short_valid = grounding.query_inputs(tokenizer, captions[:1], cases[:1], length)
    assert short_valid[0, 0] and not short_valid[0, -1] and not short_masks[0, -1].any()
    np.testing.assert_array_equal(short_masks[0, 0], masks[0, 0, :length])


def test_bad_input_is_named(setup):
    model, variables, task = setup["model"], setup["variables"], setup["task"]
    with pytest.raises(ValueError, match="offers no grounder"):
        task.evaluate({"data": setup["feats"]}, _encoder(model, variables))
    with pytest.raises(ValueError, match=r"needs the predictions \['ground'\]"):  # before any image is read
        setup["evaluator"].run(_encoder(model, variables), batch_size=8)

    def wrong(variables, images, tokens, phrases, valid):
        n, p = phrases.shape[:2]
        return {"boxes": jnp.zeros((n, p, 4)), "scores": jnp.zeros((n, p))}

    with pytest.raises(ValueError, match=r"'boxes' float32 \[\d+, \d+, 4\].*fix the method's grounder"):
        _run(setup, wrong)
    with pytest.raises(ValueError, match="returned tuple"):
        _run(setup, lambda v, x, t, p, m: (x, t))
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    bad = dict(setup["feats"])
    rows = np.asarray([[1, 2, 5, 6, 3, 400, 1]], np.float32)  # a span past every caption's end
    bad["phrases/boxes"] = np.asarray([tf.io.serialize_tensor(rows).numpy()] * len(bad["phrases/boxes"]), object)
    predictions = {**two_tower_predictions(model), "ground": Prediction(_scenes_oracle(setup), "image", 3)}
    with pytest.raises(ValueError, match=r"phrase span \(3, 400\) outside its \d+-character caption"):
        task.evaluate({"data": bad}, _encoder(model, variables, predictions))
    with pytest.raises(ValueError, match="unknown option 'labels=shape' for grounding"):
        Evaluator("grounding=shapes_scenes:test|labels=shape", setup["config"], image_size=32, context_length=77)


def test_the_predictions_flag_goes_to_the_grounding_specs():
    from clip_jax.evaluate.__main__ import with_predictions

    got = with_predictions(["--eval=grounding=shapes_scenes:test", "--predictions=/out"])
    (spec,) = parse_evals(got[0].partition("=")[2])
    assert (spec.task, spec.get("predictions")) == ("grounding", "/out")


# -- the converter ------------------------------------------------------------------------------------
SENTENCES = [
    "[/EN#1/people A man] in [/EN#2/clothing a red hat] holds [/EN#3/animals/other two small dogs] .",
    "[/EN#1/people Someone] stands in [/EN#4/scene a park] near [/EN#0/notvisual something] .",
]
XML = """<annotation><filename>{id}.jpg</filename><size><width>60</width><height>40</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>11</xmin><ymin>5</ymin><xmax>31</xmax><ymax>39</ymax></bndbox></object>
<object><name>2</name><name>1</name><bndbox><xmin>13</xmin><ymin>3</ymin><xmax>21</xmax><ymax>9</ymax></bndbox></object>
<object><name>3</name><bndbox><xmin>35</xmin><ymin>21</ymin><xmax>45</xmax><ymax>31</ymax></bndbox></object>
<object><name>3</name><bndbox><xmin>47</xmin><ymin>25</ymin><xmax>59</xmax><ymax>37</ymax></bndbox></object>
<object><name>4</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>"""


def _flickr_folder(root):
    for sub in ("Sentences", "Annotations", "images"):
        (root / sub).mkdir()
    (root / "Sentences" / "1001.txt").write_text("\n".join(SENTENCES) + "\n")
    (root / "Annotations" / "1001.xml").write_text(XML.format(id=1001))
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / "1001.png")
    return image


def test_converter_round_trip_and_the_task_reads_its_records(setup, tmp_path):
    """Each sentence a record: the caption the dataset's reader gives, a row per (phrase, box) whose span spells
    the phrase and whose box is the XML's corners minus 1 over the image's size; phrases without a box counted.
    The grounding task reads the records: an oracle of the XML's boxes finds every phrase."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    image = _flickr_folder(tmp_path)
    out = tmp_path / "out"
    summary = convert_grounding.convert(str(tmp_path / "Sentences"), str(tmp_path / "Annotations"),
                                        str(tmp_path / "images"), str(out), name="tiny")
    assert summary["sentences"] == 2 and summary["images"] == 1
    assert summary["phrases"] == 4 and summary["boxes"] == 2 + 1 + 2 + 2
    assert summary["phrases_without_box/scene"] == 1 and summary["phrases_without_box/non_visual"] == 1
    assert json.loads((out / "tiny.summary.json").read_text())["phrases"] == 4
    parsed = [tf.train.Example.FromString(r.numpy()).features.feature
              for r in tf.data.TFRecordDataset(summary["files"])]
    xml_boxes = {"1": [[10, 4, 30, 38], [12, 2, 20, 8]], "2": [[12, 2, 20, 8]], "3": [[34, 20, 44, 30],
                                                                                       [46, 24, 58, 36]]}
    want_phrases = [[("A man", "1"), ("a red hat", "2"), ("two small dogs", "3")], [("Someone", "1")]]
    for f, line, phrases in zip(parsed, SENTENCES, want_phrases):
        caption = f["caption"].bytes_list.value[0].decode()
        words = [w.rstrip("]") for w in line.split() if not w.startswith("[/EN#")]
        assert caption == " ".join(words)
        spans = np.asarray(f["objects/phrase_span"].int64_list.value).reshape(-1, 2)
        bbox = np.asarray(f["objects/bbox"].float_list.value).reshape(-1, 4)
        entities = list(f["objects/entity"].int64_list.value)
        want_rows = [(text, box, int(e)) for text, e in phrases for box in xml_boxes[e]]
        assert len(spans) == len(bbox) == len(entities) == len(want_rows)
        for (s, e), b, entity, (text, box, want_entity) in zip(spans, bbox, entities, want_rows):
            assert caption[s:e] == text and entity == want_entity
            np.testing.assert_allclose(b[[1, 0, 3, 2]] * [60, 40, 60, 40], box, atol=1e-4)
        assert f["image"].bytes_list.value[0] == (tmp_path / "images" / "1001.png").read_bytes()

    # the task on them: phrase q of a record is its q-th distinct span; its first box the oracle's answer
    truth = [[np.asarray(xml_boxes[e][0], np.float32) / [60, 40, 60, 40] for _, e in p] for p in want_phrases]
    model, variables = setup["model"], setup["variables"]
    evaluator = Evaluator(f"grounding=tfrecord:{out}/tiny-*", setup["config"], image_size=32, context_length=77,
                          log=lambda *_: None)
    ground = oracle([image, image], truth)  # both records match the first: its phrase 0 is also entity 1's
    predictions = {**two_tower_predictions(model), "ground": Prediction(ground, "image", 3)}
    metrics, details = evaluator.run(_encoder(model, variables, predictions), batch_size=8)
    assert metrics["grounding/tiny/R1"] == 1.0 and metrics["grounding/tiny/R1_merged"] == pytest.approx(3 / 4)
    (details,) = details.values()
    assert details["phrases"] == 4 and details["records"] == 2

    (tmp_path / "Sentences" / "1002.txt").write_text("[/EN#1/people A man in a hat .\n")
    (tmp_path / "Annotations" / "1002.xml").write_text(XML.format(id=1002))
    Image.fromarray(image).save(tmp_path / "images" / "1002.png")
    with pytest.raises(ValueError, match=r"1002.txt line 1: the phrase of entity 1 is not closed"):
        convert_grounding.convert(str(tmp_path / "Sentences"), str(tmp_path / "Annotations"),
                                  str(tmp_path / "images"), str(tmp_path / "bad"))
    (tmp_path / "ids.txt").write_text("1001\n1003\n")
    with pytest.raises(FileNotFoundError, match="3 files of the 2 ids are missing"):
        convert_grounding.convert(str(tmp_path / "Sentences"), str(tmp_path / "Annotations"),
                                  str(tmp_path / "images"), str(tmp_path / "bad"), ids=str(tmp_path / "ids.txt"))
