"""Training methods: what the one trainer optimizes (batch keys, variables, loss, parameter groups).

    METHODS.get(config.method)(config, model, mesh) -> a clip_jax.methods.base.Method
"""

from clip_jax.methods.base import Method
from clip_jax.registry import Registry

METHODS: Registry[type] = Registry("method")

from clip_jax.methods import clip  # noqa: E402,F401,I001  (first: the default method leads the registry's list)
from clip_jax.methods import (  # noqa: E402,F401  (registers each one)
    actionclip,
    audioclip,
    clip4clip,
    glip,
    groupvit,
    lseg,
    slip,
    vild,
)


def registered(attribute: str) -> dict:
    """The union over every registered method of a dict hook (config_sections, config_ranges,
    config_moved): the base config holds every method's section. A key two methods define
    differently is an error, since one config holds one value for it."""
    out: dict = {}
    for name in METHODS:
        for key, value in getattr(METHODS.get(name), attribute).items():
            if key in out and out[key] != value:
                raise ValueError(f"method {name!r} defines {attribute} {key!r} unlike another method: share it")
            out[key] = value
    return out


__all__ = ["METHODS", "Method", "registered"]
