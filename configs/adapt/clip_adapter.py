"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck adapter (reduction 4, no biases) on the
frozen image features, f' = 0.2 A(f) + 0.8 f, against the frozen template classifier.

    python -m clip_jax.adapt --config=configs/adapt/clip_adapter.py --workdir=DIR --config.weights=RUN_DIR

Its code sets the ratio 0.2 and reduction 4; its optimizer settings were never released, so
CoOp's (which its code builds on) are used: SGD lr 0.002, batch 32, CoOp's epochs by shots.
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "clip_adapter"
    return c
