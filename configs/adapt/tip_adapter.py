"""Tip-Adapter (Zhang et al. 2022): training-free. The cache's keys are the few-shot images'
features averaged over 10 augmented passes (random resized crop (0.5, 1), flips) and then
normalized; its values their one-hot labels; logits = 100 f W^T + alpha exp(-beta (1 - f K^T)) L.

    python -m clip_jax.adapt --config=configs/adapt/tip_adapter.py --workdir=DIR --config.weights=RUN_DIR

alpha and beta are searched on the validation set over the reference's grid (200 betas x 20
alphas from search_scale, one vectorized pass). The reference's ImageNet script selects on test;
here selection never sees test.
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "tip_adapter"
    return c
