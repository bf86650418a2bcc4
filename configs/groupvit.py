"""GroupViT (Xu et al. 2022, "GroupViT: Semantic Segmentation Emerges from Text Supervision"): the reference's
recipe (NVlabs/GroupViT configs/default.yml and group_vit_gcc_yfcc_30e.yml) on the one trainer.

    python -m clip_jax.train --config=configs/groupvit.py:GroupViT-S-16 --workdir=DIR \
        --config.data.train='tfrecord:/data/gcc_yfcc-*' --config.data.eval='segmentation=...'

The argument after ':' is a GroupViT preset; the default GroupViT-S-16 is the paper's (stages [6, 3, 3], group
tokens [64, 8, 0], projectors 4096 -> 256); batch 4,096; AdamW at 1.6e-3 x batch / 4096, betas (0.9, 0.999), weight
decay 0.05 on matrices only (no decay on 1-d params and biases), 2 of 30 epochs of linear warmup, then cosine to
4e-5; gradients clipped at norm 5; the multi-label loss with 3 noun prompts per caption (config.groupvit). The data
is a placeholder: EPOCH_EXAMPLES is the size of the reference's CC3M + CC12M + YFCC14M mix only roughly; set it
(and data.train) to yours. Not reproduced: DeiT's augmentation (RandAugment, colour jitter, random erasing), the
warmup's start at 4e-6 (here 0), the POS tagger (nouns come from a vocabulary: clip_jax/input/noun_prompts.py).
"""

from clip_jax.config import base_config

BATCH = 4_096
EPOCH_EXAMPLES = 30_000_000  # placeholder: the examples of one pass over your data
EPOCHS, WARMUP_EPOCHS = 30, 2
BASE_LR = 1.6e-3  # at batch 4096, scaled linearly with the batch


def get_config(model: str = "GroupViT-S-16"):
    c = base_config()
    c.method = "groupvit"
    c.model = model
    c.batch_size = BATCH  # the learning rate follows a change: BASE_LR x batch / 4096
    epoch = EPOCH_EXAMPLES // c.batch_size
    c.total_steps = EPOCHS * epoch
    c.checkpoint_every_steps = 2_000
    c.optim.learning_rate = BASE_LR * c.batch_size / BATCH
    c.optim.end_learning_rate = 4e-5
    c.optim.warmup_steps = WARMUP_EPOCHS * epoch
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.weight_decay_on = "matrices"
    c.optim.grad_clip_norm = 5.0
    c.groupvit.prompts = 3
    c.groupvit.multi_label_weight = 1.0
    c.data.train = "tfrecord:/path/to/gcc_yfcc-*.tfrecord"  # placeholder: records with 'image' and 'caption'
    c.data.image_dtype = "uint8"
    c.data.crop = "random_resized"
    c.data.crop_scale = (0.08, 1.0)  # DeiT's random resized crop
    return c

