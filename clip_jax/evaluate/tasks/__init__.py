"""Evaluation tasks, one class per file, registered by the name a spec gives (TASK=DATA|key=value...).

    TASKS.get("zero_shot")(spec, data_config, log) -> a clip_jax.evaluate.tasks.base.Task

A new task is a Task subclass in its own file, registered with @TASKS.register(NAME) and imported
here (or by its user before the spec is parsed): it declares its options, the splits it reads
and the method's predictions it needs, and turns their features into metrics and details.
"""

from clip_jax.evaluate.tasks import (  # noqa: F401  (registers them)
    audio,
    detection,
    grounding,
    linear_probe,
    retrieval,
    segmentation,
    video,
    zero_shot,
)
from clip_jax.evaluate.tasks.base import TASKS, Read, Task

__all__ = ["TASKS", "Read", "Task"]
