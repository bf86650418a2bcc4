"""Export a run for evaluation anywhere, what its method exports (clip_jax.runs reads the run):

    python -m clip_jax.export --workdir=DIR --out=PATH [--step=N] [--extras] [--format=open_clip|hf|open_clip_dir]

--format=open_clip (the default) writes PATH.safetensors in open_clip's layout (``open_clip.create_model(name,
pretrained=PATH.safetensors)``; a SigLIP run's logit bias with it), PATH.json (the open_clip
model config, for ``open_clip.add_model_config``, with ``init_logit_bias`` where the model has a
bias; written for every model, needed for those that are no open_clip preset; a cn-* model's is
Chinese-CLIP's), and PATH.msgpack (the plain Flax variables, unstacked). Both files load with
``clip_jax.load(name, path)``. A SLIP run's SSL head is written only with --extras
(PATH.ssl_head.safetensors); an adaptation workdir (python -m clip_jax.adapt) gives its frozen
towers and PATH.adapter.safetensors / PATH.adapter.json.

--format=hf writes the directory PATH in transformers' layout (clip_jax.save_hf): config.json,
model.safetensors and the tokenizer and image processor files, which
``transformers.AutoModel.from_pretrained(PATH)`` / ``AutoProcessor.from_pretrained(PATH)`` and
``clip_jax.load(PATH)`` read; the parts and files named above go into it as PART.safetensors / NAME.

--format=open_clip_dir writes the directory PATH as open_clip's local-dir: folder (clip_jax.save_open_clip_dir):
open_clip_config.json (model_cfg, preprocess_cfg) and open_clip_model.safetensors, which
``open_clip.create_model_and_transforms("local-dir:PATH")`` loads for any preset or override, and so
CLIP_benchmark (``--model=local-dir:PATH``) and DataComp evaluate (docs/evaluation.md).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

FORMATS = ("open_clip", "hf", "open_clip_dir")


def export(workdir: str, out: str, step: Optional[int] = None, extras: bool = False, format: str = "open_clip") -> dict:
    """A run's export (clip_jax.runs: what its method exports): a training run's towers at `step`
    (default: its newest good checkpoint), with the model's logit bias where it has one (SigLIP),
    and with `extras` the parts only training uses (SLIP's SSL head: PATH.ssl_head.safetensors); an
    adaptation's frozen towers and PATH.adapter.safetensors / PATH.adapter.json, what it learned."""
    from clip_jax import runs
    from clip_jax.api import save_open_clip, write_flax_params
    from clip_jax.convert import write_safetensors

    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {', '.join(FORMATS)}")
    run = runs.read(workdir, step)
    exported = run.exported(extras)
    if format != "hf" and exported.model.config.vision.kind == "groupvit":  # open_clip has no GroupViT
        raise ValueError(f"{workdir} holds a GroupViT run, which open_clip's layouts cannot hold: export it with "
                         "--format=hf (transformers' GroupViTModel)")
    if format == "hf":
        return {"step": run.step, **export_hf(exported, out)}
    if format == "open_clip_dir":
        return {"step": run.step, **export_open_clip_dir(exported, out)}
    out = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = {"safetensors": out + ".safetensors", "json": out + ".json", "msgpack": out + ".msgpack"}
    save_open_clip(exported.model.config, exported.variables, paths["safetensors"], config_path=paths["json"])
    write_flax_params(exported.variables, paths["msgpack"])
    for part, tensors in exported.parts.items():
        paths[part] = f"{out}.{part}.safetensors"
        write_safetensors(tensors, paths[part])
    for name, source in exported.files.items():
        stem, ext = os.path.splitext(name)
        paths[f"{stem}_{ext[1:]}"] = f"{out}.{name}"
        shutil.copyfile(source, paths[f"{stem}_{ext[1:]}"])
    return {"step": run.step, **paths}


def export_hf(exported, out: str) -> dict:
    """The towers in transformers' layout in the directory `out`, the other parts and files beside them."""
    from clip_jax.api import save_hf
    from clip_jax.convert import write_safetensors

    paths = {"hf": save_hf(exported.model, exported.variables, out)}
    for part, tensors in exported.parts.items():
        paths[part] = os.path.join(out, f"{part}.safetensors")
        write_safetensors(tensors, paths[part])
    for name, source in exported.files.items():
        paths[name] = os.path.join(out, name)
        shutil.copyfile(source, paths[name])
    return paths


def export_open_clip_dir(exported, out: str) -> dict:
    """The towers as open_clip's local-dir: folder `out`; the parts only training uses have no place there."""
    from clip_jax.api import save_open_clip_dir

    if exported.parts or exported.files:
        raise ValueError(f"--format=open_clip_dir holds the two towers only; this run also exports "
                         f"{sorted(exported.parts) + sorted(exported.files)}: use --format=open_clip or hf for those")
    return {"open_clip_dir": save_open_clip_dir(exported.model, exported.variables, out)}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clip_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir (python -m clip_jax.train --workdir)")
    parser.add_argument("--out", required=True, help="output path prefix (PATH.safetensors, PATH.json, PATH.msgpack); "
                        "with --format=hf the output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that reads)")
    parser.add_argument("--extras", action="store_true",
                        help="also the parts only training uses (SLIP's SSL head: PATH.ssl_head.safetensors)")
    parser.add_argument("--format", choices=FORMATS, default="open_clip",
                        help="open_clip: open_clip's state dict, its JSON and Flax's msgpack (the default); "
                             "hf: a transformers model directory; open_clip_dir: open_clip's local-dir: folder")
    args = parser.parse_args(argv)
    written = export(args.workdir, args.out, args.step, args.extras, args.format)
    print(f"exported step {written.pop('step')}:")
    for kind, path in written.items():
        print(f"  {kind}: {path}")


if __name__ == "__main__":
    main()
