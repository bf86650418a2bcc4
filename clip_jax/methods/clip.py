"""CLIP's contrastive pretraining (Radford et al. 2021) as a method of the one trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, Method, Phase
from clip_jax.methods.losses import LOSSES, MODEL_INIT, RINGS, make_loss
from clip_jax.models import dummy_inputs
from clip_jax.parallel.sharding import BATCH_AXES
from clip_jax.preprocessing import model_images


@jax.custom_vjp
def _released_after(x, params):
    """Identity on (x, params); in the backward pass x's cotangent is released together with the
    params' whole gradient, so what x's cotangent feeds waits for everything that feeds theirs."""
    return x, params


def _released_after_fwd(x, params):
    return (x, params), None


def _released_after_bwd(_, cotangents):
    return jax.lax.optimization_barrier(cotangents)


_released_after.defvjp(_released_after_fwd, _released_after_bwd)

# config.clip: the settings of CLIP and of the methods built on it (SigLIP's loss, FLIP, Chinese-CLIP).
CLIP_DEFAULTS = {
    "loss": "softmax",  # clip_jax.methods.losses.LOSSES; 'sigmoid' (SigLIP) brings its temperature and bias init
    "patch_dropout": 0.0,  # FLIP: the share of a ViT's patch tokens dropped in training (sets vision_cfg)
    "unmasked_from_step": 0,  # FLIP's unmasked tuning: from this step on, no patch dropout (0: never)
    # Chinese-CLIP's two stages: optim.frozen holds until this step, then everything trains with a
    # fresh optimizer and a fresh warmup + cosine over the remaining steps (0: one stage).
    "unfreeze_at_step": 0,
    # LiT: a directory of precomputed image embeddings (python -m clip_jax.embed) to train against
    # instead of running the locked image tower; the same batches as training online.
    "image_embeddings": "",
}


# CLIP reads the image, cropped, and one caption of the record, tokenized.
CLIP_INPUTS = (BatchInput("image", "crop", ("image",)), BatchInput("tokens", "tokenize", ("caption",)))


@METHODS.register("clip")
class Clip(Method):
    """Image-text contrastive loss (config.clip.loss: softmax, softmax_ring or sigmoid) over the
    global batch {'image': [N, S, S, 3] float or uint8, 'tokens': [N, T] int32}."""

    batch_keys = ("image", "tokens")
    mask_patches = True  # False: a ViT's patch dropout off in training (FLIP's unmasked tuning)
    image_locked = False  # every image-tower param frozen (LiT): the tower runs in inference mode
    detach_gather = False  # the softmax loss without gradient through the gathered rows (SLIP's reference)

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.cached_images = bool(config.clip.image_embeddings)
        if self.cached_images:  # LiT from precomputed image embeddings: no images, no image tower run
            self.batch_keys = ("image_embeds", "tokens")
        if config.clip.loss == "sigmoid" and model.config.init_logit_bias is None:
            raise ValueError("config.clip.loss='sigmoid' needs a model with a logit bias (init_logit_bias, SigLIP: "
                             "-10): build it through clip_jax.train.build.model_from_config, which adds its init")
        self.loss_fn = make_loss(config.clip.loss, mesh, BATCH_AXES, gather_by_sum=self.gather_by_sum,
                                 detach=self.detach_gather)
        # A ring loss hands both towers' cotangents back at once, and XLA:TPU then ran the image
        # tower's backward first, with the text tower's saved activations still live (1.5 GiB more
        # for ViT-B-16 at 128 per chip; docs/scaling.md): order them, text first.
        self.text_backward_first = config.clip.loss in RINGS

    def lock(self, frozen, paths):
        visual = [p for p in paths if p.startswith("visual/")]
        self.image_locked = bool(visual) and all(p in frozen for p in visual)
        if self.cached_images and not self.image_locked:
            raise ValueError(f"config.clip.image_embeddings={self.config.clip.image_embeddings!r} trains against "
                             "precomputed image embeddings, so the image tower must be locked: "
                             "--config.optim.frozen='visual/.*'")

    def inputs(self):
        if self.cached_images:  # both keys from the cache `python -m clip_jax.embed` wrote
            store = (("directory", self.config.clip.image_embeddings),)
            return (BatchInput("image_embeds", "cached", options=store), BatchInput("tokens", "cached", options=store))
        return CLIP_INPUTS

    def batch_shapes(self, n):
        if self.cached_images:
            return {"image_embeds": jax.ShapeDtypeStruct((n, self.model.config.embed_dim), jnp.float32),
                    "tokens": jax.ShapeDtypeStruct((n, self.model.config.text.context_length), jnp.int32)}
        size, context = self.model.config.vision.image_size, self.model.config.text.context_length
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        return {"image": jax.ShapeDtypeStruct((n, size, size, 3), dtype),
                "tokens": jax.ShapeDtypeStruct((n, context), jnp.int32)}

    def init(self, rng):
        return self.model.init(rng, *dummy_inputs(self.model))

    def embed(self, params, model_state, batch, train: bool = True, rng=None):
        """(model outputs: image_embeds, text_embeds, logit_scale[, logit_bias]; new model state).
        `rng` feeds the towers' 'dropout' stream (a ViT's patch dropout) in training."""
        variables = {"params": params, **model_state}
        if "image_embeds" in batch:  # precomputed by the locked tower: only the text tower runs
            text = self.model.apply(variables, batch["tokens"], train=train, method="encode_text")
            return self._outputs(variables, batch["image_embeds"].astype(jnp.float32), text), model_state
        images = model_images(batch["image"])  # the input pipeline's image_dtype='uint8': normalized here
        rngs = {"dropout": rng} if train and rng is not None else None
        mutable = list(model_state) if train and model_state else False  # BatchNorm statistics update in training
        image_train = train and not self.image_locked
        if train and self.text_backward_first:
            return self._embed_text_backward_first(variables, model_state, images, batch["tokens"], image_train,
                                                   mutable, rngs)
        out = self.model.apply(variables, images, batch["tokens"], train=train, mask_patches=self.mask_patches,
                               image_train=image_train, mutable=mutable, rngs=rngs)
        if mutable:
            out, new_state = out
            return out, dict(new_state)
        return out, model_state

    def _outputs(self, variables, image_embeds, text_embeds) -> dict:
        """The model's output dict from the two towers' embeddings and its temperature (and bias)."""
        out = {"image_embeds": image_embeds, "text_embeds": text_embeds}
        out["logit_scale"], bias = self.model.apply(variables, method="temperature")
        if bias is not None:
            out["logit_bias"] = bias
        return out

    def _embed_text_backward_first(self, variables, model_state, images, tokens, image_train, mutable, rngs):
        """The training outputs, the towers applied one by one with the image embeddings' cotangent
        held back until the text tower's gradient is complete."""
        image = self.model.apply(variables, images, train=image_train, mask_patches=self.mask_patches,
                                 method="encode_image", mutable=mutable, rngs=rngs)
        image, model_state = image if mutable else (image, model_state)
        image, text_params = _released_after(image, variables["params"]["text"])
        text_variables = dict(variables, params=dict(variables["params"], text=text_params))
        text = self.model.apply(text_variables, tokens, train=True, method="encode_text", rngs=rngs)
        return self._outputs(variables, image, text), dict(model_state)

    def loss(self, params, model_state, batch, rng, train: bool = True):
        out, model_state = self.embed(params, model_state, batch, train, rng)
        loss = self.loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"], out.get("logit_bias"))
        metrics = {"logit_scale": out["logit_scale"]}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"]
        return loss, metrics, model_state

    def post_update(self, params):
        # CLIP clamps the learned temperature on the parameter after each step, as open_clip does (not SigLIP's
        # towers: max_logit_scale None, as big_vision).
        cap = self.model.config.max_logit_scale
        return dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, cap))

    # -- config, model, phases, cost --

    config_sections = {"clip": CLIP_DEFAULTS}
    config_ranges = {"clip.patch_dropout": ("[0,1)",), "clip.unmasked_from_step": (">=", 0),
                     "clip.unfreeze_at_step": (">=", 0)}
    config_moved = {key: f"clip.{key}" for key in CLIP_DEFAULTS}  # top-level keys until this section

    @classmethod
    def check_config(cls, config):
        c = config.clip
        LOSSES.get(c.loss)  # an unknown name lists the known ones
        if c.unfreeze_at_step:
            if not 0 < c.unfreeze_at_step < config.total_steps:
                raise ValueError(f"config.clip.unfreeze_at_step={c.unfreeze_at_step} must be in (0, total_steps="
                                 f"{config.total_steps}) (0: one stage)")
            if not config.optim.frozen:
                raise ValueError(f"config.clip.unfreeze_at_step={c.unfreeze_at_step} ends a first stage that freezes "
                                 "nothing: set config.optim.frozen (Chinese-CLIP: 'visual/.*')")

    @classmethod
    def model_overrides(cls, config, overrides):
        overrides = {**MODEL_INIT.get(config.clip.loss, {}), **overrides}
        if config.clip.patch_dropout:  # open_clip's vision_cfg key
            vision = {**overrides.get("vision_cfg", {}), "patch_dropout": config.clip.patch_dropout}
            overrides = {**overrides, "vision_cfg": vision}
        return overrides

    @classmethod
    def phases(cls, config):
        c = config.clip
        phases = [Phase(0, "train")]
        if c.unfreeze_at_step:
            phases.append(Phase(c.unfreeze_at_step, "unfrozen", frozen="", fresh_optimizer=True, note=(
                f"config.clip.unfreeze_at_step reached: config.optim.frozen={config.optim.frozen!r} trains too "
                "(second stage: fresh optimizer and schedule)")))
        if c.patch_dropout and c.unmasked_from_step:
            phases.append(Phase(c.unmasked_from_step, "unmasked", attributes=(("mask_patches", False),),
                                note="config.clip.unmasked_from_step reached: no patch dropout from here"))
        return tuple(sorted(phases, key=lambda p: p.start))
