"""Every registered method's run, built through the trainer's assembly on a tiny model, stepped,
read back through clip_jax.runs, evaluated and exported: each export loads with strict keys where it
is meant to (open_clip; cn-clip for a BERT text tower) and gives the run's embeddings and logits
(temperature and bias). A SLIP run exports its towers (its SSL head only on request); a few-shot
adaptation exports its frozen towers and what it learned."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_weights import random_images
from tiny import ROOT, tiny_run

import clip_jax
from clip_jax import export, runs
from clip_jax.train import checkpoint
from clip_jax.train.trainer import write_run_config

# A method's run as its config file sets it up (configs/NAME.py), on the tiny model of its kind.
VARIANTS = {
    "clip": ("clip_paper", "ViT-B-32", "ViT-Tiny-test"),
    "siglip": ("siglip", "ViT-B-32", "ViT-Tiny-test"),
    "flip": ("flip", "ViT-B-16", "ViT-Tiny-test"),
    "lit": ("lit", "ViT-B-16", "ViT-Tiny-test"),
    "slip": ("slip", "ViT-B-16", "ViT-Tiny-test"),
    "chinese_clip": ("chinese_clip", "cn-ViT-B-16", "cn-ViT-Tiny-test"),
    "lseg": ("lseg", "ViT-B-32", "ViT-Tiny-test"),
    "groupvit": ("groupvit", "GroupViT-S-16", "GroupViT-Shapes"),  # transformers' layout: its own test below
    "vild": ("vild", "ViT-B-32", "RN-Tiny-test"),
    "glip": ("glip", "GLIP-T", "RN-Tiny-test"),
    "audioclip": ("audioclip", "full", "RN-Tiny-test"),
    "clip4clip": ("clip4clip", "seqTransf", "ViT-Tiny-test"),  # its embed_dim is its text width, as seqTransf needs
    "actionclip": ("actionclip", "Transf", "ViT-Tiny-test"),
}
# ViLD's recipe sized for the tiny model: its R50 head and sampling (512 regions of 7x7x256 per image) are not
SMALL_VILD = dict(fpn_width=8, head_convs=1, head_conv_dim=8, head_fcs=1, head_fc_dim=16, rpn_batch=32, roi_batch=16,
                  rpn_pre_nms=100, rpn_post_nms=20, test_rpn_pre_nms=100, test_rpn_post_nms=20, max_objects=4,
                  max_regions=3, detections=10)
# GLIP-T's head sized likewise (its 6 fused layers of 2,048 wide attention over 256 query tokens)
SMALL_GLIP = dict(levels=(2, 3, 4, 5), fpn_width=8, gn_groups=4, num_convs=1, fusion_dim=8, fusion_heads=2,
                  text_heads=2, anchor_scale=4.0, query_length=16, max_objects=4, pre_nms=50, detections=10)
OPEN_CLIP_LAYOUT = sorted(set(VARIANTS) - {"groupvit"})
FEW_SHOT = ("coop", "cocoop", "maple", "clip_adapter", "tip_adapter", "tip_adapter_f")
STEPS = 2
TEXTS = ["red circle", "blue square", "a green star", "small red square"]
TEXTS_ZH = ["红色的圆", "蓝色的方块", "绿色的星星", "小的红色方块"]


def variant_config(name):
    file, preset, tiny = VARIANTS[name]
    spec = importlib.util.spec_from_file_location(f"config_{file}", os.path.join(ROOT, "configs", f"{file}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(preset)
    c.model = tiny
    if name in ("lseg", "vild", "glip"):  # its recipe's overrides (ViT-L at 480 px, R50 at 1024) are for its preset
        c.model_overrides = {}
    if name == "vild":
        c.vild.update(SMALL_VILD)
    if name == "glip":
        c.glip.update(SMALL_GLIP)
    if name in ("vild", "glip"):
        c.optim.decay_boundaries = ()  # its decays at 162k.. steps lie past the test's 10
    if name == "audioclip":  # the test-sized tower on short clips (the reference's takes 5 s at 44.1 kHz)
        c.audioclip.audio_tower = "esresnext-fbsp-test"
        c.data.audio_rate, c.data.audio_samples = 16000, 2048
    if name in ("clip4clip", "actionclip"):  # short clips; ActionCLIP's classes named (its recipe reads a file)
        c.data.video_frames = 2
        c.actionclip.classes = ("running", "jumping", "swimming")
    c.dtype, c.remat, c.accum_steps, c.batch_size, c.total_steps = "float32", "none", 1, 8, 10
    c.init_from = ""  # the tiny model starts from its init
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 1e-2  # large enough that the steps move every trained tensor visibly
    return c


def synthetic_batch(method, model, n, seed):
    """A batch of the method's keys: random pixels (in the dtype the method reads) and real tokens."""
    rng = np.random.default_rng(seed)
    texts = TEXTS_ZH if model.config.text.kind == "bert" else TEXTS
    out = {}
    for key, shape in method.batch_shapes(n).items():
        if key == "tokens":
            out[key] = clip_jax.tokenize([texts[i % len(texts)] for i in range(n)], model=model.config)
        elif key == "glip/tokens":  # GLIP's prompts, at its query length
            out[key] = clip_jax.tokenize([texts[i % len(texts)] for i in range(n)], shape.shape[1], model=model.config)
        elif key == "prompt_tokens":  # GroupViT's [n, prompts, T]
            count = shape.shape[1]
            tokens = clip_jax.tokenize([texts[i % len(texts)] for i in range(n * count)], model=model.config)
            out[key] = tokens.reshape(n, count, -1)
        elif key == "frame_mask":  # every frame real
            out[key] = np.ones(shape.shape, np.int32)
        elif key == "labels":  # ActionCLIP's: class indices
            out[key] = rng.integers(0, 3, shape.shape).astype(np.int32)
        elif shape.dtype == jnp.uint8:
            out[key] = rng.integers(0, 256, shape.shape, dtype=np.uint8)
        else:
            out[key] = rng.standard_normal(shape.shape).astype(shape.dtype)
    return out


def trained_workdir(config, workdir):
    """A training workdir as the trainer leaves it (config.json, a checkpoint of the state) after
    STEPS steps of the run built by clip_jax.train.build; -> (the built run, the final state)."""
    run = tiny_run(config)
    state = run.state
    for step in range(STEPS):
        state, _ = run.step_for(step)(state, synthetic_batch(run.method, run.model, config.batch_size, step))
    write_run_config(str(workdir), config)
    manager = checkpoint.make_manager(str(workdir / "checkpoints"))
    checkpoint.save(manager, STEPS, state, force=True)
    checkpoint.finish(manager)
    return run, state


def eval_tokens(model):
    """Tokens to compare with the reference on: captions of the model's language, right-padded (a
    bidirectional tower, SigLIP's, attends to the padding in both)."""
    if model.config.text.kind == "bert":
        return clip_jax.tokenize(TEXTS_ZH, model=model.config)
    return clip_jax.tokenize(TEXTS, model=model.config)


def jax_outputs(model, variables, images, tokens):
    """The run's embeddings and logits (temperature and bias) from its model, in numpy."""
    out = model.apply(variables, jnp.asarray(images), jnp.asarray(tokens))
    logits = np.asarray(out["logit_scale"]) * np.asarray(out["image_embeds"]) @ np.asarray(out["text_embeds"]).T
    if "logit_bias" in out:
        logits = logits + np.asarray(out["logit_bias"])
    return np.asarray(out["image_embeds"]), np.asarray(out["text_embeds"]), logits


OPEN_CLIP = """
import open_clip, torch
open_clip.add_model_config(inputs_json)
ref = open_clip.create_model(name, pretrained=weights).eval()  # strict key matching
with torch.no_grad():
    img = ref.encode_image(torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2), normalize=True)
    txt = ref.encode_text(torch.from_numpy(inputs["tokens"]).long(), normalize=True)
    logits = ref.logit_scale.exp() * img @ txt.T
    if ref.logit_bias is not None:
        logits = logits + ref.logit_bias
outputs.update(img=img.numpy(), txt=txt.numpy(), logits=logits.numpy(),
               has_bias=np.array(ref.logit_bias is not None))
"""
CN_CLIP = """
import json, torch
from cn_clip.clip.model import CLIP
from safetensors.torch import load_file
with open(inputs_json) as f:
    ref = CLIP(**json.load(f)).eval()
ref.load_state_dict(load_file(weights), strict=True)
with torch.no_grad():
    img = torch.nn.functional.normalize(ref.encode_image(torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2)))
    txt = torch.nn.functional.normalize(ref.encode_text(torch.from_numpy(inputs["tokens"]).long()))
    logits = ref.logit_scale.exp() * img @ txt.T
outputs.update(img=img.numpy(), txt=txt.numpy(), logits=logits.numpy(), has_bias=np.array(False))
"""


def reference(written, model, images, tokens):
    """The export loaded in its reference (cn-clip for a BERT text tower, else open_clip), strictly:
    its embeddings and logits on `images`, `tokens`."""
    for package in ("torch", "cn_clip" if model.config.text.kind == "bert" else "open_clip"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (the reference side)")
    from conftest import torch_reference

    code = CN_CLIP if model.config.text.kind == "bert" else OPEN_CLIP
    name = os.path.splitext(os.path.basename(written["json"]))[0]
    head = f"inputs_json, weights, name = {written['json']!r}, {written['safetensors']!r}, {name!r}\n"
    return torch_reference(head + code, images=images, tokens=tokens)


def check_against_reference(written, model, variables, images, tokens):
    """The export in its reference gives the embeddings and logits of (model, variables)."""
    img, txt, logits = jax_outputs(model, variables, images, tokens)
    ref = reference(written, model, images, tokens)
    np.testing.assert_allclose(ref["img"], img, atol=1e-5)
    np.testing.assert_allclose(ref["txt"], txt, atol=1e-5)
    np.testing.assert_allclose(ref["logits"], logits, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(logits).max()))
    assert bool(ref["has_bias"]) == ("logit_bias" in variables["params"])
    return ref


def test_the_tests_here_cover_every_registered_method():
    from clip_jax.adapt.methods import ADAPTERS
    from clip_jax.methods import METHODS

    # Other test modules register methods of their own in the same process: the package's are compared.
    ours = lambda registry: {n for n in registry.names() if registry.get(n).__module__.startswith("clip_jax.")}  # noqa: E731
    assert {variant_config(name).method for name in VARIANTS} == ours(METHODS)
    assert set(FEW_SHOT) == ours(ADAPTERS)


# -- SLIP: the towers, its SSL head only on request --------------------------------------------
def test_a_slip_run_exports_its_towers_and_its_head_only_on_request(tmp_path):
    """SLIP's params hold its SSL head beside the towers: the export writes the towers (open_clip's
    keys, nothing else), and the head in its own file only with extras."""
    from clip_jax.methods.slip import HEAD

    config = variant_config("slip")
    run, state = trained_workdir(config, tmp_path / "slip")
    written = export.export(str(tmp_path / "slip"), str(tmp_path / "out" / "slip"))
    assert written["step"] == STEPS and HEAD not in written
    model, loaded = clip_jax.load(written["json"], written["safetensors"])
    towers = runs.unstacked(model, run.method.model_variables(state.params, state.model_state))
    for path, value in jax.tree_util.tree_leaves_with_path(towers):
        got = loaded
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=jax.tree_util.keystr(path))
    with_head = export.export(str(tmp_path / "slip"), str(tmp_path / "out" / "slip_head"), extras=True)
    from safetensors.numpy import load_file

    head = load_file(with_head[HEAD])
    params, stats = jax.device_get(state.params[HEAD]), jax.device_get(state.model_state["batch_stats"][HEAD])
    # PyTorch's layout under SLIP's names: Linear weights [out, in], BatchNorm's running statistics
    np.testing.assert_array_equal(head["image_mlp.layer1.weight"], np.asarray(params["linear1"]["kernel"]).T)
    np.testing.assert_array_equal(head["image_mlp.layer3.bias"], np.asarray(params["linear3"]["bias"]))
    np.testing.assert_array_equal(head["image_mlp.bn2.weight"], np.asarray(params["bn2"]["scale"]))
    np.testing.assert_array_equal(head["image_mlp.bn1.running_var"], np.asarray(stats["bn1"]["var"]))
    assert len(head) == 4 * 2 + 3 * 2  # 3 Linear (weight, bias), 2 BatchNorm (weight, bias, mean, var)
    if importlib.util.find_spec("torch") is None:
        return
    # SLIP's image_mlp (Linear, BatchNorm1d, ReLU twice, then Linear) in eval mode, with these tensors,
    # maps pooled features as our head does
    from conftest import torch_reference

    from clip_jax.methods.slip import SSLHead

    features = np.random.default_rng(0).standard_normal((4, run.method.pooled_dim)).astype(np.float32)
    ours = SSLHead(int(config.slip.mlp_dim), int(config.slip.emb_dim)).apply(
        {"params": params, "batch_stats": stats}, jnp.asarray(features), train=False)
    ref = torch_reference(f"""
import torch
from collections import OrderedDict
from safetensors.torch import load_file
f, d, e = {run.method.pooled_dim}, {int(config.slip.mlp_dim)}, {int(config.slip.emb_dim)}
image_mlp = torch.nn.Sequential(OrderedDict([
    ("layer1", torch.nn.Linear(f, d)), ("bn1", torch.nn.BatchNorm1d(d)), ("relu1", torch.nn.ReLU(inplace=True)),
    ("layer2", torch.nn.Linear(d, d)), ("bn2", torch.nn.BatchNorm1d(d)), ("relu2", torch.nn.ReLU(inplace=True)),
    ("layer3", torch.nn.Linear(d, e))]))
tensors = {{k[len("image_mlp."):]: v for k, v in load_file({with_head[HEAD]!r}).items()}}
missing, unexpected = image_mlp.load_state_dict(tensors, strict=False)
assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
with torch.no_grad():
    outputs["z"] = image_mlp.eval()(torch.from_numpy(inputs["features"])).numpy()
""", features=features)
    np.testing.assert_allclose(ref["z"], np.asarray(ours), rtol=1e-5, atol=1e-5)


# -- every method, in its reference ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", OPEN_CLIP_LAYOUT)
def test_every_method_exports_what_its_reference_loads(tmp_path, name):
    config = variant_config(name)
    run, state = trained_workdir(config, tmp_path / name)
    read = runs.read(str(tmp_path / name))
    assert (read.kind, read.step, read.config.method) == (runs.TRAINING, STEPS, config.method)
    # what the run reads back is what the steps trained (not the init), through its moving average where the
    # recipe keeps one (GLIP-T's); the towers of the export (LSeg's head, a part of its model, is written beside them)
    params = runs.evaluated_params(state.params, state.ema)
    trained = runs.unstacked(read.model, run.method.export(params, state.model_state)["towers"])
    fresh = runs.unstacked(read.model, run.method.export(*_init(run))["towers"])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained),
                                                     jax.tree_util.tree_leaves(fresh))]
    assert any(moved)
    for a, b in zip(jax.tree_util.tree_leaves(read.variables), jax.tree_util.tree_leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    size = read.model.config.vision.image_size
    images = random_images(3, size, 1)
    tokens = eval_tokens(read.model)
    # evaluation's view: the public encoders on the run's towers are the model's own embeddings
    img, txt, _ = jax_outputs(read.model, read.variables, images, tokens)
    np.testing.assert_allclose(clip_jax.encode_image(read.model, read.variables, images), img, atol=1e-6)
    np.testing.assert_allclose(clip_jax.encode_text(read.model, read.variables, tokens), txt, atol=1e-6)

    written = export.export(str(tmp_path / name), str(tmp_path / "out" / name))
    with open(written["json"]) as f:
        saved = json.load(f)
    if config.clip.loss == "sigmoid":  # open_clip builds the bias from the JSON; its trained value is in the weights
        assert saved["init_logit_bias"] == read.model.config.init_logit_bias
        assert "logit_bias" in read.variables["params"]
    check_against_reference(written, read.model, read.variables, images, tokens)
    # and clip_jax reads its own export back bit for bit
    for path in (written["safetensors"], written["msgpack"]):
        _, back = clip_jax.load(written["json"], path)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(read.variables)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_groupvit_run_exports_in_transformers_layout_only(tmp_path):
    """A GroupViT run: --format=hf loads in transformers' GroupViTModel with strict keys and gives the run's
    embeddings; open_clip's layouts, which have no GroupViT, are refused naming --format=hf."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = variant_config("groupvit")
    trained_workdir(config, tmp_path / "gv")
    for format in ("open_clip", "open_clip_dir"):
        with pytest.raises(ValueError, match="--format=hf"):
            export.export(str(tmp_path / "gv"), str(tmp_path / "out" / format), format=format)
    written = export.export(str(tmp_path / "gv"), str(tmp_path / "out" / "hf"), format="hf")
    hf, info = transformers.GroupViTModel.from_pretrained(written["hf"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    read = runs.read(str(tmp_path / "gv"))
    assert int(read.variables["batch_stats"]["visual"]["projection"]["bn"]["num_batches_tracked"]) == STEPS
    images, tokens = random_images(4, 64, 1), np.asarray(eval_tokens(read.model))
    with torch.no_grad():
        out = hf.eval()(input_ids=torch.from_numpy(tokens).long(),
                        pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), return_dict=True)
    np.testing.assert_allclose(clip_jax.encode_image(read.model, read.variables, images), out.image_embeds.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(clip_jax.encode_text(read.model, read.variables, tokens), out.text_embeds.numpy(),
                               atol=1e-5)


def _init(run):
    """The run's initial (params, model state), on the host."""
    variables = run.method.init(jax.random.key(run.config.seed))
    import flax.linen as nn

    variables = jax.device_get(nn.meta.unbox(variables))
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def test_a_sigmoid_loss_models_keys_are_open_clips():
    """The state-dict keys and shapes of a SigLIP run's model (its bias included) are those open_clip
    builds from the exported JSON."""
    from clip_jax.convert import expected_state_dict_shapes
    from clip_jax.methods.run_model import model_from_config

    model = model_from_config(variant_config("siglip"))
    assert model.config.init_logit_bias is not None
    ref = reference_keys(model)
    assert "logit_bias" in ref and expected_state_dict_shapes(model) == ref


def reference_keys(model):
    """{key: shape} of open_clip's model built from `model`'s exported JSON."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip and torch are not installed (the reference side)")
    from conftest import torch_reference

    shapes = torch_reference(f"""
import json
from open_clip.model import CLIP
ref = CLIP(**json.loads({json.dumps(model.config.to_dict())!r}))
for k, v in ref.state_dict().items():
    outputs[k] = np.array(list(v.shape), np.int64)
""")
    return {k: tuple(int(d) for d in v) for k, v in shapes.items()}


# -- each few-shot method: the frozen towers and what it learned -------------------------------
@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    """A CLIP training workdir (two steps) the adaptations start from, and its towers as read."""
    workdir = tmp_path_factory.mktemp("clip_run") / "clip"
    trained_workdir(variant_config("clip"), workdir)
    return workdir, runs.read(str(workdir))


def _adaptation_settings(name, weights, cache_dir):
    from clip_jax.adapt.config import method_config

    s = method_config(name)
    s.weights, s.model = str(weights), ""  # a training workdir brings its own model
    s.shots, s.epochs, s.batch_size, s.augment_passes, s.search_step = 4, 4, 4, 1, (10, 4)
    s.log_every_epochs, s.prompt_depth = 1, 2
    s.data.cache_dir = str(cache_dir)
    s.data.shapes_sizes = {"train": 60, "validation": 12, "test": 12}
    return s


@pytest.mark.slow
@pytest.mark.parametrize("name", FEW_SHOT)
def test_every_few_shot_method_exports_its_towers_and_adapter(tmp_path, clip_workdir, name):
    from safetensors.numpy import load_file

    from clip_jax.adapt.train import run

    weights, frozen = clip_workdir
    settings = _adaptation_settings(name, weights, tmp_path / "cache")
    run(settings, str(tmp_path / name), log=lambda message: None)
    if name != "tip_adapter":  # it trains nothing: on the default benchmark the training loss falls
        with open(tmp_path / name / "metrics.jsonl") as f:
            loss = [json.loads(line)["loss"] for line in f]
        assert len(loss) == settings.epochs and loss[-1] < loss[0], loss
    read = runs.read(str(tmp_path / name))
    assert read.kind == runs.ADAPTATION and read.step is None
    for a, b in zip(jax.tree_util.tree_leaves(read.variables), jax.tree_util.tree_leaves(frozen.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the towers it froze: the CLIP run's
    written = export.export(str(tmp_path / name), str(tmp_path / "out" / name))
    for kind in ("safetensors", "json"):
        with open(written[f"adapter_{kind}"], "rb") as got, open(tmp_path / name / f"adapter.{kind}", "rb") as want:
            assert got.read() == want.read()
    adapter = load_file(written["adapter_safetensors"])
    meta = json.loads(open(written["adapter_json"]).read())
    assert meta["method"] == name and adapter["text_features"].shape == (len(meta["classnames"]),
                                                                          frozen.model.config.embed_dim)
    if name == FEW_SHOT[0]:  # the towers are the CLIP run's for every method (asserted above): one reference load
        images = random_images(3, frozen.model.config.vision.image_size, 4)
        check_against_reference(written, frozen.model, frozen.variables, images, clip_jax.tokenize(TEXTS))


def test_an_export_written_before_the_bias_kept_its_name_still_loads(tmp_path):
    """clip_jax's SigLIP exports wrote the bias as 'logit.bias': clip_jax.load reads them as before."""
    from safetensors.numpy import load_file, save_file

    from clip_jax.methods.run_model import model_from_config

    model = model_from_config(variant_config("siglip"))
    variables = clip_jax.init_variables(model, jax.random.key(0))
    variables["params"]["logit_bias"] = jnp.float32(-7.5)
    path = clip_jax.save_open_clip(model.config, variables, str(tmp_path / "new.safetensors"))
    old = load_file(path)
    old["logit.bias"] = old.pop("logit_bias")
    save_file(old, str(tmp_path / "old.safetensors"))
    _, loaded = clip_jax.load(model.config, str(tmp_path / "old.safetensors"))
    assert float(loaded["params"]["logit_bias"]) == -7.5
