"""Evaluation: zero-shot classification, retrieval and linear probes over sharded embeddings.

    python -m clip_jax.evaluate --workdir=DIR [--eval=SPEC ...]   (see evaluate/evaluator.py)
"""

from clip_jax.evaluate.evaluator import EvalSpec, Evaluator, find_metadata, format_table, load_model, main, parse_evals

__all__ = ["EvalSpec", "Evaluator", "find_metadata", "format_table", "load_model", "main", "parse_evals"]
