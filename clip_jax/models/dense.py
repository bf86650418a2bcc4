"""Dense (per-patch) outputs of the towers: the shared parts.

Every module here declares exactly the params of the module it stands in for (same names, shapes
and place in the tree), so a tower's variables serve its pooled and its dense outputs alike:

  * ``DenseTransformer``: the ``Transformer`` stack (per layer or scanned) that also returns the
    outputs of chosen blocks (open_clip's ``forward_intermediates``) and may run its last block by
    MaskCLIP's value path (``ValueBlock``);
  * ``MAPValueHead``: SigLIP's MAP head applied per token by the same value path.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    LayerNorm,
    Mlp,
    ResidualAttentionBlock,
    Transformer,
    linear,
    normal,
    param_with_axes,
)

DENSE_FORMS = ("patch", "maskclip")


def check_form(form: str) -> str:
    if form not in DENSE_FORMS:
        raise ValueError(f"dense form {form!r} is not one of {DENSE_FORMS}: 'patch' (each patch token through the "
                         "tower's head) or 'maskclip' (MaskCLIP's value path of the last attention)")
    return form


def check_layers(layers: Sequence[int], depth: int) -> tuple:
    """1-based block indices -> a tuple, or a clear error."""
    if isinstance(layers, int):
        layers = (layers,)
    layers = tuple(int(i) for i in layers)
    if not layers or any(not 1 <= i <= depth for i in layers):
        raise ValueError(f"intermediate layers {layers} must be 1-based block indices in [1, {depth}] "
                         f"(this tower has {depth} blocks), e.g. layers=({max(1, depth // 2)}, {depth})")
    return layers


def to_grid(tokens, grid: int):
    """[N, grid * grid, D] patch tokens (row-major) -> [N, grid, grid, D]."""
    return tokens.reshape(tokens.shape[0], grid, grid, tokens.shape[-1])


def value_path(x, kernel, bias, out_kernel, out_bias, dtype):
    """Attention whose every query sees only its own token: out_proj(v(x)), x [..., width]."""
    width = x.shape[-1]
    v = linear(x.astype(dtype), kernel.reshape(width, -1).astype(dtype)) + bias.reshape(-1).astype(dtype)
    return linear(v, out_kernel.reshape(-1, out_kernel.shape[-1]).astype(dtype)) + out_bias.astype(dtype)


class ValueAttention(nn.Module):
    """MultiHeadAttention's params (in_proj_kernel [width, 3, heads, head_dim], ...) applied by the value
    path: out_proj(v(x)), no queries or keys (MaskCLIP's skip of the last attention)."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        head_dim = width // self.heads
        kernel = self.param("in_proj_kernel", param_with_axes(normal(width**-0.5), ("embed", None, "heads", "kv")),
                            (width, 3, self.heads, head_dim))
        bias = self.param("in_proj_bias", param_with_axes(nn.initializers.zeros, (None, "heads", "kv")),
                          (3, self.heads, head_dim))
        out_kernel = self.param("out_proj_kernel", param_with_axes(normal(width**-0.5), ("heads", "kv", "embed")),
                                (self.heads, head_dim, width))
        out_bias = self.param("out_proj_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (width,))
        return value_path(x, kernel[:, 2], bias[2], out_kernel, out_bias, self.dtype)


class ValueBlock(ResidualAttentionBlock):
    """A ResidualAttentionBlock's params run as MaskCLIP runs the last block: x + out_proj(v(ln_1(x))),
    then + mlp(ln_2(.)) (its `return_qkv` branch: v += x; v = ffn(norm2(v), identity=v))."""

    @nn.compact
    def __call__(self, x, query_index=None, kv_lengths=None):
        del query_index, kv_lengths  # every row, and no attention
        width = x.shape[-1]
        y = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_1")(x)
        x = x + ValueAttention(self.heads, self.dtype, name="attn")(y)
        y = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_2")(x)
        return x + Mlp(int(width * self.mlp_ratio), self.quick_gelu, self.dtype, act=self.act, name="mlp")(y)


class DenseTransformer(Transformer):
    """The Transformer's params (use it under the name 'transformer'), called as
    (x, collect=(i, ...), value_last) -> (last output computed, [output of block i for i in collect]):
    1-based block indices; without value_last the stack stops after the last block collected.
    Scanned stacks run their slice of the stacked params in scanned pieces between the collected blocks."""

    @nn.compact
    def __call__(self, x, collect: Sequence[int] = (), value_last: bool = False):
        collect = tuple(collect)
        stop = self.layers if value_last or not collect else max(collect)
        full = self.layers - 1 if value_last else stop  # blocks run in full
        ends = sorted({i for i in collect if i <= full} | {full})
        outs = {}
        kwargs = self._block_kwargs()
        if self.scan:
            params = self.param("resblocks", self._init_stack(x))
            block = self.Block(**kwargs, parent=None)
            step = lambda h, p: (block.apply({"params": p}, h), None)  # noqa: E731
            start = 0
            for end in ends:
                if end > start:
                    x = jax.lax.scan(step, x, jax.tree.map(lambda p, a=start, b=end: p[a:b], params))[0]
                outs[end], start = x, end
            if value_last:
                last = jax.tree.map(lambda p: p[-1], params)
                x = ValueBlock(**kwargs, parent=None).apply({"params": last}, x)
        else:
            for i in range(full):
                x = self.Block(**kwargs, name=f"resblocks_{i}")(x)
                outs[i + 1] = x
            if value_last:
                x = ValueBlock(**kwargs, name=f"resblocks_{self.layers - 1}")(x)
        return x, [outs[i] for i in collect]

    def _init_stack(self, x):
        """Transformer's stacked init (the same tree, for an init through a dense method)."""
        block = self.Block(**self._block_kwargs(), parent=None)

        def init(rng):
            stacked = jax.vmap(lambda key: block.init(key, x[:1])["params"])(jax.random.split(rng, self.layers))
            return jax.tree.map(lambda p: p.add_axis(0, {nn.PARTITION_NAME: "layers"}), stacked,
                                is_leaf=lambda p: isinstance(p, nn.meta.AxisMetadata))

        return init


class MAPValueAttention(nn.Module):
    """vit.AttentionalPooler's params (layer_norms=False, as SigLIP's MAP head) applied per token by the
    value path: each token's own out_proj(v(token)), what the probe gets from a token it attends to alone."""

    d_model: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        context_dim, head_dim = x.shape[-1], self.d_model // self.heads
        self.param("query", param_with_axes(normal(1.0), (None, "embed")), (1, self.d_model))

        def proj(name, dim_in):
            return self.param(name, param_with_axes(normal(dim_in**-0.5), ("embed", "heads", "kv")),
                              (dim_in, self.heads, head_dim))

        proj("q_proj_kernel", self.d_model)
        proj("k_proj_kernel", context_dim)
        v_kernel = proj("v_proj_kernel", context_dim)
        bias = self.param("in_proj_bias", param_with_axes(nn.initializers.zeros, (None, "heads", "kv")),
                          (3, self.heads, head_dim))
        out_kernel = self.param("out_proj_kernel", param_with_axes(normal(self.d_model**-0.5),
                                                                   ("heads", "kv", "embed")),
                                (self.heads, head_dim, self.d_model))
        out_bias = self.param("out_proj_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (self.d_model,))
        return value_path(x, v_kernel, bias[2], out_kernel, out_bias, self.dtype)


class MAPValueHead(nn.Module):
    """siglip.MAPHead's params applied to every token [N, L, D] -> [N, L, D]: y = out_proj(v(token)),
    then y + MLP(LN(y)), the head's output had the probe attended to that token alone."""

    heads: int
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    act: str = "gelu_tanh"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = MAPValueAttention(width, self.heads, self.dtype, name="attn")(x)
        y = LayerNorm(self.dtype, eps=self.ln_eps, name="ln")(x)
        return x + Mlp(int(width * self.mlp_ratio), dtype=self.dtype, act=self.act, name="mlp")(y)
