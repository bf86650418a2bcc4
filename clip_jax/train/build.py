"""One assembly: model, method, parameter groups, optimizer, state and the jitted step from a
config and a mesh. The trainer, the benchmark and the tests all build through here, so what
they measure and test is what the trainer runs."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from flax import traverse_util

from clip_jax.config import optim_settings
from clip_jax.methods import METHODS
from clip_jax.methods.base import Method, Phase
from clip_jax.methods.run_model import model_from_config  # noqa: F401  (built below training: clip_jax.runs)
from clip_jax.models import CLIP
from clip_jax.parallel import sharding
from clip_jax.train.optim import ParamGroups, make_optimizer, make_schedule, path_name, resolve_param_groups
from clip_jax.train.step import TrainState, create_state, jit_train_step


@dataclasses.dataclass
class Run:
    config: Any
    mesh: jax.sharding.Mesh
    model: CLIP
    method: Method
    groups: ParamGroups
    schedule: optax.Schedule  # built once: the optimizer's, and the one the trainer logs
    optimizer: optax.GradientTransformation
    state: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Callable  # (state, batch) -> (state, metrics), jitted; the state is donated; phase `phase`'s
    phases: tuple[Phase, ...] = (Phase(0, "train"),)  # the method's (phases_of)
    phase: int = 0  # the phase build was asked for
    # Every phase whose steps run on this run's optimizer state (from the one that began it to the next
    # with a fresh optimizer): its jitted step.
    step_fns: dict[int, Callable] = dataclasses.field(default_factory=dict)

    @property
    def start(self) -> int:
        """The step (count of steps taken) this run's optimizer state and schedule began at."""
        return self.phases[min(self.step_fns)].start if self.step_fns else 0

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (1-based, as logged)."""
        return float(self.schedule(step - 1 - self.start))

    def step_for(self, step: int) -> Callable:
        """The step function that runs step `step` (0-based count of steps already taken)."""
        return self.step_fns[phase_at(self.phases, step)]


def phases_of(config) -> tuple[Phase, ...]:
    """The method's phases for `config`, ordered by start, the first at step 0; phases that start
    at the same step are one, which changes what each of them changes."""
    phases = sorted(METHODS.get(config.method).phases(config), key=lambda p: p.start)
    if not phases or phases[0].start != 0:
        phases.insert(0, Phase(0, "train"))
    merged = [phases[0]]
    for p in phases[1:]:
        last = merged[-1]
        if p.start != last.start:
            merged.append(p)
            continue
        merged[-1] = Phase(p.start, f"{last.name}+{p.name}", p.frozen if p.frozen is not None else last.frozen,
                           last.fresh_optimizer or p.fresh_optimizer, last.attributes + p.attributes,
                           "; ".join(n for n in (last.note, p.note) if n))
    return tuple(merged)


def phase_at(phases: tuple[Phase, ...], step: int) -> int:
    """The index of the phase that runs step `step` (0-based count of steps already taken)."""
    return max(i for i, p in enumerate(phases) if p.start <= step)


def phase_of_checkpoint(phases: tuple[Phase, ...], steps_done: int) -> int:
    """The index of the phase whose state a checkpoint after `steps_done` steps holds: the one that
    ran its last step (phase 0 before any)."""
    return phase_at(phases, max(steps_done - 1, 0))


def optimizer_phases(phases: tuple[Phase, ...], phase: int) -> range:
    """The phases that share phase `phase`'s optimizer state: from the last fresh one at or before it
    (or the first) to the next fresh one."""
    first = max([0] + [i for i in range(phase + 1) if phases[i].fresh_optimizer])
    end = next((i for i in range(phase + 1, len(phases)) if phases[i].fresh_optimizer), len(phases))
    return range(first, end)


def build(config, mesh: jax.sharding.Mesh, *, compiler_options: Optional[dict] = None,
          gather_by_sum: bool = False, log: Callable[[str], None] = lambda message: None,
          abstract: bool = False, phase: int = 0, variables: Optional[dict] = None,
          init_weights: bool = True) -> Run:
    """Everything a run needs, with the params initialized in their shardings (and taken from
    config.init_from where set). Config errors are raised before anything compiles.

    `abstract`: nothing is allocated or run; the state is jax.ShapeDtypeStructs carrying their
    shardings, so the step can be lowered and compiled ahead of time for devices this host does
    not have (clip_jax.compile_check: a TPU topology).
    `phase`: the index in phases_of(config) of the phase to run; the run's optimizer state and
    schedule are those of the phase that began it (optimizer_phases), what the phases up to it
    froze is frozen, and it holds the step of every phase that shares its state. `variables`: the
    params (and model state) to start from, already on the mesh (those at a phase's start),
    instead of an init. `init_weights=False`: config.init_from is not read (a resumed run restores
    its checkpoint)."""
    phases = phases_of(config)
    shared = optimizer_phases(phases, phase)
    start = phases[shared[0]].start
    frozen = [p.frozen for p in phases[:shared[0] + 1] if p.frozen is not None]
    if frozen:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.optim.frozen = frozen[-1]
    model = model_from_config(config)
    method = METHODS.get(config.method)(config, model, mesh, gather_by_sum=gather_by_sum)
    boxed = jax.eval_shape(method.init, jax.random.key(0))
    shapes = _unbox(boxed)
    groups = resolve_param_groups(shapes["params"], config.optim, method.param_groups())
    method.lock({path_name(p) for p, frozen in groups.frozen.items() if frozen}, [path_name(p) for p in groups.frozen])
    schedule = make_schedule(config.optim, config.total_steps - start)
    optimizer = make_optimizer(config.optim, shapes["params"], config.total_steps - start, groups, schedule)
    ema_decay = optim_settings(config.optim)["ema_decay"]
    if not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
        raise ValueError(f"config.optim.ema_decay={ema_decay!r}: the moving average's decay is a number in [0, 1) "
                         "(GLIP's 0.999); 0 keeps no average")
    if abstract:
        shardings = sharding.init_shardings(method.init, mesh, boxed=boxed)
        variables = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           shapes, shardings)
        state = abstract_state(variables, optimizer, groups, mesh, ema=ema_decay > 0)
    else:
        if variables is None:
            variables, shardings = sharding.sharded_init_fn(method.init, mesh, jax.random.key(config.seed),
                                                            boxed=boxed)
            if config.init_from and init_weights:
                variables = initial_weights(config, model, variables, shardings, log, method=method)
            if type(method).start_variables is not Method.start_variables:
                variables = jax.jit(method.start_variables, out_shardings=shardings)(variables)
        state = create_state(variables, optimizer, groups, ema=ema_decay > 0)
    trained, frozen = groups.count()
    if frozen:
        log(f"parameter groups: {trained} param tensors trained, {frozen} frozen")
    batch_sharding = sharding.batch_sharding(mesh)
    step_fns = {}
    for i in shared:
        attributes = [a for p in phases[:i + 1] for a in p.attributes]
        stepped = method
        if attributes:  # the phase's own copy: the run's method stays as built
            stepped = copy.copy(method)
            for name, value in attributes:
                setattr(stepped, name, value)
        step_fns[i] = jit_train_step(stepped, optimizer, state, batch_sharding, groups=groups,
                                     accum_steps=config.accum_steps, seed=config.seed, ema_decay=ema_decay,
                                     compiler_options=compiler_options)
    return Run(config, mesh, model, method, groups, schedule, optimizer, state, batch_sharding, step_fns[phase],
               phases, phase, step_fns)


def abstract_state(variables, optimizer: optax.GradientTransformation, groups: ParamGroups,
                   mesh: jax.sharding.Mesh, ema: bool = False) -> TrainState:
    """create_state's result as shapes with shardings: the optimizer's moments (and the moving average) laid
    out as the params they follow, its other leaves (counts) and the scalars replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = variables["params"]
    trained = groups.trainable(params)
    like = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    opt_state = optax.tree_map_params(
        optimizer, lambda x, p: like(x, p.sharding), jax.eval_shape(optimizer.init, trained), trained,
        transform_non_params=lambda x: like(x, replicated),
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    scalar = jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=replicated)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(scalar, params, model_state, opt_state, scalar, scalar, trained if ema else {})


def _unbox(variables):
    import flax.linen as nn

    return nn.meta.unbox(variables)


def init_sources(config) -> list[tuple[str, str]]:
    """(path, regex) pairs of config.init_from and config.init_params, each ';'-separated: several
    files can each give some params (Chinese-CLIP: the image tower from CLIP's weights, the text
    tower from a Chinese RoBERTa). One regex applies to every file."""
    paths = [p.strip() for p in config.init_from.split(";") if p.strip()]
    regexes = [r.strip() for r in config.init_params.split(";")]
    if len(regexes) == 1:
        regexes = regexes * len(paths)
    if len(regexes) != len(paths):
        raise ValueError(f"config.init_from names {len(paths)} files but config.init_params has {len(regexes)} "
                         "';'-separated regexes: give one regex, or one per file")
    return list(zip(paths, regexes))


def initial_weights(config, model: CLIP, variables: dict, shardings, log=print, method=None) -> dict:
    """config.init_from's variables (those whose path matches config.init_params, BatchNorm
    statistics too) in place of the fresh init; the rest keep it. A missing or mis-shaped one of
    the taken set is an error that names its path. Only where a run starts from step 0: a resumed
    run restores its checkpoint. Several files (init_sources) are read in order."""
    for path, regex in init_sources(config):
        variables = _weights_of(config, model, variables, shardings, path, regex, log, method)
    return variables


def _weights_of(config, model: CLIP, variables: dict, shardings, path: str, regex: str, log, method=None) -> dict:
    from clip_jax.api import load
    from clip_jax.hub import is_hub_name

    if not os.path.exists(path) and "://" not in path and not is_hub_name(path):
        raise FileNotFoundError(f"config.init_from={path!r} does not exist")
    try:
        take = re.compile(regex)
    except re.error as e:
        raise ValueError(f"config.init_params={regex!r} is not a valid regex ({e})") from None
    wanted = lambda key: bool(take.fullmatch(path_name(key[1:])))  # noqa: E731  (key: (collection, ...))
    fresh = traverse_util.flatten_dict(variables)
    try:
        own = method.weights(path) if method is not None else None
        if own is None:
            _, loaded = load(model.config, path, scan=config.scan, only=wanted)
            got = traverse_util.flatten_dict(dict(loaded))
        else:  # the method's own layout: its variables by path, each checked as the model's loader does
            got = {k: v for k, v in traverse_util.flatten_dict(dict(own)).items() if k in fresh and wanted(k)}
            for key, value in got.items():
                if tuple(np.shape(value)) != tuple(fresh[key].shape):
                    raise ValueError(f"{key[0]} {path_name(key[1:])!r} has shape {tuple(np.shape(value))} in the "
                                     f"weights, the model's is {tuple(fresh[key].shape)}")
    except ValueError as e:
        raise ValueError(f"config.init_from={path!r} (config.init_params={regex!r}): {e}") from None
    taken = sum(1 for key in fresh if key in got)
    if not taken:
        raise ValueError(f"config.init_params={regex!r} matches no parameter of {config.model!r} "
                         f"(it must match a whole path, e.g. 'visual/.*')")
    out = {key: got.get(key, value) for key, value in fresh.items()}
    log(f"initialized {taken} of {len(fresh)} variables from {path}")
    flat_shardings = traverse_util.flatten_dict(shardings)
    placed = {k: jax.device_put(v, flat_shardings[k]) if k in got else v for k, v in out.items()}
    return traverse_util.unflatten_dict(placed)
