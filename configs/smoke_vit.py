"""The smoke run with a ViT image tower: ViT-Shapes-M for 800 steps, the frozen CLIP that MaPLe (which
prompts a ViT's layers) adapts in docs/adaptation.md. The ViT learns colour and the count of objects
(a 16-shot linear probe on its features), not shape, within these steps: docs/training.md#the-smoke-run.

    python -m clip_jax.train --config=configs/smoke_vit.py --workdir=/tmp/smoke_vit
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.py")
    spec = importlib.util.spec_from_file_location("smoke_config", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    c = smoke.get_config()
    c.model = "ViT-Shapes-M"
    c.total_steps = 800
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.optim.learning_rate = 1e-3  # the rate its figures in docs/adaptation.md were trained at
    return c
