"""Benchmarks that print figures: python -m clip_jax.benchmark {train,ab,parts,dots,max_batch,...}."""
