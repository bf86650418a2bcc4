"""CoCoOp (Zhou et al. 2022, "Conditional Prompt Learning for Vision-Language Models"): CoOp whose
context is shifted, per image, by a meta-net of the normalized image feature.

    python -m clip_jax.adapt --config=configs/adapt/cocoop.py --workdir=DIR --config.weights=RUN_DIR

Defaults from its code (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml): 4 context
vectors from "a photo of a", meta-net d -> d/16 -> ctx dim, SGD lr 0.002, 10 epochs, one warmup
epoch at 1e-5, cosine; batch 1 as the reference (which needs it for memory). Here the images of a
batch run one at a time under remat, so larger batches fit (--config.batch_size=32).
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "cocoop"
    c.ctx_init = "a photo of a"
    c.n_ctx = 4
    c.epochs = 10
    c.batch_size = 1
    return c
