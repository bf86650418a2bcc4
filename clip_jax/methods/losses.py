"""Contrastive losses over the GLOBAL batch, sharded over a mesh with shard_map.

Every form equals the plain single-device computation of the same global batch, in value
and gradient (tests/test_losses.py), whatever the mesh:

  * 'softmax'      symmetric InfoNCE; each device all-gathers the N embeddings and scores
                   its own rows and columns ([b_local, N] logits per device);
  * 'softmax_ring' the same loss, memory-flat: text and image chunks travel round the
                   devices with ppermute, with running log-sum-exp accumulators, so no
                   device ever holds more than [b_local, b_local] logits (each ring step
                   is rematerialized in the backward pass);
  * 'sigmoid'      SigLIP: -sum_ij log sigmoid(z_ij (t x_i.y_j + bias)) / N, z = +1 on the
                   diagonal, -1 elsewhere, computed with the same ring (memory-flat).

Embeddings come in unit-normalized [N, d], sharded on the batch axis over `data_axes`;
`scale` is exp(logit_scale) (already clamped), `bias` the SigLIP bias.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax.registry import Registry

# name -> body(img, txt, scale, bias, *, axes, n_total, n_dev, gather_by_sum), run per device.
LOSSES: Registry = Registry("loss")


# -- plain references (one device, the whole batch) -------------------------------------
def softmax_loss_reference(img, txt, scale, bias=None):
    logits = scale * img.astype(jnp.float32) @ txt.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = jax.nn.logsumexp(logits, axis=1) - logits[labels, labels]
    t2i = jax.nn.logsumexp(logits, axis=0) - logits[labels, labels]
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_loss_reference(img, txt, scale, bias):
    logits = scale * img.astype(jnp.float32) @ txt.astype(jnp.float32).T + bias
    z = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]


REFERENCES = {
    "softmax": softmax_loss_reference, "softmax_ring": softmax_loss_reference, "sigmoid": sigmoid_loss_reference
}


# -- sharded forms: bodies run per device under shard_map --------------------------------
def _gather_by_sum(x, axes, n_dev):
    """all_gather(x, tiled) as a psum: each device puts its rows in a zero buffer, then sum.

    Twice the bytes of an all_gather, so only for XLA:CPU across processes, whose gloo
    all-gather is far slower than its all-reduce (figures in docs/performance.md).
    """
    buf = jnp.zeros((n_dev,) + x.shape, x.dtype).at[jax.lax.axis_index(axes)].set(x)
    return jax.lax.psum(buf, axes).reshape((n_dev * x.shape[0],) + x.shape[1:])


def _gather(axes, n_dev, gather_by_sum):
    return partial(_gather_by_sum, axes=axes, n_dev=n_dev) if gather_by_sum else partial(
        jax.lax.all_gather, axis_name=axes, tiled=True)


@LOSSES.register("softmax")
def _softmax_all_gather(img, txt, scale, bias, *, axes, n_total, n_dev, gather_by_sum=False, detach=False):
    """detach: the gathered embeddings carry no gradient (SLIP's multi-GPU CLIP loss): the
    image-to-text term trains only the image tower, the text-to-image term only the text tower."""
    del bias
    b = img.shape[0]
    gather = _gather(axes, n_dev, gather_by_sum)
    all_img = gather(img)
    all_txt = gather(txt)
    if detach:
        all_img, all_txt = jax.lax.stop_gradient(all_img), jax.lax.stop_gradient(all_txt)
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)  # this device's rows, offset by rank
    i2t = scale * img @ all_txt.T  # [b, N]: my images against every text
    t2i = scale * txt @ all_img.T  # [b, N]: my texts against every image
    pos_i = jnp.take_along_axis(i2t, labels[:, None], axis=1)[:, 0]
    pos_t = jnp.take_along_axis(t2i, labels[:, None], axis=1)[:, 0] if detach else pos_i
    local = jnp.sum(jax.nn.logsumexp(i2t, axis=1) - pos_i) + jnp.sum(jax.nn.logsumexp(t2i, axis=1) - pos_t)
    return jax.lax.psum(local, axes) / (2 * n_total)


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


@LOSSES.register("softmax_ring")
def _softmax_ring(img, txt, scale, bias, *, axes, n_total, n_dev, gather_by_sum=False, unroll=False):
    """Row lse of my images over all texts; column lse of the texts that visit me travels with them."""
    del bias
    pos = scale * jnp.sum(img * txt, axis=-1)  # the positives: my own pairs
    row_lse = jnp.full(img.shape[:1], -jnp.inf)
    col_lse = jnp.full(txt.shape[:1], -jnp.inf)  # for the text chunk currently held

    @partial(jax.checkpoint, prevent_cse=False)  # recompute [b, b] logits in backward: memory flat
    def step(carry, _):
        row_lse, visiting_txt, visiting_col = carry
        logits = scale * img @ visiting_txt.T  # [b, b]
        row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
        visiting_col = jnp.logaddexp(visiting_col, jax.nn.logsumexp(logits, axis=0))
        visiting_txt, visiting_col = jax.lax.ppermute((visiting_txt, visiting_col), axes, _ring_perm(n_dev))
        return (row_lse, visiting_txt, visiting_col), None

    (row_lse, txt_back, col_lse), _ = jax.lax.scan(step, (row_lse, txt, col_lse), None, length=n_dev, unroll=unroll)
    del txt_back  # after n_dev hops every text chunk is home, with its complete column lse
    local = jnp.sum(row_lse - pos) + jnp.sum(col_lse - pos)
    return jax.lax.psum(local, axes) / (2 * n_total)


@LOSSES.register("sigmoid")
def _sigmoid_ring(img, txt, scale, bias, *, axes, n_total, n_dev, gather_by_sum=False, unroll=False):
    @partial(jax.checkpoint, prevent_cse=False)
    def step(carry, hop):
        total, visiting_txt = carry
        logits = scale * img @ visiting_txt.T + bias  # [b, b]
        # The chunk that arrives after `hop` hops came from device (me - hop): positives only at hop 0.
        z = jnp.where(hop == 0, 2 * jnp.eye(logits.shape[0]) - 1, -jnp.ones_like(logits))
        total = total + jnp.sum(jax.nn.log_sigmoid(z * logits))
        return (total, jax.lax.ppermute(visiting_txt, axes, _ring_perm(n_dev))), None

    (total, _), _ = jax.lax.scan(step, (jnp.zeros((), jnp.float32), txt), jnp.arange(n_dev), unroll=unroll)
    return -jax.lax.psum(total, axes) / n_total


RINGS = ("softmax_ring", "sigmoid")
# The model init a loss comes with (open_clip-style overrides; a run's own model_overrides win):
# SigLIP's temperature and bias, t = exp(t') with t' = log 10, and b = -10.
MODEL_INIT = {"sigmoid": {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}}


def ring_unrolled(mesh: Mesh) -> bool:
    """Whether the ring's hops are unrolled rather than looped: on XLA:CPU, whose runtime can run a
    loop holding collectives beside an independent collective in a different order on each
    device, and each waits for the other for ever (tests/test_multiprocess.py's SigLIP runs)."""
    return mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1


def make_loss(kind: str, mesh: Mesh, data_axes: Sequence[str] = ("data",), gather_by_sum: bool = False,
              detach: bool = False) -> Callable:
    """loss(img [N, d], txt [N, d], scale, bias) -> scalar, for arrays sharded on `data_axes`.

    Call it inside jit. N must divide over the devices of `data_axes` (checked on trace).
    gather_by_sum: the all_gather of 'softmax' as a psum, chosen by whoever builds the mesh
    (clip_jax.parallel.sharding.slow_all_gather; see _gather_by_sum). detach: 'softmax' with
    no gradient through the gathered embeddings (SLIP's reference on more than one GPU).
    """
    body = LOSSES.get(kind)
    if detach:
        if kind != "softmax":
            raise ValueError(f"a detached gather is a form of the 'softmax' loss only, not of {kind!r}")
        body = partial(body, detach=True)
    axes, n_dev = _data_devices(mesh, data_axes)

    def loss(img, txt, scale, bias=None):
        n_total = _global_batch(img, n_dev, axes)
        if bias is None:
            if kind == "sigmoid":
                raise ValueError("the sigmoid loss needs the model's logit bias: build the model with init_logit_bias "
                                 "(SigLIP: -10, with init_logit_scale log 10; config.clip.loss='sigmoid' sets both)")
            bias = jnp.zeros((), jnp.float32)
        per_device = partial(body, axes=axes, n_total=n_total, n_dev=n_dev, gather_by_sum=gather_by_sum)
        if kind in RINGS and ring_unrolled(mesh):
            per_device = partial(per_device, unroll=True)
        sharded = _shard_map(per_device, mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
        return sharded(img.astype(jnp.float32), txt.astype(jnp.float32), jnp.float32(scale), jnp.float32(bias))

    return loss


# -- several towers: one contrastive term per pair of modalities a batch carries (AudioCLIP) ------
def clamped_scale(log_scale, low: float = 1.0, high: float = 100.0):
    """exp(log_scale) clamped to [low, high] as torch.clamp does it, the gradient passing strictly inside the
    range only. AudioCLIP's new scales start at log 100, whose exp is 100.0000076 in float32: clamped, so they
    get no gradient, in the reference as here."""
    scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    inside = (scale > low) & (scale < high)
    return jnp.where(inside, scale, jax.lax.stop_gradient(jnp.clip(scale, low, high)))


def pair_name(a: str, b: str) -> str:
    """The name of the pair (a, b) in logs and metrics: 'audio_image'."""
    return f"{a}_{b}"


def make_pairs_loss(mesh: Mesh, data_axes: Sequence[str] = ("data",), gather_by_sum: bool = False) -> Callable:
    """loss(embeds {modality: [N, d] unit rows}, scales {(a, b): scale}) -> (scalar, {pair name: its term}).

    AudioCLIP's loss: every pair (a, b) of `scales` whose two modalities are in `embeds` adds
    CE(s * A B^T) + CE(s * B A^T) (each the mean over the N rows, the two directions summed), and the total is
    divided by n! for n pairs present (1, 2 or 6 for one, two or three pairs). Each term is the sharded
    'softmax' loss of make_loss (the full N x N over every device), which averages the two directions: twice it
    is the pair's sum. No pair present is an error (a batch that carries fewer than two modalities).
    """
    pair_loss = make_loss("softmax", mesh, data_axes, gather_by_sum=gather_by_sum)

    def loss(embeds: dict, scales: dict):
        present = [(a, b) for (a, b) in scales if a in embeds and b in embeds]
        if not present:
            raise ValueError(f"no pair of modalities to contrast: the batch carries {sorted(embeds)}, the pairs are "
                             f"{[pair_name(a, b) for a, b in scales]}")
        terms = {pair_name(a, b): 2.0 * pair_loss(embeds[a], embeds[b], scales[a, b]) for a, b in present}
        return sum(terms.values()) / math.factorial(len(present)), terms

    return loss


# -- SimCLR's NT-Xent over the global batch (SLIP's self-supervised branch) ------------------
def nt_xent_reference(qa, qb, temperature: float = 0.1):
    """(loss, accuracy of view a) on one device: every image's other view is its positive among
    2N - 2 negatives (the other images' two views); its own view is masked out."""
    qa, qb = qa.astype(jnp.float32), qb.astype(jnp.float32)
    n = qa.shape[0]
    mask = 1e9 * jnp.eye(n)
    aa, bb = qa @ qa.T / temperature - mask, qb @ qb.T / temperature - mask
    ab, ba = qa @ qb.T / temperature, qb @ qa.T / temperature
    labels = jnp.arange(n)
    ce = lambda logits: jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[labels, labels])  # noqa: E731
    first = jnp.concatenate([ab, aa], axis=1)
    loss = (ce(first) + ce(jnp.concatenate([ba, bb], axis=1))) / 2
    return loss, jnp.mean(jnp.argmax(first, axis=1) == labels)


def _nt_xent(qa, qb, temperature, *, axes, n_total, n_dev, gather_by_sum=False):
    b = qa.shape[0]
    gather = _gather(axes, n_dev, gather_by_sum)
    ka, kb = gather(qa), gather(qb)  # with gradient: every device's rows are trained through every logit
    labels = jax.lax.axis_index(axes) * b + jnp.arange(b)
    mask = 1e9 * jax.nn.one_hot(labels, n_total, dtype=qa.dtype)

    def ce(logits):  # logits [b, 2N]: the positive at `labels` (the first block)
        pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos)

    first = jnp.concatenate([qa @ kb.T / temperature, qa @ ka.T / temperature - mask], axis=1)
    second = jnp.concatenate([qb @ ka.T / temperature, qb @ kb.T / temperature - mask], axis=1)
    correct = jnp.sum(jnp.argmax(first, axis=1) == labels)
    loss = jax.lax.psum(ce(first) + ce(second), axes) / (2 * n_total)
    return loss, jax.lax.psum(correct, axes) / n_total


def make_nt_xent(mesh: Mesh, data_axes: Sequence[str], temperature: float = 0.1,
                 gather_by_sum: bool = False) -> Callable:
    """nt_xent(qa [N, d], qb [N, d]) -> (loss, accuracy of view a), the two views' unit-norm
    embeddings sharded on `data_axes`; equals nt_xent_reference of the global batch. Each device
    holds [b_local, 2N] logits."""
    axes, n_dev = _data_devices(mesh, data_axes)

    def loss(qa, qb):
        n_total = _global_batch(qa, n_dev, axes)
        body = partial(_nt_xent, temperature=temperature, axes=axes, n_total=n_total, n_dev=n_dev,
                       gather_by_sum=gather_by_sum)
        sharded = _shard_map(body, mesh, in_specs=(P(axes), P(axes)), out_specs=(P(), P()))
        return sharded(qa.astype(jnp.float32), qb.astype(jnp.float32))

    return loss


def _data_devices(mesh: Mesh, data_axes: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """(the data axes as a tuple, the number of devices over them); an axis not in the mesh is an error."""
    axes = tuple(data_axes)
    n_dev = 1
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"data axis {a!r} is not a mesh axis {tuple(mesh.shape)}")
        n_dev *= mesh.shape[a]
    return axes, n_dev


def _global_batch(x, n_dev: int, axes) -> int:
    """The global batch of `x`, checked to divide over the data devices (on trace)."""
    if x.shape[0] % n_dev:
        raise ValueError(f"global batch {x.shape[0]} does not divide over {n_dev} devices of mesh axes {axes}")
    return x.shape[0]


def _shard_map(f, mesh, in_specs, out_specs):
    # jax.shard_map is the public name from jax 0.6; check_vma=False: psum'd outputs are replicated.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# -- ActionCLIP's KL loss over the global batch: clips of one label are all positives -----------------
KL_TARGET_SHARPNESS = 10.0  # utils/KLLoss.py: the target is softmax(label * 10) of the 0/1 equal-label matrix


def _kl_rows(logits, same):
    """sum over rows of KL(softmax(10 * same) || softmax(logits)), each row over all its columns."""
    log_target = jax.nn.log_softmax(KL_TARGET_SHARPNESS * same.astype(jnp.float32), axis=1)
    return jnp.sum(jnp.exp(log_target) * (log_target - jax.nn.log_softmax(logits, axis=1)))


def kl_loss_reference(video, text, labels, scale):
    """ActionCLIP's train.py loss on one device: video, text unit rows [N, d], labels [N] (ints), scale =
    exp(logit_scale). KLLoss (nn.KLDivLoss's 'mean' over the N x N entries, times N) of the video->text and the
    text->video logits against the equal-label matrix (symmetric: one target for both), averaged."""
    logits = scale * video.astype(jnp.float32) @ text.astype(jnp.float32).T
    same = labels[:, None] == labels[None, :]
    n = logits.shape[0]
    return (_kl_rows(logits, same) + _kl_rows(logits.T, same)) / (2 * n)


def _kl(video, text, labels, scale, *, axes, n_total, n_dev, gather_by_sum=False):
    gather = _gather(axes, n_dev, gather_by_sum)
    all_video, all_text, all_labels = gather(video), gather(text), gather(labels)
    same = labels[:, None] == all_labels[None, :]  # my rows of the global equal-label matrix
    local = _kl_rows(scale * video @ all_text.T, same) + _kl_rows(scale * text @ all_video.T, same)
    return jax.lax.psum(local, axes) / (2 * n_total)


def make_kl_loss(mesh: Mesh, data_axes: Sequence[str] = ("data",), gather_by_sum: bool = False) -> Callable:
    """kl(video [N, d], text [N, d], labels [N], scale) -> ActionCLIP's loss of the global batch, each device
    scoring its own rows against every gathered row ([b_local, N] logits); equals kl_loss_reference."""
    axes, n_dev = _data_devices(mesh, data_axes)

    def loss(video, text, labels, scale):
        n_total = _global_batch(video, n_dev, axes)
        body = partial(_kl, axes=axes, n_total=n_total, n_dev=n_dev, gather_by_sum=gather_by_sum)
        sharded = _shard_map(body, mesh, in_specs=(P(axes), P(axes), P(axes), P()), out_specs=P())
        return sharded(video.astype(jnp.float32), text.astype(jnp.float32), labels.astype(jnp.int32),
                       jnp.asarray(scale, jnp.float32))

    return loss
