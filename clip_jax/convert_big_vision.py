"""big_vision's SigLIP checkpoints (``.npz``, its two-tower model: ``img`` a ViT with the MAP head, ``txt``
its text transformer, ``t`` and ``b``) <-> clip_jax's SigLIP towers (tower kind 'siglip').

An ``.npz`` holds the flattened tree with '/' in the names (big_vision.utils.load_checkpoint_np):
the parameters at the top, or under ``params/`` (optax checkpoints) or ``opt/target/`` (older
ones); the encoder blocks per layer (``encoderblock_{i}``) or stacked for ``lax.scan``
(``encoderblock``, a leading depth axis); bfloat16 arrays stored as 2-byte voids. Its flax modules
keep q, k and v as three DenseGenerals ([D, H, hd]), the layouts clip_jax's kernels have, so the
table is renames, the fused q/k/v stacked, and the positions' leading axis.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from clip_jax import rename_rules as rr

PREFIXES = ("params/", "opt/target/")  # where big_vision's trainers put the parameters


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The parameters of a big_vision ``.npz`` as {'img/...': array}, per-layer block names."""
    with np.load(path, allow_pickle=False) as npz:
        tensors = {k: _recover_dtype(npz[k]) for k in npz.files}
    return normalize(tensors)


def _recover_dtype(a: np.ndarray) -> np.ndarray:
    """numpy writes bfloat16 as a 2-byte void; read it back as float32."""
    if a.dtype.type is np.void:
        if a.itemsize != 2:
            raise ValueError(f"an array of unknown dtype {a.dtype} (itemsize {a.itemsize}) in the .npz")
        return np.asarray(jnp.asarray(a.view(jnp.bfloat16), jnp.float32))
    return a


def normalize(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drop the trainer's prefix, unstack scanned encoder blocks, fold in the extra text position
    table older text checkpoints carried (big_vision's text_transformer.load does the same)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.*/)encoderblock/(.*)", key)
        if m:
            for i in range(np.shape(value)[0]):
                out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = np.asarray(value[i])
        else:
            out[key] = np.asarray(value)
    extra = out.pop("txt/Encoder_0/pos_embedding", None)
    if extra is not None and "txt/pos_embedding" in out:
        out["txt/pos_embedding"] = out["txt/pos_embedding"] + extra
    return out


# -- the tensor table ----------------------------------------------------------------------------------
def _attention(path: tuple, prefix: str, fused: bool) -> list[rr.Rule]:
    """A flax MultiHeadDotProductAttention (query/key/value/out DenseGenerals) <-> clip_jax's block
    attention (fused in_proj) or its pooler's (q/k/v kernels apart, one stacked bias)."""
    names = tuple(f"{prefix}/{n}" for n in ("query", "key", "value"))
    biases = tuple(f"{n}/bias" for n in names)
    out = rr.out_proj(path, f"{prefix}/out/kernel", f"{prefix}/out/bias", heads=0, torch=False)
    if fused:
        return rr.split_qkv(path, tuple(f"{n}/kernel" for n in names), biases, heads=0, torch=False) + out
    kernels = [rr.same(path + (f"{n}_proj_kernel",), f"{full}/kernel") for n, full in zip("qkv", names)]
    bias = rr.Rule((path + ("in_proj_bias",),), biases, lambda b: (b[0], b[1], b[2]), lambda *bs: (jnp.stack(bs),))
    return kernels + [bias] + out


def _mlp(path: tuple, prefix: str) -> list[rr.Rule]:
    return (rr.dense(path + ("c_fc",), f"{prefix}/Dense_0/kernel", f"{prefix}/Dense_0/bias", transpose=False)
            + rr.dense(path + ("c_proj",), f"{prefix}/Dense_1/kernel", f"{prefix}/Dense_1/bias", transpose=False))


def _ln(path: tuple, prefix: str) -> list[rr.Rule]:
    return rr.layer_norm(path, f"{prefix}/scale", f"{prefix}/bias")


def _encoder(path: tuple, prefix: str, layers: int) -> list[rr.Rule]:
    out = []
    for i in range(layers):
        p, k = path + ("transformer", f"resblocks_{i}"), f"{prefix}/encoderblock_{i}"
        out += _ln(p + ("ln_1",), f"{k}/LayerNorm_0")
        out += _attention(p + ("attn",), f"{k}/MultiHeadDotProductAttention_0", fused=True)
        out += _ln(p + ("ln_2",), f"{k}/LayerNorm_1") + _mlp(p + ("mlp",), f"{k}/MlpBlock_0")
    return out


def rules(config) -> list[rr.Rule]:
    """clip_jax's SigLIP variables <-> big_vision's two-tower parameters ('/'-joined names)."""
    v, t = config.vision, config.text
    if v.kind != "siglip" or t.kind != "siglip":
        raise ValueError(f"big_vision's SigLIP checkpoints hold SigLIP's towers (vision_cfg and text_cfg kind "
                         f"'siglip', e.g. the ViT-B-16-SigLIP preset); this model's are {v.kind!r} / {t.kind!r}")
    img, txt = ("visual",), ("text",)
    out = [rr.same(("logit_scale",), "t", (1,), ()), rr.same(("logit_bias",), "b", (1,), ()),
           rr.same(img + ("conv1", "kernel"), "img/embedding/kernel"),
           rr.same(img + ("conv1", "bias"), "img/embedding/bias"),
           rr.same(img + ("positional_embedding",), "img/pos_embedding", (1,) + (-1, v.width), (-1, v.width))]
    out += _encoder(img, "img/Transformer", v.layers)
    out += _ln(img + ("ln_post",), "img/Transformer/encoder_norm")
    head = img + ("attn_pool",)
    out += [rr.same(head + ("attn", "query"), "img/MAPHead_0/probe", (1, 1, v.width), (1, v.width))]
    out += _attention(head + ("attn",), "img/MAPHead_0/MultiHeadDotProductAttention_0", fused=False)
    out += _ln(head + ("ln",), "img/MAPHead_0/LayerNorm_0") + _mlp(head + ("mlp",), "img/MAPHead_0/MlpBlock_0")
    out += [rr.same(txt + ("token_embedding", "embedding"), "txt/Embed_0/embedding"),
            rr.same(txt + ("positional_embedding",), "txt/pos_embedding", (1, -1, t.width), (-1, t.width))]
    out += _encoder(txt, "txt/Encoder_0", t.layers)
    out += _ln(txt + ("ln_final",), "txt/Encoder_0/encoder_norm")
    out += rr.dense(txt + ("head",), "txt/head/kernel", "txt/head/bias", transpose=False)
    return out


def variables_from_big_vision(model, tensors: Mapping[str, Any], only=None) -> dict:
    """clip_jax variables (numpy) of `model` from big_vision's parameters (``read_npz``'s names):
    strict, a ValueError naming every missing, unexpected and mis-shaped tensor; `only`: a predicate
    on variable paths, those only."""
    return rr.from_external(model, normalize(tensors), rules(model.config), "the big_vision parameters", only)


def variables_to_big_vision(model, variables) -> dict[str, np.ndarray]:
    """`model`'s variables under big_vision's names (per-layer blocks), for ``np.savez``."""
    return rr.to_external(model, variables, rules(model.config))
