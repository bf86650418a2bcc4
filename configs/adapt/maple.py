"""MaPLe (Khattak et al. 2023, "Multi-modal Prompt Learning"): prompts in both towers, coupled by
projections from the text prompts to the image tower's, in the first J layers.

    python -m clip_jax.adapt --config=configs/adapt/maple.py --workdir=DIR --config.weights=RUN_DIR

Defaults from its code (configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml, trainers/maple.py):
2 context vectors from "a photo of a" (they replace "a photo"), depth J = 9, SGD lr 0.0035, 5
epochs, batch 4, one warmup epoch at 1e-5, cosine; 16 shots. A ViT image tower (as the
reference); its cross-dataset setting is depth 3, lr 0.0026, 2 epochs. float32 here (the
reference: fp16). Works with the scanned layer stack.
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "maple"
    c.ctx_init = "a photo of a"
    c.n_ctx = 2
    c.prompt_depth = 9
    c.learning_rate = 0.0035
    c.epochs = 5
    c.batch_size = 4
    return c
