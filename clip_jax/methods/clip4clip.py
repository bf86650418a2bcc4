"""CLIP4Clip (Luo et al. 2021) as a method of the one trainer: text-video retrieval with CLIP's towers and a
similarity header over the frames' embeddings.

Facts from the reference (ArrowLuo/CLIP4Clip, modules/modeling.py, main_task_retrieval.py):

- Every frame goes through CLIP's image tower (its projected, unnormalized embedding); the frames are folded
  into the tower's batch here ([B * T, S, S, 3]), so the mesh shards them as it shards images.
- The loose headers (clip_jax.models.video: meanP, seqLSTM, seqTransf) turn the frames [B, T, D] and the frame
  mask into one unit video embedding; the loss is CrossEn both ways, (CE(sim) + CE(sim^T)) / 2 with sim =
  exp(logit_scale) text . video over the global batch (the reference gathers over its GPUs): CLIP's sharded
  softmax loss with CLIP's own learned temperature, clamped to 100 after each step.
- seqTransf starts from CLIP's text tower: its frame position table is the text positional embedding and its
  layers are the text transformer's first ones (modeling.py:105-121).
- The CLIP weights train at lr x coef_lr (1e-3; config.clip4clip.clip_lr_scale), the header at lr.

Batches: {'frames': [N, T, S, S, 3], 'frame_mask': int32 [N, T], 'tokens': [N, L]}; T = config.data.video_frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput, Method, Prediction, export_with_head, two_tower_predictions
from clip_jax.methods.losses import make_loss
from clip_jax.models import dummy_inputs
from clip_jax.models.video import CLIP4CLIP_HEADS, dummy_video_inputs, video_head
from clip_jax.parallel.sharding import BATCH_AXES
from clip_jax.preprocessing import model_images

HEAD = "video_head"  # the header's params sit under this top-level name, beside CLIP's

# config.clip4clip
CLIP4CLIP_DEFAULTS = {
    "sim_header": "meanP",  # meanP, seqLSTM or seqTransf (clip_jax.models.video.CLIP4CLIP_HEADS)
    "layers": 4,  # seqTransf's layers (--cross_num_hidden_layers)
    "clip_lr_scale": 1e-3,  # the CLIP weights' lr multiplier (--coef_lr); the header trains at the lr
    "flip": False,  # one random left-right flip per training clip (the reference has none)
}
LOOSE = ("meanP", "seqLSTM", "seqTransf")


class VideoMethod(Method):
    """What CLIP4Clip and ActionCLIP share: clips folded into the image tower's batch, a video head under HEAD,
    the CLIP weights in a parameter group of their own, and the predictions of the towers plus 'video_embeds'."""

    section = ""  # the config section
    head_lr_mult = 1.0  # lr multipliers: the head's, and the CLIP weights'
    clip_lr_mult = 1.0
    image_locked = False

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.frames = int(config.data.video_frames)
        self.head = self.make_head()

    def make_head(self):
        raise NotImplementedError

    def clip_inputs(self) -> tuple:
        flip = (("flip", True),) if getattr(self.config, self.section).flip else ()
        return (BatchInput("frames", "frames", ("frames",), (("frames", self.frames),) + flip),)

    def video_shapes(self, n) -> dict:
        size = self.model.config.vision.image_size
        dtype = {"uint8": jnp.uint8, "bfloat16": jnp.bfloat16}.get(self.config.data.image_dtype, jnp.float32)
        return {"frames": jax.ShapeDtypeStruct((n, self.frames, size, size, 3), dtype),
                "frame_mask": jax.ShapeDtypeStruct((n, self.frames), jnp.int32)}

    def init(self, rng):
        clip_rng, head_rng = jax.random.split(rng)
        variables = dict(self.model.init(clip_rng, *dummy_inputs(self.model)))
        head = self.head.init(head_rng, *dummy_video_inputs(self.head, self.model.config.embed_dim))
        if head.get("params"):  # meanP has none: an empty subtree would not survive a weights file's flattening
            variables["params"] = {**variables["params"], HEAD: head["params"]}
        return variables

    def param_groups(self):
        groups = ((rf"{HEAD}/.*", {"lr_mult": self.head_lr_mult}),)
        if self.clip_lr_mult != 1.0:
            groups += ((rf"(?!{HEAD}/).*", {"lr_mult": self.clip_lr_mult}),)
        return groups

    def lock(self, frozen, paths):
        visual = [p for p in paths if p.startswith("visual/")]
        self.image_locked = bool(visual) and all(p in frozen for p in visual)

    @staticmethod
    def split(variables) -> tuple[dict, dict]:
        """(the CLIP model's variables, the head's) of the method's variables."""
        clip = {c: {k: v for k, v in tree.items() if k != HEAD} for c, tree in variables.items()}
        return clip, {"params": variables.get("params", {}).get(HEAD, {})}

    def frame_features(self, clip_variables, frames, train: bool, rng=None):
        """frames [B, T, S, S, 3] -> (the image tower's projected, unnormalized features [B, T, D], new state):
        the frames go through the tower as one batch of B * T images."""
        b, t = frames.shape[:2]
        images = model_images(frames.reshape((b * t,) + frames.shape[2:]))
        image_train = train and not self.image_locked
        state = {k: v for k, v in clip_variables.items() if k != "params"}
        mutable = list(state) if train and state else False
        rngs = {"dropout": rng} if train and rng is not None else None

        def tower(module, x):
            return module.visual(x, train=image_train)

        out = self.model.apply(clip_variables, images, method=tower, mutable=mutable, rngs=rngs)
        out, state = out if mutable else (out, state)
        return out.astype(jnp.float32).reshape(b, t, -1), dict(state)

    def texts(self, clip_variables, tokens, train: bool, rng=None):
        rngs = {"dropout": rng} if train and rng is not None else None
        return self.model.apply(clip_variables, tokens, train=train, method="encode_text", rngs=rngs)

    def scale(self, clip_variables):
        return self.model.apply(clip_variables, method="temperature")[0]

    def video_embeds(self, head_variables, features, mask, train: bool = False, rng=None):
        """The head's unit video embeddings [B, D] from frame features [B, T, D] and the frame mask."""
        raise NotImplementedError

    @classmethod
    def train_flops(cls, forward, config=None):
        """CLIP's step with each clip's frames (config.data.video_frames; 1 without a config) through the image
        tower, forward and backward; the head is not counted: a lower bound."""
        frames = int(config.data.video_frames) if config is not None else 1
        return forward["train_step"] + 3 * (frames - 1) * forward["image"]

    def post_update(self, params):
        # CLIP's temperature clamped on the parameter after each step (CLIP4Clip clamps it to log 100)
        cap = self.model.config.max_logit_scale
        return dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, cap))

    # -- evaluation and export --
    def predictions(self):
        towers = {name: p.with_fn(lambda variables, *args, fn=p.fn: fn(self.split(variables)[0], *args))
                  for name, p in two_tower_predictions(self.model).items()
                  if not name.startswith(("image_dense", "segment"))}

        def videos(variables, frames, mask):
            clip, head = self.split(variables)
            features, _ = self.frame_features(clip, frames, train=False)
            return self.video_embeds(head, features, mask)

        towers["video_embeds"] = Prediction(videos, "frames", 4, also_reads=("frame_mask",),
                                            templates=self.templates())
        return towers

    def templates(self):
        """The prompt templates the text was trained on (zero-shot evaluation embeds classes so); None: the data's."""
        return None

    def export(self, params, model_state, extras=False):
        if not params.get(HEAD):  # meanP: no head params, the towers alone
            return {"towers": self.split({"params": params, **model_state})[0]}
        return export_with_head(params, model_state, HEAD)


@METHODS.register("clip4clip")
class Clip4Clip(VideoMethod):
    """Text-video contrastive loss over the global batch of clips and their captions."""

    section = "clip4clip"
    batch_keys = ("frames", "frame_mask", "tokens")

    def __init__(self, config, model, mesh, **options):
        super().__init__(config, model, mesh, **options)
        self.clip_lr_mult = float(config.clip4clip.clip_lr_scale)
        if config.clip4clip.sim_header == "seqTransf":
            check_widths(model.config, "seqTransf", "config.clip4clip.sim_header")
        self.loss_fn = make_loss("softmax", mesh, BATCH_AXES, gather_by_sum=self.gather_by_sum)

    def make_head(self):
        s, text = self.config.clip4clip, self.model.config.text
        name = s.sim_header
        if name == "seqTransf":
            return video_head(f"clip4clip:{name}", heads=text.heads, layers=int(s.layers),
                              positions=text.context_length)
        return video_head(f"clip4clip:{name}")

    def inputs(self):
        return self.clip_inputs() + (BatchInput("tokens", "tokenize", ("caption",)),)

    def batch_shapes(self, n):
        return {**self.video_shapes(n), "tokens": jax.ShapeDtypeStruct(
            (n, self.model.config.text.context_length), jnp.int32)}

    def start_variables(self, variables):
        """seqTransf's frame positions and layers copied from CLIP's text tower, as the reference starts them."""
        if self.config.clip4clip.sim_header != "seqTransf":
            return variables
        params = dict(variables["params"])
        head, text = dict(params[HEAD]), params["text"]
        ctx = self.model.config.text.context_length
        head["frame_position_embeddings"] = {"embedding": text["positional_embedding"][:ctx]}
        blocks = text["transformer"]
        stack = dict(head["transformerClip"])
        for i in range(min(int(self.config.clip4clip.layers), self.model.config.text.layers)):
            if "resblocks" in blocks:  # a scanned text tower: one stack with a leading layer axis
                stack[f"resblocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], blocks["resblocks"])
            else:
                stack[f"resblocks_{i}"] = blocks[f"resblocks_{i}"]
        head["transformerClip"] = stack
        params[HEAD] = head
        return {**variables, "params": params}

    def video_embeds(self, head_variables, features, mask, train=False, rng=None):
        return self.head.apply(head_variables, features, mask)

    def embed(self, params, model_state, batch, train: bool = True, rng=None):
        """(unit video embeddings [N, D], unit caption embeddings [N, D], exp(logit_scale), new model state)."""
        clip, head = self.split({"params": params, **model_state})
        image_rng, text_rng = jax.random.split(rng) if rng is not None else (None, None)
        features, state = self.frame_features(clip, batch["frames"], train, image_rng)
        video = self.video_embeds(head, features, batch["frame_mask"], train)
        text = self.texts(clip, batch["tokens"], train, text_rng)
        return video, text, self.scale(clip), state

    def loss(self, params, model_state, batch, rng, train: bool = True):
        video, text, scale, state = self.embed(params, model_state, batch, train, rng)
        return self.loss_fn(video, text, scale), {"logit_scale": scale}, state

    # -- config --
    config_sections = {"clip4clip": CLIP4CLIP_DEFAULTS}
    config_ranges = {"clip4clip.layers": (">=", 1), "clip4clip.clip_lr_scale": (">=", 0)}

    @classmethod
    def check_config(cls, config):
        s = config.clip4clip
        if s.sim_header not in LOOSE:
            more = (" (tightTransf, the cross encoder, scores every caption-clip pair and is not a training header "
                    "here yet)" if s.sim_header in CLIP4CLIP_HEADS else "")
            raise ValueError(f"config.clip4clip.sim_header={s.sim_header!r}: use one of {LOOSE}{more}")


def check_widths(model_config, head: str, where: str) -> None:
    """A head that starts from the text tower's weights needs frames as wide as the text tower."""
    if model_config.embed_dim != model_config.text.width:
        raise ValueError(f"{where}={head!r} starts from the text tower's layers, so the model's embed_dim "
                         f"({model_config.embed_dim}) must equal its text width ({model_config.text.width}), as in "
                         "ViT-B/32 and ViT-B/16: pick such a model or use sim_header meanP or seqLSTM")


__all__ = ["CLIP4CLIP_DEFAULTS", "HEAD", "Clip4Clip", "VideoMethod", "check_widths"]
