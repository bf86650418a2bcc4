"""Matmul FLOPs of a computation, counted from its jaxpr: every dot_general and convolution.

The convention of MFU (PaLM, MaxText): model FLOPs are the matmul and convolution FLOPs of
the forward pass (2 per multiply-add), and a training step costs 3x the forward (the backward
computes two matmuls per forward matmul). Rematerialization is not counted: it is overhead,
not model work. Elementwise ops, softmax and norms are not counted either.

Counting the traced program rather than a formula per architecture covers every tower
(ViT, ModifiedResNet, text), scanned layers (times the scan length) and any attention that
traces to einsums. A fused attention kernel (cuDNN) is an opaque call in the jaxpr, so
`clip_forward_flops` counts the model with XLA attention: the same model FLOPs.
"""

from __future__ import annotations

import math

import jax
import numpy as np

# Peak dense bf16 FLOP/s per device (per chip for TPUs) used for MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
    """The table's peak for a device (by device_kind), or None (the CPU: measure it instead)."""
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name]
    return None


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
    return 2 * math.prod(lhs) * rhs_free


def _conv_flops(eqn) -> int:
    (out,) = (v.aval.shape for v in eqn.outvars)
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # each output element: kernel window x (input features / groups) multiply-adds
    return 2 * math.prod(out) * (math.prod(rhs) // rhs[out_feature_dim])


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


MATMULS = ("dot_general", "conv_general_dilated")


def matmul_eqns(jaxpr, times: int = 1):
    """(eqn, times) for every dot_general and convolution `jaxpr` runs, `times` being how often
    it runs per call: scans multiply by their length; of a cond's branches only the dearest
    counts (one runs)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in MATMULS:
            yield eqn, times
        elif name == "cond":
            yield from matmul_eqns(max((b.jaxpr for b in eqn.params["branches"]), key=jaxpr_flops), times)
        elif name == "while":
            raise ValueError("a while loop's trip count is unknown: count FLOPs of a program without one")
        else:
            for inner in _sub_jaxprs(eqn.params):
                yield from matmul_eqns(inner, times * (eqn.params["length"] if name == "scan" else 1))


def eqn_flops(eqn) -> int:
    """FLOPs of one dot_general or convolution equation."""
    return _dot_flops(eqn) if eqn.primitive.name == "dot_general" else _conv_flops(eqn)


def jaxpr_flops(jaxpr) -> int:
    return sum(eqn_flops(eqn) * times for eqn, times in matmul_eqns(jaxpr))


def count_flops(fn, *args, **kwargs) -> int:
    """Matmul + convolution FLOPs of one call fn(*args) (arrays or ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)


def clip_forward_flops(model_name, batch: int) -> dict:
    """Forward FLOPs of a CLIP model (a preset name or a CLIP module) on `batch` pairs: image
    tower, text tower, the N x N logits; a ViT with every patch token kept.

    Returns {'image', 'text', 'logits', 'forward', 'train_step'} (train_step = 3 x forward).
    """
    from clip_jax.models import create_model, variable_shapes

    model = create_model(model_name, attn_impl="xla") if isinstance(model_name, str) else model_name
    size = model.config.vision.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), np.float32)
    tokens = jax.ShapeDtypeStruct((batch, model.config.text.context_length), np.int32)
    variables = variable_shapes(model)
    image = count_flops(lambda v, x: model.apply(v, x, method="encode_image"), variables, images)
    text = count_flops(lambda v, t: model.apply(v, t, method="encode_text"), variables, tokens)
    logits = 2 * batch * batch * model.config.embed_dim  # the global similarity matrix
    forward = image + text + logits
    return {"image": image, "text": text, "logits": logits, "forward": forward, "train_step": 3 * forward}


def method_train_flops(model, batch: int, method: str = "clip", config=None) -> float:
    """Model FLOPs of one training step of `method` on `batch` examples: what the method counts from
    the forward pass's parts (Method.train_flops; CLIP's: 3 x forward), given the run's config where the count
    depends on it (a video method's frames a clip)."""
    from clip_jax.methods import METHODS

    return METHODS.get(method).train_flops(clip_forward_flops(model, batch), config)
