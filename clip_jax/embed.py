"""Embed the image side of a run's training batches once, for training against a locked tower (LiT).

    python -m clip_jax.embed --config=configs/lit.py:ViT-B-16 --config.init_from=W.safetensors \
        --config.data.train='tfrecord:/data/pairs-*' --out=/data/lit_b16_embeds [--steps=N]
    python -m clip_jax.train --config=configs/lit.py:ViT-B-16 --config.init_from=W.safetensors \
        --config.data.train='tfrecord:/data/pairs-*' --config.clip.image_embeddings=/data/lit_b16_embeds --workdir=DIR

The input pipeline runs exactly as the trainer's would (same seed, streams, crops, order), the
image tower in inference mode (as a locked tower runs in training), and each step's global batch
is written as image embeddings and tokens (clip_jax.input.embedding_cache). `--steps` defaults
to config.total_steps. One process.

ViLD-image's region embeddings (clip_jax.input.region_embeds, record format clip_jax.input.regions):

    python -m clip_jax.embed regions --data='tfrecord:/data/coco-*' --teacher=W.safetensors [--teacher_model=NAME] \
        (--workdir=VILD_RUN [--step=N] | --proposals=boxes) --out=DIR [--max_regions=32] [--limit=N]
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "the run's config file, e.g. configs/lit.py:ViT-B-16")
flags.DEFINE_string("out", None, "the cache directory")
flags.DEFINE_integer("steps", 0, "steps to embed (0: config.total_steps)")
flags.DEFINE_integer("chunk_steps", 100, "steps per .npz file")
flags.mark_flags_as_required(["config", "out"])


def embed(config, out: str, steps: int = 0, chunk_steps: int = 100, log=print) -> dict:
    """Write the cache of `config`'s first `steps` training batches to `out`; its manifest."""
    import jax
    import numpy as np

    from clip_jax.evaluate.features import Encoder
    from clip_jax.input.embedding_cache import EmbeddingWriter, read_manifest, settings_of
    from clip_jax.parallel import sharding
    from clip_jax.train.build import build
    from clip_jax.train.trainer import training_input

    if jax.process_count() != 1:
        raise ValueError("python -m clip_jax.embed runs as one process (it writes global batches)")
    if not config.data.train:
        raise ValueError("config.data.train is empty: the cache embeds the run's training data")
    config = config.copy_and_resolve_references()
    config.clip.image_embeddings = ""  # building the run that makes the cache, not one that reads it
    steps = steps or config.total_steps
    mesh = sharding.make_mesh({"data": -1})
    run = build(config, mesh, log=log)
    model = run.model
    # the image tower in inference mode, as a locked tower runs in training
    encoder = Encoder(model, run.method.model_variables(run.state.params, run.state.model_state), mesh,
                      predictions=run.method.predictions())
    pipe = training_input(config, model, run.method)
    writer = EmbeddingWriter(out, settings_of(config, model.config.vision.image_size, model.config.text.context_length),
                             chunk_steps)
    start = time.perf_counter()
    for step in range(steps):
        batch = next(pipe)
        writer.add(np.asarray(encoder.images(batch["image"])), batch["tokens"])
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rate = (step + 1) * config.batch_size / (time.perf_counter() - start)
            log(f"embedded {step + 1}/{steps} steps ({rate:.1f} images/s)")
    writer.close(pipe.bad_records())
    return read_manifest(out)


def main(argv):
    del argv
    embed(flags.FLAGS.config, flags.FLAGS.out, flags.FLAGS.steps, flags.FLAGS.chunk_steps)


def regions_main(argv=None) -> dict:
    """python -m clip_jax.embed regions ...: the records of --data with their region embeddings, to --out."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m clip_jax.embed regions", description=regions_main.__doc__)
    parser.add_argument("--data", required=True,
                        help="the records: a data spec of TFRecords (tfrecord:GLOB, an embedded dataset's split)")
    parser.add_argument("--out", required=True, help="directory of the new shards and regions.json")
    parser.add_argument("--teacher", required=True, help="the teacher CLIP: an export (.safetensors/.msgpack), "
                        "open_clip/OpenAI weights, or a model directory / hf-hub:ORG/NAME")
    parser.add_argument("--teacher_model", default=None, help="the teacher's model name or config JSON (default: "
                        "the one exported beside --teacher)")
    parser.add_argument("--workdir", default=None, help="the run whose method's 'proposals' prediction (ViLD's "
                        "proposal stage) proposes the regions")
    parser.add_argument("--step", type=int, default=None, help="the workdir's checkpoint (default: the latest)")
    parser.add_argument("--proposals", choices=("model", "boxes"), default=None,
                        help="model: the workdir's proposals (the default with --workdir); boxes: the records' own "
                             "objects/bbox and jittered copies, a stand-in without a trained proposal stage")
    parser.add_argument("--copies", type=int, default=2, help="--proposals=boxes: jittered copies of each box")
    parser.add_argument("--jitter", type=float, default=0.1, help="--proposals=boxes: jitter, a share of the box")
    parser.add_argument("--seed", type=int, default=0, help="--proposals=boxes: the jitter's seed")
    parser.add_argument("--max_regions", type=int, default=32, help="proposals kept per record, best first")
    parser.add_argument("--scales", default="1.0,1.5", help="crop scales around each proposal's centre")
    parser.add_argument("--resample", choices=("bicubic", "bilinear"), default="bicubic")
    parser.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    parser.add_argument("--batch_size", type=int, default=16, help="records per proposal batch")
    parser.add_argument("--crop_batch", type=int, default=64, help="crops per teacher batch")
    parser.add_argument("--data_setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a data setting (JSON value) over the workdir's config.data, e.g. cache_dir=/tmp/c")
    args = parser.parse_args(argv)
    proposals = args.proposals or ("model" if args.workdir else None)
    if proposals is None:
        parser.error("say where the proposals come from: --workdir=VILD_RUN (its 'proposals' prediction) or "
                     "--proposals=boxes (the records' own boxes, a stand-in)")
    if proposals == "model" and not args.workdir:
        parser.error("--proposals=model runs a trained proposal stage: pass --workdir=VILD_RUN")
    if proposals == "boxes" and args.workdir:
        parser.error("--proposals=boxes reads the records' boxes, not a run: drop --workdir (or --proposals)")
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        parser.error(f"--scales={args.scales!r}: give comma-separated numbers, e.g. 1.0,1.5")

    import jax

    from clip_jax.evaluate.region_models import load_proposal_stage, load_teacher
    from clip_jax.input import region_embeds
    from clip_jax.parallel import sharding

    if jax.process_count() != 1:
        raise ValueError("python -m clip_jax.embed regions runs as one process (it writes every record)")
    mesh = sharding.make_mesh({"data": -1})
    teacher = load_teacher(args.teacher, args.teacher_model, mesh)
    width = teacher.width
    data_config, describe = {}, {"teacher": teacher.what, "teacher_model": args.teacher_model}
    if proposals == "model":
        stage = load_proposal_stage(args.workdir, args.step, args.batch_size, mesh, width, args.teacher)
        source, batch, data_config = stage.source, stage.batch_size, stage.data_config
    else:
        batch = args.batch_size
        source = region_embeds.BoxProposals(args.copies, args.jitter, args.seed)
    for item in args.data_setting:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--data_setting={item!r}: expected KEY=VALUE")
        try:
            data_config[key] = json.loads(value)
        except json.JSONDecodeError:
            data_config[key] = value
    crop_batch = teacher.encoder.round_batch(args.crop_batch)
    manifest = region_embeds.write_regions(
        args.data, args.out, source, teacher.embed_crops, teacher.image_size, config=data_config, limit=args.limit,
        describe=describe, scales=scales, max_regions=args.max_regions, batch_size=batch, crop_batch=crop_batch,
        resample=args.resample, embed_dim=width)
    print(f"wrote {manifest['records']} records with {manifest['regions']} regions to {args.out} "
          f"({len(manifest['shards'])} shards): train on {manifest['read_with']}")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "regions":
        regions_main(sys.argv[2:])
    else:
        app.run(main)
