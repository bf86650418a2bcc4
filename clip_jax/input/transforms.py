"""Image transforms of the input, in TensorFlow: the decode and crop of an encoded image (random
resized or random square crop for training, resize and center crop for evaluation), the same
crop of a label map (a segmentation: nearest-neighbour, from the image's geometry and seed), the
model-input finish (uint8 or normalized) and SimCLR's augmented views."""

from __future__ import annotations

from clip_jax.input.settings import data_settings
from clip_jax.preprocessing import MEAN, STD


def decode_and_crop(image_bytes, image_size: int, train: bool, seed, config):
    """Encoded JPEG/PNG -> float32 [S, S, 3] normalized with CLIP's mean/std.

    train: RandomResizedCrop (area scale `crop_scale`, default (0.9, 1.0) as open_clip;
    aspect ratio 3/4..4/3) or, with crop='random', a random square crop of the resized
    image. JPEGs decode only the crop window. Eval: resize the shorter side, center crop.
    """
    config = data_settings(config)
    return finish(crop_pixels(image_bytes, image_size, train, seed, config), image_size, config)


def crop_pixels(image_bytes, image_size: int, train: bool, seed, config):
    """decode_and_crop's crop, as float32 pixels in [0, 255]."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    method = config["resize_method"]
    antialias = bool(config["antialias"])
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 2), b"\xff\xd8")
    if train and config["crop"] == "random_resized":
        begin, size = _window(image_bytes, seed, config)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])

        def jpeg():
            return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

        def other():
            full = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            return tf.slice(full, [begin[0], begin[1], 0], [size[0], size[1], 3])

        image = tf.cond(is_jpeg, jpeg, other)
        image = tf.image.resize(image, [image_size, image_size], method=method, antialias=antialias)
    else:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        new_h, new_w = _resized(tf.shape(image), image_size)
        # Eval matches PIL (open_clip's eval transform), which always antialiases.
        image = tf.image.resize(image, [new_h, new_w], method=method, antialias=antialias or not train)
        if train:  # crop='random': a random square window of the resized image
            image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=seed)
        else:
            top = (new_h - image_size + 1) // 2
            left = (new_w - image_size + 1) // 2
            image = tf.slice(image, [top, left, 0], [image_size, image_size, 3])
    # float pixels whatever the resize (nearest-neighbour keeps uint8); bicubic overshoot clipped as PIL does
    return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)


def _image_shape(image_bytes):
    """[h, w, c] of an encoded image: read from a JPEG's or a PNG's header (c = 3 for a PNG), else decoded."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 2), b"\xff\xd8")
    is_png, h, w = png_size(image_bytes)
    return tf.case([
        (is_jpeg, lambda: tf.io.extract_jpeg_shape(image_bytes)),
        (is_png, lambda: tf.cast(tf.stack([h, w, 3]), tf.int32)),
    ], default=lambda: tf.shape(tf.io.decode_image(image_bytes, channels=3, expand_animations=False)))


def png_size(data):
    """(is a PNG, height, width) from a PNG's header, without decoding: never raises."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    ok = tf.logical_and(tf.strings.length(data) >= 24, tf.equal(tf.strings.substr(data, 0, 8), _PNG))
    header = tf.where(ok, tf.strings.substr(data, 16, 8), tf.constant(b"\0" * 8))
    raw = tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int64)
    big_endian = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]  # noqa: E731
    return ok, big_endian(raw[4:8]), big_endian(raw[0:4])


_PNG = b"\x89PNG\r\n\x1a\n"


def _window(image_bytes, seed, config):
    """(begin, size) of a training random resized crop of the image: a function of its shape and the seed."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        _image_shape(image_bytes), tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=tuple(config["crop_scale"]), max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _resized(shape, image_size: int):
    """(new_h, new_w) of an image of `shape` whose shorter side is resized to image_size."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    ratio = image_size / tf.minimum(h, w)
    new_h = tf.maximum(image_size, tf.cast(tf.floor(h * ratio), tf.int32))
    new_w = tf.maximum(image_size, tf.cast(tf.floor(w * ratio), tf.int32))
    return new_h, new_w


def crop_mask(mask_bytes, image_bytes, image_size: int, train: bool, seed, config):
    """An encoded label map (a PNG of per-pixel indices, the image's size) -> uint8 [S, S], cropped as
    crop_pixels crops the image with the same seed (the window comes from the image's shape and the
    seed; the random square crop draws the same offsets for one channel as for three), resized
    nearest-neighbour so indices stay indices."""
    from clip_jax.input.tf_runtime import import_tensorflow

    return crop_label_map(import_tensorflow().io.decode_png(mask_bytes, channels=1), image_bytes, image_size, train,
                          seed, config)


def crop_label_map(mask, image_bytes, image_size: int, train: bool, seed, config):
    """crop_mask of a decoded label map [H, W, 1]."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    nearest = tf.image.ResizeMethod.NEAREST_NEIGHBOR
    if train and config["crop"] == "random_resized":
        begin, size = _window(image_bytes, seed, config)
        mask = tf.slice(mask, [begin[0], begin[1], 0], [size[0], size[1], 1])
        mask = tf.image.resize(mask, [image_size, image_size], method=nearest)
    else:
        new_h, new_w = _resized(_image_shape(image_bytes), image_size)
        mask = tf.image.resize(mask, [new_h, new_w], method=nearest)
        if train:
            mask = tf.image.stateless_random_crop(mask, [image_size, image_size, 1], seed=seed)
        else:
            top = (new_h - image_size + 1) // 2
            left = (new_w - image_size + 1) // 2
            mask = tf.slice(mask, [top, left, 0], [image_size, image_size, 1])
    return tf.ensure_shape(tf.cast(mask[..., 0], tf.uint8), [image_size, image_size])


def finish(image, image_size: int, config, leading: tuple = ()):
    """Pixels in [0, 255] -> the model's input: uint8, or normalized with CLIP's mean and std. leading: the
    static dims before [S, S, 3] (a clip's frames: (None,))."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    if config["image_dtype"] == "uint8":
        # Normalize on the accelerator instead (clip_jax.preprocessing.normalize_images):
        # a quarter of the host work and of the host-to-device bytes.
        return tf.ensure_shape(tf.cast(tf.round(image), tf.uint8), [*leading, image_size, image_size, 3])
    # (x / 255 - mean) / std as one multiply-add.
    scale = tf.constant([1.0 / (255.0 * s) for s in STD])
    offset = tf.constant([-m / s for m, s in zip(MEAN, STD)])
    return tf.ensure_shape(image * scale + offset, [*leading, image_size, image_size, 3])


# SimCLR's augmentation as SLIP uses it (its datasets.py): random resized crop of area 0.08-1,
# colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p 0.8, grayscale p 0.2,
# Gaussian blur (sigma 0.1-2) p 0.5, horizontal flip p 0.5.
SIMCLR = {"crop_scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "p_jitter": 0.8, "p_gray": 0.2,
          "blur_sigma": (0.1, 2.0), "p_blur": 0.5}


def simclr_view(image_bytes, image_size: int, seed, config):
    """One SimCLR view of an encoded image, deterministic in `seed` (stateless ops only). The
    jitter's four parts run in a fixed order (torchvision draws one per call) and the blur is a
    true Gaussian (PIL's is a box approximation)."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    config = {**data_settings(config), "crop": "random_resized", "crop_scale": SIMCLR["crop_scale"]}
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 10)
    x = crop_pixels(image_bytes, image_size, True, seeds[0], config) / 255.0
    uniform = lambda i, low=0.0, high=1.0: tf.random.stateless_uniform([], seeds[i], low, high)  # noqa: E731
    b, c, s, h = SIMCLR["jitter"]

    def gray(img):
        return tf.image.rgb_to_grayscale(img)  # [S, S, 1], ITU-R 601 weights as torchvision

    def jitter(img):
        img = tf.clip_by_value(img * uniform(2, 1 - b, 1 + b), 0.0, 1.0)
        mean = tf.reduce_mean(gray(img))
        img = tf.clip_by_value((img - mean) * uniform(3, 1 - c, 1 + c) + mean, 0.0, 1.0)
        g = gray(img)
        img = tf.clip_by_value((img - g) * uniform(4, 1 - s, 1 + s) + g, 0.0, 1.0)
        return tf.image.adjust_hue(img, uniform(5, -h, h))

    x = tf.cond(uniform(1) < SIMCLR["p_jitter"], lambda: jitter(x), lambda: x)
    x = tf.cond(uniform(6) < SIMCLR["p_gray"], lambda: tf.tile(gray(x), [1, 1, 3]), lambda: x)
    x = tf.cond(uniform(7) < SIMCLR["p_blur"], lambda: _gaussian_blur(x, uniform(8, *SIMCLR["blur_sigma"])),
                lambda: x)
    x = tf.image.stateless_random_flip_left_right(x, seeds[9])
    return finish(tf.clip_by_value(x * 255.0, 0.0, 255.0), image_size, config)


def _gaussian_blur(image, sigma, radius: int = 6):
    """A separable Gaussian blur of an [S, S, 3] image (edges reflected); radius covers 3 sigma at
    the largest sigma."""
    from clip_jax.input.tf_runtime import import_tensorflow

    tf = import_tensorflow()
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
    cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
    x = tf.nn.depthwise_conv2d(x, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(x, cols, [1, 1, 1, 1], "VALID")[0]
