"""The TFRecord schema of clip_jax image-text shards, and its writer.

One ``tf.train.Example`` per image-text pair:

| feature   | type          | required | what |
| --------- | ------------- | -------- | ---- |
| `image`   | bytes         | yes      | the encoded image file (JPEG or PNG), as stored |
| `caption` | bytes (1+)    | yes      | UTF-8 caption; several for COCO-style data (training: one, retrieval: all) |
| `key`     | bytes         | no       | an id of the pair (e.g. img2dataset's key), for tracing |
| `label`   | int64         | no       | a class index, for datasets that also serve zero-shot eval |

A video clip's record (``serialize_clip``; clip_jax.input.video reads it) holds `frames` (bytes, 1+: the
encoded frames, PNG or JPEG, in time order), `frames/count` (int64, how many) and, from the converter,
`frames/time` (float, each frame's timestamp in seconds) in place of `image`; captions, key and label as above.

Shards are named ``PREFIX-00012-of-00128.tfrecord`` (optionally GZIP-compressed, then
``.tfrecord.gz``). The readers take any glob, local or on cloud storage (tf.io.gfile).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

IMAGE = "image"
CAPTION = "caption"
KEY = "key"
LABEL = "label"
FRAMES = "frames"
FRAME_COUNT = "frames/count"
FRAME_TIMES = "frames/time"


def shard_name(prefix: str, index: int, count: int, compressed: bool = False) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.tfrecord" + (".gz" if compressed else "")


def serialize_example(
    image: bytes, caption: Union[str, Sequence[str]], key: str = "", label: Optional[int] = None
) -> bytes:
    """Encode one image and its caption (or captions) as a serialized tf.train.Example."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    captions = [caption] if isinstance(caption, str) else list(caption)

    feature = {
        IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        CAPTION: tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode("utf-8") for c in captions])),
        KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
    }
    if label is not None:
        feature[LABEL] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    # deterministic=True: the same pair gives the same bytes in every process.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def serialize_clip(frames: Sequence[bytes], captions: Sequence[str] = (), key: str = "", label: Optional[int] = None,
                   ints: Optional[dict] = None, times: Optional[Sequence[float]] = None) -> bytes:
    """A serialized tf.train.Example of one clip: its encoded frames in time order, captions, key, label, other
    int64 features {name: value} and the frames' timestamps."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()

    def int64(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    feature = {
        FRAMES: tf.train.Feature(bytes_list=tf.train.BytesList(value=list(frames))),
        FRAME_COUNT: int64(len(frames)),
        CAPTION: tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode("utf-8") for c in captions])),
        KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
    }
    if label is not None:
        feature[LABEL] = int64(label)
    for name, value in (ints or {}).items():
        feature[name] = int64(value)
    if times is not None:
        feature[FRAME_TIMES] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(t) for t in times]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


class ShardWriter:
    """Writes examples round the shards of one output, ``count`` files in all."""

    def __init__(self, prefix: str, count: int = 1, compressed: bool = False):
        from clip_jax.input.tf_runtime import import_tensorflow

        tf = import_tensorflow()
        options = tf.io.TFRecordOptions(compression_type="GZIP" if compressed else "")
        self.paths = [shard_name(prefix, i, count, compressed) for i in range(count)]
        self._writers = [tf.io.TFRecordWriter(p, options) for p in self.paths]
        self.written = 0

    def write(self, serialized: bytes) -> None:
        self._writers[self.written % len(self._writers)].write(serialized)
        self.written += 1

    def close(self) -> None:
        for w in self._writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
