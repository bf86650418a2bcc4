"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): CLIP's two towers
trained with the pairwise sigmoid loss instead of the softmax over the batch.

    python -m clip_jax.train --config=configs/siglip.py:ViT-B-16 --workdir=DIR \
        --config.data.train='tfrecord:/data/pairs-*'

The argument after ':' is a ViT preset, or 'PRESET,TOPOLOGY' for that TPU pod's mesh and remat
plan (configs/clip_paper.py). The loss is -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / N with
z = +1 for the N matching pairs and -1 for the rest, with its own temperature t = exp(t') (t'
starts at log 10) and bias b (starts at -10; clip_jax.methods.losses.MODEL_INIT), in the ring
form: text chunks travel round the devices, so a device never holds more than [b_local,
b_local] logits and the loss's memory stays flat in the global batch (docs/scaling.md).

Text tower as open_clip's SigLIP presets (ViT-B-16-SigLIP.json): 64 tokens, bidirectional
attention over every position (the padding too, as open_clip's and big_vision's), the last position
pooled; the image tower pools with an
attention-pooling head (one learned query, 'map'). Global batch 32,768, which the paper found
sufficient. Everything else is the CLIP paper's recipe for the preset (configs/clip_paper.py:
AdamW, its learning rate, weight decay 0.2, 2,000 warmup steps, cosine, 390,625 steps): SigLIP's
own optimizer settings are not in its released code; set them with --config.optim.*.
Not reproduced: SigLIP's SentencePiece vocabulary (32,000 ids, trained on C4; give one with
--config.model_overrides.text_cfg.tokenizer=sentencepiece:PATH and
--config.model_overrides.text_cfg.vocab_size=32000), the text projection's bias, LayerNorm eps
1e-6 and the 0.5 mean / std image normalization: CLIP's are kept, so weights stay in open_clip's
CLIP layout.
"""

import importlib.util
import os

import ml_collections

CONTEXT_LENGTH = 64


def _clip_paper():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_paper.py")
    spec = importlib.util.spec_from_file_location("clip_paper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "ViT-B-16"):
    model = arg.partition(",")[0]
    if not model.startswith("ViT"):
        raise ValueError(f"configs/siglip.py takes a ViT preset (its image tower pools with 'map'): got {model!r}")
    c = _clip_paper().get_config(arg)
    c.clip.loss = "sigmoid"  # the ring form; the model gets t' = log 10, b = -10 with it
    c.model_overrides = ml_collections.ConfigDict({
        "vision_cfg": {"pool_type": "map"},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "no_causal_mask": True, "pool_type": "last"},
    })
    return c
