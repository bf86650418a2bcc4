"""GroupViT's towers (Xu et al. 2022, "GroupViT: Semantic Segmentation Emerges from Text Supervision"), in
transformers' GroupViTModel's computation (the parity reference, tests/test_groupvit.py).

Image: a patch embedding with a bias, LayerNorm, learned positions (no class token); then stages. A stage
with group tokens appends them to the image tokens, runs its pre-LN blocks over both and ends in a grouping
block that merges the image tokens into its output groups (64 then 8 in the paper): the group tokens go
through LN, a token-mixing MLP to the output count and a post-LN cross-attention block to the image tokens;
each image token is then assigned to one group (AssignAttention: one head, softmax over the GROUP axis, a
hard one-hot straight-through, with Gumbel noise from the 'gumbel' rng stream in training), each group's
assignment is normalized over tokens with eps 1, and the groups become proj(assign @ v) + the projected
group tokens, then + MLP(LN(.)). A later stage's group tokens start at zero plus a mixer MLP of the previous
stage's. A last stage without group tokens runs blocks over the segments. Final LN, mean over the segments.
Text: CLIP's causal tower pooled at EOT. Both towers end in the projector Linear -> BatchNorm -> ReLU ->
Linear; its BatchNorm normalizes with the statistics of the whole batch in training (a mean over a batch
axis sharded under jit is the global mean: XLA reduces across the devices) and keeps PyTorch's running
statistics in 'batch_stats' for evaluation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Dense,
    Dtype,
    LayerNorm,
    Mlp,
    MultiHeadAttention,
    Transformer,
    constrain,
    drop_path,
    drop_path_rates,
    gelu,
    l2_normalize,
    normal,
    param_with_axes,
    remat_policy,
)
from clip_jax.models.text import check_tokens, embed_tokens
from clip_jax.models.vit import PatchEmbed, check_images

ASSIGN_EPS = 1.0  # each group's assignment is divided by (its sum over tokens + this)
ASSIGN_MLP_RATIO = (0.5, 4.0)  # the grouping block's token-mixing and channel MLPs, times the width
BN_MOMENTUM = 0.1  # PyTorch's BatchNorm1d default (SyncBN in the reference)
BN_EPS = 1e-5


def straight_through(y_soft, axis: int):
    """A one-hot of y_soft's argmax along `axis` in the forward pass, y_soft's gradient in the backward."""
    hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=axis), y_soft.shape[axis], dtype=y_soft.dtype, axis=axis)
    return hard - jax.lax.stop_gradient(y_soft) + y_soft


def hard_assign(logits, axis: int, noise=None, tau: float = 1.0):
    """The straight-through hard assignment along `axis`: of softmax((logits + noise) / tau) with Gumbel(0, 1)
    `noise` (training), of softmax(logits) without (evaluation)."""
    if noise is not None:
        logits = (logits + noise) / tau
    return straight_through(jax.nn.softmax(logits, axis=axis), axis)


def _dense(features: int, axes: tuple, dtype, name: str, std: Optional[float] = None) -> Dense:
    init = normal(std) if std else nn.initializers.lecun_normal()
    return Dense(features, dtype, kernel_init=param_with_axes(init, axes),
                 bias_init=param_with_axes(nn.initializers.zeros, axes[1:]), name=name)


class BatchNorm1d(nn.Module):
    """PyTorch's BatchNorm1d over the last axis: in training the batch's statistics (every leading axis,
    biased variance) and running averages updated with momentum 0.1 and the unbiased variance (where the
    'batch_stats' collection is mutable); in evaluation the running statistics."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        features = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, ("mlp",)), (features,))
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("mlp",)), (features,))
        mean_v = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        var_v = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        xf = x.astype(jnp.float32)
        if train:
            rows = xf.reshape(-1, features)
            mean = rows.mean(0)
            var = jnp.square(rows - mean).mean(0)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = rows.shape[0]
                mean_v.value = (1 - BN_MOMENTUM) * mean_v.value + BN_MOMENTUM * mean
                var_v.value = (1 - BN_MOMENTUM) * var_v.value + BN_MOMENTUM * var * (n / max(n - 1, 1))
                count.value = count.value + 1
        else:
            mean, var = mean_v.value, var_v.value
        y = (xf - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias
        return y.astype(self.dtype)


class Projector(nn.Module):
    """GroupViT's projector: Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)."""

    hidden: int
    out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = _dense(self.hidden, ("embed", "mlp"), self.dtype, "linear1")(x)
        x = nn.relu(BatchNorm1d(self.dtype, name="bn")(x, train))
        return _dense(self.out, ("mlp", None), self.dtype, "linear2")(x)


class GroupMlp(nn.Module):
    """fc1 -> exact GELU -> fc2, to `out` features (the input's by default); over the token axis with
    `mix_tokens` (GroupViT's MixerMlp: [N, tokens, C] -> [N, out, C])."""

    hidden: int
    out: int = 0
    mix_tokens: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.mix_tokens:
            x = x.swapaxes(1, 2)
        axes = (None, None) if self.mix_tokens else ("embed", "mlp")
        h = gelu(_dense(self.hidden, axes, self.dtype, "fc1")(x))
        x = _dense(self.out or x.shape[-1], axes[::-1], self.dtype, "fc2")(h)
        return x.swapaxes(1, 2) if self.mix_tokens else x


class CrossAttention(nn.Module):
    """Multi-head attention of queries [N, Q, C] over keys and values from `context` [N, K, C]."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        width = x.shape[-1]
        head_dim = width // self.heads
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, head_dim))  # noqa: E731
        q = split(_dense(width, ("embed", "mlp"), self.dtype, "q_proj")(x)) * head_dim**-0.5
        k = split(_dense(width, ("embed", "mlp"), self.dtype, "k_proj")(context))
        v = split(_dense(width, ("embed", "mlp"), self.dtype, "v_proj")(context))
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(x.shape[:2] + (width,))
        return _dense(width, ("mlp", "embed"), self.dtype, "out_proj")(out)


class CrossAttentionBlock(nn.Module):
    """The grouping block's post-norm cross-attention: x = q + attn(q, context); x + MLP(LN(x)); LN."""

    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, context):
        x = query + CrossAttention(self.heads, self.dtype, name="attn")(query, context)
        x = x + GroupMlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name="mlp")(
            LayerNorm(self.dtype, name="norm2")(x))
        return LayerNorm(self.dtype, name="norm_post")(x)


class AssignAttention(nn.Module):
    """Groups [N, G, C] take image tokens [N, T, C]: the hard assignment of each token to one group
    (one head), normalized over tokens, -> (proj(assignment @ v) [N, G, C], the soft assignment [N, G, T])."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, groups, tokens, train: bool):
        width = groups.shape[-1]
        q = _dense(width, ("embed", "mlp"), self.dtype, "q_proj")(groups)
        k = _dense(width, ("embed", "mlp"), self.dtype, "k_proj")(tokens)
        v = _dense(width, ("embed", "mlp"), self.dtype, "v_proj")(tokens)
        logits = jnp.einsum("bgc,btc->bgt", q, k).astype(jnp.float32) * width**-0.5
        noise = None
        if train:
            # the 'gumbel' stream where the caller gives one, else the towers' 'dropout' stream
            key = self.make_rng("gumbel") if self.has_rng("gumbel") else self.make_rng("dropout")
            noise = jax.random.gumbel(key, logits.shape, jnp.float32)
        assign = hard_assign(logits, axis=-2, noise=noise)
        assign = assign / (assign.sum(-1, keepdims=True) + ASSIGN_EPS)
        out = jnp.einsum("bgt,btc->bgc", assign.astype(self.dtype), v)
        return _dense(width, ("mlp", "embed"), self.dtype, "proj")(out), jax.nn.softmax(logits, axis=-2)


class GroupingBlock(nn.Module):
    """Image tokens [N, T, C] and group tokens [N, S1, C] -> (segments [N, S2, C], soft assignment [N, S2, T])."""

    output_groups: int
    heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, groups, train: bool):
        width = tokens.shape[-1]
        groups = LayerNorm(self.dtype, name="norm_tokens")(groups)
        tokens = LayerNorm(self.dtype, name="norm_x")(tokens)
        projected = GroupMlp(int(ASSIGN_MLP_RATIO[0] * width), self.output_groups, mix_tokens=True, dtype=self.dtype,
                             name="mlp_inter")(groups)
        projected = LayerNorm(self.dtype, name="norm_post_tokens")(projected)
        projected = CrossAttentionBlock(self.heads, self.mlp_ratio, self.dtype, name="pre_assign_attn")(projected,
                                                                                                          tokens)
        out, soft = AssignAttention(self.dtype, name="assign")(projected, tokens, train)
        out = out + projected
        out = out + GroupMlp(int(ASSIGN_MLP_RATIO[1] * width), dtype=self.dtype, name="mlp_channels")(
            LayerNorm(self.dtype, name="norm_new_x")(out))
        return out, soft


class Block(nn.Module):
    """A pre-LN block (CLIP's: ln_1, attn, ln_2, mlp) with stochastic depth at `drop_path` in training."""

    heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None

    def _dropped(self, y, train: bool):
        return drop_path(self, y, self.drop_path, train)

    @nn.compact
    def __call__(self, x, train: bool):
        x = constrain(x, (BATCH, LENGTH, EMBED))
        y = MultiHeadAttention(self.heads, False, self.dtype, self.attn_impl, name="attn")(
            LayerNorm(self.dtype, name="ln_1")(x))
        x = x + self._dropped(y, train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name="mlp")(LayerNorm(self.dtype, name="ln_2")(x))
        return x + self._dropped(y, train)


class GroupViTStage(nn.Module):
    """One stage: its group tokens (if any) appended, `depth` blocks, then the grouping block."""

    depth: int
    group_tokens: int
    output_groups: int
    prev_groups: int  # the previous stage's group tokens (0: none), mixed into this stage's
    heads: int
    mlp_ratio: float = 4.0
    drop_paths: Tuple[float, ...] = ()
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x, prev, train: bool):
        """x [N, T, C], prev [N, prev_groups, C] or None -> (x, this stage's group tokens or None,
        the soft assignment [N, output_groups, T] or None)."""
        width = x.shape[-1]
        n = self.group_tokens
        if n:
            mixed = bool(self.prev_groups)
            # zero where a projector of the previous stage's tokens adds to them (the reference's init)
            init = nn.initializers.zeros if mixed else nn.initializers.truncated_normal(0.02)
            group = self.param("group_token", param_with_axes(init, (None, "embed")), (n, width))
            group = jnp.broadcast_to(group.astype(self.dtype), (x.shape[0], n, width))
            if mixed:
                y = LayerNorm(self.dtype, name="projector_norm")(prev)
                group = group + GroupMlp(width // 2, n, mix_tokens=True, dtype=self.dtype, name="projector_mlp")(y)
            x = jnp.concatenate([x, group], axis=1)
        block = Block
        if self.remat != "none":  # train is a Python bool: static for the rematerialized call
            block = nn.remat(Block, policy=remat_policy(self.remat), static_argnums=(2,))
        for j in range(self.depth):
            x = block(self.heads, self.mlp_ratio, self.drop_paths[j] if self.drop_paths else 0.0, self.dtype,
                      self.attn_impl, name=f"blocks_{j}")(x, train)
        if not n:
            return x, None, None
        x, group = x[:, :-n], x[:, -n:]
        x, soft = GroupingBlock(self.output_groups, self.heads, self.mlp_ratio, self.dtype, name="grouping")(
            x, group, train)
        return x, group, soft


def check_stages(depths, group_tokens, output_groups):
    """A clear error for stage lists GroupViT cannot build."""
    if not depths or not (len(depths) == len(group_tokens) == len(output_groups)):
        raise ValueError(f"a GroupViT tower needs vision_cfg stage_depths, group_tokens and output_groups of one "
                         f"length per stage (paper: [6, 3, 3], [64, 8, 0], [64, 8, 8]); got {list(depths)}, "
                         f"{list(group_tokens)}, {list(output_groups)}")
    for i in range(1, len(depths)):
        if group_tokens[i] and group_tokens[i - 1] and output_groups[i - 1] != group_tokens[i - 1]:
            raise ValueError(f"stage {i} mixes the {group_tokens[i - 1]} group tokens of stage {i - 1} as "
                             f"output_groups[{i - 1}]={output_groups[i - 1]} of them (transformers' layout): make "
                             "them equal")


class GroupViTVisionTransformer(nn.Module):
    """images NHWC [N, S, S, 3], normalized as for every clip_jax tower -> features [N, output_dim] (not
    normalized). groups=True: a dict with them ('embeds'), the projected segment embeddings
    ('group_embeds' [N, G, output_dim]) and each grouping stage's soft assignment ('assignments', tuple of
    [N, groups, tokens]: the first over the patches, each next over the previous stage's segments)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    heads: int = 6
    mlp_ratio: float = 4.0
    stage_depths: Tuple[int, ...] = (6, 3, 3)
    group_tokens: Tuple[int, ...] = (64, 8, 0)
    output_groups: Tuple[int, ...] = (64, 8, 8)
    output_dim: int = 256
    projection_hidden: int = 4096
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, images, train: bool = False, pooled_too: bool = False, groups: bool = False, dense=None,
                 intermediates=None):
        if dense is not None or intermediates is not None:  # CLIP's encode_image_dense / _intermediates
            raise ValueError("a GroupViT image tower has no per-patch features in the joint space: its dense output "
                             "is its segments, clip_jax.models.groupvit.encode_groups (with methods.groupvit.segment)")
        check_images(images, self.image_size)
        check_stages(self.stage_depths, self.group_tokens, self.output_groups)
        grid = self.image_size // self.patch_size
        x = PatchEmbed(self.patch_size, self.width, self.dtype, use_bias=True, name="conv1")(
            images[:, : grid * self.patch_size, : grid * self.patch_size])
        x = LayerNorm(self.dtype, name="ln_embed")(x)
        pos = self.param("positional_embedding", param_with_axes(normal(0.02), (None, "embed")),
                         (grid * grid, self.width))
        x = constrain(x + pos.astype(self.dtype), (BATCH, LENGTH, EMBED))
        rates = drop_path_rates(self.drop_path, sum(self.stage_depths))
        prev, assignments, start = None, [], 0
        for i, depth in enumerate(self.stage_depths):
            stage = GroupViTStage(depth, self.group_tokens[i], self.output_groups[i],
                                  self.group_tokens[i - 1] if i else 0, self.heads, self.mlp_ratio,
                                  tuple(rates[start:start + depth]), self.dtype, self.attn_impl, self.remat,
                                  name=f"stages_{i}")
            x, prev, soft = stage(x, prev, train)
            start += depth
            if soft is not None:
                assignments.append(soft)
        x = LayerNorm(self.dtype, name="ln_post")(x)
        pooled = x.astype(jnp.float32).mean(1)
        projector = Projector(self.projection_hidden, self.output_dim, self.dtype, name="projection")
        features = projector(pooled, train)
        if groups:
            return {"embeds": features, "pooled": pooled, "group_embeds": projector(x, False),
                    "assignments": tuple(assignments)}
        return (pooled, features) if pooled_too else features


class GroupViTTextTransformer(nn.Module):
    """tokens int32 [N, T] -> text features [N, output_dim] (not normalized): CLIP's causal tower pooled at
    EOT (the largest id), then GroupViT's projector."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 256
    heads: int = 4
    layers: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 256
    projection_hidden: int = 4096
    quick_gelu: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: Optional[str] = None
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False, embeddings=None):
        check_tokens(tokens, self.context_length)
        x = embed_tokens(self, tokens, embeddings, pos_std=0.01)
        x = Transformer.of_tower(self, causal=True)(x, jnp.argmax(tokens, axis=-1))
        x = LayerNorm(self.dtype, name="ln_final")(x)
        return Projector(self.projection_hidden, self.output_dim, self.dtype, name="projection")(x, train)


def _check_projector(clip) -> int:
    if not clip.config.projection_hidden:
        raise ValueError("GroupViT's towers end in its MLP projector: set projection_hidden in the model config "
                         "(the paper's 4096)")
    return clip.config.projection_hidden


def vision_tower(clip) -> nn.Module:
    """The image tower of a CLIP module whose vision_cfg kind is 'groupvit'."""
    v = clip.config.vision
    if v.is_resnet or not v.patch_size:
        raise ValueError("a GroupViT image tower (vision_cfg kind 'groupvit') is a ViT: give patch_size and int layers")
    check_stages(v.stage_depths, v.group_tokens, v.output_groups)
    if sum(v.stage_depths) != v.layers:
        raise ValueError(f"vision_cfg layers={v.layers} must be the sum of stage_depths {list(v.stage_depths)}")
    if v.patch_dropout:
        raise ValueError(f"patch_dropout={v.patch_dropout}: the GroupViT image tower has no patch dropout; set it to 0")
    if not 0 <= v.drop_path < 1:
        raise ValueError(f"vision_cfg drop_path={v.drop_path} is a rate: give one in [0, 1) (the paper's 0.1)")
    return GroupViTVisionTransformer(
        image_size=v.image_size, patch_size=v.patch_size, width=v.width, heads=v.heads, mlp_ratio=v.mlp_ratio,
        stage_depths=tuple(v.stage_depths), group_tokens=tuple(v.group_tokens), output_groups=tuple(v.output_groups),
        output_dim=clip.config.embed_dim, projection_hidden=_check_projector(clip), drop_path=v.drop_path,
        dtype=clip.dtype, attn_impl=clip.attn_impl, remat=clip.remat)


def text_tower(clip) -> nn.Module:
    """The text tower of a CLIP module whose text_cfg kind is 'groupvit'."""
    t = clip.config.text
    return GroupViTTextTransformer(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=t.mlp_ratio, output_dim=clip.config.embed_dim, projection_hidden=_check_projector(clip),
        quick_gelu=clip.config.quick_gelu, dtype=clip.dtype, attn_impl=clip.attn_impl, remat=clip.remat,
        scan=clip.scan)


def encode_groups(model, variables, images) -> dict:
    """In evaluation mode: {'image_embeds' [N, E] and 'group_embeds' [N, G, E], unit-norm float32;
    'assignments', each grouping stage's soft assignment [N, groups, tokens]} of a GroupViT CLIP `model`."""
    if model.config.vision.kind != "groupvit":
        raise ValueError(f"encode_groups needs a GroupViT image tower (vision_cfg kind 'groupvit'), not "
                         f"{model.config.vision.kind!r}")
    out = model.apply(variables, images, method=lambda m, x: m.visual(x, train=False, groups=True))
    return {"image_embeds": l2_normalize(out["embeds"]), "group_embeds": l2_normalize(out["group_embeds"]),
            "assignments": out["assignments"]}
