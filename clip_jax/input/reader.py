"""The one reader of records: the features a consumer names (clip_jax.input.features) become one
tf.train.Example parse spec, one parse and one tfds selection, each giving {feature name: raw value}.
Training (pipeline), evaluation (eval_data) and adaptation (adapt.data, through eval_data) read
through it."""

from __future__ import annotations

from typing import Sequence

from clip_jax.input.features import Reading, nested, resolve


def example_spec(names: Sequence[str], reading: Reading) -> dict:
    """The tf.io parse spec of the named features."""
    spec: dict = {}
    for _, feature in resolve(names):
        spec.update(feature.parse(reading))
    return spec


def parse_example(record, names: Sequence[str], reading: Reading, spec=None) -> dict:
    """A serialized tf.train.Example -> {name: raw value} (raises where the bytes are no Example or hold
    a feature of another type: tf.data's ignore_errors drops such records)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    parsed = tf.io.parse_single_example(record, spec if spec is not None else example_spec(names, reading))
    return {name: feature.value(parsed, reading) for name, feature in resolve(names)}


def tfds_decoders(names: Sequence[str], reading: Reading) -> dict:
    """The nested tfds decoders of the named features (images stay encoded: the ops decode them)."""
    flat: dict = {}
    for _, feature in resolve(names):
        flat.update(feature.tfds_decoders(reading))
    return nested(flat)


def from_tfds(ex, names: Sequence[str], reading: Reading) -> dict:
    """A tfds example -> {name: raw value} of the named features."""
    out = {}
    for name, feature in resolve(names):
        if feature.tfds is None:
            raise ValueError(f"record feature {name!r} is read from TFRecords only: tfds:{reading.source.name} "
                             "cannot provide it; read it from tfrecord: or shapes data")
        out[name] = feature.tfds(ex, reading)
    return out


def empty(names: Sequence[str], reading: Reading) -> dict:
    """{name: the feature's value in a sentinel or marker}."""
    return {name: feature.empty(reading) for name, feature in resolve(names)}
