"""Input: data sources, the resumable tf.data training stream, evaluation readers, the record
schema and the embedded shapes dataset. Imports neither training nor evaluation."""
