"""Training methods: what the one trainer optimizes (batch keys, variables, loss, parameter groups).

    METHODS.get(config.method)(config, model, mesh) -> a clip_jax.methods.base.Method
"""

from clip_jax.methods.base import Method
from clip_jax.registry import Registry

METHODS: Registry[type] = Registry("method")

from clip_jax.methods import clip, slip  # noqa: E402,F401  (registers 'clip', 'slip')

__all__ = ["METHODS", "Method"]
