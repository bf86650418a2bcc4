"""Chinese-CLIP (Yang et al. 2022, "Chinese CLIP: Contrastive Vision-Language Pretraining in
Chinese"): CLIP's image tower, a Chinese RoBERTa-wwm (BERT architecture) text tower, and two
stages in one run.

    python -m clip_jax.train --config=configs/chinese_clip.py:cn-ViT-B-16 --workdir=DIR \
        --config.init_from='ViT-B-16.pt;chinese-roberta-wwm-ext.bin' --config.data.train='tfrecord:/data/zh-*'

The argument after ':' is a cn-* preset. `init_from` names two files, ';'-separated: CLIP weights
for the image tower (OpenAI's or open_clip's, of the same image architecture) and a Hugging Face
BERT/RoBERTa state dict for the text tower (its pooler and pretraining heads are ignored); a
released Chinese-CLIP checkpoint alone also works with --config.init_params='.*'.
Stage 1 (locked-image tuning) trains the text tower against the locked image tower (no image
gradient, no optimizer state for it; a ResNet's BatchNorm in inference mode); from
`clip.unfreeze_at_step` on (stage 2) both towers train, with a fresh optimizer and a fresh warmup +
cosine over the remaining steps. Resuming is exact on both sides of the switch.

From its code (cn_clip/training/params.py, main.py): AdamW, betas (0.9, 0.98), eps 1e-6, weight
decay 0.2 on weight matrices, warmup 500, cosine; lr 5e-4 for ViT-B/16 (RN50's 5e-4 too;
ViT-L/14 and H/14: 2e-4 and 1e-4 here, scaled down as their larger runs use), 52-token texts,
logit scale clamped to ln 100. Batch 32,768 and the stage lengths come from the paper, not the
repository: an even split is the default here (set --config.clip.unfreeze_at_step for your data).
Not reproduced: its weight decay on embeddings and BERT's LayerNorm gains (its exclusion rule
matches names with 'ln'/'bn'/'bias' only), and AutoAugment (`--use-augment`, off by default).
"""

from clip_jax.config import base_config

LEARNING_RATES = {"cn-ViT-B-16": 5e-4, "cn-RN50": 5e-4, "cn-ViT-L-14": 2e-4, "cn-ViT-L-14-336": 2e-4,
                  "cn-ViT-H-14": 1e-4}
# The text tower's body in the second file: everything of it but the projection into the joint space.
TEXT_BODY = "text/(word_embeddings|position_embeddings|token_type_embeddings|embeddings_norm|encoder)/.*"


def get_config(model: str = "cn-ViT-B-16"):
    c = base_config()
    c.model = model
    c.init_params = f"visual/.*;{TEXT_BODY}"
    c.optim.frozen = "visual/.*"
    c.batch_size = 32_768
    c.total_steps = 20_000
    c.clip.unfreeze_at_step = 10_000
    c.checkpoint_every_steps = 1_000
    c.optim.learning_rate = LEARNING_RATES.get(model, 5e-4)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 500
    c.dtype = "bfloat16"
    c.remat = "full"
    c.data.image_dtype = "uint8"
    return c
