"""Tip-Adapter-F: Tip-Adapter's cache keys fine-tuned (the values fixed), then alpha and beta
searched on validation.

    python -m clip_jax.adapt --config=configs/adapt/tip_adapter_f.py --workdir=DIR --config.weights=RUN_DIR

From its code: AdamW lr 1e-3, eps 1e-4, cosine over every step, 20 epochs, batch 256, training
views random resized crop (0.5, 1) and flips, alpha and beta initialized at init_alpha, init_beta.
Its epoch was picked on test in the reference; here the last epoch is reported.
"""

from clip_jax.adapt.config import adapt_config


def get_config():
    c = adapt_config()
    c.method = "tip_adapter_f"
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.adam_eps = 1e-4
    c.weight_decay = 0.01  # torch.optim.AdamW's default, which the reference keeps
    c.warmup_epochs = 0
    c.epochs = 20
    c.batch_size = 256
    c.crop_scale = (0.5, 1.0)
    return c
