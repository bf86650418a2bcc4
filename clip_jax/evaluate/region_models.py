"""The models that work on a split's region proposals: a teacher CLIP's image encoder of crops, and a trained
run's proposal stage (its method's 'proposals' prediction, ViLD's RPN), loaded on a mesh. Shared by
`python -m clip_jax.embed regions` and the CLIP-on-crops baseline (clip_jax.evaluate.crops_baseline).

    teacher = load_teacher(weights, model_name, mesh)                   # .model, .encoder, .what, .crop_batch(n)
    stage = load_proposal_stage(workdir, step, batch_size, mesh, width)  # .source (ModelProposals), .config, ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np


@dataclasses.dataclass
class Teacher:
    model: Any
    encoder: Any  # clip_jax.evaluate.features.Encoder of the two towers
    what: str

    @property
    def width(self) -> int:
        return int(self.model.config.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision.image_size)

    def embed_crops(self, crops) -> np.ndarray:
        """Normalized crops [n, T, T, 3] -> unit image embeddings [n, E] on the host."""
        return np.asarray(self.encoder.images(np.asarray(crops)))


@dataclasses.dataclass
class ProposalStage:
    source: Any  # clip_jax.input.region_embeds.ModelProposals
    model: Any
    config: Any  # the run's config
    data_config: dict  # its data settings less train/eval (how its images are cropped)
    batch_size: int  # records per proposal batch, rounded to the mesh
    step: Optional[int]


def load_teacher(weights: str, model_name: Optional[str], mesh) -> Teacher:
    import jax

    from clip_jax.evaluate.evaluator import load_model
    from clip_jax.evaluate.features import Encoder

    model, variables, what, _, _ = load_model(None, weights, model_name, None)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return Teacher(model, Encoder(model, jax.device_put(variables, replicated), mesh), what)


def load_proposal_stage(workdir: str, step: Optional[int], batch_size: int, mesh, teacher_width: int,
                        teacher: str = "") -> ProposalStage:
    """The run's proposal stage; an error where its method has none or its embedding width is not the teacher's."""
    import jax

    from clip_jax.evaluate.evaluator import load_model, method_predictions
    from clip_jax.evaluate.features import Encoder
    from clip_jax.input import region_embeds

    model, variables, what, run_config, step = load_model(workdir, None, None, step)
    predictions = method_predictions(run_config, model, mesh)
    if "proposals" not in predictions:
        method = run_config.method if run_config is not None else "none"
        raise ValueError(f"--workdir={workdir!r}: its method ({method}) offers no 'proposals' prediction "
                         f"(it offers {sorted(predictions)}): pass a ViLD run, or --proposals=boxes")
    student = getattr(model.config, "embed_dim", None)
    if student is not None and int(student) != int(teacher_width):
        raise ValueError(f"--teacher={teacher!r} embeds in {teacher_width} dimensions but the run's model in "
                         f"{student}: ViLD distils into the teacher's space, so use a teacher of width {student}")
    data_config = {}
    if run_config is not None:
        data_config = {k: v for k, v in run_config.data.to_dict().items() if k not in ("train", "eval")}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    encoder = Encoder(model, jax.device_put(variables, replicated), mesh,
                      predictions={"proposals": predictions["proposals"]})
    batch = encoder.round_batch(batch_size)

    def proposal_fn(images):
        return jax.tree_util.tree_map(np.asarray, encoder.predict("proposals", images))

    source = region_embeds.ModelProposals(proposal_fn, model.config.vision.image_size, batch, data_config,
                                          {"workdir": workdir, "step": step, "run": what})
    return ProposalStage(source, model, run_config, data_config, batch, step)


__all__ = ["ProposalStage", "Teacher", "load_proposal_stage", "load_teacher"]
