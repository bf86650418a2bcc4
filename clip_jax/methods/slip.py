"""SLIP (Mu et al. 2022, "SLIP: Self-supervision meets Language-Image Pre-training") as a method of
the one trainer: CLIP's loss plus SimCLR's on two more augmented views of each image.

The image tower runs three times per step: on the CLIP view and on the two SimCLR views (the
input makes them from the declared `image_views` key: clip_jax.input.ops, 'simclr_views'). The SimCLR views' pooled
features before the CLIP projection go through a 3-layer MLP head with BatchNorm over the
global batch (SyncBN in the reference), are L2-normalized, and NT-Xent at temperature 0.1 pairs
each view with its image's other view against the 2N - 2 views of the other images, over the
global batch with gradients through every device's rows. Total: clip + ssl_scale * ssl.
Settings: config.slip (SLIP_DEFAULTS) beside config.clip.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.methods import METHODS
from clip_jax.methods.base import BatchInput
from clip_jax.methods.clip import Clip
from clip_jax.methods.losses import make_nt_xent
from clip_jax.models import dummy_inputs, l2_normalize
from clip_jax.models.layers import param_with_axes
from clip_jax.parallel.sharding import BATCH_AXES
from clip_jax.preprocessing import model_images

HEAD = "ssl_head"  # the head's params and BatchNorm statistics sit under this top-level name

# config.slip: the SimCLR branch beside CLIP's loss (facts: SLIP's main.py).
SLIP_DEFAULTS = {
    "ssl_scale": 1.0,  # total loss = clip + ssl_scale * ssl
    "ssl_temp": 0.1,  # NT-Xent temperature
    "mlp_dim": 4096,  # the head: Linear-BN-ReLU, Linear-BN-ReLU to mlp_dim, then Linear to emb_dim
    "emb_dim": 256,
    # True: no gradient through the gathered embeddings of the CLIP loss, as SLIP's reference on more
    # than one GPU (each term trains one tower); False: the full-gradient global-batch loss.
    "detach_clip_gather": False,
}


class SSLHead(nn.Module):
    """SLIP's image SSL head: (Linear -> BatchNorm -> ReLU) x 2 -> Linear. BatchNorm normalizes with
    the statistics of the whole global batch (a mean over a batch axis sharded under jit is global)."""

    mlp_dim: int = 4096
    emb_dim: int = 256

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32)
        for i, axes in ((1, ("embed", "mlp")), (2, ("mlp", "mlp_out"))):
            x = nn.Dense(self.mlp_dim, kernel_init=param_with_axes(nn.initializers.lecun_normal(), axes),
                         bias_init=param_with_axes(nn.initializers.zeros, (axes[1],)), name=f"linear{i}")(x)
            # PyTorch's BatchNorm1d defaults: momentum 0.1 (flax's 0.9), eps 1e-5
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x))
        return nn.Dense(self.emb_dim, kernel_init=param_with_axes(nn.initializers.lecun_normal(), ("mlp", None)),
                        name="linear3")(x)


# Two SimCLR views of each record's image beside CLIP's inputs.
SIMCLR_VIEWS = BatchInput("image_views", "simclr_views", ("image",), (("views", 2),))


@METHODS.register("slip")
class Slip(Clip):
    """CLIP + SimCLR over the global batch {'image', 'tokens', 'image_views': [N, 2, S, S, 3]}."""

    batch_keys = ("image", "tokens", "image_views")

    def __init__(self, config, model, mesh, **options):
        s = config.slip
        _check_detach(config)  # built outside the trainer too (tests, the benchmark)
        self.detach_gather = bool(s.detach_clip_gather)
        super().__init__(config, model, mesh, **options)
        self.nt_xent = make_nt_xent(mesh, BATCH_AXES, float(s.ssl_temp), gather_by_sum=self.gather_by_sum)
        self.head = SSLHead(int(s.mlp_dim), int(s.emb_dim))
        self.ssl_scale = float(s.ssl_scale)
        images, _ = dummy_inputs(model)
        try:
            pooled = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images,
                                                                   method="image_features")[0][0])
        except TypeError:  # a tower without pooled_too
            raise ValueError(f"config.method='slip' puts its SimCLR head on the image tower's features before its "
                             f"projection; {model.config.vision.kind!r} towers do not expose them") from None
        self.pooled_dim = pooled.shape[-1]

    def inputs(self):
        return super().inputs() + (SIMCLR_VIEWS,)

    def batch_shapes(self, n):
        shapes = super().batch_shapes(n)
        image = shapes["image"]
        shapes["image_views"] = jax.ShapeDtypeStruct((n, 2) + image.shape[1:], image.dtype)
        return shapes

    def init(self, rng):
        model_rng, head_rng = jax.random.split(rng)
        variables = dict(self.model.init(model_rng, *dummy_inputs(self.model)))
        head = self.head.init(head_rng, jnp.zeros((2, self.pooled_dim), jnp.float32), train=False)
        variables["params"] = {**variables["params"], HEAD: head["params"]}
        variables["batch_stats"] = {**variables.get("batch_stats", {}), HEAD: head["batch_stats"]}
        return variables

    def model_variables(self, params, model_state):
        params = {k: v for k, v in params.items() if k != HEAD}
        stats = {k: v for k, v in model_state.get("batch_stats", {}).items() if k != HEAD}
        return {"params": params, **({"batch_stats": stats} if stats else {})}

    def export(self, params, model_state, extras=False):
        parts = super().export(params, model_state, extras)
        if extras:  # the SSL head, in PyTorch's layout under the reference's names (SLIP's image_mlp)
            from clip_jax.convert import variables_to_state_dict

            head = variables_to_state_dict({"params": params[HEAD], "batch_stats": model_state["batch_stats"][HEAD]})
            parts[HEAD] = {"image_mlp." + key.replace("linear", "layer"): value for key, value in head.items()}
        return parts

    def loss(self, params, model_state, batch, rng, train: bool = True):
        tower = self.model_variables(params, model_state)
        clip_params = tower.pop("params")
        out, tower = self.embed(clip_params, tower, batch, train, rng)  # a ResNet's statistics updated
        clip_loss = self.loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"], out.get("logit_bias"))

        views = model_images(batch["image_views"])
        head_vars = {"params": params[HEAD], "batch_stats": model_state["batch_stats"][HEAD]}
        image_train = train and not self.image_locked
        embeddings = []
        for i in range(2):  # each view through the tower and the head on its own, as the reference
            rngs = {"dropout": jax.random.fold_in(rng, i + 1)} if train and rng is not None else None
            mutable = list(tower) if image_train and tower else False
            pooled = self.model.apply({"params": clip_params, **tower}, views[:, i], image_train, self.mask_patches,
                                      method="image_features", rngs=rngs, mutable=mutable)
            if mutable:
                pooled, tower = pooled
                tower = dict(tower)
            z = self.head.apply(head_vars, pooled[0], train, mutable=["batch_stats"] if train else False)
            if train:
                z, updated = z
                head_vars = {**head_vars, "batch_stats": updated["batch_stats"]}
            embeddings.append(l2_normalize(z))
        ssl_loss, ssl_acc = self.nt_xent(*embeddings)
        loss = clip_loss + self.ssl_scale * ssl_loss
        metrics = {"clip_loss": clip_loss, "ssl_loss": ssl_loss, "ssl_acc": ssl_acc, "logit_scale": out["logit_scale"]}
        stats = {**tower.get("batch_stats", {}), HEAD: head_vars["batch_stats"]}
        return loss, metrics, {**model_state, **tower, "batch_stats": stats}

    # -- config, model, phases, cost --

    config_sections = {**Clip.config_sections, "slip": SLIP_DEFAULTS}
    config_ranges = {**Clip.config_ranges, "slip.ssl_scale": (">=", 0), "slip.ssl_temp": (">", 0),
                     "slip.mlp_dim": (">=", 1), "slip.emb_dim": (">=", 1)}

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        _check_detach(config)

    @classmethod
    def train_flops(cls, forward, config=None):
        # the two SimCLR views: two more image passes, forward and backward (the small head not counted)
        return super().train_flops(forward, config) + 2 * 3 * forward["image"]


def _check_detach(config) -> None:
    if config.slip.detach_clip_gather and config.clip.loss != "softmax":
        raise ValueError(f"config.slip.detach_clip_gather reproduces SLIP's softmax CLIP loss; config.clip.loss="
                         f"{config.clip.loss!r} has no such form: set config.clip.loss='softmax' or the flag False")
