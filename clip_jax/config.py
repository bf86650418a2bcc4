"""The base config: every key a run reads, with its default, in one place.

Experiment files in configs/ start from `base_config()` and override what they change;
`--config.KEY=VALUE` overrides on the command line, and an unknown key is refused there.
"""

from __future__ import annotations

import ml_collections

from clip_jax.input.settings import DEFAULTS as DATA_DEFAULTS

OPTIM_DEFAULTS = {
    "learning_rate": 5e-4,
    "end_learning_rate": 0.0,
    "warmup_steps": 2000,
    "b1": 0.9,
    "b2": 0.98,  # the paper's ViT value; 0.999 for ResNets
    "eps": 1e-6,
    "weight_decay": 0.2,  # decoupled, on weight matrices only (clip_jax.train.optim.DECAY)
    "grad_clip_norm": 1.0,  # 0 disables
    # Parameter groups: ((REGEX, {frozen, lr_mult, weight_decay}), ...) over '/'-joined param
    # paths (e.g. 'visual/transformer/resblocks/attn/in_proj_kernel'), first full match wins.
    "param_groups": (),
    "frozen": "",  # shortcut: params whose path fully matches this regex are frozen ('' = none)
}


# SLIP (config.method='slip'): the SimCLR branch beside CLIP's loss (facts: SLIP's main.py).
SLIP_DEFAULTS = {
    "ssl_scale": 1.0,  # total loss = clip + ssl_scale * ssl
    "ssl_temp": 0.1,  # NT-Xent temperature
    "mlp_dim": 4096,  # the head: Linear-BN-ReLU, Linear-BN-ReLU to mlp_dim, then Linear to emb_dim
    "emb_dim": 256,
    # True: no gradient through the gathered embeddings of the CLIP loss, as SLIP's reference on more
    # than one GPU (each term trains one tower); False: the full-gradient global-batch loss.
    "detach_clip_gather": False,
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "clip"  # clip_jax.methods: what the trainer optimizes
    c.model = "ViT-B-32"  # a preset (clip_jax.list_models()) or an open_clip-style JSON path
    # Architecture changes over the preset, in open_clip's JSON keys, e.g.
    # ConfigDict({"text_cfg": {"width": 256}, "init_logit_bias": -10.0}).
    c.model_overrides = ml_collections.ConfigDict()
    c.init_from = ""  # weights to start from: .safetensors / .pt / .msgpack (anything clip_jax.load reads)
    c.init_params = ".*"  # the params taken from init_from (regex over param paths); the rest stay fresh
    # A directory of precomputed image embeddings (python -m clip_jax.embed): train against them instead
    # of running the (locked) image tower; the same batches as training online.
    c.image_embeddings = ""
    c.dtype = "float32"  # compute; params and optimizer state stay float32
    c.remat = "none"  # 'none' | 'full' | a jax.checkpoint_policies name
    c.scan = True
    c.attn_impl = "auto"  # cuDNN fused attention on NVIDIA GPUs in bf16 (lengths padded to x8), else XLA
    c.loss = "softmax"  # clip_jax.methods.losses.LOSSES
    c.patch_dropout = 0.0  # FLIP: the share of a ViT's patch tokens dropped in training (sets vision_cfg)
    c.unmasked_from_step = 0  # FLIP's unmasked tuning: from this step on, no patch dropout (0: never)
    # Two stages (Chinese-CLIP): optim.frozen holds until this step, then everything trains with a
    # fresh optimizer and a fresh warmup + cosine over the remaining steps (0: one stage).
    c.unfreeze_at_step = 0
    c.seed = 0
    c.batch_size = 256  # global, over every process
    c.total_steps = 1000
    c.accum_steps = 1
    c.prefetch_batches = 2  # global batches put on the devices ahead of the step
    c.log_every_steps = 100
    c.eval_every_steps = 0
    c.eval_batch_size = 256  # global
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.compilation_cache_dir = ""  # "" = ~/.cache/clip_jax/xla; "none" = off
    c.max_nonfinite_steps = 10  # stop after this many steps in a row with a NaN/inf loss or gradient
    c.summary_png = False  # at the end: WORKDIR/summary.png, curves and (on shapes) zero-shot predictions
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.optim = ml_collections.ConfigDict(OPTIM_DEFAULTS)
    c.slip = ml_collections.ConfigDict(SLIP_DEFAULTS)
    c.data = ml_collections.ConfigDict(DATA_DEFAULTS)
    return c


def optim_settings(config=None) -> dict:
    """OPTIM_DEFAULTS overlaid with `config` (a dict or ConfigDict); an unknown key is an error."""
    given = {} if config is None else dict(config.items())
    unknown = sorted(set(given) - set(OPTIM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optim settings {unknown}: known are {', '.join(OPTIM_DEFAULTS)}")
    return {**OPTIM_DEFAULTS, **given}


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's config from its config.json: the base config with the saved values, so a workdir
    written before a key existed reads with that key's default (keys no longer known are dropped)."""
    config = base_config()
    _overlay(config, saved)
    return config


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key not in config:
            continue
        current = config[key]
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            if len(current) and key not in ("shapes_sizes", "shapes_shards", "mesh"):
                _overlay(current, value)
            else:  # free-form mappings: the saved one whole
                config[key] = ml_collections.ConfigDict(value)
        elif isinstance(current, tuple) and isinstance(value, list):
            config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            config[key] = value
