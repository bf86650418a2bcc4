"""big_vision's SigLIP .npz in clip_jax: the fixture's parameters and embeddings come from big_vision's
own two-tower model (tests/fixtures/make_big_vision_fixture.py; nothing of big_vision runs here)."""

import os

import numpy as np
import pytest

import clip_jax
from clip_jax import convert_big_vision

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NPZ = os.path.join(FIXTURES, "big_vision_siglip_tiny.npz")
CONFIG = os.path.join(FIXTURES, "big_vision_siglip_tiny.json")


def _io():
    with np.load(os.path.join(FIXTURES, "big_vision_siglip_tiny_io.npz")) as f:
        return {k: f[k] for k in f.files}


def _check(model, params, io):
    # big_vision's images are pixels in [-1, 1]; clip_jax's towers take them normalized as clip_jax.preprocess does
    from clip_jax.preprocessing import MEAN, STD

    images = (((io["images"] + 1) / 2 - np.asarray(MEAN)) / np.asarray(STD)).astype(np.float32)
    np.testing.assert_allclose(clip_jax.encode_image(model, params, images), io["image_embeds"], atol=1e-5)
    np.testing.assert_allclose(clip_jax.encode_text(model, params, io["tokens"]), io["text_embeds"], atol=1e-5)
    scale, bias = model.apply(params, method="temperature")
    np.testing.assert_allclose(float(scale), float(io["t"][0]), rtol=1e-6)
    np.testing.assert_allclose(float(bias), float(io["b"][0]), rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_gives_big_vision_embeddings(scan):
    model, params = clip_jax.load(CONFIG, NPZ, scan=scan)
    _check(model, params, _io())


def test_big_vision_scanned_and_bfloat16_npz(tmp_path):
    # big_vision's scanned encoder stacks the blocks under 'encoderblock' (the generator checks that big_vision
    # reads them so); without the trainer's 'params/' prefix, as released checkpoints may be
    with np.load(NPZ) as f:
        flat = {k[len("params/"):]: f[k] for k in f.files}
    scanned = {}
    for name, value in flat.items():
        for tower in ("img/Transformer", "txt/Encoder_0"):
            if name.startswith(tower + "/encoderblock_"):
                layer, rest = name[len(tower) + len("/encoderblock_"):].split("/", 1)
                scanned.setdefault(f"{tower}/encoderblock/{rest}", {})[int(layer)] = value
                break
        else:
            scanned[name] = value
    scanned = {k: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v for k, v in scanned.items()}
    path = str(tmp_path / "scanned.npz")
    np.savez(path, **scanned)
    model, params = clip_jax.load(CONFIG, path)
    _check(model, params, _io())
    # numpy writes bfloat16 as a 2-byte void; it reads back as the rounded float32
    import ml_dtypes

    halves = {k: v.astype(ml_dtypes.bfloat16).view(np.void) if v.dtype == np.float32 else v
              for k, v in flat.items()}
    path = str(tmp_path / "bf16.npz")
    np.savez(path, **halves)
    got = convert_big_vision.read_npz(path)["img/embedding/kernel"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, flat["img/embedding/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_big_vision_round_trip_and_strict_keys(tmp_path):
    model, params = clip_jax.load(CONFIG, NPZ)
    with np.load(NPZ) as f:
        original = {k[len("params/"):]: f[k] for k in f.files}
    back = convert_big_vision.variables_to_big_vision(model, params)
    assert sorted(back) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)
    broken = dict(original)
    broken["img/head/kernel"] = np.zeros((32, 10), np.float32)  # a classifier head: not part of SigLIP's image tower
    del broken["txt/head/bias"]
    broken["txt/pos_embedding"] = np.zeros((1, 9, 16), np.float32)
    with pytest.raises(ValueError, match=r"missing: txt/head/bias[\s\S]*unexpected: img/head/kernel[\s\S]*"
                                         r"mis-shaped: txt/pos_embedding: got \(1, 9, 16\), expected \(1, 8, 16\)"):
        convert_big_vision.variables_from_big_vision(model, broken)
    with pytest.raises(ValueError, match="kind 'siglip'"):
        clip_jax.load("ViT-Tiny-test", NPZ)


def _spiece(tmp_path, vocab_size):
    """A SentencePiece model of `vocab_size` ids trained here on captions like the shapes data's
    (pad 0, EOS 1, unk 2, as SigLIP's), in well under a second."""
    import sentencepiece as spm

    words = ["a", "photo", "of", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "small",
             "large", "shape", "on", "black", "white", "background", "picture", "drawing", "quick", "brown", "fox",
             "jumps", "over", "lazy", "dog", "zebra", "vivid", "purple", "orange", "kite", "sky", "mountain", "with",
             "wave", "jelly", "quartz", "box", "hexagon", "star", "pink", "gray"]
    rng = np.random.RandomState(0)
    text = [" ".join(rng.choice(words, 6)) for _ in range(400)]
    prefix = str(tmp_path / "spiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=prefix, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return prefix + ".model"


def test_continue_training_a_big_vision_siglip(tmp_path):
    import importlib.util

    from clip_jax import train

    spec = importlib.util.spec_from_file_location("siglip_config", os.path.join(
        os.path.dirname(__file__), "..", "configs", "siglip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(CONFIG)
    assert c.clip.loss == "sigmoid" and c.optim.b2 == 0.95
    c.init_from = NPZ
    c.model_overrides = {"text_cfg": {"tokenizer": "sentencepiece:" + _spiece(tmp_path, 64)}}
    c.dtype = "float32"
    c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 2, 1, 2
    c.optim.warmup_steps = 1
    c.data.train = "shapes:train"
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.shapes_sizes = {"train": 32, "validation": 8, "test": 8}
    c.data.shapes_shards = {"train": 2}
    c.data.shuffle_buffer = 16
    workdir = tmp_path / "run"
    train.train_and_evaluate(c, str(workdir))
    import json

    with open(workdir / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    # it started from the checkpoint: big_vision's temperature t (10, perturbed by the fixture's noise), not a fresh one
    io = _io()
    np.testing.assert_allclose(metrics[0]["logit_scale"], float(io["t"][0]), rtol=1e-4)
    with pytest.raises(ValueError, match="takes no topology"):
        module.get_config("ViT-B-16-SigLIP,v5p:4x4x8")
