"""ModifiedResNet image tower of the CLIP paper (RN50, RN101, RN50x4, RN50x16, RN50x64).

Differences from a torchvision ResNet: a 3-conv stem with an average pool, anti-aliased
strided blocks (avgpool before the strided 1x1 conv), and an attention-pooling head
whose query is the mean of the spatial features.

BatchNorm statistics live in the ``batch_stats`` collection; ``train=True`` normalizes
with the batch statistics (the mean over the whole global batch when the batch is
sharded under jit) and updates the running averages (PyTorch momentum 0.1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.dense import check_form, to_grid, value_path
from clip_jax.models.layers import BATCH, Dtype, constrain, heads_major_attention, normal, param_with_axes
from clip_jax.models.vit import check_images


class BatchNorm(nn.Module):
    """nn.BatchNorm (eps 1e-5, momentum 0.1 as PyTorch) plus PyTorch's num_batches_tracked
    counter, kept so that an open_clip state dict round-trips bit for bit."""

    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train and not self.is_initializing():
            count.value = count.value + 1
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=param_with_axes(
                nn.initializers.zeros if self.zero_init else nn.initializers.ones, ("conv_out",)
            ),
            bias_init=param_with_axes(nn.initializers.zeros, ("conv_out",)),
            name="bn",
        )(x)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=[(kernel // 2, kernel // 2)] * 2,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=param_with_axes(nn.initializers.kaiming_normal(), (None, None, "conv_in", "conv_out")),
        name=name,
    )


def avg_pool(x, stride: int):
    return nn.avg_pool(x, (stride, stride), (stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out_planes = self.planes * 4
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(conv(self.planes, 1, self.dtype, "conv1")(x), train))
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(conv(self.planes, 3, self.dtype, "conv2")(out), train))
        out = avg_pool(out, self.stride)
        out = BatchNorm(zero_init=True, dtype=self.dtype, name="bn3")(
            conv(out_planes, 1, self.dtype, "conv3")(out), train
        )
        identity = x
        if self.stride > 1 or x.shape[-1] != out_planes:
            identity = conv(out_planes, 1, self.dtype, "downsample_conv")(avg_pool(x, self.stride))
            identity = BatchNorm(dtype=self.dtype, name="downsample_bn")(identity, train)
        return constrain(nn.relu(out + identity), (BATCH, None, None, None))


class AttentionPool2d(nn.Module):
    """QKV attention of the mean feature over [mean; all positions], with its own positions."""

    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, pooled_too: bool = False, dense: Optional[str] = None):
        """pooled_too: (the attention output before c_proj [N, C], the projected features). dense: every
        position of x through v_proj and c_proj, [N, h, w, output_dim]: 'maskclip' the feature map as it is
        (MaskCLIP's ResNet head), 'patch' with the pool's positional embedding added (the values it attends)."""
        n, h, w, c = x.shape
        if c % self.heads:
            raise ValueError(f"attention-pool width {c} is not divisible by heads {self.heads}")
        head_dim = c // self.heads
        std = c**-0.5
        spatial = x.reshape(n, h * w, c)
        x = jnp.concatenate([spatial.mean(axis=1, keepdims=True), spatial], axis=1)
        pos = self.param("positional_embedding", param_with_axes(normal(std), (None, "embed")), (h * w + 1, c))
        x = x + pos.astype(self.dtype)

        def proj(name):
            kernel = self.param(
                f"{name}_kernel", param_with_axes(normal(std), ("embed", "heads", "kv")), (c, self.heads, head_dim)
            )
            bias = self.param(
                f"{name}_bias", param_with_axes(nn.initializers.zeros, ("heads", "kv")), (self.heads, head_dim)
            )
            return kernel.astype(self.dtype), bias.astype(self.dtype)

        qk, qb = proj("q_proj")
        kk, kb = proj("k_proj")
        vk, vb = proj("v_proj")
        out_kernel = self.param(
            "c_proj_kernel", param_with_axes(normal(std), ("heads", "kv", None)),
            (self.heads, head_dim, self.output_dim)
        )
        out_bias = self.param("c_proj_bias", param_with_axes(nn.initializers.zeros, (None,)), (self.output_dim,))
        if dense is not None:
            tokens = x[:, 1:] if check_form(dense) == "patch" else spatial
            return to_grid(value_path(tokens, vk, vb, out_kernel, out_bias, self.dtype), h)
        # heads-major [batch, heads, length, head_dim]: heads_major_attention's layout
        q = jnp.einsum("btc,chk->bhtk", x[:, :1], qk) + qb[:, None]
        k = jnp.einsum("btc,chk->bhtk", x, kk) + kb[:, None]
        v = jnp.einsum("btc,chk->bhtk", x, vk) + vb[:, None]
        out = heads_major_attention(q, k, v, causal=False)[:, :, 0]
        projected = jnp.einsum("bhk,hko->bo", out, out_kernel.astype(self.dtype)) + out_bias.astype(self.dtype)
        return (out.reshape(n, c), projected) if pooled_too else projected


class ModifiedResNet(nn.Module):
    """images NHWC [N, S, S, 3] (normalized) -> image features [N, output_dim] (not normalized)."""

    layers: Sequence[int] = (3, 4, 6, 3)
    output_dim: int = 1024
    heads: int = 32
    image_size: int = 224
    width: int = 64
    dtype: Dtype = jnp.float32
    remat: str = "none"  # 'none' or 'full': rematerialize each bottleneck in the backward pass

    @nn.compact
    def __call__(self, images, train: bool = False, pooled_too: bool = False, dense: Optional[str] = None,
                 intermediates: Sequence[int] = ()):
        """pooled_too: (the attention pool's output before its projection [N, width * 32], features).
        dense ('patch' | 'maskclip'): [N, S/32, S/32, output_dim] per-position features (AttentionPool2d).
        intermediates (stage numbers, 1-based): the outputs of those stages, [N, S/2^(i+1), S/2^(i+1), width*2^(i+1)]
        for stage i, the stages after the last one asked for not run."""
        check_images(images, self.image_size)
        if self.image_size % 32:
            raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {self.image_size}")
        x = constrain(images.astype(self.dtype), (BATCH, None, None, None))
        for i, (features, stride) in enumerate([(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)], 1):
            x = conv(features, 3, self.dtype, f"conv{i}", stride)(x)
            x = constrain(nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train)), (BATCH, None, None, None))
        x = avg_pool(x, 2)
        block = Bottleneck
        if self.remat != "none":
            # train is a Python bool: static for the rematerialized call.
            block = nn.remat(Bottleneck, static_argnums=(2,))
        wanted = tuple(int(i) for i in intermediates)
        if wanted and not all(1 <= i <= len(self.layers) for i in wanted):
            raise ValueError(f"intermediates={wanted}: a ModifiedResNet's stages are 1..{len(self.layers)}")
        stages = []
        for stage, blocks in enumerate(self.layers[:max(wanted)] if wanted else self.layers):
            planes = self.width * 2**stage
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = block(planes, stride, self.dtype, name=f"layer{stage + 1}_{b}")(x, train)
            stages.append(x)
        if wanted:
            return [stages[i - 1] for i in wanted]
        return AttentionPool2d(self.heads, self.output_dim, self.dtype, name="attnpool")(x, pooled_too, dense)
