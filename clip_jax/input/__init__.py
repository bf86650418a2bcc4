"""Input: data sources, record features by name (features) read through one reader (reader), the
ops that make a method's declared batch keys (ops, transforms), the resumable tf.data training
stream (pipeline, training), evaluation readers, the record schema and the embedded shapes
dataset with what it offers its consumers (dataset_info). Imports neither training nor evaluation."""

# The ops and features defined outside ops.py and features.py register themselves when imported: the
# package imports them, so any use of clip_jax.input finds them.
from clip_jax.input import audio, detection, grounding_records, noun_prompts, prompts, regions, segmentation, video  # noqa: E402,F401
