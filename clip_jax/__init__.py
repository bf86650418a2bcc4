"""clip_jax: CLIP pretraining in JAX/Flax, from a laptop CPU to a TPU pod.

The public API (TensorFlow is never imported here; the input pipeline imports it lazily):

    tokens = clip_jax.tokenize(["a photo of a cat"])           # int32 [N, 77]
    model, params = clip_jax.load("ViT-B-32-quickgelu", "openai.safetensors")
    img = clip_jax.encode_image(model, params, clip_jax.preprocess([pil_image]))
    txt = clip_jax.encode_text(model, params, tokens)          # both L2-normalized
    dense = clip_jax.encode_image_dense(model, params, images)  # [N, h, w, E] per patch, not normalized
    clip_jax.save_open_clip("ViT-B-32-quickgelu", params, "out.safetensors")
    model, params = clip_jax.load("hf-hub:openai/clip-vit-base-patch32")   # or a transformers model dir
    clip_jax.save_hf(model, params, "out_dir")                 # transformers.AutoModel.from_pretrained
    clip_jax.save_open_clip_dir(model, params, "dir")   # open_clip.create_model_and_transforms("local-dir:dir")
"""

from clip_jax.input.tf_runtime import quiet_cuda_probe

quiet_cuda_probe()  # first, before anything (etils, tfds, the input pipeline) imports TensorFlow

from clip_jax.api import (  # noqa: E402
    encode_image,
    encode_image_dense,
    encode_text,
    load,
    save_hf,
    save_open_clip,
    save_open_clip_dir,
)
from clip_jax.models import create_model, get_model_config, init_variables, list_models  # noqa: E402
from clip_jax.preprocessing import MEAN, STD, preprocess  # noqa: E402
from clip_jax.tokenizers import tokenize  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MEAN",
    "STD",
    "create_model",
    "encode_image",
    "encode_image_dense",
    "encode_text",
    "get_model_config",
    "init_variables",
    "list_models",
    "load",
    "preprocess",
    "save_hf",
    "save_open_clip",
    "save_open_clip_dir",
    "tokenize",
]
