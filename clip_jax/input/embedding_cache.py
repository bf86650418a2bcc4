"""Precomputed image embeddings for training against a locked image tower (LiT).

`python -m clip_jax.embed` runs the training input pipeline of a config exactly as the trainer
would (same seed, streams, crops and order) through the locked image tower, once, and writes
each step's global batch as (image embeddings, tokens) to DIR/embeds-STEP.npz, with
DIR/manifest.json saying what made them. A run with `--config.clip.image_embeddings=DIR` then reads
the batches back in step order instead of decoding images and running the tower: the same
losses as training online, a fraction of the work per step. The manifest must agree with the
run's config (model, weights, data, seed, batch); anything else is refused with the setting named.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from clip_jax.input.pipeline import InputState

MANIFEST = "manifest.json"
# The settings a cache depends on: the run reading it must have the same ones.
MATCH = ("model", "init_from", "data.train", "seed", "batch_size", "data.streams", "data.crop", "data.crop_scale",
         "data.image_key", "data.caption_key", "image_size", "context_length")


def chunk_path(directory: str, first_step: int) -> str:
    return os.path.join(directory, f"embeds-{first_step:08d}.npz")


def settings_of(config, image_size: int, context_length: int) -> dict:
    """The MATCH settings of a run config, JSON-ready."""
    flat = {"model": config.model, "init_from": config.init_from, "seed": int(config.seed),
            "batch_size": int(config.batch_size), "image_size": int(image_size),
            "context_length": int(context_length)}
    for key in MATCH:
        if key.startswith("data."):
            value = config.data[key[5:]]
            flat[key] = list(value) if isinstance(value, (tuple, list)) else value
    return flat


class EmbeddingWriter:
    """Writes step-ordered global batches, `chunk_steps` steps a file, and the manifest last."""

    def __init__(self, directory: str, settings: dict, chunk_steps: int = 100):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.settings, self.chunk_steps = directory, settings, chunk_steps
        self._embeds: list = []
        self._tokens: list = []
        self.steps = 0

    def add(self, image_embeds: np.ndarray, tokens: np.ndarray) -> None:
        self._embeds.append(np.asarray(image_embeds, np.float32))
        self._tokens.append(np.asarray(tokens, np.int32))
        self.steps += 1
        if len(self._embeds) == self.chunk_steps:
            self._flush()

    def _flush(self) -> None:
        if not self._embeds:
            return
        first = self.steps - len(self._embeds)
        np.savez(chunk_path(self.directory, first), image_embeds=np.stack(self._embeds), tokens=np.stack(self._tokens))
        self._embeds, self._tokens = [], []

    def close(self, bad_records: Optional[dict] = None) -> None:
        self._flush()
        manifest = {**self.settings, "steps": self.steps, "chunk_steps": self.chunk_steps,
                    "bad_records": bad_records or {}}
        with open(os.path.join(self.directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.clip.image_embeddings={directory!r} holds no {MANIFEST}: make the cache with "
                                "python -m clip_jax.embed --config=... --out=DIR (an interrupted one writes none)")
    with open(path) as f:
        return json.load(f)


class EmbeddingCache:
    """Host-local batches {'image_embeds': [b, d] float32, 'tokens': [b, T] int32} in step order,
    the rows of this process; resumable from the step count (its state())."""

    def __init__(self, directory: str, settings: dict, *, total_steps: int, process_index: int = 0,
                 process_count: int = 1, state: Optional[Sequence[InputState]] = None):
        manifest = read_manifest(directory)
        wrong = [f"{k}: cache {manifest.get(k)!r}, run {settings[k]!r}" for k in MATCH
                 if k in settings and _norm(manifest.get(k)) != _norm(settings[k])]
        if wrong:
            raise ValueError(f"config.clip.image_embeddings={directory!r} was made with other settings than this "
                             "run's ("
                             + "; ".join(wrong) + "): embed again with this config, or run with the cache's")
        if total_steps > manifest["steps"]:
            raise ValueError(f"config.clip.image_embeddings={directory!r} holds {manifest['steps']} steps but "
                             f"config.total_steps={total_steps}: embed more (python -m clip_jax.embed --steps=...) "
                             "or train fewer steps")
        self.directory, self.manifest = directory, manifest
        self.rows = manifest["batch_size"] // process_count
        self.first_row = process_index * self.rows
        self.step = state[0].position if state else 0
        self._chunk: Optional[tuple[int, Any]] = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step >= self.manifest["steps"]:
            raise StopIteration
        size = self.manifest["chunk_steps"]
        first = self.step // size * size
        if self._chunk is None or self._chunk[0] != first:
            with np.load(chunk_path(self.directory, first)) as data:
                self._chunk = (first, {k: data[k] for k in ("image_embeds", "tokens")})
        rows = slice(self.first_row, self.first_row + self.rows)
        out = {k: v[self.step - first, rows] for k, v in self._chunk[1].items()}
        self.step += 1
        return out

    def state(self) -> list[InputState]:
        return [InputState(epoch=0, position=self.step, examples=self.step * self.rows)]

    def bad_records(self) -> dict:
        return dict(self.manifest.get("bad_records", {}))

    def close(self) -> None:
        """Drops the chunk held in memory (a cache runs no reader threads to stop)."""
        self._chunk = None


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value
