"""A run's workdir, read: its kind, its config and the params it holds. Evaluation, export and
adaptation read runs through here, so a workdir means the same to each of them.

Two kinds of run:
  'training'   (python -m clip_jax.train --workdir=DIR): DIR/config.json (over the base config) and
               DIR/checkpoints/STEP; its params are the method's (clip_jax.methods: SLIP's head too);
  'adaptation' (python -m clip_jax.adapt --workdir=DIR): DIR/adapt_config.json; its towers are the
               frozen weights it names (a file or a training workdir), its learned tensors the
               finished DIR/adapter.safetensors and DIR/adapter.json.

Reading changes nothing in a workdir: a checkpoint that does not read back whole is passed over
(the trainer, resuming, is the one that sets it aside).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

TRAINING, ADAPTATION = "training", "adaptation"
TRAINING_CONFIG = "config.json"
ADAPTATION_CONFIG = "adapt_config.json"
ADAPTER_FILES = ("adapter.safetensors", "adapter.json")  # what an adaptation learned, written when it finishes


@dataclasses.dataclass
class Export:
    """What an export of a run holds: the towers, in open_clip's layout where written, and beside
    them the method's other parts (OUT.PART.safetensors) and the run's own files (OUT.NAME)."""

    model: Any  # clip_jax.models.CLIP, float32, unscanned
    variables: dict  # the towers' variables, unstacked, numpy
    parts: dict[str, dict]  # part name -> {tensor name: array}
    files: dict[str, str]  # file name -> its path in the workdir


@dataclasses.dataclass
class Run:
    """A workdir as read: a training run of method config.method at `step`, or an adaptation."""

    workdir: str
    kind: str  # TRAINING or ADAPTATION
    config: Any  # ml_collections.ConfigDict: the training config, or the adaptation's saved settings
    model: Any  # the towers' clip_jax.models.CLIP, float32, unscanned
    variables: dict  # the towers' variables, unstacked, numpy
    step: Optional[int] = None  # the checkpoint read (a training run)
    method: Any = None  # the training run's clip_jax.methods.base.Method
    params: Any = None  # the training run's params and model state, the method's whole (numpy)
    model_state: Any = None

    def exported(self, extras: bool = False) -> Export:
        """What the method exports (clip_jax.methods.base.Method.export); for an adaptation, its frozen
        towers and the adapter files it finished with. `extras`: the parts only training uses too."""
        if self.kind == ADAPTATION:
            files = {}
            for name in ADAPTER_FILES:
                path = os.path.join(self.workdir, name)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path} not found: the adaptation in {self.workdir} has not finished")
                files[name] = path
            return Export(self.model, self.variables, {}, files)
        parts = dict(self.method.export(self.params, self.model_state, extras=extras))
        variables = unstacked(self.model, parts.pop("towers"))
        return Export(self.model, variables, parts, {})


def kind_of(workdir: str) -> str:
    """TRAINING or ADAPTATION; an error naming the workdir where it is neither."""
    from etils import epath

    path = epath.Path(workdir)
    if (path / ADAPTATION_CONFIG).exists():
        return ADAPTATION
    if (path / TRAINING_CONFIG).exists():
        return TRAINING
    raise FileNotFoundError(f"{path / TRAINING_CONFIG} not found: {workdir!r} is not a clip_jax training workdir "
                            f"(nor an adaptation's: no {ADAPTATION_CONFIG}; or it was made before config.json "
                            "existed)")


def read_config(workdir: str):
    """The config a training run was started with (DIR/config.json), over the base config."""
    from etils import epath

    from clip_jax.config import from_saved

    path = epath.Path(workdir) / TRAINING_CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a clip_jax training workdir (or was made before config.json existed)"
        )
    return from_saved(json.loads(path.read_text()))


def read(workdir: str, step: Optional[int] = None, log: Callable[[str], None] = print) -> Run:
    """The run in `workdir`: a training run at `step` (default: its newest checkpoint that reads
    back whole), or an adaptation with its frozen towers."""
    if kind_of(workdir) == ADAPTATION:
        if step is not None:
            raise ValueError(f"{workdir!r} is an adaptation run: its towers are frozen, there is no step to choose")
        import ml_collections

        with open(os.path.join(workdir, ADAPTATION_CONFIG)) as f:
            saved = ml_collections.ConfigDict(json.load(f))
        model, variables = towers(saved.get("weights", ""), saved.get("model", ""))
        return Run(workdir, ADAPTATION, saved, model, variables)
    return _training_run(workdir, step, log)


def towers(weights: str, model: str = "", **options):
    """(model, variables) of `weights`: a file clip_jax.load reads (with `model`, its architecture) or a
    training workdir (its method's towers, at its newest good checkpoint). `options`: create_model's
    runtime settings (dtype, remat); the weights stay float32."""
    from clip_jax import hf_layouts, hub
    from clip_jax.api import load
    from clip_jax.models import create_model

    if not weights:
        raise ValueError("config.weights is empty: give a weights file (.safetensors, .pt, .msgpack) with "
                         "config.model, or a training workdir (python -m clip_jax.train --workdir=DIR)")
    if hub.is_hub_name(weights) or hf_layouts.is_model_dir(weights):  # its config is the architecture
        return load(model, weights, **options) if model else load(weights, **options)
    if os.path.isdir(weights):
        if not os.path.exists(os.path.join(weights, TRAINING_CONFIG)):
            raise ValueError(f"config.weights={weights!r} is a directory but not a training workdir (no config.json)")
        run = _training_run(weights, None, print)
        return create_model(run.model.config, **options), run.variables
    if not model:
        raise ValueError(f"config.weights={weights!r} is a file: set config.model to its architecture (a preset name "
                         "or a model JSON)")
    return load(model, weights, **options)


def unstacked(model, variables) -> dict:
    """`variables` of any layout (scanned layers stacked) as `model`'s, unstacked, in numpy: through
    open_clip's state dict, the one tested conversion."""
    from clip_jax import convert

    return convert.state_dict_to_variables(model, convert.variables_to_state_dict(variables))


def evaluated_params(params, ema) -> dict:
    """The params that evaluation and export read: the training's moving average of its trained params where
    it keeps one (config.optim.ema_decay), the frozen ones as they are; else the params."""
    if not ema:
        return params
    from flax import traverse_util

    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(ema)})


def _training_run(workdir: str, step: Optional[int], log) -> Run:
    import jax

    from clip_jax.methods import METHODS
    from clip_jax.methods.run_model import model_from_config
    from clip_jax.models import create_model
    from clip_jax.parallel.sharding import make_mesh

    config = read_config(workdir)
    step, state = _restore(os.path.join(workdir, "checkpoints"), step, log)
    params = jax.device_get(evaluated_params(state["params"], state.get("ema") or {}))
    model_state = dict(jax.device_get(state.get("model_state") or {}))
    trained = model_from_config(config)
    # the method's own view of its params (what are the towers, what else it trains), on one device
    method = METHODS.get(config.method)(config, trained, make_mesh({"data": 1}, jax.devices()[:1]))
    model = create_model(trained.config)
    variables = unstacked(model, method.export(params, model_state)["towers"])
    return Run(workdir, TRAINING, config, model, variables, step, method, params, model_state)


def _restore(directory: str, step: Optional[int], log) -> tuple[int, dict]:
    """(step, the saved train state as a dict) of the checkpoint at `step`, or of the newest that reads."""
    import orbax.checkpoint as ocp

    if "://" not in directory:
        directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None)
    manager = ocp.CheckpointManager(directory, options=options)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first, or pass an exported file")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {directory}; there are {sorted(steps)}")
    for candidate in [step] if step is not None else steps:
        try:
            restored = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            return candidate, restored["state"]
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            if step is not None:
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            log(f"checkpoint {directory}/{candidate} is unreadable ({type(e).__name__}: {reason}); "
                "reading the previous one")
    raise FileNotFoundError(f"no checkpoint in {directory} reads back whole (steps {sorted(steps)})")
