"""Smoke run in Chinese: a small Chinese-CLIP (BERT text tower, WordPiece tokenizer) on the
embedded shapes dataset's Chinese captions, on a laptop CPU in a few minutes.

    python -m clip_jax.train --config=configs/smoke_zh.py --workdir=/tmp/smoke_zh

The text tower trains without dropout here: the 600-step run is far from overfitting, and the
reference's 0.1 halved its shape and combination accuracy (docs/methods.md#chinese-clip).
Zero-shot uses Chinese prompts and class names (e.g. 一张红色圆形的照片。); the held-out colour-shape
combinations of shapes:test stay unseen in training, as in configs/smoke.py.
"""

import importlib.util
import os


def _english_smoke():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.py")
    spec = importlib.util.spec_from_file_location("smoke", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _english_smoke()
    c.model = "cn-RN-Shapes-S"
    c.model_overrides = {"text_cfg": {"dropout": 0.0, "attn_dropout": 0.0}}
    c.data.train = "shapes:train|lang=zh"
    c.data.eval = "zero_shot=shapes:validation|lang=zh,zero_shot=shapes:test|lang=zh,retrieval=shapes:test|lang=zh"
    # The schedule its figures in docs/methods.md were trained with (the English run's until 2026-12-06).
    c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 600, 150, 150
    c.optim.learning_rate = 1e-3
    return c
