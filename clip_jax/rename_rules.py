"""Tables that turn a model's variables into another library's flat named tensors and back (the SigLIP
layouts: transformers' SiglipModel, big_vision's .npz).

A table is a list of ``Rule``s. Each names some of clip_jax's variables (paths under 'params' in the
per-layer form, ``resblocks_{i}``) and the external tensors they become, with the functions both ways.
The external shapes a model expects come from the same functions (``jax.eval_shape``), so the import's
strict key check and the export cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple


@dataclasses.dataclass(frozen=True)
class Rule:
    """`paths` (clip_jax variables, under 'params') <-> `keys` (external tensors). ``out``: the paths'
    arrays -> the keys' arrays; ``into``: the keys' arrays -> the paths' arrays (jnp functions)."""

    paths: tuple
    keys: tuple
    out: Callable[..., tuple]
    into: Callable[..., tuple]


def same(path: Path, key: str, shape_out: Optional[tuple] = None, shape_in: Optional[tuple] = None) -> Rule:
    """One tensor under another name, reshaped to `shape_out` going out and `shape_in` coming in."""
    return Rule((path,), (key,), lambda x: (x if shape_out is None else x.reshape(shape_out),),
                lambda y: (y if shape_in is None else y.reshape(shape_in),))


def unscanned_shapes(model) -> dict[Path, Any]:
    """{path under 'params': ShapeDtypeStruct} of the model in its per-layer form."""
    from clip_jax.models import variable_shapes

    shapes = variable_shapes(model.clone(scan=False) if model.scan else model)
    return traverse_util.flatten_dict(shapes["params"])


def expected_shapes(model, rules: list[Rule]) -> dict[str, tuple]:
    """The external tensors' names and shapes for `model`; every variable must be covered exactly once."""
    shapes = unscanned_shapes(model)
    covered = [p for r in rules for p in r.paths]
    if sorted(map(str, covered)) != sorted(map(str, shapes)):
        missed = sorted("/".join(p) for p in set(shapes) - set(covered))
        unknown = sorted("/".join(p) for p in set(covered) - set(shapes))
        raise ValueError(f"the table does not cover this model's variables: not mapped {missed[:8]}, "
                         f"not in the model {unknown[:8]}")
    out = {}
    for rule in rules:
        results = jax.eval_shape(rule.out, *(shapes[p] for p in rule.paths))
        out.update({k: tuple(r.shape) for k, r in zip(rule.keys, results)})
    return out


def to_external(model, variables, rules: list[Rule]) -> dict[str, np.ndarray]:
    """clip_jax variables -> {external name: numpy array}; an error where they are not this model's."""
    from clip_jax import convert

    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)["params"])))
    flat = convert.unstack_layers(flat)
    want = {p: tuple(s.shape) for p, s in unscanned_shapes(model).items()}
    got = {p: tuple(np.shape(v)) for p, v in flat.items()}
    if got != want:
        bad = sorted("/".join(p) for p in set(got) ^ set(want)) or sorted(
            "/".join(p) for p in got if got[p] != want[p])
        raise ValueError(f"the variables are not this model's: first differing {bad[:8]}")
    out = {}
    for rule in rules:
        results = rule.out(*(jnp.asarray(flat[p]) for p in rule.paths))
        out.update({k: np.array(r, order="C") for k, r in zip(rule.keys, results)})
    return out


def from_external(model, tensors: Mapping[str, Any], rules: list[Rule], where: str, only=None,
                  ignored: Iterable[str] = ()) -> dict:
    """{external name: array} -> clip_jax variables {'params': ...} (numpy float32) of `model`, strict:
    ValueError naming every missing, unexpected and mis-shaped tensor (`ignored` names are dropped).
    `only`: a predicate on variable paths ('params', ...): read those variables only."""
    from clip_jax import convert

    expected = expected_shapes(model, rules)
    given = {k: v for k, v in tensors.items() if k not in set(ignored)}
    if only is not None:
        rules = [r for r in rules if all(only(("params",) + p) for p in r.paths)]
        expected = {k: expected[k] for r in rules for k in r.keys}
    missing, extra, wrong = convert.mismatches(given, expected, strict=only is None)
    if missing or extra or wrong:
        lines = [f"{where} do not match the model:"]
        for title, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong)):
            if items:
                lines.append(f"  {title}: {convert.listed(items)}")
        raise ValueError("\n".join(lines))
    flat = {}
    for rule in rules:
        results = rule.into(*(jnp.asarray(np.asarray(given[k], np.float32)) for k in rule.keys))
        flat.update({p: np.asarray(r, np.float32) for p, r in zip(rule.paths, results)})
    if model.scan:
        flat = convert.stack_layers(flat)
    return {"params": traverse_util.unflatten_dict(flat)}


# -- rules for clip_jax's shared blocks ----------------------------------------------------------------
def dense(path: Path, weight: str, bias: Optional[str], transpose: bool = True) -> list[Rule]:
    """A Dense's kernel [in, out] (and bias) <-> a torch Linear's weight [out, in] (transpose) or a flax one."""
    t = (lambda x: x.T) if transpose else (lambda x: x)
    rules = [Rule((path + ("kernel",),), (weight,), lambda k: (t(k),), lambda w: (t(w),))]
    if bias is not None:
        rules.append(same(path + ("bias",), bias))
    return rules


def layer_norm(path: Path, scale: str, bias: str) -> list[Rule]:
    return [same(path + ("scale",), scale), same(path + ("bias",), bias)]


def split_qkv(path: Path, weights: tuple, biases: tuple, heads: int, torch: bool) -> list[Rule]:
    """A block's fused in_proj_kernel [D, 3, H, hd] / in_proj_bias [3, H, hd] <-> three projections q, k,
    v: torch Linears ([D, D] weights [out, in], [D] biases) or flax DenseGenerals ([D, H, hd], [H, hd])."""
    if not torch:
        return [Rule((path + ("in_proj_kernel",),), weights, lambda k: tuple(k[:, i] for i in range(3)),
                     lambda *ws: (jnp.stack(ws, axis=1),)),
                Rule((path + ("in_proj_bias",),), biases, lambda b: tuple(b[i] for i in range(3)),
                     lambda *bs: (jnp.stack(bs),))]

    def out_k(k):
        d = k.shape[0]
        return tuple(k[:, i].reshape(d, d).T for i in range(3))

    def into_k(*ws):
        d = ws[0].shape[1]
        return (jnp.stack([w.T.reshape(d, heads, d // heads) for w in ws], axis=1),)

    return [Rule((path + ("in_proj_kernel",),), weights, out_k, into_k),
            Rule((path + ("in_proj_bias",),), biases, lambda b: tuple(b[i].reshape(-1) for i in range(3)),
                 lambda *bs: (jnp.stack([b.reshape(heads, -1) for b in bs]),))]


def out_proj(path: Path, weight: str, bias: str, heads: int, torch: bool) -> list[Rule]:
    """An attention's out_proj_kernel [H, hd, D] (and bias) <-> a torch Linear's [D, H * hd] weight
    ([out, in]) or a flax DenseGeneral's [H, hd, D] kernel."""
    if not torch:
        return [same(path + ("out_proj_kernel",), weight), same(path + ("out_proj_bias",), bias)]
    return [Rule((path + ("out_proj_kernel",),), (weight,), lambda k: (k.reshape(-1, k.shape[-1]).T,),
                 lambda w: (w.T.reshape(heads, -1, w.shape[0]),)),
            same(path + ("out_proj_bias",), bias)]
