"""The CLIP two-tower model: image tower + text tower + learned temperature (and optional bias)."""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models import groupvit, swin
from clip_jax.models.bert import BertTextTower
from clip_jax.models.config import CLIPConfig
from clip_jax.models.dense import check_form
from clip_jax.models.layers import Dtype, l2_normalize, remat_policy
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.siglip import SiglipTextTransformer, SiglipVisionTransformer
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer
from clip_jax.registry import Registry

MAX_LOGIT_SCALE = math.log(100.0)  # CLIPConfig.max_logit_scale's default


def _resnet(clip: "CLIP") -> nn.Module:
    v = clip.config.vision
    if len(v.layers) != 4:
        raise ValueError(f"a ModifiedResNet needs 4 stage depths, got layers={v.layers}")
    if v.patch_dropout:
        raise ValueError(f"patch_dropout={v.patch_dropout} drops a ViT's patch tokens; this image tower is a "
                         "ModifiedResNet: pick a ViT preset (e.g. --config.model=ViT-Shapes-M) or set it to 0")
    return ModifiedResNet(layers=v.layers, output_dim=clip.config.embed_dim, heads=v.heads, image_size=v.image_size,
                          width=v.width, dtype=clip.dtype, remat="none" if clip.remat == "none" else "full")


def _vit(clip: "CLIP") -> nn.Module:
    v = clip.config.vision
    if not v.patch_size:
        raise ValueError("a ViT vision_cfg needs patch_size (or give 4 stage depths for a ResNet)")
    return VisionTransformer(
        image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads,
        mlp_ratio=v.mlp_ratio, output_dim=clip.config.embed_dim, pool_type=v.pool_type,
        attn_pooler_heads=v.attn_pooler_heads, patch_dropout=v.patch_dropout, quick_gelu=clip.config.quick_gelu,
        dtype=clip.dtype,
        attn_impl=clip.attn_impl, remat=clip.remat, scan=clip.scan)


# Image towers by VisionConfig.kind: each builds the tower from the CLIP module's config and options.
VISION_TOWERS: Registry = Registry("vision tower")
VISION_TOWERS.register("resnet")(_resnet)
VISION_TOWERS.register("vit")(_vit)


def _no_quick_gelu(clip: "CLIP"):
    if clip.config.quick_gelu:
        raise ValueError("SigLIP's towers compute GELU's tanh approximation (their weights were trained with it): "
                         "drop quick_gelu (and any '-quickgelu' suffix)")


def _siglip_vision(clip: "CLIP") -> nn.Module:
    v = clip.config.vision
    _no_quick_gelu(clip)
    if v.is_resnet or not v.patch_size:
        raise ValueError("a SigLIP image tower (vision_cfg kind 'siglip') is a ViT: give an int layers and patch_size")
    if clip.config.embed_dim != v.width:
        raise ValueError(f"a SigLIP image tower has no projection, so its embedding is its width {v.width}: set "
                         f"embed_dim={v.width} (got {clip.config.embed_dim})")
    if v.patch_dropout:
        raise ValueError(f"patch_dropout={v.patch_dropout}: the SigLIP image tower has no patch dropout; set it to 0")
    return SiglipVisionTransformer(
        image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads,
        mlp_ratio=v.mlp_ratio, dtype=clip.dtype, attn_impl=clip.attn_impl, remat=clip.remat, scan=clip.scan)


VISION_TOWERS.register("siglip")(_siglip_vision)
VISION_TOWERS.register("groupvit")(groupvit.vision_tower)
VISION_TOWERS.register("swin")(swin.vision_tower)


def _clip_text(clip: "CLIP") -> nn.Module:
    t = clip.config.text
    return TextTransformer(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=t.mlp_ratio, output_dim=clip.config.embed_dim, pool_type=t.pool_type,
        no_causal_mask=t.no_causal_mask, use_pad_mask=t.use_pad_mask, pad_id=t.pad_id,
        quick_gelu=clip.config.quick_gelu, dtype=clip.dtype, attn_impl=clip.attn_impl, remat=clip.remat, scan=clip.scan)


def _bert_text(clip: "CLIP") -> nn.Module:
    t = clip.config.text
    if t.context_length > t.max_positions:
        raise ValueError(f"text context_length {t.context_length} is above the position table (max_positions "
                         f"{t.max_positions}): tokenize to at most {t.max_positions} tokens (Chinese-CLIP: 52)")
    return BertTextTower(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=t.mlp_ratio, output_dim=clip.config.embed_dim, max_positions=t.max_positions,
        type_vocab_size=t.type_vocab_size, dropout=t.dropout, attn_dropout=t.attn_dropout, pad_id=t.pad_id,
        dtype=clip.dtype, attn_impl=clip.attn_impl, remat=clip.remat, scan=clip.scan)


# Text towers by TextConfig.kind.
TEXT_TOWERS: Registry = Registry("text tower")
TEXT_TOWERS.register("clip")(_clip_text)
TEXT_TOWERS.register("bert")(_bert_text)


def _siglip_text(clip: "CLIP") -> nn.Module:
    t = clip.config.text
    _no_quick_gelu(clip)
    return SiglipTextTransformer(
        context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        mlp_ratio=t.mlp_ratio, output_dim=clip.config.embed_dim, dtype=clip.dtype, attn_impl=clip.attn_impl,
        remat=clip.remat, scan=clip.scan)


TEXT_TOWERS.register("siglip")(_siglip_text)
TEXT_TOWERS.register("groupvit")(groupvit.text_tower)


def token_embedding_table(config: CLIPConfig, params) -> jnp.ndarray:
    """The text tower's token-embedding table [vocab, width] in `params` (the model's 'params')."""
    text = params["text"]
    return (text["word_embeddings"] if config.text.kind == "bert" else text["token_embedding"])["embedding"]


class CLIP(nn.Module):
    """CLIP with param tree {'visual': ..., 'text': ..., 'logit_scale': ()[, 'logit_bias': ()]}.

    Runtime options (not part of the architecture, so not in CLIPConfig):
      dtype: compute dtype (params stay float32); remat: 'none' | 'full' | a
      jax.checkpoint_policies name; scan: scan the Transformer layers; attn_impl: the
      attention kernel, 'auto' | 'xla' | 'cudnn' (layers.attention_impl).
    Embeddings come out L2-normalized, in float32.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    attn_impl: Optional[str] = None

    def setup(self):
        cfg = self.config
        if self.remat != "none":
            remat_policy(self.remat)  # fail early on a bad name
        self.visual = VISION_TOWERS.get(cfg.vision.kind)(self)
        self.text = TEXT_TOWERS.get(cfg.text.kind)(self)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.init_logit_scale), ()), ()
        )
        if cfg.init_logit_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(cfg.init_logit_bias), ()), ()
            )

    @property
    def is_resnet(self) -> bool:
        return self.config.vision.is_resnet

    def encode_image(self, images, train: bool = False, mask_patches: bool = True):
        """images NHWC [N, S, S, 3], normalized -> unit-norm float32 [N, embed_dim]. mask_patches=False:
        a training pass without a ViT's patch dropout (FLIP's unmasked tuning)."""
        return l2_normalize(self.visual(images, train=train if self.is_resnet else train and mask_patches))

    def image_features(self, images, train: bool = False, mask_patches: bool = True):
        """(the image tower's pooled features before its projection, float32 [N, width]: a ViT's pooled
        token, a ModifiedResNet's attention-pool output before c_proj; the unit-norm embedding)."""
        pooled, features = self.visual(images, train=train if self.is_resnet else train and mask_patches,
                                       pooled_too=True)
        return pooled.astype(jnp.float32), l2_normalize(features)

    def encode_image_dense(self, images, form: str = "patch"):
        """images NHWC [N, S, S, 3], normalized -> float32 [N, h, w, embed_dim] per-patch features in the joint
        space, NOT normalized (models/dense.py): 'patch' each patch token through the tower's head, 'maskclip'
        MaskCLIP's value path of the last attention (a ModifiedResNet: its attention pool's v and c projections,
        without ('maskclip') or with ('patch') the pool's positional embedding)."""
        return self.visual(images, dense=check_form(form)).astype(jnp.float32)

    def encode_image_intermediates(self, images, layers=(1,)):
        """images -> [[N, h, w, width] patch tokens (no class token) of the output of block i, for i in `layers`
        (1-based)], in the compute dtype, as open_clip's forward_intermediates (NHWC here). A ModifiedResNet:
        the outputs of its stages i (1..4, strides 4 to 32), BatchNorm in inference; a Swin tower likewise its
        stages' maps (strides 4 to 32)."""
        return self.visual(images, intermediates=layers)

    def encode_text_tokens(self, tokens):
        """tokens int32 [N, T] -> (float32 [N, T, embed_dim]: every position through the final LayerNorm and the
        projection, not normalized; the pooled position [N], the EOT for CLIP's vocabulary, BERT's [CLS])."""
        states, index = self.text(tokens, per_token=True)
        return states.astype(jnp.float32), index

    def encode_text(self, tokens, train: bool = False, embeddings=None):
        """tokens int32 [N, T] -> unit-norm float32 [N, embed_dim]. `embeddings` [N, T, width]: in place
        of the token embeddings (prompt learning; the tokens still give pooling and padding)."""
        if embeddings is None:
            return l2_normalize(self.text(tokens, train=train))
        return l2_normalize(self.text(tokens, train=train, embeddings=embeddings))

    def temperature(self):
        """(exp(logit_scale) clamped at exp(config.max_logit_scale), 100 by default, logit_bias or None), in
        float32."""
        cap = self.config.max_logit_scale
        scale = jnp.exp(self.logit_scale if cap is None else jnp.minimum(self.logit_scale, cap))
        bias = self.logit_bias if self.config.init_logit_bias is not None else None
        return scale, bias

    def __call__(self, images, tokens, train: bool = False, mask_patches: bool = True, image_train=None):
        """-> dict(image_embeds, text_embeds, logit_scale[, logit_bias]). image_train: the image tower's
        own mode where it differs from `train` (False: a locked tower, BatchNorm in inference mode)."""
        out = dict(image_embeds=self.encode_image(images, train if image_train is None else image_train, mask_patches),
                   text_embeds=self.encode_text(tokens, train))
        out["logit_scale"], bias = self.temperature()
        if bias is not None:
            out["logit_bias"] = bias
        return out
