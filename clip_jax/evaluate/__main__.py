import sys

from clip_jax.evaluate.evaluator import main

sys.exit(0 if main() is not None else 1)
