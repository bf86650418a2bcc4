"""A method's predictions for evaluation (image and text embeddings, ...), sharded over the device
mesh like training.

Each process feeds its own rows (clip_jax.input.eval_data); the batch axis is split over the
mesh's ('data', 'fsdp') axes and the parameters stay as they are (sharded in training,
replicated when loaded for evaluation). Every process ends with all predictions on the host.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from clip_jax.input.eval_data import empty_batch
from clip_jax.methods.base import two_tower_predictions
from clip_jax.parallel import distributed, sharding


def host_copy(tree):
    """A numpy copy of a (possibly multi-process) pytree of arrays, on every process."""
    return distributed.allgather(tree)


def _any_process(flag: bool) -> bool:
    return any(row == b"1" for row in distributed.exchange("any", b"1" if flag else b"0"))


class Encoder:
    """A method's predict functions (clip_jax.methods.base.Prediction), jitted on one model's variables
    on a mesh. Without `predictions`, the towers' of a two-tower model (CLIP's)."""

    def __init__(self, model, variables, mesh, predictions: Optional[dict] = None):
        self.model = model
        self.variables = variables
        self.mesh = mesh
        self.sharding = sharding.batch_sharding(mesh)
        self.devices = sharding.batch_devices(mesh)
        self.predictions = dict(two_tower_predictions(model) if predictions is None else predictions)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._jitted = {
            name: distributed.compile_together(
                jax.jit(p.fn, out_shardings=self.sharding if p.reads else replicated), f"predict_{name}")
            for name, p in self.predictions.items()}

    def require(self, names, what: str) -> None:
        """A clear error where `what` needs a prediction the method does not offer."""
        missing = [n for n in names if n not in self.predictions]
        if missing:
            raise ValueError(f"{what} needs the predictions {missing}, which this method does not offer (it offers "
                             f"{sorted(self.predictions)}): evaluate it with tasks that read those")

    def round_batch(self, batch: int) -> int:
        """The smallest global batch >= `batch` that splits over the batch devices."""
        return -(-batch // self.devices) * self.devices

    def _global(self, local: np.ndarray):
        shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def predict(self, name: str, local: np.ndarray, *also: np.ndarray):
        """This process's rows of the batch key the prediction reads (and of those it also reads) -> global
        [rows * processes, ...] (on the devices); axes before the items' are flattened into rows."""
        p = self.predictions[name]
        local = np.asarray(local)
        lead = local.ndim - p.item_rank
        local = local.reshape((-1,) + local.shape[lead:])
        also = [np.asarray(a).reshape((-1,) + np.asarray(a).shape[lead:]) for a in also]
        return self._jitted[name](self.variables, self._global(local), *map(self._global, also))

    def predict_batch(self, name: str, local: dict):
        """predict() on the keys of a batch the prediction reads."""
        p = self.predictions[name]
        return self.predict(name, local[p.reads], *(local[k] for k in p.also_reads))

    def value(self, name: str) -> np.ndarray:
        """A prediction of the model itself (reads=None), e.g. 'logit_scale', on the host."""
        return np.asarray(host_copy(self._jitted[name](self.variables)))

    def images(self, local_images: np.ndarray):
        """This process's rows -> global [rows * processes, d] embeddings (on the devices)."""
        return self.predict("image_embeds", local_images)

    def texts(self, local_tokens: np.ndarray):
        return self.predict("text_embeds", local_tokens.astype(np.int32))

    def embed_texts(self, tokens: np.ndarray, batch: int = 256) -> np.ndarray:
        """Tokens every process holds alike [N, ctx] -> [N, d] on the host (e.g. zero-shot prompts)."""
        tokens = np.asarray(tokens, np.int32)
        batch = self.round_batch(min(batch, max(len(tokens), 1)))
        outs = []
        for start in range(0, len(tokens), batch):
            chunk = tokens[start : start + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, chunk.shape[1]), np.int32)])
            arr = jax.make_array_from_callback(chunk.shape, self.sharding, lambda idx, c=chunk: c[idx])
            outs.append((self._jitted["text_embeds"](self.variables, arr), n))
        return np.concatenate([host_copy(o)[:n] for o, n in outs]) if outs else np.zeros((0, 0), np.float32)


def extract(encoder: Encoder, batches: Iterable[dict], *, texts: bool = False, predictions: Sequence[str] = (),
            desc: str = "", total: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
            every_s: float = 10.0, features: Sequence[str] = ()) -> dict:
    """Run the encoder's `predictions` (default image_embeds, and text_embeds with texts=True) on every
    real row of this process's `batches` (eval_data) on the mesh; gather on every process.

    Returns each prediction [n, ...] (text_embeds [n, M, d]: one per caption slot), labels [n, K],
    with captions caption_mask [n, M], and the batches' record `features` [n, ...]; n counts the real
    rows of all processes, process-major order. Processes whose share ends early feed padding until
    every process is done.
    """
    names = list(predictions) or ["image_embeds"] + (["text_embeds"] if texts else [])
    encoder.require(names, desc or "evaluation")
    iterator = iter(batches)
    like, pending, seen = None, [], 0
    start = last_report = time.perf_counter()
    while True:
        local = next(iterator, None)
        if not _any_process(local is not None):
            break
        if local is None:
            local = empty_batch(like)
        if like is None:
            like = local
        out = {name: encoder.predict_batch(name, local) for name in names}
        pending.append((out, {k: local[k] for k in ("mask", "labels", "caption_mask", *features) if k in local}))
        seen += int(local["mask"].sum()) * jax.process_count()  # an estimate while the shares are even
        now = time.perf_counter()
        if log and now - last_report >= every_s:
            last_report = now
            of = f"/{total}" if total else ""
            log(f"  {desc}: ~{min(seen, total) if total else seen}{of} images, {seen / (now - start):.0f} images/s")
    if like is None:
        from clip_jax.input.pipeline import NoUsableData

        raise NoUsableData(f"{desc or 'the evaluation split'}: no usable example in the whole split")
    device = host_copy([o for o, _ in pending])
    local_meta = {k: np.concatenate([m[k] for _, m in pending]) for k in pending[0][1]}
    strings = {k for k, v in local_meta.items() if v.dtype.kind in "OSU"}  # keys, encoded masks: no device type
    meta = host_copy({k: v for k, v in local_meta.items() if k not in strings})
    meta.update({k: _gather_strings(local_meta[k], f"extract_{k}") for k in strings})
    # Rows of a global batch are process-major: regroup the per-process metadata to match.
    meta = _process_major(meta, [len(m["mask"]) for _, m in pending])
    mask = meta["mask"].astype(bool)
    result = {}
    for name in names:
        p = encoder.predictions[name]
        per_row = like[p.reads].shape[1 : like[p.reads].ndim - p.item_rank]  # caption slots of a row
        rows = np.concatenate([d[name] for d in device])
        result[name] = rows.reshape((-1,) + per_row + rows.shape[1:])[mask]
    if "labels" in meta:
        result["labels"] = meta["labels"][mask]
    if "caption_mask" in meta:
        result["caption_mask"] = meta["caption_mask"][mask].astype(bool)
    for name in features:
        result[name] = meta[name][mask]
    if log:
        log(f"  {desc}: {int(mask.sum())} images in {time.perf_counter() - start:.1f}s")
    return result


def _gather_strings(local: np.ndarray, name: str) -> np.ndarray:
    """Every process's rows of a string array, process after process (as host_copy tiles numbers)."""
    if jax.process_count() == 1:
        return local
    import pickle

    parts = [pickle.loads(b) for b in distributed.exchange(name, pickle.dumps(local))]
    return np.concatenate(parts)


def _process_major(meta: dict, sizes: list) -> dict:
    """[processes * sum(sizes), ...] gathered per process -> the global batches' row order."""
    p = jax.process_count()
    if p == 1:
        return meta
    out = {}
    total = sum(sizes)
    for key, value in meta.items():
        per_process = value.reshape((p, total) + value.shape[1:])
        chunks, start = [], 0
        for size in sizes:  # batch i of the global run: process 0's rows, then process 1's, ...
            chunks.append(per_process[:, start : start + size].reshape((p * size,) + value.shape[1:]))
            start += size
        out[key] = np.concatenate(chunks)
    return out

