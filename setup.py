"""clip_jax: CLIP pretraining in JAX/Flax, from a laptop CPU to a TPU pod."""

from setuptools import find_packages, setup

# Core: what the model, the losses, the train step and the benchmark need. TensorFlow
# (input pipeline, SentencePiece) comes with the "data" extra so an accelerator host
# without it can still run the model and the benchmark.
CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "etils[epath]>=1.7",  # workdir files on local disks or gs:// (Orbax uses it too)
    "ml-collections>=1.0",
    "einops>=0.8",
    "numpy>=1.26",
    "safetensors>=0.4",
    "ftfy>=6.1",
    "regex>=2024.0",
    "pillow>=10.0",
]
DATA = [
    "tensorflow>=2.18",
    "tensorflow-text>=2.18",
    "tensorflow-datasets>=4.9",
    "pycocotools>=2.0.7",  # COCOeval: the detection evaluation's AP
    "av>=12",  # PyAV: clip_jax.input.convert_video decodes video files (mp4, webm, avi) with it
]
# libtpu (with the jaxlib of the installed jax): clip_jax.compile_check describes Cloud TPU
# topologies with it and compiles the step for them on any host.
TPU = ["jax[tpu]"]
# huggingface_hub: hf-hub:ORG/NAME model names (clip_jax.hub), read from and fetched into its cache.
HUB = ["huggingface_hub>=0.34"]
# scikit-learn: the reference the linear probe is tested against; importlib_resources: tfds needs
# it to write the small test datasets the evaluation tests build; ruff: the linter CI runs.
TEST = DATA + TPU + HUB + ["pytest>=8.0", "pytest-xdist>=3.5", "sentencepiece>=0.2", "scikit-learn>=1.3",
                     "importlib_resources>=5", "ruff>=0.6"]

# The distribution's name: "clip-jax" (to which pip normalizes "clip_jax") is another project on the package
# index; the import name stays clip_jax.
DISTRIBUTION = "clip-jax-pretraining"

setup(
    name=DISTRIBUTION,
    version="0.1.0",
    description="CLIP pretraining in JAX/Flax: ViT/ModifiedResNet/text towers, open_clip interop, sharded training",
    python_requires=">=3.10",
    packages=find_packages(include=["clip_jax", "clip_jax.*"]),
    package_data={"clip_jax": ["assets/*", "assets/zero_shot/*.json", "model_configs/*.json"]},
    install_requires=CORE,
    extras_require={"data": DATA, "tpu": TPU, "hub": HUB, "test": TEST},
)
