"""GLIP-T (Li et al. 2022): its recipe (microsoft/GLIP configs/pretrain/glip_Swin_T_O365_GoldG.yaml) as far as it
maps here.

    python -m clip_jax.train --config=configs/glip.py:GLIP-T --workdir=DIR \
        --config.data.train='tfrecord:/data/o365_goldg-*' --config.glip.classes_file=o365_classes.txt \
        --config.glip.labels=record --config.init_from=swin_tiny_patch4_window7_224.safetensors

The argument picks the fusion: 'GLIP-T' is GLIP-T(B) (deep fusion, the bi-attention and a language layer before
each of the 6 head layers), 'GLIP-T-A' GLIP-T(A) (no fusion). Towers: Swin-T (timm's swin_tiny_patch4_window7_224
layout, drop path 0.2) at 800 px (the reference's shorter side; its 480-800 multi-scale and 1333 px longer side
are not reproduced: inputs here are square) and BERT-base's layout (uncased, 30,522 word pieces, 256 query
tokens): pass its vocabulary with --config.model_overrides.text_cfg.tokenizer='wordpiece:PATH/vocab.txt'. Recipe:
batch 64, AdamW lr 1e-4 (the language tower 1e-5), weight decay 1e-4, 2,000 warmup steps, x0.1 at 67% and 89% of the
run, gradients clipped to norm 1.0, a moving average of the params (0.999) evaluated and exported; 85 negative class
names a detection prompt; ATSS (9 candidates a level), anchors of 8 x stride on P3-P7, GroupNorm of 16 groups. STEPS
is 30 epochs of Objects365 (~0.66M images) and GoldG (~0.8M) at batch 64; set total_steps to 30 epochs of your data.
Not reproduced: DyHead's dynamic convs (an ATSS conv tower in their place) and AMP (here float32, or
--config.dtype=bfloat16).
"""

from clip_jax.config import base_config

BATCH = 64
STEPS = 30 * 1_460_000 // BATCH
BERT_BASE = {"kind": "bert", "vocab_size": 30522, "width": 768, "heads": 12, "layers": 12, "mlp_ratio": 4.0,
             "context_length": 256, "max_positions": 512, "tokenizer": "wordpiece", "dropout": 0.1,
             "attn_dropout": 0.1}


def get_config(arg: str = "GLIP-T"):
    if arg not in ("GLIP-T", "GLIP-T-A"):
        raise ValueError(f"configs/glip.py:{arg}: pick GLIP-T (deep fusion) or GLIP-T-A (none)")
    c = base_config()
    c.method = "glip"
    c.model = "Swin-T"
    # the prompt's tokens 768 wide, BERT-base's hidden size (GLIP's LANG_DIM; 12 heads in the language layers)
    c.model_overrides = {"embed_dim": 768, "vision_cfg": {"image_size": 800}, "text_cfg": dict(BERT_BASE)}
    c.batch_size = BATCH
    c.total_steps = STEPS
    c.checkpoint_every_steps = 5_000
    o = c.optim
    o.optimizer = "adamw"
    o.learning_rate, o.warmup_steps = 1e-4, 2_000
    o.schedule, o.decay_boundaries, o.decay_factor = "steps", (int(0.67 * STEPS), int(0.89 * STEPS)), 0.1
    o.weight_decay, o.weight_decay_on = 1e-4, "all"
    o.grad_clip_norm = 1.0
    o.ema_decay = 0.999  # SOLVER.MODEL_EMA
    g = c.glip
    g.labels, g.novel = "record", ()
    g.prompts, g.negatives, g.query_length = "mix", 85, 256
    g.levels, g.fpn_width, g.anchor_scale, g.top_k = (3, 4, 5, 6, 7), 256, 8.0, 9
    g.num_convs, g.gn_groups = 6, 16
    g.fusion = arg == "GLIP-T"
    g.fusion_dim, g.fusion_heads, g.text_heads = 2048, 8, 12
    g.text_lr_mult = 0.1
    g.max_objects = 100
    g.score_threshold, g.pre_nms, g.nms, g.detections = 0.05, 1000, 0.6, 100
    c.data.crop_scale = (0.3, 1.0)
    c.data.image_dtype = "uint8"
    return c
