"""A training run's batches: what its method declares (clip_jax.methods.base.BatchInput) resolved
through the input's ops, read from records by the input pipeline or, where every key comes from a
store, from that store (precomputed image embeddings). The trainer asks for the method's keys and
translates nothing."""

from __future__ import annotations

from typing import Optional, Sequence

from clip_jax.input import ops
from clip_jax.input.embedding_cache import EmbeddingCache, settings_of
from clip_jax.input.pipeline import InputPipeline, InputState


def training_batches(inputs: Sequence, config, *, image_size: int, context_length: int, tokenizer=None,
                     process_index: int = 0, process_count: int = 1,
                     state: Optional[Sequence[InputState]] = None):
    """This process's host batches of the run `config` (its data section, seed, batch size, total steps),
    holding the keys `inputs` declares, from `state` (a checkpoint's) or the start."""
    resolved = ops.resolve(inputs)
    if not resolved:
        raise ValueError("the method declares no batch inputs (Method.inputs): it cannot train from config.data."
                         "train; declare a BatchInput for each of its batch_keys")
    store = ops.store_of(resolved)
    if store is not None:
        directory = store.option("directory")
        if not directory:
            raise ValueError(f"batch key {store.key!r} comes from op 'cached' without options directory=DIR: "
                             "declare where the cache is")
        settings = settings_of(config, image_size, context_length)
        return EmbeddingCache(directory, settings, total_steps=config.total_steps, process_index=process_index,
                              process_count=process_count, state=state)
    data = {k: v for k, v in config.data.items() if k not in ("train", "eval")}
    return InputPipeline(config.data.train, data, global_batch_size=config.batch_size, image_size=image_size,
                         train=True, seed=config.seed, process_index=process_index, process_count=process_count,
                         context_length=context_length, state=state, tokenizer=tokenizer, inputs=inputs)
