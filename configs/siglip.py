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
With a CLIP preset, not reproduced: SigLIP's SentencePiece vocabulary (32,000 ids, trained on C4;
give one with --config.model_overrides.text_cfg.tokenizer=sentencepiece:PATH and
--config.model_overrides.text_cfg.vocab_size=32000), the text projection's bias, LayerNorm eps
1e-6, tanh GELU and the [-1, 1] pixels: CLIP's are kept, so weights stay in open_clip's CLIP
layout. A SigLIP preset (below) has them all.

Continuing a big_vision SigLIP (its .npz, or transformers' weights): name a SigLIP preset, whose towers
are SigLIP's own (clip_jax.models.siglip: the MAP head, the biased text head, LayerNorm eps 1e-6, tanh
GELU), and give the weights and the SentencePiece model it was trained with:

    python -m clip_jax.train --config=configs/siglip.py:ViT-B-16-SigLIP --workdir=DIR \
        --config.init_from=webli_en_b16_224_63724782.npz \
        --config.model_overrides.text_cfg.tokenizer=sentencepiece:/path/to/spiece.model \
        --config.data.train='tfrecord:/data/pairs-*'

Every SigLIP preset (or a model JSON with vision_cfg kind 'siglip') takes this form. The temperature and
bias come from the weights; texts are padded with EOS (pad_id 1) and the last position is pooled, as
big_vision's; images go through clip_jax's pipeline and the tower maps them to SigLIP's [-1, 1]. The
optimizer starts from the SigLIP paper's Adam beta2 0.95 and weight decay 1e-4, at a fine-tuning
learning rate (1e-5, 500 warmup steps) over 5,000 steps of 512: set them for the run (--config.optim.*,
--config.batch_size, --config.mesh for more than one host's devices).
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


def _siglip_architecture(model: str) -> bool:
    from clip_jax.models.config import get_model_config

    try:
        return get_model_config(model).vision.kind == "siglip"
    except ValueError:  # not a preset: the paper recipe's check names the choices
        return False


def continue_siglip(arg: str):
    """A SigLIP-architecture model (big_vision's towers) trained on from its weights (config.init_from)."""
    from clip_jax.config import base_config

    model, _, topology = arg.partition(",")
    if topology:
        raise ValueError(f"configs/siglip.py:{model} takes no topology ({topology!r}): the pod plans are the CLIP "
                         "presets'; set --config.mesh, --config.remat and --config.accum_steps")
    c = base_config()
    c.model = model
    c.clip.loss = "sigmoid"
    c.dtype = "bfloat16"
    c.batch_size = 512
    c.total_steps = 5_000
    c.checkpoint_every_steps = 1_000
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 500
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    c.data.image_dtype = "uint8"
    return c


def get_config(arg: str = "ViT-B-16"):
    model = arg.partition(",")[0]
    if _siglip_architecture(model):
        return continue_siglip(arg)
    if not model.startswith("ViT"):
        raise ValueError(f"configs/siglip.py takes a ViT preset (its image tower pools with 'map'): got {model!r}")
    c = _clip_paper().get_config(arg)
    c.clip.loss = "sigmoid"  # the ring form; the model gets t' = log 10, b = -10 with it
    c.model_overrides = ml_collections.ConfigDict({
        "vision_cfg": {"pool_type": "map"},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "no_causal_mask": True, "pool_type": "last"},
    })
    return c
