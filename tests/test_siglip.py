"""SigLIP's towers (clip_jax.models.siglip) against transformers' SiglipModel on random weights, through
the SiglipModel <-> clip_jax table (clip_jax.hf_layouts.siglip), both ways, strict keys."""

import math

import jax
import numpy as np
import pytest

from clip_jax.hf_layouts import siglip as hf_siglip
from clip_jax.models import create_model, init_variables
from tests.conftest import reference

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
            max_position_embeddings=16, projection_size=48, pad_token_id=1, bos_token_id=None, eos_token_id=1)
VISION = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8)


def _hf_model(seed=0, **vision):
    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(text_config=TEXT, vision_config={**VISION, **vision})
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # transformers' init leaves some biases zero and LayerNorms plain: randomize all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(5.0)  # past open_clip's clamp at log 100: SigLIP's temperature is not clamped
    return model


def _inputs(image_size=32):
    """(pixels in [0, 1], tokens): transformers takes 2 p - 1, clip_jax preprocess's (p - MEAN) / STD."""
    rng = np.random.RandomState(0)
    images = rng.uniform(0, 1, (3, image_size, image_size, 3)).astype(np.float32)
    tokens = rng.randint(2, 100, (3, 16))
    tokens[0, 9:] = 1  # EOS then padding with EOS, as SigLIP's tokenizer writes them
    tokens[1, 5:] = 1
    return images, tokens.astype(np.int32)


def _clip_normalized(pixels):
    from clip_jax.preprocessing import MEAN, STD

    return ((pixels - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def _hf_outputs(hf, pixels, tokens):
    torch = reference("torch")
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                 pixel_values=torch.tensor((2 * pixels - 1).transpose(0, 3, 1, 2)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_siglip_matches_transformers(scan):
    hf = _hf_model()
    config = hf_siglip.config_from_hf(hf.config.to_dict())
    model = create_model(config, scan=scan)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    variables = hf_siglip.variables_from_hf(model, state)
    images, tokens = _inputs()
    want_img, want_txt, want_logits = _hf_outputs(hf, images, tokens)
    out = model.apply(variables, _clip_normalized(images), tokens)
    np.testing.assert_allclose(np.asarray(out["image_embeds"]), want_img, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["text_embeds"]), want_txt, atol=1e-5)
    logits = np.asarray(out["text_embeds"]) @ np.asarray(out["image_embeds"]).T * float(out["logit_scale"]) \
        + float(out["logit_bias"])
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    # and back: the same tensors under transformers' names, every key
    back = hf_siglip.variables_to_hf(model, variables)
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_siglip_export_loads_in_transformers():
    transformers = reference("transformers")
    torch = reference("torch")
    model = create_model("ViT-SigLIP-Tiny-test")
    variables = init_variables(model, jax.random.key(1))
    hf = transformers.SiglipModel(transformers.SiglipConfig(**hf_siglip.config_to_hf(model.config))).eval()
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in
                                              hf_siglip.variables_to_hf(model, variables).items()}, strict=True)
    assert not missing and not unexpected
    images, tokens = _inputs()
    want_img, want_txt, _ = _hf_outputs(hf, images, tokens)
    got = model.apply(variables, _clip_normalized(images), method="encode_image")
    np.testing.assert_allclose(np.asarray(got), want_img, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.apply(variables, tokens, method="encode_text")), want_txt, atol=1e-5)


def test_siglip_patch_grid_drops_the_remainder_as_transformers_does():
    # So400m/14 at 384 pixels: 27 patches of 14, the last 6 rows and columns unseen ('VALID' conv)
    hf = _hf_model(image_size=36)
    config = hf_siglip.config_from_hf(hf.config.to_dict())
    model = create_model(config)
    variables = hf_siglip.variables_from_hf(model, {k: v.numpy() for k, v in hf.state_dict().items()})
    images, tokens = _inputs(36)
    want_img, _, _ = _hf_outputs(hf, images, tokens)
    got = model.apply(variables, _clip_normalized(images), method="encode_image")
    np.testing.assert_allclose(np.asarray(got), want_img, atol=1e-5)


def test_siglip_strict_keys_and_refused_configs():
    hf = _hf_model()
    model = create_model(hf_siglip.config_from_hf(hf.config.to_dict()))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    state["vision_model.head.extra"] = np.zeros(3)
    del state["text_model.head.bias"]
    with pytest.raises(ValueError, match=r"missing: text_model.head.bias[\s\S]*unexpected: vision_model.head.extra"):
        hf_siglip.variables_from_hf(model, state)
    d = hf.config.to_dict()
    d["text_config"]["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="text_config.hidden_act"):
        hf_siglip.config_from_hf(d)
    d = hf.config.to_dict()
    d["text_config"]["projection_size"] = 40
    with pytest.raises(ValueError, match="projection_size"):
        hf_siglip.config_from_hf(d)


def test_siglip_presets():
    import clip_jax
    from clip_jax.models import variable_shapes

    names = clip_jax.list_models()
    assert "ViT-B-16-SigLIP" in names and "ViT-SO400M-14-SigLIP-384" in names
    assert "ViT-B-16-SigLIP-quickgelu" not in names
    config = clip_jax.get_model_config("ViT-B-16-SigLIP")
    assert (config.text.vocab_size, config.text.context_length, config.embed_dim) == (32000, 64, 768)
    assert config.init_logit_scale == pytest.approx(math.log(10)) and config.init_logit_bias == -10
    # the overrides path goes through the JSON form: log 10 survives it
    assert clip_jax.get_model_config("ViT-B-16-SigLIP", {"text_cfg": {"layers": 2}}).init_logit_scale == \
        pytest.approx(math.log(10))
    # SiglipModel's own shapes of google's B/16 at 224 (its config.json's fields)
    assert hf_siglip.config_from_hf({"text_config": {}, "vision_config": {}}) == config
    shapes = variable_shapes(create_model("ViT-SO400M-14-SigLIP-384"))["params"]
    assert shapes["visual"]["positional_embedding"].shape == (27 * 27, 1152)
    assert shapes["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"].shape == (1152, 4304)


def test_siglip_open_clip_json_refused():
    import clip_jax

    model = create_model("ViT-SigLIP-Tiny-test")
    with pytest.raises(ValueError, match="save_hf"):
        clip_jax.save_open_clip("ViT-SigLIP-Tiny-test", init_variables(model, jax.random.key(0)), "/tmp/x.safetensors")
    with pytest.raises(ValueError, match="quick_gelu"):
        init_variables(create_model("ViT-SigLIP-Tiny-test", overrides={"quick_gelu": True}), jax.random.key(0))


def test_siglip_input_normalization_is_clip_jax_preprocessings():
    from clip_jax.models import siglip
    from clip_jax.preprocessing import MEAN, STD

    assert siglip.CLIP_MEAN == MEAN and siglip.CLIP_STD == STD


def _stacked(tree):
    from flax import traverse_util

    from clip_jax import convert

    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, tree))
    return traverse_util.unflatten_dict(convert.stack_layers(flat))


def test_siglip_scan_remat_and_bfloat16_match_plain():
    import jax.numpy as jnp

    plain = create_model("ViT-SigLIP-Tiny-test")
    variables = init_variables(plain, jax.random.key(3))
    images, tokens = _inputs()
    images = _clip_normalized(images)

    def loss(model, params):
        out = model.apply({"params": params}, images, tokens)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T + out["logit_bias"]
        return -jnp.mean(jax.nn.log_sigmoid((2 * jnp.eye(len(logits)) - 1) * logits))

    ref_out = plain.apply(variables, images, tokens)
    ref_grad = jax.grad(loss, argnums=1)(plain, variables["params"])
    for scan, remat in ((True, "none"), (False, "full")):  # a remat policy changes what is kept, not the values
        model = create_model("ViT-SigLIP-Tiny-test", scan=scan, remat=remat)
        stack = _stacked if scan else (lambda t: t)
        out = model.apply({"params": stack(variables["params"])}, images, tokens)
        for k in ref_out:
            np.testing.assert_allclose(out[k], ref_out[k], atol=2e-6, err_msg=f"{k} scan={scan}")
        grad = jax.grad(loss, argnums=1)(model, stack(variables["params"]))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad),
                                jax.tree_util.tree_leaves(stack(ref_grad))):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"{path} scan={scan}")
    half = create_model("ViT-SigLIP-Tiny-test", dtype="bfloat16").apply(variables, images, tokens)
    for k in ("image_embeds", "text_embeds"):
        assert half[k].dtype == jnp.float32
        np.testing.assert_allclose(half[k], ref_out[k], atol=5e-2)


def test_siglip2_fixed_resolution_matches_transformers():
    from clip_jax.hf_layouts import siglip2

    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(0)
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    hf = transformers.Siglip2Model(transformers.Siglip2Config(text_config=TEXT, vision_config={**vision,
                                                                                              "num_patches": 16}))
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = siglip2.config_from_hf(hf.config.to_dict())
    assert config.vision.image_size == 32
    model = create_model(config)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    variables = siglip2.variables_from_hf(model, state)
    pixels, tokens = _inputs()
    # transformers' Siglip2 input: each image as its patches flattened (rows, columns, channels), in [-1, 1]
    patches = (2 * pixels - 1).reshape(3, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 192)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens, dtype=torch.long), pixel_values=torch.tensor(patches),
                 pixel_attention_mask=torch.ones(3, 16, dtype=torch.long),
                 spatial_shapes=torch.tensor([[4, 4]] * 3))
    ours = model.apply(variables, _clip_normalized(pixels), tokens)
    np.testing.assert_allclose(np.asarray(ours["image_embeds"]), out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours["text_embeds"]), out.text_embeds.numpy(), atol=1e-5)
    back = siglip2.variables_to_hf(model, variables)
    assert sorted(back) == sorted(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    assert siglip2.config_to_hf(config)["vision_config"]["num_patches"] == 16


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_tokenizer_files_give_clip_jax_ids(tmp_path, family):
    import importlib

    import clip_jax
    from tests.test_big_vision import _spiece

    transformers = reference("transformers")
    layout = importlib.import_module(f"clip_jax.hf_layouts.{family}")
    spiece = _spiece(tmp_path, 64)
    config = clip_jax.get_model_config("ViT-SigLIP-Tiny-test", {"text_cfg": {"vocab_size": 64,
                                                                             "tokenizer": "sentencepiece:" + spiece}})
    out = tmp_path / "export"
    out.mkdir()
    layout.write_tokenizer(config, str(out))
    processor = transformers.AutoProcessor.from_pretrained(str(out))
    assert type(processor).__name__ == ("SiglipProcessor" if family == "siglip" else "Siglip2Processor")
    texts = ["A photo of a Red circle!", "the  quick, brown fox jumps over the lazy dog; and a kite in the sky", ""]
    want = processor.tokenizer(texts, padding="max_length", max_length=16, truncation=True).input_ids
    got = clip_jax.tokenize(texts, model=config)
    assert got.tolist() == want


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_written_directory_loads_with_auto_classes(tmp_path, family):
    """config.json + model.safetensors as the family module gives them: transformers' AutoModel loads them
    with no missing or unexpected key, the same embeddings, and config.json reads back as the same config."""
    import importlib
    import json

    from safetensors.numpy import save_file

    transformers = reference("transformers")
    torch = reference("torch")
    layout = importlib.import_module(f"clip_jax.hf_layouts.{family}")
    model = create_model("ViT-SigLIP-Tiny-test")
    variables = init_variables(model, jax.random.key(2))
    (tmp_path / "config.json").write_text(json.dumps(layout.config_to_hf(model.config)))
    save_file(layout.variables_to_hf(model, variables), str(tmp_path / "model.safetensors"))
    hf, info = transformers.AutoModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(hf).__name__ == ("SiglipModel" if family == "siglip" else "Siglip2Model")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert layout.config_from_hf(json.loads((tmp_path / "config.json").read_text())) == model.config
    pixels, tokens = _inputs()
    with torch.no_grad():
        text = hf.get_text_features(input_ids=torch.tensor(tokens, dtype=torch.long))
    text = getattr(text, "pooler_output", text).numpy()
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model.apply(variables, tokens, method="encode_text")), text, atol=1e-5)
