"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck adapter (reduction 4, no biases) on the
frozen image features, f' = 0.2 A(f) + 0.8 f, against the frozen template classifier.

    python -m clip_jax.adapt --config=configs/adapt/clip_adapter.py --workdir=DIR --config.weights=RUN_DIR

Its code sets the ratio 0.2 and reduction 4; its optimizer settings were never released, so
CoOp's (which its code builds on) are used, SGD, batch 32, CoOp's epochs by shots, with one change:
lr 0.1, not 0.002. At 0.002 the adapter stays at its init on the smoke model within CoOp's epochs
(whose logit scale is about 18, not the 100 of OpenAI's models, so its gradients are smaller);
0.1 was the best validation top-1 of 0.002, 0.02 and 0.1 on the default benchmark (docs/adaptation.md).
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "clip_adapter"
    c.learning_rate = 0.1
    return c
