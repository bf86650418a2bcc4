"""Training: one trainer for every method (trainer.py), assembled by build.py, stepping step.py.

    python -m clip_jax.train --config=configs/smoke.py --workdir=DIR
"""

from clip_jax.train.trainer import NonFiniteError, train_and_evaluate, validate, write_run_config

__all__ = ["NonFiniteError", "train_and_evaluate", "validate", "write_run_config"]
