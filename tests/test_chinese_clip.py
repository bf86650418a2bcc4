"""Chinese-CLIP: the BERT text tower and presets against Chinese-CLIP's own code (fixtures from
tests/fixtures/make_cn_fixtures.py: cn-clip 1.6.0, torch, random weights), its checkpoint and
JSON formats, initialization from a Hugging Face BERT, and the errors a user can meet."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert
from clip_jax.models import create_model
from clip_jax.models.config import from_chinese_clip, get_model_config, to_chinese_clip

CASES = sorted(os.path.basename(p)[len("cn_embeddings_"):-4] for p in glob.glob(f"{FIXTURES}/cn_embeddings_*.npz"))
TOL = 1e-4
PRESETS = ["cn-ViT-B-16", "cn-ViT-L-14", "cn-ViT-L-14-336", "cn-ViT-H-14", "cn-RN50"]


def reference_params(model, seed):
    return convert.state_dict_to_variables(model, random_state_dict(convert.expected_state_dict_shapes(model), seed))


def test_fixture_cases_cover_both_tower_kinds_and_released_presets():
    assert {"cn_vit_tiny", "cn_rn_tiny", "cn_vit_b16", "cn_rn50"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scan", [False, True])
def test_embeddings_match_chinese_clip(case, scan):
    if scan and "tiny" not in case:
        pytest.skip("the scanned form is checked on the tiny towers")
    fx = np.load(f"{FIXTURES}/cn_embeddings_{case}.npz")
    model = create_model(str(fx["model"]), scan=scan)
    params = reference_params(model, int(fx["seed"]))
    images = random_images(2, int(fx["image_size"]), int(fx["seed"]))
    assert np.abs(clip_jax.encode_image(model, params, images) - fx["image_embeds"]).max() < TOL
    assert np.abs(clip_jax.encode_text(model, params, fx["tokens"]) - fx["text_embeds"]).max() < TOL
    scale = model.apply(params, method=lambda m: m.temperature()[0])
    np.testing.assert_allclose(scale, fx["logit_scale"], rtol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_chinese_clips_architectures(name):
    """Key names and shapes of the state dict, and the CLIP constructor's kwargs, equal the
    reference's for each released model (its model_configs merged as cn_clip does)."""
    with open(f"{FIXTURES}/cn_state_dict_shapes.json") as f:
        reference = json.load(f)[name]
    shapes = convert.expected_state_dict_shapes(create_model(name))
    assert shapes == {k: tuple(v) for k, v in reference["shapes"].items()}
    config = get_model_config(name)
    assert to_chinese_clip(config) == reference["kwargs"]
    assert from_chinese_clip(reference["kwargs"]) == config
    assert config.text.context_length == 52 and config.text.vocab_size == 21128


def test_round_trip_of_weights_is_bit_identical():
    model = create_model("cn-ViT-Tiny-test")
    sd = random_state_dict(convert.expected_state_dict_shapes(model), 4)
    back = convert.variables_to_state_dict(convert.state_dict_to_variables(model, sd))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].tobytes() == v.tobytes(), k


def test_released_checkpoint_layout_and_json_pair(tmp_path):
    """A released .pt holds {'state_dict': {'module.' + key: ...}} (with BERT's pooler); a plain
    .safetensors state dict and the exported NAME.json + NAME.safetensors pair load too."""
    model = create_model("cn-RN-Shapes-S")
    params = reference_params(model, 6)
    written = clip_jax.save_open_clip("cn-RN-Shapes-S", params, str(tmp_path / "cn.safetensors"))
    with open(tmp_path / "cn.json") as f:
        kwargs = json.load(f)
    assert kwargs == to_chinese_clip(model.config) and "vision_layers" in kwargs
    images = random_images(2, 64, 0)
    tokens = np.array([[101, 1, 2, 102] + [0] * 48], np.int32)
    want_img = clip_jax.encode_image(model, params, images)
    for name in ("cn-RN-Shapes-S", str(tmp_path / "cn.json")):
        loaded, got = clip_jax.load(name, written)
        assert loaded.config == model.config
        np.testing.assert_array_equal(clip_jax.encode_image(loaded, got, images), want_img)
    from conftest import reference

    torch = reference("torch")
    sd = convert.variables_to_state_dict(params)
    sd["bert.pooler.dense.weight"] = np.zeros((64, 64), np.float32)
    torch.save({"epoch": 3, "state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}},
               tmp_path / "epoch_latest.pt")
    loaded, got = clip_jax.load("cn-RN-Shapes-S", str(tmp_path / "epoch_latest.pt"))
    np.testing.assert_allclose(clip_jax.encode_text(loaded, got, tokens),
                               clip_jax.encode_text(model, params, tokens), atol=1e-6)


def test_export_loads_strictly_in_chinese_clip(tmp_path):
    """The reference builds CLIP(**NAME.json) and loads NAME.safetensors with strict keys, and
    gives our embeddings (in a subprocess)."""
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("cn_clip", load=False)

    for name in ("cn-ViT-Tiny-test", "cn-RN-Shapes-S"):
        model = create_model(name)
        params = reference_params(model, 8)
        path = clip_jax.save_open_clip(name, params, str(tmp_path / f"{name}.safetensors"))
        images = random_images(2, model.config.vision.image_size, 2)
        ref = torch_reference(f"""
import json, torch
from cn_clip.clip import tokenize
from cn_clip.clip.model import CLIP
from safetensors.torch import load_file
with open({str(tmp_path / f"{name}.json")!r}) as f:
    ref = CLIP(**json.load(f)).eval()
ref.load_state_dict(load_file({path!r}), strict=True)
tokens = tokenize(["一只猫的照片", "北京的天安门"], context_length=52)
with torch.no_grad():
    outputs["img"] = torch.nn.functional.normalize(ref.encode_image(
        torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2))).numpy()
    outputs["txt"] = torch.nn.functional.normalize(ref.encode_text(tokens)).numpy()
outputs["tokens"] = tokens.numpy()
""", images=images)
        assert np.abs(clip_jax.encode_image(model, params, images) - ref["img"]).max() < TOL
        assert np.abs(clip_jax.encode_text(model, params, ref["tokens"]) - ref["txt"]).max() < TOL


def test_text_tower_from_hugging_face_bert():
    """A Hugging Face BertModel state dict (bare keys, with its pooler) initializes the text tower:
    the [CLS] state equals BertModel's last_hidden_state[:, 0] (fixture: transformers, random init)."""
    ref = np.load(f"{FIXTURES}/hf_bert_tiny.npz")
    model = create_model("cn-ViT-Tiny-test", overrides={"text_cfg": {
        "vocab_size": 99, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 2.0, "max_positions": 64}})
    is_bert_body = lambda path: path[1] == "text" and path[2] != "text_projection"  # noqa: E731
    _, loaded = clip_jax.load(model.config, f"{FIXTURES}/hf_bert_tiny.safetensors", only=is_bert_body)
    params = reference_params(model, 0)
    text = dict(jax.tree_util.tree_map(jnp.asarray, loaded)["params"]["text"],
                text_projection=jnp.eye(32, model.config.embed_dim))  # reads out the [CLS] state
    params = {**params, "params": {**params["params"], "text": text}}
    cls = model.apply(params, jnp.asarray(ref["tokens"]), method=lambda m, t: m.text(t))
    np.testing.assert_allclose(cls[:, :32], ref["cls"][:, :32], atol=1e-5)


def test_dropout_only_in_training():
    model = create_model("cn-ViT-Tiny-test")
    params = reference_params(model, 1)
    tokens = jnp.asarray([[101, 5, 6, 7, 102] + [0] * 47] * 2, jnp.int32)
    run = lambda train, key: model.apply(params, tokens, train=train, method="encode_text",  # noqa: E731
                                         rngs={"dropout": jax.random.key(key)})
    np.testing.assert_array_equal(run(False, 0), run(False, 1))
    a, b = run(True, 0), run(True, 1)
    assert not np.allclose(a, b) and not np.allclose(a, run(False, 0))
    np.testing.assert_array_equal(a, run(True, 0))


def test_wrong_architecture_and_context_errors(tmp_path):
    clip_model = create_model("ViT-Tiny-test")
    clip_params = reference_params(clip_model, 0)
    path = clip_jax.save_open_clip("ViT-Tiny-test", clip_params, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="BERT text tower .* use the matching CLIP model"):
        clip_jax.load("cn-ViT-Tiny-test", path)
    cn_params = reference_params(create_model("cn-ViT-Tiny-test"), 0)
    cn_path = clip_jax.save_open_clip("cn-ViT-Tiny-test", cn_params, str(tmp_path / "cn.safetensors"))
    with pytest.raises(ValueError, match="Chinese-CLIP weights .* cn-\\* model"):
        clip_jax.load("ViT-Tiny-test", cn_path)
    with pytest.raises(ValueError, match="above the position table .*max_positions 512"):
        clip_jax.create_model("cn-ViT-Tiny-test", overrides={"text_cfg": {"context_length": 600}}).init(
            jax.random.key(0), *clip_jax.models.dummy_inputs(create_model("cn-ViT-Tiny-test")))


def test_vocab_of_tokenizer_and_tower_must_agree():
    from clip_jax.tokenizers import tokenizer_for

    config = get_model_config("cn-ViT-Tiny-test", {"text_cfg": {"vocab_size": 30000}})
    with pytest.raises(ValueError, match="21128 ids but the text tower embeds 30000"):
        tokenizer_for(config.text)
