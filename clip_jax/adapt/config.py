"""Every key an adaptation run reads, with its default (configs/adapt/METHOD.py set the method's)."""

from __future__ import annotations

import ml_collections

from clip_jax.config import base_config
from clip_jax.input import dataset_info, settings


def adapt_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "coop"  # clip_jax.adapt.methods.ADAPTERS: coop, cocoop, clip_adapter, tip_adapter, tip_adapter_f
    c.weights = ""  # the frozen CLIP: a file clip_jax.load reads (with c.model), a model dir / hf-hub: or a workdir
    c.model = ""  # the weights' architecture (a preset or model JSON); a workdir brings its own
    c.dtype = "float32"  # the frozen towers' compute dtype ('bfloat16'; the references run fp16)
    c.remat = "none"  # the towers' remat policy: 'full' lets MaPLe's and CoOp's text passes over many classes fit
    # a dataset named by its source ('tfds:NAME': its train/validation/test splits; dataset_info.split_specs)
    # or {train:, validation:, test:} specs; by default the embedded one, no download (dataset_info)
    c.dataset = dataset_info.DEFAULT_DATASET
    c.label_key = dataset_info.DEFAULT_LABEL_KEY  # the integer label feature of the records
    c.classnames = ""  # '' : the dataset's; or a JSON file {'classnames': [...]}, one per label in order
    c.templates = ()  # '' : the dataset's zero-shot templates; or e.g. ('a photo of a {}.',)
    c.shots = 16
    c.seed = 1
    c.base_to_novel = False  # train on the first ceil(C/2) classes; report base, novel and their harmonic mean
    # cross-dataset transfer: the learned tensors evaluated on other datasets' test splits and classes,
    # each 'DATASET' or 'DATASET@LABEL_KEY' (a dataset as config.dataset names one, with |options)
    c.transfer = ()
    # optimization (CoOp's, from Dassl: SGD, 1 warmup epoch at a constant 1e-5, cosine by epoch)
    c.optimizer = "sgd"
    c.learning_rate = 0.002
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.adam_eps = 1e-8
    c.warmup_epochs = 1
    c.warmup_lr = 1e-5
    c.epochs = 0  # 0: CoOp's by shots (50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16)
    c.batch_size = 32
    c.crop_scale = (0.08, 1.0)  # training views: random resized crop of this area share, and flips
    c.accum_steps = 1  # microbatches per step (the gradient of the whole batch, in less memory)
    c.max_nonfinite_steps = 10  # stop after this many steps in a row with a NaN/inf loss or gradient
    c.checkpoint_every_steps = 200
    # the devices: the batch over ('data', 'fsdp'), the frozen towers laid out by their logical axes
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.log_every_epochs = 10
    # CoOp / CoCoOp
    c.n_ctx = 16
    c.ctx_init = ""  # e.g. 'a photo of a': the context starts from these words (n_ctx = their count)
    c.csc = False  # class-specific context
    c.class_token_position = "end"  # end | middle | front
    # MaPLe
    c.prompt_depth = 9  # J: layers 0..J-1 of both towers get prompts
    # CLIP-Adapter
    c.reduction = 4
    c.ratio = 0.2  # alpha: the adapted share of the feature
    # Tip-Adapter(-F)
    c.augment_passes = 10
    c.cache_crop_scale = (0.5, 1.0)
    c.init_alpha = 1.17
    c.init_beta = 1.0
    c.search_scale = (7.0, 3.0)  # [beta, alpha]: ImageNet's, Oxford Pets' and UCF's
    c.search_step = (200, 20)
    # the readers' settings (clip_jax.input.settings: cache_dir, data_dir, image_key, ...), as the trainer's
    c.data = base_config().data
    del c.data["train"], c.data["eval"]
    return c


def method_config(method: str) -> ml_collections.ConfigDict:
    """configs/adapt/METHOD.py's config (the reference's defaults) from this checkout, loaded by path;
    the base config with `method` set where the checkout has no such file."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "configs", "adapt", f"{method}.py")
    if not os.path.exists(path):
        settings = adapt_config()
        settings.method = method
        return settings
    spec = importlib.util.spec_from_file_location(f"adapt_config_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


RANGES = {
    "shots": (">=", 1), "seed": (">=", 0), "learning_rate": (">=", 0), "momentum": ("[0,1)",),
    "weight_decay": (">=", 0), "adam_eps": (">", 0), "warmup_epochs": (">=", 0), "warmup_lr": (">=", 0),
    "epochs": (">=", 0), "batch_size": (">=", 1), "accum_steps": (">=", 1), "max_nonfinite_steps": (">=", 1),
    "checkpoint_every_steps": (">=", 1), "log_every_epochs": (">=", 1),
    "n_ctx": (">=", 1), "prompt_depth": (">=", 1), "reduction": (">=", 1), "ratio": ("[0,1]",),
    "augment_passes": (">=", 1), "init_alpha": (">=", 0), "init_beta": (">=", 0),
    **{f"data.{key}": rule for key, rule in settings.RANGES.items()},
}
SCALE_PAIRS = ("crop_scale", "cache_crop_scale", "data.crop_scale")


def check_adapt_ranges(settings) -> None:
    """An adaptation config's numbers in range (clip_jax.config.check_ranges with this table); the
    search grid's scales above its 0.1 start and its steps >= 1."""
    from clip_jax.config import check_ranges

    check_ranges(settings, RANGES, SCALE_PAIRS)
    scale, steps = tuple(settings.search_scale), tuple(settings.search_step)
    if len(scale) != 2 or min(scale) <= 0.1:
        raise ValueError(f"config.search_scale={scale!r}: use (beta scale, alpha scale), each > 0.1 (the grid "
                         "runs from 0.1 up to them)")
    if len(steps) != 2 or min(steps) < 1:
        raise ValueError(f"config.search_step={steps!r}: use (beta steps, alpha steps), each >= 1")
