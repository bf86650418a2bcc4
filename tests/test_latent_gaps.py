"""Choices that used to be silently wrong: the sigmoid loss without its bias, 'first' pooling under a
causal mask, and a tokenizer that does not fit the model's vocabulary."""

import jax
import numpy as np
import pytest
from tiny import text_batch, tiny_config, tiny_run

import clip_jax
from clip_jax.models import create_model, get_model_config, init_variables


# -- SigLIP: the sigmoid loss brings its temperature and bias ------------------------------
def test_sigmoid_loss_comes_with_siglip_init_and_never_runs_without_a_bias():
    from clip_jax.methods.losses import make_loss, sigmoid_loss_reference
    from clip_jax.parallel.sharding import make_mesh

    r = tiny_run(loss="sigmoid")
    np.testing.assert_allclose(r.state.params["logit_scale"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(r.state.params["logit_bias"], -10.0)
    state, metrics = r.step_fn(r.state, text_batch(8, 32))
    assert np.isfinite(float(metrics["loss"])) and "logit_bias" in metrics
    # The step's loss is the SigLIP formula on the model's own embeddings, scale and bias.
    out = r.model.apply({"params": jax.device_get(state.params)},
                        text_batch(8, 32, 1)["image"], text_batch(8, 32, 1)["tokens"])
    loss = make_loss("sigmoid", make_mesh({"data": 1}, jax.devices()[:1]))
    np.testing.assert_allclose(
        loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"]),
        sigmoid_loss_reference(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"]),
        rtol=1e-5)
    with pytest.raises(ValueError, match="the sigmoid loss needs the model's logit bias"):
        loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], None)
    c = tiny_config(loss="sigmoid")
    c.model_overrides = {"init_logit_bias": -5.0}  # the experiment's own value wins
    assert float(tiny_run(c).state.params["logit_bias"]) == -5.0


# -- the text tower's mask -------------------------------------------------------------------
def _text_model(**text):
    cfg = get_model_config("ViT-Tiny-test").to_dict()
    cfg["text_cfg"].update(text)
    return create_model(cfg)


def test_first_pooling_under_the_causal_mask_is_refused():
    model = _text_model(pool_type="first")
    with pytest.raises(ValueError, match="'first' under the causal mask"):
        init_variables(model, jax.random.key(0))


def test_bidirectional_first_pooling_sees_the_whole_text_and_the_pad_mask_ignores_padding():
    model = _text_model(pool_type="first", no_causal_mask=True, use_pad_mask=True)
    params = init_variables(model, jax.random.key(0))["params"]
    encode = jax.jit(lambda tokens: model.apply({"params": params}, tokens, method=model.encode_text))
    a = clip_jax.tokenize(["a red circle", "a red square"])
    assert (a[0, 0] == a[1, 0]) and not np.allclose(encode(a)[0], encode(a)[1], atol=1e-4)  # differ after token 0
    # The padding mask: the same texts in a context of 16 or 77 tokens embed alike.
    short = clip_jax.tokenize(["a red circle", "a red square"], context_length=16)
    np.testing.assert_allclose(encode(short), encode(a), atol=1e-5)
    # Without it (open_clip's and big_vision's SigLIP: the pad tokens attended to) the embedding depends
    # on the context length.
    unmasked = _text_model(pool_type="first", no_causal_mask=True)
    encode_unmasked = jax.jit(lambda tokens: unmasked.apply({"params": params}, tokens, method=unmasked.encode_text))
    assert not np.allclose(encode_unmasked(short), encode_unmasked(a), atol=1e-4)


def test_the_pad_mask_without_a_bidirectional_stack_is_refused():
    model = _text_model(use_pad_mask=True)
    with pytest.raises(ValueError, match="no_causal_mask=True"):
        init_variables(model, jax.random.key(0))


def test_optional_text_fields_stay_out_of_open_clip_json_by_default():
    assert set(get_model_config("ViT-B-32").to_dict()["text_cfg"]) == {
        "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type"}
    cfg = get_model_config("ViT-Tiny-test", {"text_cfg": {"no_causal_mask": True, "pool_type": "first"}})
    assert cfg.to_dict()["text_cfg"]["no_causal_mask"] is True
    assert get_model_config(cfg.to_dict()) == cfg


# -- the model's tokenizer, everywhere ----------------------------------------------------------
def test_tokenizer_comes_from_the_model_and_must_fit_its_vocabulary(tmp_path):
    from clip_jax.tokenizers import tokenizer_for

    spm = pytest.importorskip("sentencepiece")
    lines = [f"a {c} {s} of the picture" for c in ("red", "green", "blue") for s in ("circle", "square", "star")]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 5))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "m"), vocab_size=24,
                                   model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=2, minloglevel=2)
    sp = f"sentencepiece:{tmp_path / 'm.model'}"
    good = {"text_cfg": {"tokenizer": sp, "vocab_size": 24, "context_length": 16, "pool_type": "last"}}
    tokens = clip_jax.tokenize(["a red circle"], model=get_model_config("ViT-Tiny-test", good))
    want = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model")).encode("a red circle") + [2]
    assert tokens.shape == (1, 16) and list(tokens[0, :len(want)]) == want and not tokens[0, len(want):].any()
    bad = get_model_config("ViT-Tiny-test", {"text_cfg": {"tokenizer": sp}})  # 24 ids, 49408 embeddings
    with pytest.raises(ValueError, match="has 24 ids but the text tower embeds 49408"):
        tokenizer_for(bad.text)
    with pytest.raises(ValueError, match="unknown tokenizer 'byte_level': choose one of clip_bpe, sentencepiece, "
                                         "wordpiece"):
        tokenizer_for(get_model_config("ViT-Tiny-test", {"text_cfg": {"tokenizer": "byte_level"}}).text)
    assert tokenizer_for(get_model_config("ViT-Tiny-test").text).vocab_size == 49408
