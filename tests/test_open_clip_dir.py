"""clip_jax.save_open_clip_dir / export --format=open_clip_dir: open_clip's local-dir: loader builds the model
from the folder alone, loads it with strict keys and gives clip_jax's embeddings and clip_jax's preprocessing,
for ViT and ResNet presets, the smoke preset and a config with overrides (open_clip in a subprocess)."""

import json

import numpy as np
import pytest
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.models import create_model, get_model_config

TOL = 1e-5  # max abs difference on unit-norm float32 embeddings

# (what the folder is made from, its overrides): open_clip presets, ours, and one with model_overrides
CASES = [("ViT-B-32", None), ("RN50", None), ("RN-Shapes-S", None),
         ("ViT-Tiny-test", {"vision_cfg": {"image_size": 48, "width": 48}, "text_cfg": {"context_length": 20}})]

OPEN_CLIP_SIDE = """
import json, numpy as np, open_clip, torch
from PIL import Image
for i, d in enumerate(json.loads(str(inputs["dirs"]))):
    # local-dir: reads open_clip_config.json and loads the weights beside it with strict=True
    model, _, transform = open_clip.create_model_and_transforms("local-dir:" + d)
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + d)
    with torch.no_grad():
        images = torch.from_numpy(inputs[f"images{i}"]).permute(0, 3, 1, 2)
        outputs[f"img{i}"] = model.encode_image(images, normalize=True).numpy()
        outputs[f"txt{i}"] = model.encode_text(tokenizer(["a photo of a cat", "a red circle."]), normalize=True).numpy()
    raw = Image.fromarray(inputs["raw"])
    outputs[f"pre{i}"] = transform(raw).permute(1, 2, 0).numpy()[None]
    cfg = model.visual.preprocess_cfg
    outputs[f"cfg{i}"] = np.array(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}))
"""


def test_local_dir_loads_strictly_with_our_embeddings_and_preprocessing(tmp_path):
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("open_clip", load=False)
    raw = np.random.default_rng(3).integers(0, 256, (70, 90, 3), np.uint8)  # not square: resize and crop both act
    dirs, arrays, ours = [], {"raw": raw}, []
    for i, (name, overrides) in enumerate(CASES):
        config = get_model_config(name, overrides)
        model = create_model(config)
        params = convert.state_dict_to_variables(model, random_state_dict(convert.expected_state_dict_shapes(model), i))
        directory = clip_jax.save_open_clip_dir(model, params, str(tmp_path / f"dir{i}"))
        assert sorted(p.name for p in (tmp_path / f"dir{i}").iterdir()) == [
            "open_clip_config.json", "open_clip_model.safetensors"]
        size = config.vision.image_size
        images = random_images(2, size, i)
        tokens = clip_jax.tokenize(["a photo of a cat", "a red circle."], config.text.context_length)
        ours.append((clip_jax.encode_image(model, params, images), clip_jax.encode_text(model, params, tokens),
                     clip_jax.preprocess(raw, size)))
        dirs.append(directory)
        arrays[f"images{i}"] = images
    ref = torch_reference(OPEN_CLIP_SIDE, dirs=np.array(json.dumps(dirs)), **arrays)
    for i, ((name, _), (img, txt, pre)) in enumerate(zip(CASES, ours)):
        assert np.abs(img - ref[f"img{i}"]).max() < TOL, name
        assert np.abs(txt - ref[f"txt{i}"]).max() < TOL, name
        # open_clip's transform from the folder's preprocess_cfg equals clip_jax.preprocess, pixel for pixel
        assert np.abs(pre - ref[f"pre{i}"][0]).max() < 1e-5, name
        cfg = json.loads(str(ref[f"cfg{i}"]))
        size = get_model_config(*CASES[i]).vision.image_size
        assert cfg["size"] in (size, [size, size])  # open_clip sets the tower's (H, W) over the folder's int
        assert (cfg["mean"], cfg["std"]) == (list(clip_jax.MEAN), list(clip_jax.STD))
        assert (cfg["interpolation"], cfg["resize_mode"]) == ("bicubic", "shortest")


def test_models_open_clip_cannot_build_are_refused_by_name(tmp_path):
    model = create_model("cn-ViT-Tiny-test")
    with pytest.raises(ValueError, match="no Chinese-CLIP"):
        clip_jax.save_open_clip_dir(model, {}, str(tmp_path / "cn"))
    other = get_model_config("ViT-Tiny-test", {"text_cfg": {"tokenizer": "wordpiece"}})
    with pytest.raises(ValueError, match="tokenizer is CLIP's BPE"):
        clip_jax.save_open_clip_dir(other, {}, str(tmp_path / "wp"))
    assert not (tmp_path / "cn").exists() and not (tmp_path / "wp").exists()


def test_export_of_a_run_as_open_clip_dir(tmp_path, capsys):
    from test_train import smoke_config

    from clip_jax import export, runs, train

    train.train_and_evaluate(smoke_config(tmp_path, 2), str(tmp_path / "run"))
    export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'dir'}", "--format=open_clip_dir"])
    assert "open_clip_dir:" in capsys.readouterr().out
    run = runs.read(str(tmp_path / "run"))
    with open(tmp_path / "dir" / "open_clip_config.json") as f:
        written = json.load(f)
    assert written["model_cfg"] == run.model.config.to_dict()
    # the weights are the run's: clip_jax reads the folder's safetensors back to the same variables
    _, loaded = clip_jax.load(written["model_cfg"], str(tmp_path / "dir" / "open_clip_model.safetensors"))
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(run.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
