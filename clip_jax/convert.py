"""OpenAI / open_clip state dict <-> clip_jax variables (import and export).

The exchange format is open_clip's state dict: keys like
``visual.transformer.resblocks.3.attn.in_proj_weight``, PyTorch layouts (Linear [out, in],
Conv OIHW). Every clip_jax leaf maps to exactly one state-dict tensor; a kernel is
stored as ``k.reshape(prod(in_dims), -1).T`` in PyTorch, so the inverse is a transpose
and a reshape to the Flax shape. Scanned models (params stacked on a 'layers' axis) are
unstacked to ``resblocks_{i}`` first, so one table serves both forms.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

# Keys of OpenAI's original checkpoints that are metadata, not tensors of the model.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Number of leading Flax kernel dims that are PyTorch's "in" dims, by leaf name.
_IN_DIMS = {
    "kernel": 1,  # nn.Dense [in, out]
    "in_proj_kernel": 1,  # [embed, 3, heads, head_dim] <-> in_proj_weight [3*embed, embed]
    "q_proj_kernel": 1,
    "k_proj_kernel": 1,
    "v_proj_kernel": 1,
    "out_proj_kernel": 2,  # [heads, head_dim, embed] <-> out_proj.weight [embed, embed]
    "c_proj_kernel": 2,  # attention-pool output [heads, head_dim, out]
    "query_kernel": 1,  # BERT's q/k/v [embed, heads, head_dim] <-> query.weight [embed, embed]
    "key_kernel": 1,
    "value_kernel": 1,
    "attention_output_kernel": 2,  # BERT's [heads, head_dim, embed] <-> attention.output.dense.weight
}

# The BERT text tower (clip_jax.models.bert) in Chinese-CLIP's keys, which are Hugging Face's
# BertModel keys under 'bert.': our name -> theirs, per layer and for the embeddings.
BERT_LAYER_KEYS = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm",
}
BERT_EMBEDDING_KEYS = {
    "word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings",
    "token_type_embeddings": "token_type_embeddings", "embeddings_norm": "LayerNorm",
}
# Keys of BERT checkpoints that are not part of the tower (pooler and pretraining heads, buffers).
_BERT_EXTRA = re.compile(r"^(bert\.pooler\.|cls\.|bert\.embeddings\.position_ids$)")


def _bert_key(key: str) -> str:
    """Our generic key of a BERT tower leaf (e.g. 'encoder.resblocks.3.query.weight') -> Chinese-CLIP's."""
    m = re.fullmatch(r"encoder\.resblocks\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        return f"bert.encoder.layer.{m.group(1)}.{BERT_LAYER_KEYS[m.group(2)]}.{m.group(3)}"
    name, leaf = key.rsplit(".", 1)
    return f"bert.embeddings.{BERT_EMBEDDING_KEYS[name]}.{leaf}"


# -- scan <-> per-layer ----------------------------------------------------------------
def unstack_layers(flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """'.../resblocks/...' leaves [L, ...] -> '.../resblocks_{i}/...' leaves."""
    out = {}
    for path, value in flat.items():
        if "resblocks" in path:
            i = path.index("resblocks")
            for layer in range(value.shape[0]):
                out[path[:i] + (f"resblocks_{layer}",) + path[i + 1 :]] = value[layer]
        else:
            out[path] = value
    return out


def stack_layers(flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """Inverse of ``unstack_layers``."""
    groups: dict[tuple, dict[int, Any]] = {}
    out = {}
    for path, value in flat.items():
        idx = next((i for i, p in enumerate(path) if re.fullmatch(r"resblocks_\d+", p)), None)
        if idx is None:
            out[path] = value
            continue
        key = path[:idx] + ("resblocks",) + path[idx + 1 :]
        groups.setdefault(key, {})[int(path[idx].split("_")[1])] = value
    for key, layers in groups.items():
        out[key] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out


# -- one leaf <-> one torch key ----------------------------------------------------------
def torch_key(path: tuple) -> str:
    """The open_clip state-dict key of a clip_jax variable path (unstacked form)."""
    collection, *rest = path
    if rest == ["logit_bias"]:  # open_clip's own name (SigLIP's bias), not a layer's '.bias'
        return "logit_bias"
    bert = False
    if rest[0] == "text":  # open_clip's CLIP keeps the text tower at the top level
        rest = rest[1:]
        bert = rest[0] == "encoder" or rest[0] in BERT_EMBEDDING_KEYS
    parts = []
    for p in rest:
        m = re.fullmatch(r"resblocks_(\d+)", p)
        m2 = re.fullmatch(r"layer(\d)_(\d+)", p)
        if m:
            parts += ["resblocks", m.group(1)]
        elif m2:
            parts += [f"layer{m2.group(1)}", m2.group(2)]
        elif p == "downsample_conv":
            parts += ["downsample", "0"]
        elif p == "downsample_bn":
            parts += ["downsample", "1"]
        elif p == "bn" and collection in ("params", "batch_stats"):
            continue  # our BatchNorm wrapper's inner module
        else:
            parts.append(p)
    leaf = parts[-1]
    parent = parts[:-1]
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    elif leaf in ("scale", "kernel", "embedding"):
        leaf = "weight"
    elif parent and parent[-1] == "attn_pool" and leaf != "query":  # its nn.MultiheadAttention
        parent = parent + ["attn"]
        leaf = {"out_proj_kernel": "out_proj.weight", "out_proj_bias": "out_proj.bias"}.get(
            leaf, leaf.replace("_kernel", "_weight")
        )
    elif parent and parent[-1] == "attn":  # MultiheadAttention's own names
        leaf = {"in_proj_kernel": "in_proj_weight", "out_proj_kernel": "out_proj.weight",
                "out_proj_bias": "out_proj.bias"}.get(leaf, leaf)
    elif leaf.endswith("_kernel"):
        leaf = leaf[: -len("_kernel")] + ".weight"
    elif leaf.endswith("_bias"):
        leaf = leaf[: -len("_bias")] + ".bias"
    key = ".".join(parent + [leaf])
    return _bert_key(key) if bert else key


def _in_dims(path: tuple) -> int | None:
    """How many leading dims of this kernel are PyTorch's input dims; None if the layout is shared."""
    leaf = path[-1]
    if path[0] != "params" or leaf not in _IN_DIMS:
        return None
    return _IN_DIMS[leaf]


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if path[-1] == "kernel" and value.ndim == 4:  # conv HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    n_in = _in_dims(path)
    if n_in is not None:
        return value.reshape(math.prod(value.shape[:n_in]), -1).T
    if path[0] == "batch_stats" and path[-1] == "num_batches_tracked":
        return value.astype(np.int64)
    if _is_bias(path, value.shape):
        return value.reshape(-1)
    return value


def from_torch_layout(path: tuple, value: np.ndarray, shape: tuple, dtype) -> np.ndarray:
    value = np.asarray(value)
    if path[-1] == "kernel" and len(shape) == 4:  # OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    elif _in_dims(path) is not None:
        value = value.T
    return value.reshape(shape).astype(dtype)


def torch_shape(path: tuple, shape: tuple) -> tuple:
    """PyTorch shape of a clip_jax leaf of ``shape``, computed without memory (same rules as above)."""
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    n_in = _in_dims(path)
    if n_in is not None:
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if _is_bias(path, shape):
        return (math.prod(shape),)
    return shape


def _is_bias(path: tuple, shape: tuple) -> bool:
    # Per-head biases [3, heads, head_dim] are flat vectors in PyTorch; logit_bias is a scalar.
    return len(shape) > 0 and path[0] == "params" and (path[-1] == "bias" or path[-1].endswith("_bias"))


# torch.nn.MultiheadAttention keeps separate q/k/v weights only when the key/value width
# differs from the query width; otherwise it fuses them into in_proj_weight.
_POOL = "visual.attn_pool.attn."
_POOL_QKV = [_POOL + f"{n}_proj_weight" for n in "qkv"]


def _fuse_pool_qkv(sd: dict) -> dict:
    """Separate pooler q/k/v weights -> fused in_proj_weight, where torch would fuse them."""
    if _POOL_QKV[0] not in sd:
        return sd
    is_shape = isinstance(sd[_POOL_QKV[0]], tuple)
    shape = (lambda v: v) if is_shape else np.shape
    if shape(sd[_POOL_QKV[0]]) == shape(sd[_POOL_QKV[1]]):
        sd = dict(sd)
        parts = [sd.pop(k) for k in _POOL_QKV]
        if is_shape:
            sd[_POOL + "in_proj_weight"] = (3 * parts[0][0], parts[0][1])
        else:
            sd[_POOL + "in_proj_weight"] = np.concatenate(parts, axis=0)
    return sd


def _split_pool_qkv(sd: dict) -> dict:
    if _POOL + "in_proj_weight" in sd:
        sd = dict(sd)
        for k, part in zip(_POOL_QKV, np.split(np.asarray(sd.pop(_POOL + "in_proj_weight")), 3, axis=0)):
            sd[k] = part
    return sd


# -- whole trees ---------------------------------------------------------------------
def expected_variables(shapes) -> dict[str, tuple[tuple, tuple, Any]]:
    """torch key -> (clip_jax path, flax shape, dtype) for the unstacked variables."""
    out = {}
    for path, s in traverse_util.flatten_dict(dict(shapes)).items():
        shape = tuple(s.shape)
        if "resblocks" in path:
            i = path.index("resblocks")
            for layer in range(shape[0]):
                p = path[:i] + (f"resblocks_{layer}",) + path[i + 1 :]
                out[torch_key(p)] = (p, shape[1:], s.dtype)
        else:
            out[torch_key(path)] = (path, shape, s.dtype)
    return out


def expected_state_dict_shapes(model) -> dict[str, tuple[int, ...]]:
    """The open_clip state-dict keys and PyTorch shapes this model imports/exports."""
    from clip_jax.models import variable_shapes

    return _fuse_pool_qkv({k: torch_shape(p, s) for k, (p, s, _) in expected_variables(variable_shapes(model)).items()})


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Unwrap training checkpoints ({'state_dict': ...}, 'module.' prefixes: Chinese-CLIP's too);
    drop OpenAI metadata and BERT's pooler, pretraining heads and buffers; a bare Hugging Face
    BertModel state dict ('embeddings.*', 'encoder.*') gets Chinese-CLIP's 'bert.' prefix."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    bare_bert = any(k.startswith("embeddings.word_embeddings.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if bare_bert and k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k
        if k in OPENAI_METADATA_KEYS or _BERT_EXTRA.match(k):
            continue
        if k == "logit.bias":  # clip_jax's exports before open_clip's name was kept
            k = "logit_bias"
        out[k] = v
    return out


def mismatches(given: Mapping[str, Any], expected: Mapping[str, tuple], strict: bool = True):
    """(missing, unexpected, mis-shaped) between named tensors and the names and shapes a model expects,
    each sorted; unexpected ones only where `strict`; a mis-shaped one as 'KEY: got S, expected S'."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected)) if strict else []
    wrong = [f"{k}: got {tuple(np.shape(given[k]))}, expected {tuple(expected[k])}"
             for k in sorted(set(expected) & set(given)) if tuple(np.shape(given[k])) != tuple(expected[k])]
    return missing, extra, wrong


def listed(items, shown: int = 12) -> str:
    """The first `shown` items, comma-separated, and how many there are in all where more."""
    items = list(items)
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def state_dict_to_variables(model, state_dict: Mapping[str, Any], only=None) -> dict:
    """open_clip/OpenAI state dict (numpy arrays) -> clip_jax variables (numpy, float32 params).

    Raises ValueError naming every missing, unexpected and mis-shaped key. With `only` (a
    predicate on variable paths, ('params', 'visual', ...)), only those variables are read: the
    first of them missing or mis-shaped is the error, and other keys are ignored.
    """
    from clip_jax.models import variable_shapes

    state_dict = _split_pool_qkv(clean_state_dict(state_dict))
    expected = expected_variables(variable_shapes(model))
    if only is not None:
        expected = {k: v for k, v in expected.items() if only(v[0])}
        for k, (path, shape, _) in sorted(expected.items(), key=lambda kv: kv[1][0]):
            name = "/".join(str(p) for p in path[1:])
            if k not in state_dict:
                raise ValueError(f"the weights have no {path[0]} {name!r} (key {k!r})")
            if tuple(np.shape(state_dict[k])) != torch_shape(path, shape):
                raise ValueError(f"{path[0]} {name!r} has shape {tuple(np.shape(state_dict[k]))} in the weights "
                                 f"(key {k!r}), the model's is {torch_shape(path, shape)}")
        state_dict = {k: state_dict[k] for k in expected}
    missing, extra, wrong = mismatches(state_dict, {k: torch_shape(p, shape) for k, (p, shape, _) in expected.items()})
    if missing or extra or wrong:
        name = getattr(model.config, "name", None) or "this model config"
        lines = [f"state dict does not match {name}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", wrong)):
            if items:
                lines.append(f"  {title}: {listed(items)}")
        bert_weights = any(k.startswith("bert.") for k in state_dict)
        bert_model = any(k.startswith("bert.") for k in expected)
        if bert_weights and not bert_model:
            lines.append("  these are Chinese-CLIP weights (a BERT text tower): load them with a cn-* model "
                         "(e.g. 'cn-ViT-B-16') or Chinese-CLIP's JSON")
        elif bert_model and not bert_weights:
            lines.append("  this model has a BERT text tower (Chinese-CLIP) but the weights do not: use the "
                         "matching CLIP model name (e.g. 'ViT-B-16')")
        else:
            lines.append("  (is it the right model name? '-quickgelu' only changes the activation, not the keys)")
        raise ValueError("\n".join(lines))
    flat = {}
    for k, (path, shape, dtype) in expected.items():
        flat[path] = from_torch_layout(path, np.asarray(state_dict[k]), shape, dtype)
    if model.scan:
        flat = stack_layers(flat)
    return traverse_util.unflatten_dict(flat)


def variables_to_state_dict(variables) -> dict[str, np.ndarray]:
    """clip_jax variables -> open_clip state dict (numpy, PyTorch layouts, contiguous)."""
    flat = traverse_util.flatten_dict(_to_numpy(variables))
    flat = unstack_layers(flat)
    # np.array(order="C") keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d).
    sd = {torch_key(p): np.array(to_torch_layout(p, v), order="C") for p, v in flat.items()}
    return _fuse_pool_qkv(sd)


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(tree))


# -- files ---------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """.safetensors (no torch needed) or .pt/.bin/.pth (needs torch; OpenAI's TorchScript archives too)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path!r} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path!r} needs PyTorch; install torch or convert the file to .safetensors"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's released .pt files
    obj = clean_state_dict(obj)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str, metadata: dict | None = None):
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.asarray(v) for k, v in state_dict.items()}, path, metadata=metadata)
