"""The benchmark rows' memory figures, shared by every benchmark (the training steps' and the
adaptation's), so no benchmark imports another."""

from __future__ import annotations


def step_memory(compiled) -> dict:
    """Per-device GiB of the compiled step (clip_jax.compile_check.memory_gib): what must fit."""
    from clip_jax.compile_check import memory_gib

    m = memory_gib(compiled)
    return {"memory_gib": m["total_gib"], "temp_gib": m["temp_gib"], "arguments_gib": m["argument_gib"]} if m else {}
