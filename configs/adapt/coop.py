"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): 16 learned context
vectors before each class name, the towers frozen.

    python -m clip_jax.adapt --config=configs/adapt/coop.py --workdir=DIR --config.weights=RUN_DIR

Defaults from its code (trainers/coop.py, configs/trainers/CoOp/rn50.yaml, Dassl's defaults):
N_CTX 16, unified context, class token at the end, random init N(0, 0.02); SGD lr 0.002,
momentum 0.9, weight decay 5e-4, one warmup epoch at a constant 1e-5, cosine by epoch; batch 32;
random resized crop (0.08, 1) and flips; 50 / 100 / 100 / 200 / 200 epochs for 1 / 2 / 4 / 8 / 16
shots; seeds 1, 2, 3; the last epoch's context is reported. float32 here (the reference: fp16).
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "coop"
    return c
