"""AudioCLIP (Guzhov et al. 2022) as a method of the one trainer: a third tower, audio, in CLIP's embedding space.

Facts from the reference (AndreyGuzhov/AudioCLIP, model/audioclip.py; clip_jax.models.esresnext holds the tower):

- Towers: CLIP's image and text towers and an audio tower (ESResNeXt-fbsp) whose output is the embedding; each
  modality's embedding is L2-normalized.
- A logit scale per pair of modalities: CLIP's own for image-text, two new ones for audio-image and audio-text
  that start at log 100; all three enter as clamp(exp(s), 1, 100).
- The loss covers the pairs the batch carries: each adds CE(logits) + CE(logits^T), and the sum is divided by
  n_pairs! (clip_jax.methods.losses.make_pairs_loss); plus the fbsp front end's regularizer (the transform rows'
  norms pulled to 1) at weight 1 when audio is present.
- Partial training (the released "Partial" checkpoint, and the ESC-50 / UrbanSound8K protocols) trains the audio
  tower and the two new scales only (config.optim.frozen='visual/.*|text/.*|logit_scale'); full training trains
  every tower. The fbsp parameters and the scales take no weight decay.

The modalities a batch carries are config.audioclip.modalities (('audio', 'text') for the ESC-50 protocol: no
images there; the text is the sample's labels joined by ', ').
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from clip_jax import convert_audioclip
from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, Method, Prediction, two_tower_predictions
from clip_jax.methods.clip import CLIP_INPUTS
from clip_jax.methods.losses import clamped_scale, make_pairs_loss, pair_name
from clip_jax.models import dummy_inputs, esresnext
from clip_jax.models.layers import l2_normalize
from clip_jax.parallel.sharding import BATCH_AXES
from clip_jax.preprocessing import model_images

AUDIO = "audio"  # the audio tower's params and batch statistics sit under this top-level name
MODALITIES = ("audio", "image", "text")
# The batch key each modality is read from.
BATCH_KEY = {"audio": "audio", "image": "image", "text": "tokens"}

# config.audioclip
AUDIOCLIP_DEFAULTS = {
    "modalities": MODALITIES,  # what the batch carries; the loss covers every pair of them
    "audio_tower": "esresnext-fbsp",  # a preset of clip_jax.models.esresnext.PRESETS
    "front_end": "",  # '' the preset's; 'fbsp' or 'logmel'
    "tower": {},  # any other field of the preset overridden (clip_jax.models.esresnext.ESResNeXtFBSP's: layers, width)
    "regularizer": 1.0,  # the weight of the fbsp front end's regularizer
    "init_logit_scale": math.log(100.0),  # the two new scales' start
}


def audio_tower(config, embed_dim: int):
    """The audio tower of config.audioclip, its embedding as wide as the CLIP model's."""
    s = config.audioclip
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(s.tower).items()}
    if s.front_end:
        overrides["front_end"] = s.front_end
    return esresnext.esresnext(s.audio_tower, **{**overrides, "embed_dim": embed_dim})


def scale_param(a: str, b: str) -> str:
    """The param of the pair (a, b)'s logit scale: CLIP's own for image-text."""
    return "logit_scale" if (a, b) == ("image", "text") else f"logit_scale_{a}_{b}"


@METHODS.register("audioclip")
class AudioCLIP(Method):
    """Contrastive training of every pair of the towers (audio, image, text) a batch carries, over the global
    batch {'audio': [N, C, T] float32 in [-1, 1], 'image': [N, S, S, 3], 'tokens': [N, L] int32}."""

    image_locked = False  # every image-tower param frozen: the tower runs in inference mode (its BatchNorm)

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        s = config.audioclip
        self.modalities = tuple(m for m in MODALITIES if m in tuple(s.modalities))
        self.pairs = tuple(itertools.combinations(self.modalities, 2))
        self.audio = audio_tower(config, model.config.embed_dim)
        # the clips as config.data reads them, for training and evaluation alike
        self.samples, self.channels = int(config.data.audio_samples), int(config.data.audio_channels)
        self.pairs_loss = make_pairs_loss(mesh, BATCH_AXES, gather_by_sum=self.gather_by_sum)

    @property
    def batch_keys(self):
        return tuple(BATCH_KEY[m] for m in self.modalities)

    def inputs(self):
        audio = BatchInput("audio", "audio", ("audio",))  # at config.data's audio_rate, audio_samples, audio_channels
        by_key = {b.key: b for b in CLIP_INPUTS + (audio,)}
        return tuple(by_key[k] for k in self.batch_keys)

    def batch_shapes(self, n):
        size, context = self.model.config.vision.image_size, self.model.config.text.context_length
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        shapes = {"audio": jax.ShapeDtypeStruct((n, self.channels, self.samples), jnp.float32),
                  "image": jax.ShapeDtypeStruct((n, size, size, 3), dtype),
                  "tokens": jax.ShapeDtypeStruct((n, context), jnp.int32)}
        return {k: shapes[k] for k in self.batch_keys}

    def init(self, rng):
        clip_rng, audio_rng = jax.random.split(rng)
        variables = dict(self.model.init(clip_rng, *dummy_inputs(self.model)))
        clip_audio = jnp.zeros((1, self.channels, self.samples), jnp.float32)
        audio = self.audio.init(audio_rng, clip_audio, train=False)
        start = jnp.float32(self.config.audioclip.init_logit_scale)
        scales = {scale_param(a, b): start for a, b in itertools.combinations(MODALITIES, 2)
                  if scale_param(a, b) != "logit_scale"}
        variables["params"] = {**variables["params"], AUDIO: audio["params"], **scales}
        if "batch_stats" in audio:
            variables["batch_stats"] = {**variables.get("batch_stats", {}), AUDIO: audio["batch_stats"]}
        return variables

    def param_groups(self):
        # the reference's second group: the fbsp front end and the new scales without weight decay
        return ((r"audio/fbsp/.*|logit_scale_.*", {"weight_decay": 0.0}),)

    def lock(self, frozen, paths):
        visual = [p for p in paths if p.startswith("visual/")]
        self.image_locked = bool(visual) and all(p in frozen for p in visual)

    # -- the network --
    @staticmethod
    def split(variables) -> tuple[dict, dict]:
        """(the CLIP model's variables, the audio tower's) of the method's variables."""
        clip, audio = {}, {}
        for collection, tree in variables.items():
            clip[collection] = {k: v for k, v in tree.items() if k != AUDIO and not k.startswith("logit_scale_")}
            if AUDIO in tree:
                audio[collection] = tree[AUDIO]
        return clip, audio

    def scales(self, params) -> dict:
        return {(a, b): clamped_scale(params[scale_param(a, b)]) for a, b in self.pairs}

    def embed(self, params, model_state, batch, train: bool, rng=None):
        """({modality: unit-norm [N, E]}, the fbsp regularizer (0 without audio), new model state)."""
        clip, audio = self.split({"params": params, **model_state})
        mutable = ["batch_stats"] if train else False
        embeds, state, reg = {}, dict(model_state), jnp.zeros((), jnp.float32)
        if "image" in self.modalities or "text" in self.modalities:
            image_train = train and not self.image_locked

            def towers(module, images, tokens):
                out = {}
                if images is not None:
                    out["image"] = module.encode_image(images, image_train)
                if tokens is not None:
                    out["text"] = module.encode_text(tokens, train)
                return out

            images = model_images(batch["image"]) if "image" in self.modalities else None
            tokens = batch["tokens"] if "text" in self.modalities else None
            clip_mutable = mutable if clip.get("batch_stats") else False
            rngs = {"dropout": rng} if train and rng is not None else None
            out = self.model.apply(clip, images, tokens, method=towers, mutable=clip_mutable, rngs=rngs)
            if clip_mutable:
                out, new = out
                stats = {**state.get("batch_stats", {}), **new["batch_stats"]}
                state["batch_stats"] = stats
            embeds.update(out)
        if "audio" in self.modalities:
            # the regularizer from the same forward: the fbsp params' gradient scaling sees both losses' gradients
            out = self.audio.apply(audio, batch["audio"], train=train, with_regularizer=True, mutable=mutable)
            if mutable:
                out, new = out
                state["batch_stats"] = {**state.get("batch_stats", {}), AUDIO: new["batch_stats"]}
            features, reg = out
            embeds["audio"] = l2_normalize(features)
        return embeds, reg, state

    def loss(self, params, model_state, batch, rng, train: bool = True):
        embeds, reg, state = self.embed(params, model_state, batch, train, rng)
        scales = self.scales(params)
        total, terms = self.pairs_loss(embeds, scales)
        metrics = {f"{name}_loss": v for name, v in terms.items()}
        metrics.update({f"logit_scale_{pair_name(a, b)}": s for (a, b), s in scales.items()})
        weight = float(self.config.audioclip.regularizer)
        if "audio" in self.modalities and weight:
            metrics["fbsp_regularizer"] = reg
            total = total + weight * reg
        return total, metrics, state

    def weights(self, path):
        """AudioCLIP's checkpoints (AudioCLIP-Full-Training.pt, AudioCLIP-Partial-Training.pt, ESRNXFBSP.pt, or this
        method's export OUT.audio.safetensors: the tower and its scales only) as the method's variables; any other
        file is the CLIP model's."""
        if not path.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return None
        from clip_jax import convert

        state_dict = convert.clean_state_dict(convert.read_state_dict(path))
        try:
            layout = convert_audioclip.layout_of(state_dict)
        except ValueError:
            return None  # no audio tower in it: CLIP's weights
        params, stats = {}, {}
        if layout == "audioclip" and not any(k.startswith("visual.") for k in state_dict):  # an export's audio part
            audio = {k[len(convert_audioclip.AUDIO_PREFIX):]: v for k, v in state_dict.items()
                     if k.startswith(convert_audioclip.AUDIO_PREFIX)}
            tower, _ = convert_audioclip.audio_variables(audio, self.audio, fc="raise")
            scales = {k: state_dict[k] for k in convert_audioclip.SCALES if k in state_dict}
        else:
            loaded = convert_audioclip.load_audioclip(state_dict, self.audio, self.model)
            tower, scales = loaded["audio"], {k: loaded[k] for k in convert_audioclip.SCALES}
            if loaded["clip"] is not None:
                params.update(loaded["clip"]["params"])
                stats.update(loaded["clip"].get("batch_stats", {}))
        params[AUDIO] = tower["params"]
        if "batch_stats" in tower:
            stats[AUDIO] = tower["batch_stats"]
        for name, ours in (("logit_scale_ai", "logit_scale_audio_image"), ("logit_scale_at", "logit_scale_audio_text")):
            if scales.get(name) is not None:
                params[ours] = jnp.asarray(scales[name], jnp.float32)
        return {"params": params, **({"batch_stats": stats} if stats else {})}

    # -- evaluation and export --
    def predictions(self):
        def without_audio(fn):
            return lambda variables, *args: fn(self.split(variables)[0], *args)

        out = {name: p.with_fn(without_audio(p.fn))
               for name, p in two_tower_predictions(self.model).items() if not name.startswith(("image_dense",
                                                                                                "segment"))}

        def audio_embeds(variables, clips):
            return l2_normalize(self.audio.apply(self.split(variables)[1], clips.astype(jnp.float32), train=False))

        out["audio_embeds"] = Prediction(audio_embeds, "audio", 2)
        for a, b in itertools.combinations(MODALITIES, 2):
            if a == "audio":
                out[f"logit_scale_{a}_{b}"] = Prediction(
                    lambda variables, name=scale_param(a, b): clamped_scale(variables["params"][name]))
        return out

    def model_variables(self, params, model_state):
        return {"params": params, **model_state}

    def export(self, params, model_state, extras=False):
        clip, audio = self.split({"params": params, **model_state})
        # AudioCLIP's own keys beside the towers (open_clip's, which are OpenAI's for its ResNet): together they are
        # the reference's state dict
        part = convert_audioclip.audio_state_dict(self.audio, audio)
        part.update({"logit_scale_ai": params["logit_scale_audio_image"],
                     "logit_scale_at": params["logit_scale_audio_text"]})
        return {"towers": clip, AUDIO: part}

    # -- config --
    config_sections = {"audioclip": AUDIOCLIP_DEFAULTS}
    config_ranges = {"audioclip.regularizer": (">=", 0)}

    @classmethod
    def check_config(cls, config):
        s = config.audioclip
        unknown = [m for m in s.modalities if m not in MODALITIES]
        if unknown or len(set(s.modalities)) < 2:
            raise ValueError(f"config.audioclip.modalities={tuple(s.modalities)}: name at least two of {MODALITIES} "
                             f"(the loss contrasts every pair of them)")
        tower = audio_tower(config, 8)  # an unknown preset or front end is named here
        if int(config.data.audio_rate) != tower.sample_rate:
            raise ValueError(f"config.data.audio_rate={config.data.audio_rate} but the audio tower "
                             f"{s.audio_tower!r} reads clips at {tower.sample_rate} Hz: set --config.data.audio_rate="
                             f"{tower.sample_rate} (the input resamples every clip to it)")
        if int(config.data.audio_channels) not in (1, 2):
            raise ValueError(f"config.data.audio_channels={config.data.audio_channels}: 1 (mono) or 2 (stereo)")
