"""Building blocks shared by the towers: LayerNorm, attention, MLP, residual Transformer.

Conventions:
  * params are float32; ``dtype`` is the compute dtype (float32 or bfloat16);
  * every parameter carries logical axis names (see ``clip_jax.models.AXES``) so the
    trainer can shard it over a mesh by rules, without the layers knowing the mesh;
  * the Transformer stack can be scanned over layers (params get a leading 'layers'
    axis, compile time flat in depth) and rematerialized by a named policy;
  * "heads-major" is the layout [batch, heads, length, head_dim] that XLA's per-head batched
    dots take as is; cuDNN's attention takes [batch, length, heads, head_dim].

Measurements behind the hand-written backwards here are in docs/performance.md.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# Activations name their axes too, with names of their own (a weight's 'embed' is sharded over
# 'fsdp'; an activation's embed dim never is): the trainer maps them to mesh axes
# (clip_jax.parallel.sharding.ACTIVATION_RULES) while it traces the step. Without that context
# (evaluation, export, tests) a constraint is a no-op.
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, KV, MLP = "activation_heads", "activation_kv", "activation_mlp"


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize semantics (divide by max(norm, eps)), computed in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def constrain(x, names):
    """Pin an activation's layout by logical axis names (None: not sharded). Without it XLA's
    propagation may take a weight's layout for an activation: under FSDP it then gathers the
    batch to split the embed dim, and every chip holds and computes far more than its share."""
    return nn.with_logical_constraint(x, names)


# Remat policies by name: 'none' keeps every activation (no remat), 'full' saves nothing,
# anything else is looked up in jax.checkpoint_policies (e.g. 'dots_with_no_batch_dims_saveable').
def remat_policy(name: str):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        raise ValueError(
            f"unknown remat policy {name!r}: use 'none', 'full' or a name in jax.checkpoint_policies "
            "such as 'dots_with_no_batch_dims_saveable'"
        )
    # Policies that take arguments (save_only_these_names, ...) are factories; callers pass the
    # finished policy through code, not config names.
    return policy


def quick_gelu(x):
    """OpenAI's approximation x * sigmoid(1.702 x); their released weights were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


@jax.custom_vjp
def gelu(x):
    """torch.nn.GELU's default, the exact erf form (not the tanh approximation), in torch's own
    formula x/2 (1 + erf(x/sqrt 2)). jax.nn.gelu's erfc form is as exact but XLA expands erfc
    into two polynomial branches, an exp and divides, and its gradient keeps more residuals.

    The backward keeps only x and takes the derivative Phi(x) + x phi(x) from it, with Phi
    written through erfc so that XLA cannot share it with the forward's erf: shared, the erf
    tensor was written out for the backward and the forward took two passes. Both choices
    shrink the training step's temporaries.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.5**0.5))  # Python floats: x's dtype is kept


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * jax.lax.erfc(xf * -(0.5**0.5))  # = (1 + erf(x / sqrt 2)) / 2
    pdf = jnp.exp(-0.5 * xf * xf) * (2 * jnp.pi) ** -0.5
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_tanh(x):
    """GELU's tanh approximation (flax's nn.gelu default, torch's approximate='tanh'): SigLIP's towers."""
    return jax.nn.gelu(x, approximate=True)


# The MLP activations by name (a block's ``act``; '' keeps the quick_gelu flag's choice).
ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


def activation(quick: bool, act: str = "") -> Callable:
    if act:
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}: use one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act]
    return quick_gelu if quick else gelu


def drop_path(module: nn.Module, y, rate: float, train: bool):
    """Stochastic depth: a residual branch `y` zeroed per example with probability `rate` in training, the kept
    ones scaled by 1 / (1 - rate) (timm's DropPath), from the module's 'dropout' rng."""
    if not train or not rate:
        return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, 0).astype(y.dtype)


def drop_path_rates(rate: float, blocks: int) -> list:
    """Each block's stochastic depth, rising linearly from 0 to `rate` at the last (Swin's, GroupViT's)."""
    return np.linspace(0.0, rate, blocks).tolist()


def param_with_axes(init, axes):
    return nn.with_logical_partitioning(init, axes)


def normal(std: float):
    return nn.initializers.normal(stddev=std)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float = 1e-5):
    """LayerNorm over the last axis as PyTorch computes it: float32 statistics, the variance
    as the mean of squared deviations (two passes, not E[x^2] - E[x]^2), the result in x's dtype.

    The backward pass is written out (the closed form of the LayerNorm gradient) so it keeps
    only x and two per-row statistics: autodiff of the forward formula kept more full-size
    residuals.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    centred = xf - mean
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    y = centred * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):
    x, mean, rstd, scale = residuals
    normed = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    rows = tuple(range(g.ndim - 1))
    g_normed = g * scale.astype(jnp.float32)
    # d/dx of (x - mean) * rstd: remove the gradient's mean and its projection on the normed row
    dx = rstd * (g_normed - g_normed.mean(-1, keepdims=True)
                 - normed * (g_normed * normed).mean(-1, keepdims=True))
    dscale = (g * normed).sum(rows).astype(scale.dtype)
    dbias = g.sum(rows).astype(scale.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def linear(x, kernel):
    """x [..., in] @ kernel [in, *out] -> [..., *out], with a backward whose weight gradient is
    one dot contracting the rows of x and of the incoming gradient as they are laid out.

    Autodiff of a dot_general computes the weight gradient as dot(dy, x) and transposes the
    result, and XLA:CPU turns that into a transposed copy of an activation before the dot (a
    [rows, width] activation written column by column). Here dW = x^T dy is asked for directly
    (contracting dim 0 of both), which XLA:CPU runs as one dot with no copy. Same values as
    autodiff (tested).
    """
    return _linear_fwd(x, kernel)[0]


def _linear_fwd(x, kernel):
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y, (x, kernel)


def _linear_bwd(residuals, dy):
    x, kernel = residuals
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(x2.shape[0], -1)
    kernel2 = kernel.reshape(kernel.shape[0], -1)
    dx = jax.lax.dot_general(dy2, kernel2, (((1,), (1,)), ((), ())))
    dkernel = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
    """nn.Dense's params (``kernel`` [in, out], ``bias`` [out], float32) and result, computed by
    ``linear`` in ``dtype``."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return linear(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with PyTorch's eps 1e-5 and float32 params ``scale``/``bias`` (flax's
    nn.LayerNorm's names, so checkpoints and converters see the same tree); output in ``dtype``."""

    dtype: Dtype = jnp.float32
    axis_name: str = "embed"
    eps: float = 1e-5  # BERT's is 1e-12

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, (self.axis_name,)), (width,))
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, (self.axis_name,)), (width,))
        # statistics of x as given (a float32 input is not rounded to bf16 first), as flax's did
        return layer_norm(x, scale, bias, self.eps).astype(self.dtype)


# cuDNN's fused attention takes sequence lengths that are multiples of this (not 197 or 77).
CUDNN_SEQ_MULTIPLE = 8
# attn_impl values: None and 'auto' choose (see attention_impl); 'xla' and 'cudnn' force a kernel.
ATTN_IMPLS = (None, "auto", "xla", "cudnn")


def attention_impl(requested: Optional[str], q) -> str:
    """The jax.nn.dot_product_attention implementation to use: 'auto'/None picks cuDNN's fused
    kernel where it applies (NVIDIA GPU, 16-bit inputs, head dim a multiple of 8 up to 128),
    XLA's everywhere else (CPU, TPU, float32)."""
    if requested not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {requested!r}: use 'auto', 'xla' or 'cudnn'")
    backend = jax.default_backend()
    on_gpu = backend in ("gpu", "cuda")
    if requested == "cudnn" and not on_gpu:
        raise ValueError(f"attn_impl='cudnn' needs an NVIDIA GPU (this backend is {backend!r}): use 'auto' or 'xla'")
    if requested in ("xla", "cudnn"):
        return requested
    head_dim = q.shape[-1]
    if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def padded_attention(q, k, v, causal: bool, implementation: str, multiple: int = CUDNN_SEQ_MULTIPLE,
                     kv_lengths=None):
    """Attention over [batch, length, heads, head_dim] with the length padded up to `multiple`.

    Padded keys are masked out by ``key_value_seq_lengths`` (or, causally, are never seen
    by a real query); padded query rows are sliced off. Equal to unpadded attention.
    """
    length = q.shape[1]
    pad = -length % multiple
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                            implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    lengths = kv_lengths if kv_lengths is not None else (None if causal else jnp.full((q.shape[0],), length, jnp.int32))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :length]


def take_rows(x, index):
    """x [batch, length, ...] -> [batch, 1, ...]: row index[b] of each sequence (the pooled token)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)


def attention(q, k, v, causal: bool, implementation: Optional[str] = None, kv_lengths=None):
    """Scaled dot-product attention over [batch, length, heads, head_dim] by the chosen (or
    automatic) implementation: cuDNN's fused kernel, or XLA's (``heads_major_attention``, so
    its bf16 backward takes bf16 dots as the layers' own XLA path does). ``kv_lengths`` [batch]:
    only keys before it are seen (a padding mask)."""
    if attention_impl(implementation, q) == "cudnn":
        try:
            return padded_attention(q, k, v, causal, "cudnn", kv_lengths=kv_lengths)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            if implementation == "cudnn":  # asked for by name: no silent fallback
                raise
            # chosen automatically: an old cuDNN or an unsupported shape falls back to XLA
            warnings.warn(f"cuDNN attention unavailable ({e}); using XLA's")
    swap = (0, 2, 1, 3)  # [batch, length, heads, head_dim] <-> heads_major_attention's layout
    return heads_major_attention(q.transpose(swap), k.transpose(swap), v.transpose(swap), causal,
                                 kv_lengths).transpose(swap)


@jax.custom_vjp
def attention_logits(q, k):
    """q [batch, heads, t, head_dim], k [batch, heads, s, head_dim] -> float32 logits [batch, heads, t, s].

    The dot accumulates in float32 for the float32 softmax. Its backward rounds the logits'
    gradient to the inputs' dtype and takes dq and dk as dots in that dtype (accumulating in
    float32), as fused attention kernels do: autodiff would meet the float32 cotangent by
    converting k and q to float32, two float32 matmuls per layer in a bf16 step. In float32 it
    is autodiff's backward exactly.
    """
    return jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)


def _attention_logits_fwd(q, k):
    return attention_logits(q, k), (q, k)


def _attention_logits_bwd(residuals, g):
    q, k = residuals
    g = g.astype(q.dtype)
    dq = jnp.einsum("bhts,bhsk->bhtk", g, k, preferred_element_type=jnp.float32).astype(q.dtype)
    dk = jnp.einsum("bhts,bhtk->bhsk", g, q, preferred_element_type=jnp.float32).astype(k.dtype)
    return dq, dk


attention_logits.defvjp(_attention_logits_fwd, _attention_logits_bwd)


def heads_major_attention(q, k, v, causal: bool, kv_lengths=None, dropout_rate: float = 0.0, dropout_rng=None):
    """XLA's attention over [batch, heads, length, head_dim]: what jax.nn.dot_product_attention's
    'xla' implementation computes (float32 logits scaled after the dot, softmax in float32, the
    probabilities in the input dtype), in the layout its batched dots want. ``kv_lengths``
    [batch]: only keys before it are seen (its ``key_value_seq_lengths``). With ``dropout_rng``,
    attention probabilities are dropped at ``dropout_rate`` and the rest scaled up (BERT's training).

    From [batch, length, heads, head_dim] XLA:CPU transposes q, k, v and the output around the
    per-head dots, forward and backward; ``heads_major_qkv`` writes q, k, v in this layout
    directly, so those transposes are never made.
    """
    logits = attention_logits(q, k) * q.shape[-1] ** -0.5
    if causal:
        length = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, jnp.finfo(jnp.float32).min)
    if kv_lengths is not None:
        seen = jnp.arange(logits.shape[-1]) < kv_lengths[:, None, None, None]
        logits = jnp.where(seen, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bhsk->bhtk", probs.astype(q.dtype), v)


@jax.custom_vjp
def heads_major_qkv(x, kernel, bias):
    """x [batch, length, width], kernel [width, 3, heads, head_dim], bias [3, heads, head_dim] ->
    q, k, v, each [batch, heads, length, head_dim].

    One [rows, width] x [width, 3 * width] matmul and a transpose to the heads-major layout. The
    backward writes dq, dk, dv back into one [rows, 3 * width] gradient in a single pass, then
    takes dx and dkernel as two plain matmuls (autodiff of three slices made a zero-padded
    [3, ...] copy of each of dq, dk and dv first).
    """
    return _heads_major_qkv_fwd(x, kernel, bias)[0]


def _heads_major_qkv_fwd(x, kernel, bias):
    qkv, residuals = _linear_fwd(x, kernel)
    qkv = (qkv + bias).transpose(2, 0, 3, 1, 4)
    return (qkv[0], qkv[1], qkv[2]), residuals


def _heads_major_qkv_bwd(residuals, grads):
    kernel = residuals[1]
    dqkv = jnp.stack(grads, axis=2).transpose(0, 3, 2, 1, 4)  # [batch, length, 3, heads, head_dim]
    # linear's backward, as 2-D matmuls: contracting several axes at once, XLA:CPU copied x and
    # dqkv transposed first. (With heads split over a 'tensor' mesh axis its reshape costs a
    # reshard; correct either way.)
    dx, dkernel = _linear_bwd(residuals, dqkv)
    # over the same 2-D rows (a 5-D sum made XLA write one more transposed copy of dqkv)
    dbias = dqkv.reshape(-1, kernel[0].size).sum(0, dtype=jnp.float32)
    return dx, dkernel, dbias.reshape(kernel.shape[1:]).astype(kernel.dtype)


heads_major_qkv.defvjp(_heads_major_qkv_fwd, _heads_major_qkv_bwd)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q/k/v projection (open_clip's in_proj) and an output projection.

    Kernels are stored per head ([embed, 3, heads, head_dim] and [heads, head_dim, embed])
    so a tensor-parallel axis can split heads; the layout maps 1:1 onto PyTorch's
    ``in_proj_weight`` [3*width, width] by a transpose and a reshape.
    """

    heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None  # None/'auto' (see attention_impl), 'xla' or 'cudnn'
    init_std: Optional[float] = None
    out_init_std: Optional[float] = None

    @nn.compact
    def __call__(self, x, query_index=None, kv_lengths=None):
        """x [batch, length, width] -> the same; with ``query_index`` [batch], only that row's output
        [batch, 1, width] (what a pooled last layer needs: ~1/length of the query-side work).
        ``kv_lengths`` [batch]: keys at and after it are padding, never attended to."""
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}")
        head_dim = width // self.heads
        std = self.init_std or width**-0.5
        qkv_kernel = self.param(
            "in_proj_kernel",
            param_with_axes(normal(std), ("embed", None, "heads", "kv")),
            (width, 3, self.heads, head_dim),
        )
        qkv_bias = self.param(
            "in_proj_bias", param_with_axes(nn.initializers.zeros, (None, "heads", "kv")), (3, self.heads, head_dim)
        )
        out_kernel = self.param(
            "out_proj_kernel",
            param_with_axes(normal(self.out_init_std or std), ("heads", "kv", "embed")),
            (self.heads, head_dim, width),
        )
        out_bias = self.param("out_proj_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (width,))

        return self_attention(x, qkv_kernel, qkv_bias, out_kernel, out_bias, causal=self.causal, dtype=self.dtype,
                              attn_impl=self.attn_impl, query_index=query_index, kv_lengths=kv_lengths)


def self_attention(x, kernel, bias, out_kernel, out_bias, *, causal: bool, dtype, attn_impl=None, query_index=None,
                   kv_lengths=None, dropout_rate: float = 0.0, dropout_rng=None):
    """Multi-head self-attention from its weights: x [batch, length, width], kernel [width, 3, heads,
    head_dim], bias [3, heads, head_dim], out_kernel [heads, head_dim, width] or [width, width],
    out_bias [width] -> [batch, length, width] (one row per sequence with ``query_index``).
    ``dropout_rng``: attention-probability dropout at ``dropout_rate`` (XLA's kernel then)."""
    width, head_dim = x.shape[-1], kernel.shape[-1]
    x = x.astype(dtype)
    kernel, bias = kernel.astype(dtype), bias.astype(dtype)
    per_head = jax.ShapeDtypeStruct((head_dim,), kernel.dtype)  # what attention_impl decides on
    dropout = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if query_index is not None:
        # One query row per sequence (the pooled token's), keys and values for all rows.
        # XLA's kernel always: a single query row is a small share of the layer's work.
        kv = jnp.einsum("btd,dchk->cbhtk", x, kernel[:, 1:]) + bias[1:, None, :, None]
        q = jnp.einsum("btd,dhk->bhtk", take_rows(x, query_index), kernel[:, 0]) + bias[0, :, None]
        kv, q = constrain(kv, (None, BATCH, HEADS, LENGTH, KV)), constrain(q, (BATCH, HEADS, LENGTH, KV))
        # causally, the query at position i sees the keys 0..i
        lengths = query_index.astype(jnp.int32) + 1 if causal else kv_lengths
        out = heads_major_attention(q, kv[0], kv[1], False, lengths, **dropout).transpose(0, 2, 1, 3)
    elif dropout_rng is not None or attention_impl(attn_impl, per_head) == "xla":
        q, k, v = heads_major_qkv(x, kernel, bias)
        q, k, v = (constrain(t, (BATCH, HEADS, LENGTH, KV)) for t in (q, k, v))
        out = heads_major_attention(q, k, v, causal, kv_lengths, **dropout).transpose(0, 2, 1, 3)
    else:
        qkv = jnp.einsum("btd,dchk->cbthk", x, kernel) + bias[:, None, None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k, v = (constrain(t, (BATCH, LENGTH, HEADS, KV)) for t in (q, k, v))
        out = attention(q, k, v, causal, attn_impl, kv_lengths)
    out = checkpoint_name(out, "attention")  # [batch, length, heads, head_dim]
    # heads and head_dim are adjacent: the projection is one [rows, width] x [width, width] matmul
    out = linear(out.reshape(out.shape[:2] + (width,)), out_kernel.reshape(width, width).astype(dtype))
    return out + out_bias.astype(dtype)


class Mlp(nn.Module):
    """width -> mlp_dim -> width with (Quick)GELU; open_clip's c_fc / c_proj."""

    mlp_dim: int
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    fc_std: Optional[float] = None
    proj_std: Optional[float] = None
    act: str = ""  # a name in ACTIVATIONS, over quick_gelu

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=param_with_axes(normal(self.fc_std or (2 * width) ** -0.5), ("embed", "mlp")),
            bias_init=param_with_axes(nn.initializers.zeros, ("mlp",)),
            name="c_fc",
        )(x)
        h = activation(self.quick_gelu, self.act)(h)
        h = constrain(h, (BATCH, LENGTH, MLP))
        h = checkpoint_name(h, "mlp_hidden")
        return Dense(
            width,
            dtype=self.dtype,
            kernel_init=param_with_axes(normal(self.proj_std or width**-0.5), ("mlp", "embed")),
            bias_init=param_with_axes(nn.initializers.zeros, ("embed",)),
            name="c_proj",
        )(h)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    depth: int = 12  # of the whole stack: scales the init of the residual projections
    act: str = ""  # the MLP's activation by name (ACTIVATIONS); '' follows quick_gelu
    ln_eps: float = 1e-5  # SigLIP's (flax's default) is 1e-6

    @nn.compact
    def __call__(self, x, query_index=None, kv_lengths=None):
        """[batch, length, width] -> the same; with ``query_index`` [batch] only that row's
        output, [batch, 1, width]: a last layer whose other rows nobody reads. ``kv_lengths``
        [batch]: a padding mask (keys from it on are not attended to)."""
        width = x.shape[-1]
        proj_std = width**-0.5 * (2 * self.depth) ** -0.5
        x = constrain(x, (BATCH, LENGTH, EMBED))
        y = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_1")(x)
        if query_index is not None:
            x = take_rows(x, query_index)
        x = x + MultiHeadAttention(
            self.heads, self.causal, self.dtype, self.attn_impl, out_init_std=proj_std, name="attn"
        )(y, query_index, kv_lengths)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        y = LayerNorm(self.dtype, eps=self.ln_eps, name="ln_2")(x)
        x = x + Mlp(int(width * self.mlp_ratio), self.quick_gelu, self.dtype, proj_std=proj_std, act=self.act,
                    name="mlp")(y)
        return constrain(x, (BATCH, LENGTH, EMBED))


class Transformer(nn.Module):
    """A stack of residual attention blocks, per layer (``resblocks_{i}``) or stacked (``resblocks``,
    every leaf with a leading 'layers' axis, applied by ``lax.scan``: compile time flat in depth).

    Called with ``pool_index`` [batch] (the token a tower pools: the class token, EOT), the last
    layer computes only that token's row (its keys and values still see every token) and the
    stack returns [batch, width]. The result is the same; the last layer costs ~1/6 of the others.
    """

    layers: int
    heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False
    act: str = ""
    ln_eps: float = 1e-5

    Block = ResidualAttentionBlock  # the layer; a subclass may stack another (BERT's post-LN layer)

    @classmethod
    def of_tower(cls, tower: nn.Module, causal: bool) -> "Transformer":
        """The stack of a tower module that has the same-named fields (layers, heads, dtype, ...)."""
        fields = ("layers", "heads", "mlp_ratio", "quick_gelu", "dtype", "attn_impl", "remat", "scan")
        optional = {f: getattr(tower, f) for f in ("act", "ln_eps") if hasattr(tower, f)}  # SigLIP's towers
        return cls(causal=causal, name="transformer", **{f: getattr(tower, f) for f in fields}, **optional)

    def _block_kwargs(self) -> dict:
        return dict(heads=self.heads, mlp_ratio=self.mlp_ratio, causal=self.causal, quick_gelu=self.quick_gelu,
                    dtype=self.dtype, attn_impl=self.attn_impl, depth=self.layers, act=self.act, ln_eps=self.ln_eps)

    def _draws_dropout(self) -> bool:
        """Whether the layers draw from the 'dropout' rng stream (a scanned stack hands each its key)."""
        return False

    @nn.compact
    def __call__(self, x, pool_index=None, kv_lengths=None, deep_prompts=None):
        """``kv_lengths`` [batch]: a padding mask for bidirectional stacks (None: every key seen).
        ``deep_prompts`` (values [layers, n, width], active [layers], start): at the input of each
        active layer, tokens start..start+n are replaced by that layer's values (MaPLe)."""
        if self.scan:
            x = self._scanned(x, pool_index, kv_lengths, deep_prompts)
        else:
            block = self.Block
            if self.remat != "none":
                block = nn.remat(block, policy=remat_policy(self.remat))
            for i in range(self.layers):
                if deep_prompts is not None:
                    x = replace_tokens(x, deep_prompts[0][i], deep_prompts[1][i], deep_prompts[2])
                query_index = pool_index if i == self.layers - 1 else None
                x = block(**self._block_kwargs(), name=f"resblocks_{i}")(x, query_index, kv_lengths)
        return x if pool_index is None else x[:, 0]

    def _scanned(self, x, pool_index, kv_lengths=None, deep_prompts=None):
        # One unbound block applied to each layer's slice of the stacked params: the same
        # params tree as flax's nn.scan, and the last layer may differ (pooled) from the rest.
        block = self.Block(**self._block_kwargs(), parent=None)

        def init_stack(rng):
            one = lambda key: block.init(key, x[:1])["params"]  # noqa: E731 (shapes need only one row)
            stacked = jax.vmap(one)(jax.random.split(rng, self.layers))
            return jax.tree.map(lambda p: p.add_axis(0, {nn.PARTITION_NAME: "layers"}), stacked,
                                is_leaf=lambda p: isinstance(p, nn.meta.AxisMetadata))

        params = self.param("resblocks", init_stack)
        keys = jax.random.split(self.make_rng("dropout"), self.layers) if self._draws_dropout() else None
        deep = None if deep_prompts is None else (deep_prompts[0], deep_prompts[1])
        start = None if deep_prompts is None else deep_prompts[2]

        def apply(h, p, key, prompt, query_index=None):
            if prompt is not None:
                h = replace_tokens(h, prompt[0], prompt[1], start)
            rngs = None if key is None else {"dropout": key}
            return block.apply({"params": p}, h, query_index, kv_lengths, rngs=rngs)

        if self.remat != "none":
            apply = jax.checkpoint(apply, policy=remat_policy(self.remat), prevent_cse=False)
        layer = lambda h, pk: (apply(h, *pk), None)  # noqa: E731
        xs = (params, keys, deep)
        if pool_index is None:
            return jax.lax.scan(layer, x, xs)[0]
        head, last = jax.tree.map(lambda p: p[:-1], xs), jax.tree.map(lambda p: p[-1], xs)
        x = jax.lax.scan(layer, x, head)[0]
        return apply(x, *last, pool_index)


def replace_tokens(x, values, active, start: int):
    """x [batch, length, width] with tokens start..start+n replaced by values [n, width] where
    `active` (a scalar), else x as it is."""
    n = values.shape[0]
    new = jax.lax.dynamic_update_slice_in_dim(
        x, jnp.broadcast_to(values.astype(x.dtype), (x.shape[0], n, x.shape[2])), start, axis=1)
    return jnp.where(active, new, x)
