"""Video heads over per-frame CLIP embeddings: CLIP4Clip's similarity headers and ActionCLIP's temporal fusion.

Inputs are frame embeddings [B, T, D] (CLIP's image tower, projected, not normalized) and a frame mask [B, T]
(1 = real frame). Masks are prefixes (real frames first, then padding), as both references' loaders write
them; CLIP4Clip's LSTM and our attention masks rely on it.

* CLIP4Clip (ArrowLuo/CLIP4Clip, modules/modeling.py ``_loose_similarity`` / ``_cross_similarity``):
  ``MeanPool``, ``SeqLSTM``, ``SeqTransf`` give one unit video embedding per clip (frames normalized, masked
  mean, normalized again); ``loose_logits`` scores them against captions; ``TightTransf`` is the cross
  encoder giving one logit per (caption, clip) pair.
* ActionCLIP (sallymmx/ActionCLIP, modules/Visual_Prompt.py ``visual_prompt``): ``ActionFusion`` with
  sim_head meanP, LSTM, Conv_1D, Transf or Transf_cls gives one (unnormalized) video embedding per clip.

The references' own details are kept: their transformers' LayerNorm eps is 1e-12 (BERT's), Transf_cls is
torch's post-norm nn.TransformerEncoder (ReLU, eps 1e-5, dropout 0.1), and Conv_1D reads [B, T, D] as
[B, D, T] by a reshape (the reference's ``view``), not a transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.layers import Dense, LayerNorm, Transformer, l2_normalize, normal, quick_gelu, self_attention

Dtype = Any
BERT_EPS = 1e-12  # the references' own LayerNorm (module_cross.py, Visual_Prompt.py)
CONTEXT = 77  # CLIP's context length: the size of both references' frame position tables


def frame_lengths(mask):
    """mask [B, T] -> the number of real frames [B] (int32); a concrete mask that is not a prefix is an error."""
    if not isinstance(mask, jax.core.Tracer):
        m = np.asarray(mask) > 0
        if m.ndim != 2:
            raise ValueError(f"the frame mask must be [batch, frames], got shape {m.shape}")
        lengths = m.sum(1)
        if (m != (np.arange(m.shape[1]) < lengths[:, None])).any():
            raise ValueError("the frame mask must put a clip's real frames first (1s, then 0s for padding): "
                             "move the padding to the end of each clip")
    return jnp.sum(jnp.asarray(mask) > 0, axis=1).astype(jnp.int32)


def masked_mean(x, mask):
    """CLIP4Clip's _mean_pooling_for_similarity_visual: the mean over real frames (a clip with none gives 0)."""
    m = (jnp.asarray(mask) > 0)[..., None]
    total = jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0), axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1).astype(jnp.float32)


def pool_frames(frames, mask):
    """Normalize each frame, average the real ones, normalize the mean: the end of every loose header."""
    return l2_normalize(masked_mean(l2_normalize(frames), mask))


def loose_logits(text, video, scale):
    """text [Bt, D] (caption embeddings), video [Bv, D] (a loose header's unit embeddings), scale = exp(logit_scale)
    -> logits [Bt, Bv]."""
    return scale * l2_normalize(text) @ video.astype(jnp.float32).T


def _check_frames(frames, positions: int, name: str):
    if frames.ndim != 3:
        raise ValueError(f"{name} takes frame embeddings [batch, frames, width], got shape {frames.shape}")
    if frames.shape[1] > positions:
        raise ValueError(f"{name} has {positions} frame positions but got {frames.shape[1]} frames: "
                         f"sample at most {positions} frames or raise `positions`")


class TorchLSTM(nn.Module):
    """torch.nn.LSTM (one layer, batch_first, unidirectional) with its own parameter names and layouts:
    weight_ih_l0 [4H, in], weight_hh_l0 [4H, H], bias_ih_l0, bias_hh_l0 [4H]; gates in torch's order i, f, g, o."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = self.hidden
        init = nn.initializers.uniform(2 * h**-0.5)  # torch's U(-1/sqrt(H), 1/sqrt(H)), shifted below
        shifted = lambda key, shape: init(key, shape) - h**-0.5  # noqa: E731
        w_ih = self.param("weight_ih_l0", shifted, (4 * h, x.shape[-1]))
        w_hh = self.param("weight_hh_l0", shifted, (4 * h, h))
        b = self.param("bias_ih_l0", shifted, (4 * h,)) + self.param("bias_hh_l0", shifted, (4 * h,))
        xs = (x.astype(self.dtype) @ w_ih.T.astype(self.dtype) + b.astype(self.dtype)).astype(jnp.float32)

        def step(carry, gx):
            hid, cell = carry
            i, f, g, o = jnp.split(gx + hid @ w_hh.T, 4, axis=-1)
            cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
            hid = jax.nn.sigmoid(o) * jnp.tanh(cell)
            return (hid, cell), hid

        zeros = jnp.zeros((x.shape[0], h), jnp.float32)
        _, out = jax.lax.scan(step, (zeros, zeros), xs.transpose(1, 0, 2))
        return out.transpose(1, 0, 2)


def _frame_positions(positions: int, t: int, width: int, name: str):
    table = nn.Embed(positions, width, embedding_init=normal(0.02), name=name)
    return table.embedding[:t]


# -- CLIP4Clip ------------------------------------------------------------------------------------------------
class MeanPool(nn.Module):
    """CLIP4Clip's meanP: no parameters."""

    @nn.compact
    def __call__(self, frames, mask):
        frame_lengths(mask)
        return pool_frames(frames, mask)


class SeqLSTM(nn.Module):
    """CLIP4Clip's seqLSTM: an LSTM over the real frames, plus the frames (residual), then pooled. Its
    frame_position_embeddings (built by the reference, never read by this header) are not a parameter here."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames, mask):
        lengths = frame_lengths(mask)
        out = TorchLSTM(frames.shape[-1], self.dtype, name="lstm_visual")(frames)
        real = (jnp.arange(frames.shape[1]) < lengths[:, None])[..., None]
        # the LSTM is causal: its outputs on the real prefix are those of the packed sequence
        return pool_frames(jnp.where(real, out, 0.0) + frames.astype(jnp.float32), mask)


class SeqTransf(nn.Module):
    """CLIP4Clip's seqTransf: frames + frame position embeddings through a transformer (padding masked as keys),
    plus the frames (residual), then pooled. The reference initializes the table from CLIP's text positional
    embedding and the layers from the first `layers` of CLIP's text transformer; heads = text width // 64."""

    heads: int
    layers: int = 4  # --cross_num_hidden_layers
    positions: int = CONTEXT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames, mask):
        _check_frames(frames, self.positions, "SeqTransf")
        lengths = frame_lengths(mask)
        x = frames + _frame_positions(self.positions, frames.shape[1], frames.shape[-1],
                                      "frame_position_embeddings")
        x = Transformer(self.layers, self.heads, quick_gelu=True, dtype=self.dtype, ln_eps=BERT_EPS,
                        name="transformerClip")(x.astype(self.dtype), kv_lengths=lengths)
        return pool_frames(x.astype(jnp.float32) + frames.astype(jnp.float32), mask)


class _CrossEmbeddings(nn.Module):
    positions: int

    @nn.compact
    def __call__(self, x):
        return x + _frame_positions(self.positions, x.shape[1], x.shape[-1], "position_embeddings")


class _CrossPooler(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, first):
        first = LayerNorm(self.dtype, eps=BERT_EPS, name="ln_pool")(first)
        return quick_gelu(Dense(first.shape[-1], self.dtype, name="dense")(first))


class _CrossModel(nn.Module):
    heads: int
    layers: int
    positions: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, lengths):
        x = _CrossEmbeddings(self.positions, name="embeddings")(tokens)
        first = Transformer(self.layers, self.heads, quick_gelu=True, dtype=self.dtype, ln_eps=BERT_EPS,
                            name="transformer")(x.astype(self.dtype), pool_index=jnp.zeros(x.shape[:1], jnp.int32),
                                                kv_lengths=lengths)
        return _CrossPooler(self.dtype, name="pooler")(first)


class TightTransf(nn.Module):
    """CLIP4Clip's tightTransf: for every (caption, clip) pair, [caption embedding, frames] + position embeddings
    through the cross transformer, its first token pooled (LayerNorm, Dense, QuickGELU) and scored by
    similarity_dense. No normalization and no logit scale. Costs Bt x Bv sequences of 1 + T tokens."""

    heads: int = 8  # cross_config.json's num_attention_heads
    layers: int = 4  # --cross_num_hidden_layers
    positions: int = CONTEXT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text, frames, mask):
        """text [Bt, D], frames [Bv, T, D], mask [Bv, T] -> logits [Bt, Bv]."""
        _check_frames(frames, self.positions - 1, "TightTransf")
        lengths = frame_lengths(mask)
        bt, (bv, t, d) = text.shape[0], frames.shape
        pairs = jnp.concatenate([jnp.broadcast_to(text[:, None, None, :], (bt, bv, 1, d)),
                                 jnp.broadcast_to(frames[None], (bt, bv, t, d))], axis=2).reshape(bt * bv, 1 + t, d)
        pooled = _CrossModel(self.heads, self.layers, self.positions, self.dtype, name="cross")(
            pairs.astype(jnp.float32), jnp.tile(lengths + 1, bt))
        return Dense(1, self.dtype, name="similarity_dense")(pooled).astype(jnp.float32).reshape(bt, bv)


CLIP4CLIP_HEADS = {"meanP": MeanPool, "seqLSTM": SeqLSTM, "seqTransf": SeqTransf, "tightTransf": TightTransf}


# -- ActionCLIP -----------------------------------------------------------------------------------------------
def _shift_init(key, shape, dtype=jnp.float32):
    """Visual_Prompt.py's Conv_1D init: the first quarter of channels takes the previous frame, the middle half
    the frame itself, the last quarter the next frame."""
    del key
    c = shape[0]
    w = np.zeros(shape, np.float32)
    w[: c // 4, 0, 0] = 1.0
    w[c // 4: c // 4 + c // 2, 0, 1] = 1.0
    w[-c // 4:, 0, 2] = 1.0
    return jnp.asarray(w, dtype)


class _Shift(nn.Module):
    """nn.Conv1d(D, D, 3, padding=1, groups=D, bias=False) over [B, D, T]; weight [D, 1, 3] in torch's layout."""

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", _shift_init, (x.shape[1], 1, 3))
        p = jnp.pad(x, ((0, 0), (0, 0), (1, 1)))
        t = x.shape[2]
        return sum(w[None, :, 0, k, None] * p[:, :, k: k + t] for k in range(3))


class _TorchSelfAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (fused in_proj, out_proj) with its attention dropout."""

    heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_lengths, deterministic: bool):
        width = x.shape[-1]
        hd = width // self.heads
        kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (width, 3, self.heads, hd))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3, self.heads, hd))
        out_kernel = self.param("out_proj_kernel", normal(width**-0.5), (self.heads, hd, width))
        out_bias = self.param("out_proj_bias", nn.initializers.zeros, (width,))
        rng = None if deterministic or not self.dropout else self.make_rng("dropout")
        return self_attention(x, kernel, bias, out_kernel, out_bias, causal=False, dtype=self.dtype,
                              kv_lengths=kv_lengths, dropout_rate=self.dropout, dropout_rng=rng)


class _PostNormLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer's defaults: post-norm, ReLU, LayerNorm eps 1e-5, dropout everywhere."""

    heads: int
    mlp_dim: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_lengths, deterministic: bool):
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
        y = _TorchSelfAttention(self.heads, self.dropout, self.dtype, name="self_attn")(x, kv_lengths, deterministic)
        x = LayerNorm(self.dtype, name="norm1")(x + drop(y))
        h = drop(jax.nn.relu(Dense(self.mlp_dim, self.dtype, name="linear1")(x)))
        return LayerNorm(self.dtype, name="norm2")(x + drop(Dense(x.shape[-1], self.dtype, name="linear2")(h)))


class _TransformerEncoder(nn.Module):
    layers: int
    heads: int
    mlp_dim: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv_lengths, deterministic: bool):
        for i in range(self.layers):
            x = _PostNormLayer(self.heads, self.mlp_dim, self.dropout, self.dtype, name=f"layers_{i}")(
                x, kv_lengths, deterministic)
        return LayerNorm(self.dtype, name="norm")(x)


class _TAggregate(nn.Module):
    """Visual_Prompt.py's TAggregate: a class token and T + 1 position embeddings, the encoder, the class token out."""

    frames: int
    layers: int
    heads: int
    mlp_dim: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, lengths, deterministic: bool):
        b, t, d = x.shape
        if t != self.frames:
            raise ValueError(f"Transf_cls was built for {self.frames} frames and got {t}: sample exactly "
                             f"{self.frames} frames per clip (ActionCLIP's num_segments)")
        cls = self.param("cls_token", normal(0.02), (1, 1, d))
        pos = self.param("pos_embed", normal(0.02), (1, self.frames + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.astype(jnp.float32)], axis=1) + pos
        kv = None if lengths is None else lengths + 1
        out = _TransformerEncoder(self.layers, self.heads, self.mlp_dim, self.dropout, self.dtype,
                                  name="transformer_enc")(x.astype(self.dtype), kv, deterministic)
        return out[:, 0]


class ActionFusion(nn.Module):
    """ActionCLIP's visual_prompt: frames [B, T, D] -> one video embedding [B, D] (unnormalized).

    sim_head: meanP (the mean), LSTM (LSTM + frames, mean), Conv_1D (a depthwise temporal shift over the
    reference's [B, D, T] reshape, + frames, mean), Transf (frame positions + a 6-layer pre-norm transformer +
    frames, mean; heads = CLIP's text width // 64), Transf_cls (TAggregate: post-norm encoder, 8 heads, class
    token out; built for exactly `frames` frames). The reference has no frame mask (it always samples T frames);
    with one, the means, attention keys and the LSTM see only real frames, except Conv_1D, whose reshape mixes
    frames into channels (its mask only selects frames of the final mean)."""

    sim_head: str = "Transf"
    heads: int = 8
    frames: int = 8  # Transf_cls only: num_segments
    layers: int = 6
    mlp_dim: int = 2048  # Transf_cls only: nn.TransformerEncoderLayer's dim_feedforward
    dropout: float = 0.1  # Transf_cls only: nn.TransformerEncoderLayer's
    positions: int = CONTEXT
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames, mask=None, deterministic: bool = True):
        if self.sim_head not in ACTIONCLIP_HEADS:
            raise ValueError(f"unknown ActionCLIP sim_head {self.sim_head!r}: use one of {ACTIONCLIP_HEADS}")
        _check_frames(frames, self.positions, "ActionFusion")
        b, t, d = frames.shape
        lengths = None if mask is None else frame_lengths(mask)
        if mask is None:
            mask = jnp.ones((b, t), jnp.int32)
        x = frames.astype(jnp.float32)
        if self.sim_head == "Transf_cls":
            return _TAggregate(self.frames, self.layers, self.heads, self.mlp_dim, self.dropout, self.dtype,
                               name="transformer")(x, lengths, deterministic).astype(jnp.float32)
        if self.sim_head == "Conv_1D":
            x = _Shift(name="shift")(x.reshape(b, d, t)).transpose(0, 2, 1) + x
        elif self.sim_head == "LSTM":
            x = TorchLSTM(d, self.dtype, name="lstm_visual")(x) + x
        elif self.sim_head == "Transf":
            y = x + _frame_positions(self.positions, t, d, "frame_position_embeddings")
            y = Transformer(self.layers, self.heads, quick_gelu=True, dtype=self.dtype, ln_eps=BERT_EPS,
                            name="transformer")(y.astype(self.dtype), kv_lengths=lengths)
            x = y.astype(jnp.float32) + x
        return masked_mean(x, mask)


ACTIONCLIP_HEADS = ("meanP", "LSTM", "Conv_1D", "Transf", "Transf_cls")


def video_head(name: str, **kwargs) -> nn.Module:
    """'clip4clip:seqTransf', 'actionclip:Transf', ... -> the head module (kwargs: its fields)."""
    family, _, head = name.partition(":")
    if family == "clip4clip" and head in CLIP4CLIP_HEADS:
        return CLIP4CLIP_HEADS[head](**kwargs)
    if family == "actionclip" and head in ACTIONCLIP_HEADS:
        return ActionFusion(sim_head=head, **kwargs)
    names = [f"clip4clip:{h}" for h in CLIP4CLIP_HEADS] + [f"actionclip:{h}" for h in ACTIONCLIP_HEADS]
    raise ValueError(f"unknown video head {name!r}: use one of {names}")


def dummy_video_inputs(module: nn.Module, width: int) -> tuple:
    """Inputs of the right shapes for init / eval_shape of a head of frame width `width`."""
    t = module.frames if isinstance(module, ActionFusion) and module.sim_head == "Transf_cls" else 1
    frames, mask = jnp.zeros((1, t, width)), jnp.ones((1, t), jnp.int32)
    return (jnp.zeros((1, width)), frames, mask) if isinstance(module, TightTransf) else (frames, mask)


__all__ = ["ACTIONCLIP_HEADS", "CLIP4CLIP_HEADS", "ActionFusion", "MeanPool", "SeqLSTM", "SeqTransf", "TightTransf",
           "dummy_video_inputs", "frame_lengths", "loose_logits", "masked_mean", "pool_frames", "video_head"]

