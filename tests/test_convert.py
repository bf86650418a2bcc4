"""Interop with open_clip: embeddings against open_clip fixtures, key layouts, round trips, errors.

Fixtures come from tests/fixtures/make_fixtures.py (open_clip 3.3.0, torch, float32).
"""

import dataclasses
import glob
import gzip
import json
import os
import re

import numpy as np
import pytest
from conftest import FIXTURES
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.models import create_model, list_models

CASES = sorted(os.path.basename(p)[len("embeddings_") : -4] for p in glob.glob(f"{FIXTURES}/embeddings_*.npz"))
TOL = 1e-4  # max abs difference on unit-norm float32 embeddings


def fixture_model(case, **kwargs):
    fx = np.load(f"{FIXTURES}/embeddings_{case}.npz")
    name = str(fx["model"]) if "model" in fx else json.loads(str(fx["config"]))
    return fx, name, create_model(name, **kwargs)


def test_fixture_cases_cover_vit_and_resnet_presets_with_both_activations():
    assert {"vit_b32", "vit_b32_quickgelu", "rn50", "rn50_quickgelu"} <= set(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_embeddings_match_open_clip(case):
    fx, name, model = fixture_model(case)
    seed = int(fx["seed"])
    state_dict = random_state_dict(convert.expected_state_dict_shapes(model), seed)
    params = convert.state_dict_to_variables(model, state_dict)
    images = random_images(2, int(fx["image_size"]), seed)
    img = clip_jax.encode_image(model, params, images)
    txt = clip_jax.encode_text(model, params, fx["tokens"])
    assert np.abs(img - fx["image_embeds"]).max() < TOL
    assert np.abs(txt - fx["text_embeds"]).max() < TOL
    scale = model.apply(params, method=lambda m: m.temperature()[0])
    np.testing.assert_allclose(scale, fx["logit_scale"], rtol=1e-6)
    # Export of the import is bit-identical, dtypes included.
    back = convert.variables_to_state_dict(params)
    assert sorted(back) == sorted(state_dict)
    for k, v in state_dict.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k


def test_state_dict_layout_equals_open_clip_for_every_preset():
    with gzip.open(f"{FIXTURES}/state_dict_shapes.json.gz", "rt") as f:
        reference = json.load(f)
    # The CPU demo presets (*-Shapes-*) are built like the tiny test presets of their tower: the
    # same keys once block indices are set aside (their depths differ). Chinese-CLIP's (cn-*) are
    # checked against cn-clip's layout in tests/test_chinese_clip.py.
    demos = [n for n in list_models() if "-Shapes-" in n and not n.endswith("-quickgelu") and not n.startswith("cn-")]
    blockless = lambda keys: {re.sub(r"\.\d+\.", ".N.", k) for k in keys}  # noqa: E731
    for name in demos:
        tiny = "RN-Tiny-test" if name.startswith("RN") else "ViT-Tiny-test"
        keys = convert.expected_state_dict_shapes(create_model(name, scan=True))
        assert blockless(keys) == blockless(reference[tiny]), name
    # SigLIP's, GroupViT's and Swin's towers have no open_clip CLIP layout: tests/test_siglip.py and
    # tests/test_groupvit.py check them against transformers', tests/test_swin.py against timm's.
    siglip = {n for n in list_models() if clip_jax.get_model_config(n).vision.kind in ("siglip", "groupvit", "swin")}
    names = [n for n in list_models()
             if not n.endswith("-quickgelu") and n not in demos and not n.startswith("cn-") and n not in siglip]
    assert sorted(names) == sorted(reference)
    for name in list_models():
        if name in demos or name.startswith("cn-") or name in siglip:
            continue
        if name.endswith("-quickgelu"):  # same tensors as the base preset, other activation
            base = clip_jax.get_model_config(name[: -len("-quickgelu")])
            assert clip_jax.get_model_config(name) == dataclasses.replace(base, quick_gelu=True)
            continue
        ref = reference[name]
        # scan=True: one traced layer per stack, same keys once unstacked (and 10x faster here).
        ours = convert.expected_state_dict_shapes(create_model(name, scan=True))
        assert sorted(ours) == sorted(ref), name
        for k, (shape, _) in ref.items():
            assert tuple(ours[k]) == tuple(shape), (name, k)


@pytest.mark.parametrize("case", ["small_vit", "small_rn"])
def test_load_file_written_by_open_clip(case, tmp_path):
    path = f"{FIXTURES}/openclip_{case}.safetensors"
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        config = json.loads(f.metadata()["config"])
    ref = np.load(f"{FIXTURES}/openclip_{case}.npz")
    model, params = clip_jax.load(config, path)
    img = clip_jax.encode_image(model, params, ref["images"])
    txt = clip_jax.encode_text(model, params, ref["tokens"])
    assert np.abs(img - ref["image_embeds"]).max() < TOL
    assert np.abs(txt - ref["text_embeds"]).max() < TOL
    # Round trip through our writer: every tensor, BatchNorm counters included, bit for bit.
    out = clip_jax.save_open_clip(config, params, str(tmp_path / "out.safetensors"))
    original, written = convert.read_state_dict(path), convert.read_state_dict(out)
    assert sorted(original) == sorted(written)
    for k in original:
        assert original[k].dtype == written[k].dtype and original[k].tobytes() == written[k].tobytes(), k
    # A config that is no preset gets its open_clip JSON beside the weights.
    with open(tmp_path / "out.json") as f:
        assert json.load(f) == clip_jax.get_model_config(config).to_dict()


def test_scanned_model_loads_same_weights():
    path = f"{FIXTURES}/openclip_small_vit.safetensors"
    ref = np.load(f"{FIXTURES}/openclip_small_vit.npz")
    config = json.loads(__import__("safetensors").safe_open(path, "np").metadata()["config"])
    model, params = clip_jax.load(config, path, scan=True)
    assert params["params"]["visual"]["transformer"]["resblocks"]["ln_1"]["scale"].ndim == 2
    img = clip_jax.encode_image(model, params, ref["images"])
    assert np.abs(img - ref["image_embeds"]).max() < TOL
    back = convert.variables_to_state_dict(params)
    original = convert.read_state_dict(path)
    assert all(back[k].tobytes() == original[k].tobytes() for k in original)


def test_flax_msgpack_roundtrip(tmp_path):
    from clip_jax.api import write_flax_params

    path = f"{FIXTURES}/openclip_small_rn.safetensors"
    config = json.loads(__import__("safetensors").safe_open(path, "np").metadata()["config"])
    model, params = clip_jax.load(config, path)
    write_flax_params(params, str(tmp_path / "p.msgpack"))
    _, again = clip_jax.load(config, str(tmp_path / "p.msgpack"))
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_a_msgpack_reads_into_either_layer_layout(tmp_path):
    """An export (per layer) starts a scanned run (init_from), and a scanned run's params read per layer."""
    import jax

    from clip_jax.api import read_flax_params, write_flax_params
    from clip_jax.models import init_variables

    per_layer = create_model("ViT-Tiny-test", scan=False)
    params = {"params": init_variables(per_layer, jax.random.key(0))["params"]}
    write_flax_params(params, str(tmp_path / "per_layer.msgpack"))
    scanned = read_flax_params(create_model("ViT-Tiny-test", scan=True), str(tmp_path / "per_layer.msgpack"))
    blocks = params["params"]["text"]["transformer"]
    np.testing.assert_array_equal(scanned["params"]["text"]["transformer"]["resblocks"]["ln_1"]["scale"][1],
                                  blocks["resblocks_1"]["ln_1"]["scale"])
    write_flax_params(scanned, str(tmp_path / "scanned.msgpack"))
    again = read_flax_params(per_layer, str(tmp_path / "scanned.msgpack"))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


# -- bad input -----------------------------------------------------------------------
def tiny_state_dict():
    model = create_model("ViT-Tiny-test")
    return model, random_state_dict(convert.expected_state_dict_shapes(model), 0)


def test_missing_extra_and_misshaped_keys_are_named():
    model, sd = tiny_state_dict()
    del sd["visual.ln_post.weight"]
    sd["visual.extra.weight"] = np.zeros(3, np.float32)
    sd["text_projection"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError) as e:
        convert.state_dict_to_variables(model, sd)
    msg = str(e.value)
    assert "missing keys: visual.ln_post.weight" in msg
    assert "unexpected keys: visual.extra.weight" in msg
    assert "text_projection: got (5, 5), expected (32, 32)" in msg


def test_wrong_model_name_for_weights(tmp_path):
    model, sd = tiny_state_dict()
    path = str(tmp_path / "w.safetensors")
    convert.write_safetensors(sd, path)
    with pytest.raises(ValueError, match="does not match"):
        clip_jax.load("RN-Tiny-test", path)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError) as e:
        clip_jax.load("ViT-B-33", "/nonexistent.safetensors")
    assert "unknown model 'ViT-B-33'" in str(e.value) and "ViT-B-32" in str(e.value) and "RN50x64" in str(e.value)


def test_missing_and_truncated_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        clip_jax.load("ViT-Tiny-test", str(tmp_path / "nope.safetensors"))
    model, sd = tiny_state_dict()
    path = tmp_path / "w.safetensors"
    convert.write_safetensors(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        clip_jax.load("ViT-Tiny-test", str(path))


def test_openai_metadata_and_training_wrappers_are_accepted():
    model, sd = tiny_state_dict()
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    wrapped["state_dict"]["module.input_resolution"] = np.asarray(32)
    variables = convert.state_dict_to_variables(model, wrapped)
    assert variables["params"]["visual"]["proj"].shape == (64, 32)


def test_bad_images_and_tokens_fail_before_compile():
    model = create_model("ViT-Tiny-test")
    params = clip_jax.init_variables(model, __import__("jax").random.key(0))
    with pytest.raises(ValueError, match="NCHW"):
        clip_jax.encode_image(model, params, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="the model takes 32x32"):
        clip_jax.encode_image(model, params, np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="add a batch axis"):
        clip_jax.encode_image(model, params, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="must be float"):
        clip_jax.encode_image(model, params, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="context_length is 77"):
        clip_jax.encode_text(model, params, np.zeros((1, 80), np.int32))
    with pytest.raises(ValueError, match="token ids must be in"):
        clip_jax.encode_text(model, params, np.full((1, 77), 49408, np.int32))


def test_export_loads_in_open_clip(tmp_path):
    """open_clip loads the export strictly and gives our embeddings (in a subprocess)."""
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("open_clip", load=False)

    for name in ("ViT-B-32-quickgelu", "RN50"):
        model = create_model(name)
        sd = random_state_dict(convert.expected_state_dict_shapes(model), 5)
        params = convert.state_dict_to_variables(model, sd)
        path = clip_jax.save_open_clip(name, params, str(tmp_path / f"{name}.safetensors"))
        images = random_images(2, model.config.vision.image_size, 1)
        tokens = clip_jax.tokenize(["a photo of a cat", "a diagram"])
        ref = torch_reference(f"""
import open_clip, torch
ref = open_clip.create_model({name!r}, pretrained={path!r}).eval()  # strict key matching
with torch.no_grad():
    outputs["img"] = ref.encode_image(torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2), normalize=True).numpy()
    outputs["txt"] = ref.encode_text(torch.from_numpy(inputs["tokens"]).long(), normalize=True).numpy()
""", images=images, tokens=tokens)
        assert np.abs(clip_jax.encode_image(model, params, images) - ref["img"]).max() < TOL
        assert np.abs(clip_jax.encode_text(model, params, tokens) - ref["txt"]).max() < TOL


def test_read_torch_checkpoint(tmp_path):
    """.pt / .bin through torch where it is installed (never required): plain and TorchScript."""
    from conftest import reference

    torch = reference("torch")
    path = f"{FIXTURES}/openclip_small_vit.safetensors"
    config = json.loads(__import__("safetensors").safe_open(path, "np").metadata()["config"])
    sd = convert.read_state_dict(path)
    ref = np.load(f"{FIXTURES}/openclip_small_vit.npz")
    torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "ckpt.pt")

    class Holder(torch.nn.Module):  # a TorchScript archive, like OpenAI's released .pt files
        def __init__(self):
            super().__init__()
            for k, v in sd.items():
                tensor = torch.from_numpy(v).half() if v.dtype == np.float32 else torch.from_numpy(v)
                self.register_buffer(k.replace(".", "__"), tensor)

        def forward(self, x):
            return x

    torch.jit.script(Holder()).save(str(tmp_path / "jit.pt"))
    model, params = clip_jax.load(config, str(tmp_path / "ckpt.pt"))
    assert np.abs(clip_jax.encode_image(model, params, ref["images"]) - ref["image_embeds"]).max() < TOL
    jit_sd = convert.read_state_dict(str(tmp_path / "jit.pt"))
    assert {k.replace("__", "."): v.dtype for k, v in jit_sd.items()} == {k: v.dtype for k, v in sd.items()}
