"""Export a training run's parameters for evaluation anywhere:

    python -m clip_jax.export --workdir=DIR --out=PATH [--step=N]

writes PATH.safetensors in open_clip's layout (``open_clip.create_model(name,
pretrained=PATH.safetensors)``), PATH.json (the open_clip model config, for
``open_clip.add_model_config``; written for every model, needed for those that are no
open_clip preset), and PATH.msgpack (the plain Flax variables, unstacked). Both files
load with ``clip_jax.load(name, path)``.
"""

from __future__ import annotations

import json
import os
from typing import Optional


def read_run_config(workdir: str):
    """The config a run was started with (the trainer writes DIR/config.json), over the base config."""
    from etils import epath

    from clip_jax.config import from_saved

    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a clip_jax training workdir (or was made before config.json existed)"
        )
    return from_saved(json.loads(path.read_text()))


def load_run(workdir: str, step: Optional[int] = None):
    """(model, variables, step) of a workdir's checkpoint (latest by default), unstacked, on the host."""
    import orbax.checkpoint as ocp

    from clip_jax import convert
    from clip_jax.models import create_model
    from clip_jax.train import checkpoint
    from clip_jax.train.build import model_from_config

    config = read_run_config(workdir)
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"))
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first, or pass an exported file")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {workdir}/checkpoints; there are {sorted(steps)}")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    trained = {"params": state["params"], **(state.get("model_state") or {})}
    # Through open_clip's state dict: the same tested conversion unstacks scanned layers.
    model = create_model(model_from_config(config).config)
    variables = convert.state_dict_to_variables(model, convert.variables_to_state_dict(trained))
    return model, variables, step


def export(workdir: str, out: str, step: Optional[int] = None) -> dict:
    """A training workdir, or an adaptation workdir (python -m clip_jax.adapt): its frozen towers,
    and NAME.adapter.safetensors / NAME.adapter.json with what the method learned."""
    from clip_jax.api import save_open_clip, write_flax_params

    adapted = os.path.exists(os.path.join(workdir, "adapt_config.json"))
    if adapted:
        model, variables = _adapted_towers(workdir)
    else:
        model, variables, step = load_run(workdir, step)
    out = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = {"safetensors": out + ".safetensors", "json": out + ".json", "msgpack": out + ".msgpack"}
    save_open_clip(model.config, variables, paths["safetensors"], config_path=paths["json"])
    write_flax_params(variables, paths["msgpack"])
    if adapted:
        import shutil

        for ext in ("safetensors", "json"):
            source = os.path.join(workdir, f"adapter.{ext}")
            if not os.path.exists(source):
                raise FileNotFoundError(f"{source} not found: the adaptation in {workdir} has not finished")
            paths[f"adapter_{ext}"] = f"{out}.adapter.{ext}"
            shutil.copyfile(source, paths[f"adapter_{ext}"])
    return {"step": step, **paths}


def _adapted_towers(workdir: str):
    """(model, variables) an adaptation ran on: its config's weights (a file or a training workdir)."""
    from clip_jax.adapt.config import adapt_config
    from clip_jax.adapt.weights import load_frozen

    with open(os.path.join(workdir, "adapt_config.json")) as f:
        saved = json.load(f)
    settings = adapt_config()
    settings.weights, settings.model = saved.get("weights", ""), saved.get("model", "")
    return load_frozen(settings)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir (python -m clip_jax.train --workdir)")
    parser.add_argument("--out", required=True, help="output path prefix (PATH.safetensors, PATH.json, PATH.msgpack)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    written = export(args.workdir, args.out, args.step)
    print(f"exported step {written.pop('step')}:")
    for kind, path in written.items():
        print(f"  {kind}: {path}")


if __name__ == "__main__":
    main()
