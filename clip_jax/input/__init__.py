"""Input: data sources, the resumable tf.data training stream, evaluation readers, the record
schema and the embedded shapes dataset. Imports neither training nor evaluation."""

from clip_jax.input.tf_runtime import quiet_cuda_probe

quiet_cuda_probe()  # before any module of this package imports TensorFlow
