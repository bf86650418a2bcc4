"""transformers' model directories (clip_jax.hf_layouts) and hub names (clip_jax.hub): transformers'
CLIPModel and ChineseCLIPModel on random weights give clip_jax's embeddings after import and after
export (strict keys both ways), the tokenizers written beside an export give clip_jax's ids, configs
clip_jax cannot represent are refused by field, and hf-hub: names resolve from a cache the tests build
(HF_HUB_OFFLINE: nothing is downloaded). transformers runs in a subprocess (conftest.torch_reference)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from random_weights import random_images, random_state_dict

import clip_jax
from clip_jax import convert, hf_layouts, hub
from clip_jax.hf_layouts import chinese_clip, clip
from clip_jax.models import create_model
from clip_jax.models.config import CLIPConfig, TextConfig, VisionConfig

TOL = 1e-5
# transformers' sub-configs of a tiny model: 16 patches of 8 pixels, a 16-token text.
TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
            max_position_embeddings=16)
VISION = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=32,
              patch_size=8)
CAPTIONS = ["a photo of a cat", "A Diagram, of 2 DOGS!", "it's   a café at 5pm", "a long caption " * 30]
CN_CAPTIONS = ["一张猫的照片", "两只狗在草地上奔跑", "a photo 的 Cat!", "一只很长的猫" * 15]


def transformers_reference(code: str, monkeypatch, **arrays):
    from conftest import reference, torch_reference

    reference("torch", load=False)
    reference("transformers", load=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the subprocess never reaches for the network
    return torch_reference("import torch, transformers\ntorch.manual_seed(0)\n" + code, **arrays)


def random_params(model, seed: int):
    return convert.state_dict_to_variables(model, random_state_dict(convert.expected_state_dict_shapes(model), seed))


def random_tokens(n: int, length: int, vocab: int, eos: int, seed: int) -> np.ndarray:
    """Ids in [1, eos) ending with eos at varied positions, then padding 0."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, length), np.int32)
    for i, end in enumerate(rng.integers(2, length, n)):
        tokens[i, :end] = rng.integers(1, eos, end)
        tokens[i, end] = eos
    return tokens


# -- transformers -> clip_jax --------------------------------------------------------------------------
def test_transformers_models_load_with_their_embeddings(tmp_path, monkeypatch):
    """CLIPModel (quick_gelu with eos the last id; gelu with the legacy eos_token_id 2, pooled by
    argmax, also saved in bfloat16) and ChineseCLIPModel, random weights with non-zero biases, saved by
    save_pretrained: clip_jax builds their architecture from config.json and gives their normalized
    features."""
    images = random_images(3, 32, 1)
    tokens = random_tokens(3, 16, 100, 99, 2)
    cn_tokens = random_tokens(3, 16, 100, 99, 3)
    cases = {"quick": dict(hidden_act="quick_gelu", eos_token_id=99, bos_token_id=98, pad_token_id=0),
             "legacy": dict(hidden_act="gelu", eos_token_id=2, bos_token_id=1, pad_token_id=0)}
    ref = transformers_reference(f"""
import numpy as np
from transformers import CLIPConfig, CLIPModel, ChineseCLIPConfig, ChineseCLIPModel
def noisy(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()
images = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)
for name, text in {cases!r}.items():
    act = text["hidden_act"]
    model = noisy(CLIPModel(CLIPConfig(text_config={{**{TEXT!r}, **text}},
                                       vision_config={{**{VISION!r}, "hidden_act": act}}, projection_dim=24)))
    model.save_pretrained({str(tmp_path)!r} + "/" + name)
    with torch.no_grad():
        outputs[name + "_img"] = model.get_image_features(pixel_values=images).pooler_output.numpy()
        ids = torch.from_numpy(inputs["tokens"]).long()
        outputs[name + "_txt"] = model.get_text_features(input_ids=ids).pooler_output.numpy()
half = model.to(torch.bfloat16)  # the last one (legacy) also as a bfloat16 checkpoint, as hub files often are
half.save_pretrained({str(tmp_path / "bf16")!r})
with torch.no_grad():
    model = half.float()
    outputs["bf16_img"] = model.get_image_features(pixel_values=images).pooler_output.numpy()
    outputs["bf16_txt"] = model.get_text_features(input_ids=ids).pooler_output.numpy()
model = noisy(ChineseCLIPModel(ChineseCLIPConfig(text_config={TEXT!r}, vision_config={VISION!r}, projection_dim=24)))
model.save_pretrained({str(tmp_path / "cn")!r})
ids = torch.from_numpy(inputs["cn_tokens"]).long()
with torch.no_grad():
    outputs["cn_img"] = model.get_image_features(pixel_values=images).pooler_output.numpy()
    outputs["cn_txt"] = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long(),
                                                token_type_ids=torch.zeros_like(ids)).pooler_output.numpy()
""", monkeypatch, images=images, tokens=tokens, cn_tokens=cn_tokens)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    for name, toks in (("quick", tokens), ("legacy", tokens), ("bf16", tokens), ("cn", cn_tokens)):
        model, params = clip_jax.load(str(tmp_path / name))
        np.testing.assert_allclose(clip_jax.encode_image(model, params, images), unit(ref[name + "_img"]), atol=TOL)
        np.testing.assert_allclose(clip_jax.encode_text(model, params, toks), unit(ref[name + "_txt"]), atol=TOL)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:  # the bfloat16 reader was needed
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    vision = VisionConfig(image_size=32, layers=2, width=48, patch_size=8, head_width=12, mlp_ratio=2.0)
    text = TextConfig(context_length=16, vocab_size=100, width=32, heads=4, layers=2, mlp_ratio=2.0)
    assert clip_jax.load(str(tmp_path / "quick"))[0].config == CLIPConfig(24, vision, text, quick_gelu=True,
                                                                          init_logit_scale=2.6592)
    assert not clip_jax.load(str(tmp_path / "legacy"))[0].config.quick_gelu
    cn = clip_jax.load(str(tmp_path / "cn"))[0].config
    assert (cn.text.kind, cn.text.max_positions, cn.text.context_length, cn.quick_gelu) == ("bert", 16, 16, True)


# -- clip_jax -> transformers --------------------------------------------------------------------------
def test_exports_load_strictly_in_transformers_with_our_embeddings_and_ids(tmp_path, monkeypatch):
    """save_hf of a CLIP (gelu) and a Chinese-CLIP model: AutoModel loads each with no missing,
    unexpected or mis-shaped key and gives clip_jax's embeddings; AutoProcessor's tokenizer gives
    clip_jax.tokenize's ids (CLIP: up to and including the end of text, after which transformers pads
    with <|endoftext|> where clip_jax pads with 0; its text features from its own ids still equal
    ours), and its image processor clip_jax.preprocess's pixels."""
    from PIL import Image

    models = {"clip": "ViT-Tiny-test", "cn": "cn-ViT-Tiny-test"}
    arrays = {"photo": np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)}
    for key, name in models.items():
        model = create_model(name)
        params = random_params(model, 7)
        clip_jax.save_hf(model, params, str(tmp_path / key))
        arrays[key + "_images"] = random_images(2, model.config.vision.image_size, 3)
        arrays[key + "_tokens"] = clip_jax.tokenize(CAPTIONS if key == "clip" else CN_CAPTIONS, model=name)
        arrays[key + "_img"] = clip_jax.encode_image(model, params, arrays[key + "_images"])
        arrays[key + "_txt"] = clip_jax.encode_text(model, params, arrays[key + "_tokens"])
        arrays[key + "_pixels"] = clip_jax.preprocess([Image.fromarray(arrays["photo"])],
                                                      image_size=model.config.vision.image_size)
    ref = transformers_reference(f"""
import json
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer
for key, captions in (("clip", {CAPTIONS!r}), ("cn", {CN_CAPTIONS!r})):
    path = {str(tmp_path)!r} + "/" + key
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    outputs[key + "_info"] = np.array(json.dumps({{k: sorted(map(str, v)) for k, v in info.items()}}))
    processor = AutoProcessor.from_pretrained(path)
    outputs[key + "_classes"] = np.array([type(model).__name__, type(processor).__name__,
                                          type(AutoTokenizer.from_pretrained(path)).__name__])
    length = inputs[key + "_tokens"].shape[1]
    batch = processor(text=captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    outputs[key + "_ids"] = batch["input_ids"].numpy()
    pixels = processor(images=Image.fromarray(inputs["photo"]), return_tensors="pt")["pixel_values"]
    outputs[key + "_pixels"] = pixels.numpy()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(inputs[key + "_images"]).permute(0, 3, 1, 2))
        txt = model.get_text_features(**{{k: v for k, v in batch.items() if k != "pixel_values"}})
    outputs[key + "_img"] = torch.nn.functional.normalize(img.pooler_output, dim=-1).numpy()
    outputs[key + "_txt"] = torch.nn.functional.normalize(txt.pooler_output, dim=-1).numpy()
""", monkeypatch, **arrays)
    classes = {"clip": ["CLIPModel", "CLIPProcessor", "CLIPTokenizer"],
               "cn": ["ChineseCLIPModel", "ChineseCLIPProcessor", "BertTokenizer"]}
    for key in models:
        info = json.loads(str(ref[key + "_info"]))
        assert {"missing_keys", "unexpected_keys", "mismatched_keys"} <= set(info), info
        assert all(not v for v in info.values()), info
        assert list(ref[key + "_classes"]) == classes[key]
        np.testing.assert_allclose(ref[key + "_img"], arrays[key + "_img"], atol=TOL)
        np.testing.assert_allclose(ref[key + "_txt"], arrays[key + "_txt"], atol=TOL)
        # at most one grey level apart (transformers resizes in torch, clip_jax in PIL)
        np.testing.assert_allclose(ref[key + "_pixels"][0].transpose(1, 2, 0), arrays[key + "_pixels"][0],
                                   atol=1.01 / 255 / min(clip_jax.STD))
    ours, theirs = arrays["clip_tokens"], ref["clip_ids"]
    ends = np.argmax(ours == 49407, axis=1)
    for row, end in enumerate(ends):
        np.testing.assert_array_equal(theirs[row, : end + 1], ours[row, : end + 1])
        assert (theirs[row, end + 1:] == 49407).all() and (ours[row, end + 1:] == 0).all()
    np.testing.assert_array_equal(ref["cn_ids"], arrays["cn_tokens"])


def test_export_round_trips_and_configs_map_both_ways(tmp_path):
    """save_hf -> clip_jax.load(DIR) gives the same architecture and bit-identical variables (scanned
    too); config_to_hf -> config_from_hf is the identity on the tiny presets."""
    for name in ("ViT-Tiny-test-quickgelu", "cn-ViT-Tiny-test"):
        model = create_model(name)
        family, hf = hf_layouts.family_for(model.config)
        assert family.config_from_hf(json.loads(json.dumps(hf))) == model.config
        params = random_params(model, 1)
        clip_jax.save_hf(name, params, str(tmp_path / name))
        loaded_model, loaded = clip_jax.load(str(tmp_path / name), scan=True)
        assert loaded_model.config == model.config and loaded_model.scan
        flat = convert.variables_to_state_dict(loaded)
        for key, value in convert.variables_to_state_dict(params).items():
            assert flat[key].tobytes() == value.tobytes(), key


def test_sharded_weights_and_open_clip_hub_directories_load(tmp_path, tiny_dir):
    """transformers' sharded files (model.safetensors.index.json) and open_clip's hub layout
    (open_clip_config.json + open_clip_model.safetensors) give the same variables; a missing shard
    is named."""
    model, params = clip_jax.load(str(tiny_dir))
    _, state_dict = hf_layouts.read(str(tiny_dir))
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    os.remove(sharded / "model.safetensors")
    keys = sorted(state_dict)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        convert.write_safetensors({k: state_dict[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    open_clip_dir = tmp_path / "open_clip"
    open_clip_dir.mkdir()
    clip_jax.save_open_clip(model.config, params, str(open_clip_dir / "open_clip_model.safetensors"))
    os.remove(open_clip_dir / "open_clip_model.json")
    (open_clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model.config.to_dict(),
                                                                      "preprocess_cfg": {}}))
    for path in (sharded, open_clip_dir):
        assert hf_layouts.is_model_dir(path)
        loaded_model, loaded = clip_jax.load(str(path))
        assert loaded_model.config == model.config
        for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="the shards model-00002-of-00002.safetensors named in"):
        clip_jax.load(str(sharded))
    assert not hf_layouts.is_model_dir(tmp_path) and not hf_layouts.is_model_dir(sharded / "config.json")


# -- strictness and refusals ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model = create_model("ViT-Tiny-test")
    clip_jax.save_hf(model, random_params(model, 2), str(path))
    return path


def test_import_is_strict_and_names_keys(tiny_dir, tmp_path):
    _, state_dict = hf_layouts.read(str(tiny_dir))
    model = create_model("ViT-Tiny-test")
    broken = dict(state_dict)
    del broken["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    broken["text_model.pooler.weight"] = np.zeros(3, np.float32)
    broken["visual_projection.weight"] = broken["visual_projection.weight"].T
    broken["vision_model.embeddings.position_ids"] = np.arange(17)[None]  # a buffer of older files: dropped
    with pytest.raises(ValueError) as e:
        clip.variables_from_hf(model, broken)
    message = str(e.value)
    for part in ("missing keys: text_model.encoder.layers.1.self_attn.k_proj.bias",
                 "unexpected keys: text_model.pooler.weight",
                 "visual_projection.weight: got (64, 32), expected (32, 64)"):
        assert part in message
    assert "position_ids" not in message
    # only=: the selected variables are read (the text tower's damage does not matter), a missing one is named
    del broken["text_model.pooler.weight"]
    broken["visual_projection.weight"] = broken["visual_projection.weight"].T
    visual = clip.variables_from_hf(model, broken, only=lambda path: path[1] == "visual")
    assert set(visual["params"]) == {"visual"}
    with pytest.raises(ValueError, match=r"missing keys: text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias"):
        clip.variables_from_hf(model, broken, only=lambda path: path[1] == "text")
    # a directory read into a given architecture: a different one is named by its keys
    with pytest.raises(ValueError, match="mis-shaped keys"):
        clip_jax.load("ViT-B-32", str(tiny_dir))
    model, params = clip_jax.load("ViT-Tiny-test", str(tiny_dir), only=lambda path: path[1] == "visual")
    assert set(params["params"]) == {"visual"}


def test_configs_clip_jax_cannot_represent_are_refused_by_field(tmp_path):
    base = {"model_type": "clip", "projection_dim": 24, "text_config": dict(TEXT, eos_token_id=99),
            "vision_config": dict(VISION)}
    assert clip.config_from_hf(base).text.pool_type == "argmax"

    def changed(where, **fields):
        return {**base, where: {**base[where], **fields}}

    for hf, field in ((changed("text_config", hidden_act="relu"), "text_config.hidden_act='relu'"),
                      (changed("text_config", hidden_act="gelu"), "text_config.hidden_act='gelu'"),
                      (changed("vision_config", layer_norm_eps=1e-6), "vision_config.layer_norm_eps=1e-06"),
                      (changed("text_config", eos_token_id=5), "text_config.eos_token_id=5"),
                      (changed("vision_config", num_channels=1), "vision_config.num_channels=1"),
                      (changed("vision_config", num_attention_heads=5), "vision_config.num_attention_heads=5"),
                      (changed("vision_config", image_size=30), "vision_config.image_size=30")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
            clip.config_from_hf(hf)
    cn = {"model_type": "chinese_clip", "text_config": {**TEXT, "position_embedding_type": "relative_key"},
          "vision_config": VISION}
    with pytest.raises(ValueError, match=r"text_config\.position_embedding_type='relative_key'"):
        chinese_clip.config_from_hf(cn)
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "config.json").write_text(json.dumps({"model_type": "owlvit"}))
    with pytest.raises(ValueError, match=r"model_type 'owlvit' is not a layout clip_jax reads; it reads "
                                         r"chinese_clip, clip"):
        clip_jax.load(str(tmp_path / "group"))
    # what transformers cannot hold: each family's reason, with the fix
    for name, reason in (("RN-Tiny-test", "only a ViT image tower, this one is 'resnet'"),
                         ({**create_model("ViT-Tiny-test").config.to_dict(), "init_logit_bias": -10.0},
                          "no logit bias")):
        with pytest.raises(ValueError, match=reason) as e:
            clip_jax.save_hf(name, None, str(tmp_path / "out"))
        assert "clip_jax.save_open_clip" in str(e.value) and "chinese_clip: " in str(e.value)
    with pytest.raises(ValueError, match="without a weights path needs a model directory"):
        clip_jax.load("ViT-Tiny-test")
    # a vocabulary CLIP's tokenizer does not have: the weights alone, where asked for
    small = create_model("ViT-Tiny-test", overrides={"text_cfg": {"vocab_size": 100}})
    params = random_params(small, 3)
    with pytest.raises(ValueError, match="CLIPTokenizer is CLIP's BPE over 49408 ids.*tokenizer=False"):
        clip_jax.save_hf(small, params, str(tmp_path / "small"))
    clip_jax.save_hf(small, params, str(tmp_path / "small"), tokenizer=False)
    assert sorted(os.listdir(tmp_path / "small")) == ["config.json", "model.safetensors"]
    assert clip_jax.load(str(tmp_path / "small"))[0].config == small.config


# -- hub names -----------------------------------------------------------------------------------------
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo: str, source, files=None):
    """A repository in huggingface_hub's cache layout: refs/main -> snapshots/REVISION/<files>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name in files or os.listdir(source):
        shutil.copy(os.path.join(source, name), snapshot / name)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from conftest import reference

    hh = reference("huggingface_hub")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hh, tmp_path / "hub"


def test_hub_names_resolve_from_the_cache_offline(tiny_dir, offline_cache):
    _, cache = offline_cache
    cached_repo(cache, "org/tiny", tiny_dir)
    model, params = clip_jax.load(str(tiny_dir))
    for name in ("hf-hub:org/tiny", f"hf-hub:org/tiny@{REVISION}"):
        hub_model, hub_params = clip_jax.load(name)
        assert hub_model.config == model.config
        for a, b in zip(jax.tree_util.tree_leaves(hub_params), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # as init_from reads it: the given architecture, the selected variables only
    _, visual = clip_jax.load(model.config, "hf-hub:org/tiny", only=lambda path: path[1] == "visual")
    assert set(visual["params"]) == {"visual"}
    # open_clip's hub layout
    source = cache.parent / "open_clip"
    source.mkdir()
    clip_jax.save_open_clip(model.config, params, str(source / "open_clip_model.safetensors"),
                            config_path=str(cache.parent / "unused.json"))
    (source / "open_clip_config.json").write_text(json.dumps({"model_cfg": model.config.to_dict()}))
    cached_repo(cache, "org/tiny-open-clip", source)
    hub_model, hub_params = clip_jax.load("hf-hub:org/tiny-open-clip")
    assert hub_model.config == model.config
    for a, b in zip(jax.tree_util.tree_leaves(hub_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_takes_a_hub_name(offline_cache):
    """--config.init_from=hf-hub:ORG/NAME with init_params: the trainer's start reads the matching
    params from the cached directory (scanned model), the rest keep their fresh init."""
    from flax import traverse_util
    from tiny import tiny_config, tiny_run

    _, cache = offline_cache
    model = create_model("ViT-Tiny-test")
    params = random_params(model, 5)
    clip_jax.save_hf(model, params, str(cache.parent / "export"))
    cached_repo(cache, "org/tiny", cache.parent / "export")
    c = tiny_config()
    fresh = convert.unstack_layers(traverse_util.flatten_dict(tiny_run(c).state.params))
    c.init_from, c.init_params = "hf-hub:org/tiny", "text/.*|logit_scale"
    got = convert.unstack_layers(traverse_util.flatten_dict(tiny_run(c).state.params))
    want = convert.unstack_layers(traverse_util.flatten_dict(params["params"]))
    for key, value in got.items():
        expected = fresh[key] if key[0] == "visual" else want[key]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=str(key))
    assert not np.array_equal(np.asarray(fresh[("logit_scale",)]), want[("logit_scale",)])


def test_evaluation_and_adaptation_take_model_directories_and_hub_names(tiny_dir, offline_cache):
    """python -m clip_jax.evaluate --weights=DIR|hf-hub:... and clip_jax.adapt's config.weights: the
    directory's config is the architecture (a transformers directory has a config.json, as a training
    workdir has: it is not taken for one)."""
    from clip_jax import runs
    from clip_jax.evaluate.evaluator import load_model

    _, cache = offline_cache
    cached_repo(cache, "org/tiny", tiny_dir)
    model, params = clip_jax.load(str(tiny_dir))
    for weights in (str(tiny_dir), "hf-hub:org/tiny"):
        for got_model, got in (load_model(None, weights, None, None)[:2], runs.towers(weights),
                               runs.towers(weights, "ViT-Tiny-test", dtype="bfloat16")):
            assert got_model.config == model.config
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hub_names_missing_from_the_cache_name_the_files_and_the_command(tiny_dir, offline_cache):
    _, cache = offline_cache
    cached_repo(cache, "org/no-weights", tiny_dir, files=["config.json"])
    with pytest.raises(FileNotFoundError) as e:
        clip_jax.load("hf-hub:org/no-weights")
    assert "config.json, model.safetensors of org/no-weights are not in the hub cache" in str(e.value)
    assert "HF_HUB_OFFLINE=1" in str(e.value)
    assert "`hf download org/no-weights config.json model.safetensors`" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"hf download org/absent config\.json model\.safetensors "
                                                r"--revision v2"):
        clip_jax.load("hf-hub:org/absent@v2")
    with pytest.raises(ValueError, match="is no hub name"):
        hub.parse("hf-hub:just-a-name")


def test_hub_names_without_huggingface_hub_say_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        clip_jax.load("hf-hub:org/tiny")


# -- python -m clip_jax.export --format=hf ------------------------------------------------------------
@pytest.mark.slow
def test_export_of_a_trained_run_in_transformers_layout(tmp_path, monkeypatch, capsys):
    from test_train import smoke_config

    from clip_jax import export, runs, train

    train.train_and_evaluate(smoke_config(tmp_path, 2), str(tmp_path / "run"))
    export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}", "--format=hf"])
    assert "exported step 2" in capsys.readouterr().out
    run = runs.read(str(tmp_path / "run"))
    tokens = clip_jax.tokenize(CAPTIONS)
    images = random_images(2, 32, 4)
    ref = transformers_reference(f"""
model, info = transformers.AutoModel.from_pretrained({str(tmp_path / "hf")!r}, output_loading_info=True)
assert not any(info.values()), info
with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)).pooler_output
    txt = model.get_text_features(input_ids=torch.from_numpy(inputs["tokens"]).long()).pooler_output
outputs["img"] = torch.nn.functional.normalize(img, dim=-1).numpy()
outputs["txt"] = torch.nn.functional.normalize(txt, dim=-1).numpy()
""", monkeypatch, images=images, tokens=tokens)
    np.testing.assert_allclose(ref["img"], clip_jax.encode_image(run.model, run.variables, images), atol=TOL)
    np.testing.assert_allclose(ref["txt"], clip_jax.encode_text(run.model, run.variables, tokens), atol=TOL)
