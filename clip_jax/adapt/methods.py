"""Few-shot adaptation methods over a frozen CLIP: what each learns and how it scores an image.

Each method gets the frozen model and its variables, the class names and prompt templates, and
returns its learned tensors (``init``) and class logits for a batch (``logits``). The image side
comes in as the frozen image tower's projected features (``features``: unnormalized, [B, E]);
the towers are never differentiated except where a method must run one (the text tower for
CoOp and CoCoOp's prompts: gradients reach only the context vectors through it).

  * CoOp (Zhou et al. 2022): M context vectors before (or around) each class name;
  * CoCoOp: CoOp plus a meta-net that shifts the context by a function of each image;
  * CLIP-Adapter: a residual bottleneck adapter on the image features;
  * Tip-Adapter(-F): a cache of the few-shot features as keys (trainable in -F), one-hot values.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.models.clip import l2_normalize, token_embedding_table
from clip_jax.registry import Registry

ADAPTERS: Registry = Registry("adaptation method")
PLACEHOLDER = "X"  # CoOp's context placeholder word, replaced by the learned vectors


def text_classifier(model, variables, prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """Template-ensembled class embeddings [C, E] (each prompt's embedding normalized, averaged,
    normalized again), as CLIP's zero-shot classifier and Tip-Adapter's clip_weights."""
    from clip_jax.evaluate.zero_shot import classifier_weights

    return np.asarray(classifier_weights(model, variables, prompts), np.float32)


def frozen_image_features(model, variables, images):
    """The frozen image tower's projected features [B, E], not normalized."""
    return model.apply(variables, images, method=lambda m, x: m.visual(x)).astype(jnp.float32)


class Adapter:
    """The interface: init(rng) -> learned tensors; image_features(learned, images) -> [B, E] (the
    frozen tower's unless the method prompts it); logits(learned, features) -> [B, C]."""

    trains = True  # False: training-free (Tip-Adapter), nothing to optimize
    prompts_images = False  # True: the image features depend on the learned tensors (MaPLe)

    def __init__(self, settings, model, variables, classnames: Sequence[str], prompts: Sequence[Sequence[str]]):
        self.settings, self.model, self.variables = settings, model, variables
        self.classnames = list(classnames)
        self.prompts = prompts
        self.scale = float(model.apply(variables, method=lambda m: m.temperature()[0]))  # the model's, clamped

    def image_features(self, learned, images):
        return jax.lax.stop_gradient(frozen_image_features(self.model, self.variables, images))

    @contextlib.contextmanager
    def bound(self, variables):
        """Trace with `variables` (a jitted step's argument) as the frozen model's, so the weights enter
        the compiled step as an input rather than as constants captured from this object."""
        saved, self.variables = self.variables, variables
        try:
            yield self
        finally:
            self.variables = saved

    def init(self, rng):
        raise NotImplementedError

    def logits(self, learned, features, train: bool = False, rng=None):
        raise NotImplementedError

    def export(self, learned) -> dict:
        """The learned tensors under the reference implementation's state-dict names."""
        raise NotImplementedError

    def text_features(self, learned):
        """The final class embeddings [C, E] the method scores images against (unit norm)."""
        return self.weights


# -- CoOp and CoCoOp ----------------------------------------------------------------------
class PromptLearner:
    """CoOp's prompts: [SOS] ctx_1..ctx_M CLASS . [EOS] (class token at the end, middle or front).

    The tokens of "X X ... X {class}." fix the length, the EOT position and the frozen word
    embeddings (SOS before the context, the class name, '.', EOS and padding after it); the
    learned context replaces the X's."""

    def __init__(self, model, variables, classnames: Sequence[str], n_ctx: int, position: str = "end",
                 ctx_init: str = ""):
        from clip_jax.tokenizers import tokenize

        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position {position!r}: use 'end', 'middle' or 'front'")
        if model.config.text.kind not in ("clip", "bert"):  # the prompt layout below: [SOS|CLS] words [EOT|SEP]
            raise ValueError(f"CoOp's prompts here are laid out for CLIP's and BERT's tokens; this text tower is "
                             f"{model.config.text.kind!r} (SigLIP's: no start token, EOS padding)")
        self.model, self.position = model, position
        table = np.asarray(token_embedding_table(model.config, variables["params"]))
        self.width = table.shape[1]
        config = model.config
        if ctx_init:
            words = tokenize([ctx_init], model=config)[0]
            ids = words[1:int(np.argmax(words))] if config.text.kind == "clip" else words[1:int(np.sum(words != 0)) - 1]
            n_ctx = len(ids)
            self.ctx_init = table[ids]  # [M, D]: the words' own embeddings
        else:
            self.ctx_init = None
        if n_ctx < 1:
            raise ValueError(f"n_ctx={n_ctx}: CoOp needs at least one context vector")
        self.n_ctx = n_ctx
        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        self.tokens = tokenize([f"{placeholder} {name}." for name in classnames], model=config)  # [C, T]
        bare = tokenize([f"{name}." for name in classnames], model=config)
        end = (np.argmax(bare, axis=1) if config.text.kind == "clip" else np.sum(bare != 0, axis=1) - 1)
        self.name_lens = [int(e) - 2 for e in end]  # the class name's tokens: between SOS and '.'
        self.embedded = table[self.tokens]  # [C, T, D], frozen

    def assemble(self, ctx):
        """ctx [M, D] (unified), [C, M, D] (class-specific) or [B, M, D] per image broadcast by the
        caller -> prompt embeddings [C, T, D]."""
        emb = jnp.asarray(self.embedded)
        c, m = emb.shape[0], self.n_ctx
        if ctx.ndim == 2:
            ctx = jnp.broadcast_to(ctx, (c,) + ctx.shape)
        prefix, rest = emb[:, :1], emb[:, 1 + m:]
        if self.position == "end":
            return jnp.concatenate([prefix, ctx.astype(emb.dtype), rest], axis=1)
        rows = []
        half = m // 2
        for i, n in enumerate(self.name_lens):
            name, after = rest[i, :n], rest[i, n:]
            if self.position == "middle":
                parts = [prefix[i], ctx[i, :half], name, ctx[i, half:], after]
            else:
                parts = [prefix[i], name, ctx[i], after]
            rows.append(jnp.concatenate(parts, axis=0))
        return jnp.stack(rows)

    def text_features(self, variables, prompt_embeddings):
        """[C, T, D] prompt embeddings -> unit-norm class embeddings [C, E] through the frozen tower."""
        return self.model.apply(variables, jnp.asarray(self.tokens), embeddings=prompt_embeddings,
                                method="encode_text")


@ADAPTERS.register("coop")
class CoOp(Adapter):
    def __init__(self, settings, model, variables, classnames, prompts):
        super().__init__(settings, model, variables, classnames, prompts)
        self.learner = PromptLearner(model, variables, classnames, int(settings.n_ctx), settings.class_token_position,
                                     settings.ctx_init)
        self.csc = bool(settings.csc)

    def init(self, rng):
        shape = ((len(self.classnames),) if self.csc else ()) + (self.learner.n_ctx, self.learner.width)
        if self.learner.ctx_init is not None:
            ctx = jnp.broadcast_to(jnp.asarray(self.learner.ctx_init), shape)
        else:
            ctx = 0.02 * jax.random.normal(rng, shape)
        return {"ctx": jnp.asarray(ctx, jnp.float32)}

    def class_embeddings(self, learned):
        return self.learner.text_features(self.variables, self.learner.assemble(learned["ctx"]))

    def text_features(self, learned):
        """CoOp's; CoCoOp's without an image's shift (its prompts depend on the image)."""
        return self.class_embeddings(learned)

    def logits(self, learned, features, train=False, rng=None):
        return self.scale * l2_normalize(features) @ self.class_embeddings(learned).T

    def export(self, learned):
        return {"prompt_learner.ctx": learned["ctx"]}


class MetaNet(nn.Module):
    """CoCoOp's meta-net: Linear(d, d/16) -> ReLU -> Linear(d/16, ctx_dim), PyTorch's default init."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        h = nn.relu(nn.Dense(self.hidden, kernel_init=torch_init, name="linear1")(x))
        return nn.Dense(self.out, kernel_init=torch_init, name="linear2")(h)


@ADAPTERS.register("cocoop")
class CoCoOp(CoOp):
    """Each image's normalized feature shifts every context vector by meta_net(f); one prompt set
    per image. Images run one at a time under remat, so memory stays that of one image's prompts
    (C sequences) whatever the batch."""

    def __init__(self, settings, model, variables, classnames, prompts):
        super().__init__(settings, model, variables, classnames, prompts)
        if self.csc:
            raise ValueError("CoCoOp's context is unified (config.csc=False), as in its reference")
        dim = model.config.embed_dim
        self.meta_net = MetaNet(max(dim // 16, 1), self.learner.width)

    def init(self, rng):
        ctx_rng, net_rng = jax.random.split(rng)
        out = super().init(ctx_rng)
        out["meta_net"] = self.meta_net.init(net_rng, jnp.zeros((1, self.model.config.embed_dim)))["params"]
        return out

    def logits(self, learned, features, train=False, rng=None):
        image = l2_normalize(features)
        shift = self.meta_net.apply({"params": learned["meta_net"]}, image)  # [B, D]

        @jax.checkpoint
        def one(args):
            f, bias = args
            text = self.learner.text_features(self.variables, self.learner.assemble(learned["ctx"] + bias))
            return self.scale * text @ f

        return jax.lax.map(one, (image, shift))

    def export(self, learned):
        net = learned["meta_net"]
        out = {"prompt_learner.ctx": learned["ctx"]}
        for ours, theirs in (("linear1", "linear1"), ("linear2", "linear2")):
            out[f"prompt_learner.meta_net.{theirs}.weight"] = net[ours]["kernel"].T
            out[f"prompt_learner.meta_net.{theirs}.bias"] = net[ours]["bias"]
        return out


# -- CLIP-Adapter ---------------------------------------------------------------------------
@ADAPTERS.register("clip_adapter")
class ClipAdapter(Adapter):
    """f' = alpha A(f) + (1 - alpha) f, A(f) = ReLU(W2 ReLU(W1 f)) without biases (reduction 4), on
    the image features; the class embeddings are the frozen template ensemble."""

    def __init__(self, settings, model, variables, classnames, prompts):
        super().__init__(settings, model, variables, classnames, prompts)
        self.alpha = float(settings.ratio)
        self.reduction = int(settings.reduction)
        self.weights = jnp.asarray(text_classifier(model, variables, prompts))

    def init(self, rng):
        dim = self.model.config.embed_dim
        a, b = jax.random.split(rng)
        torch_init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1, 1) / np.sqrt(shape[0])  # noqa
        return {"fc1": torch_init(a, (dim, dim // self.reduction)), "fc2": torch_init(b, (dim // self.reduction, dim))}

    def adapt(self, learned, features):
        x = jax.nn.relu(jax.nn.relu(features @ learned["fc1"]) @ learned["fc2"])
        return self.alpha * x + (1 - self.alpha) * features

    def logits(self, learned, features, train=False, rng=None):
        return self.scale * l2_normalize(self.adapt(learned, features)) @ self.weights.T

    def export(self, learned):
        return {"adapter.fc.0.weight": learned["fc1"].T, "adapter.fc.2.weight": learned["fc2"].T}


# -- Tip-Adapter and Tip-Adapter-F ----------------------------------------------------------
def search_grid(search_scale: Sequence[float], search_step: Sequence[int] = (200, 20)):
    """Tip-Adapter's (beta list, alpha list): 0.1 + i (scale - 0.1) / steps, i < steps."""
    betas = np.asarray([i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])])
    alphas = np.asarray([i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])])
    return betas, alphas


def tip_logits(features, keys, values, clip_weights, alpha, beta, clip_scale: float):
    """clip_scale f W^T + alpha exp(-beta (1 - f K^T)) L, f unit-norm [B, E], keys [NK, E], values
    one-hot [NK, C]. The reference writes clip_scale as 100, the scale of OpenAI's released models:
    here it is the frozen model's own (exp of its logit scale, clamped), which is 100 for those."""
    f = l2_normalize(features)
    affinity = f @ keys.T
    return clip_scale * f @ clip_weights.T + alpha * jnp.exp(-beta * (1.0 - affinity)) @ values


@ADAPTERS.register("tip_adapter")
class TipAdapter(Adapter):
    """Training-free: keys from the few-shot features (averaged over augmented passes, then
    normalized), values their one-hot labels; alpha and beta searched on validation."""

    trains = False

    def __init__(self, settings, model, variables, classnames, prompts):
        super().__init__(settings, model, variables, classnames, prompts)
        self.weights = jnp.asarray(text_classifier(model, variables, prompts))
        self.alpha, self.beta = float(settings.init_alpha), float(settings.init_beta)
        self.keys = self.values = None

    def build_cache(self, features_per_pass, labels):
        """features_per_pass [P, N, E] (unnormalized) and labels [N] -> keys, values."""
        keys = l2_normalize(jnp.mean(jnp.asarray(features_per_pass), axis=0))
        self.keys = keys
        self.values = jax.nn.one_hot(jnp.asarray(labels), len(self.classnames), dtype=jnp.float32)
        return keys

    def init(self, rng):
        return {"cache_keys": self.keys}

    def logits(self, learned, features, train=False, rng=None):
        return tip_logits(features, learned["cache_keys"], self.values, self.weights, self.alpha, self.beta,
                          self.scale)

    def search(self, learned, features, labels, search_scale, search_step=(200, 20)):
        """(best val top-1, beta, alpha) over the reference's grid, in one vectorized pass; ties go to
        the first in the reference's loop order (beta outer, alpha inner)."""
        betas, alphas = search_grid(search_scale, search_step)
        f = l2_normalize(jnp.asarray(features))
        clip = self.scale * f @ self.weights.T
        affinity = f @ learned["cache_keys"].T
        labels = jnp.asarray(labels)

        def accuracy(beta, alpha):
            logits = clip + alpha * jnp.exp(-beta * (1.0 - affinity)) @ self.values
            return jnp.mean(jnp.argmax(logits, axis=1) == labels)

        grid = jax.jit(jax.vmap(jax.vmap(accuracy, (None, 0)), (0, None)))(jnp.asarray(betas), jnp.asarray(alphas))
        best = int(np.argmax(np.asarray(grid)))
        b, a = divmod(best, len(alphas))
        self.beta, self.alpha = float(betas[b]), float(alphas[a])
        return float(np.asarray(grid).flat[best]), self.beta, self.alpha

    def export(self, learned):
        return {"cache_keys": learned["cache_keys"].T, "cache_values": self.values,
                "alpha": jnp.float32(self.alpha), "beta": jnp.float32(self.beta)}


@ADAPTERS.register("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter with the keys trained (AdamW), the values fixed."""

    trains = True


# -- MaPLe -----------------------------------------------------------------------------------
def _torch_linear(key, fan_in: int, fan_out: int):
    """nn.Linear's default init: kernel and bias uniform in +-1/sqrt(fan_in)."""
    a, b = jax.random.split(key)
    bound = 1 / np.sqrt(fan_in)
    return {"kernel": jax.random.uniform(a, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(b, (fan_out,), jnp.float32, -bound, bound)}


@ADAPTERS.register("maple")
class MaPLe(Adapter):
    """Coupled prompts in both towers (Khattak et al. 2023). Text: n_ctx context vectors replace the
    first n_ctx words of ctx_init ("a photo" of "a photo of a {class}."); at the input of layers
    1..J-1 its own prompts replace those positions. Image: the text context projected (Linear
    text width -> image width) is appended after the patch tokens; at layers 1..J-1 the last n_ctx
    tokens are replaced by that layer's text prompts through that layer's projection (J - 1
    projections, initialized as copies of one)."""

    prompts_images = True

    def __init__(self, settings, model, variables, classnames, prompts):
        super().__init__(settings, model, variables, classnames, prompts)
        from clip_jax.tokenizers import tokenize

        config = model.config
        if config.vision.kind != "vit" or config.vision.pool_type != "tok":
            raise ValueError("MaPLe prompts a ViT image tower with class-token pooling; this model's image tower "
                             f"is a {config.vision.kind} ({config.vision.pool_type!r} pooling)")
        if config.text.kind != "clip":
            raise ValueError("MaPLe here prompts CLIP's own text tower (text_cfg kind 'clip')")
        self.n_ctx, self.depth = int(settings.n_ctx), int(settings.prompt_depth)
        deepest = min(config.text.layers, config.vision.layers)
        if not 1 <= self.depth <= deepest:
            raise ValueError(f"config.prompt_depth={self.depth} must be in 1..{deepest} (the shallower tower's layers)")
        table = np.asarray(token_embedding_table(config, variables["params"]))
        ctx_init = settings.ctx_init or " ".join([PLACEHOLDER] * self.n_ctx)
        self.tokens = tokenize([f"{ctx_init} {name}." for name in classnames], model=config)
        self.embedded = table[self.tokens]
        words = tokenize([ctx_init])[0]
        if int(np.argmax(words)) - 1 < self.n_ctx:
            raise ValueError(f"config.ctx_init={ctx_init!r} has fewer than n_ctx={self.n_ctx} tokens")
        self.ctx_init = table[words[1:1 + self.n_ctx]] if settings.ctx_init else None
        self.text_width, self.image_width = config.text.width, config.vision.width

    def init(self, rng):
        k = jax.random.split(rng, 4)
        ctx = (jnp.asarray(self.ctx_init) if self.ctx_init is not None
               else 0.02 * jax.random.normal(k[0], (self.n_ctx, self.text_width)))
        one = _torch_linear(k[2], self.text_width, self.image_width)
        deep = self.depth - 1
        return {"ctx": jnp.asarray(ctx, jnp.float32), "proj": _torch_linear(k[1], self.text_width, self.image_width),
                "compound_prompts_text": 0.02 * jax.random.normal(k[3], (deep, self.n_ctx, self.text_width)),
                "compound_projections": jax.tree_util.tree_map(lambda x: jnp.repeat(x[None], deep, axis=0), one)}

    def _deep(self, values, layers: int):
        """[J-1, n, d] -> ([layers, n, d] with them at layers 1..J-1, active [layers])."""
        full = jnp.zeros((layers,) + values.shape[1:], values.dtype).at[1:self.depth].set(values)
        return full, (jnp.arange(layers) >= 1) & (jnp.arange(layers) < self.depth)

    def image_features(self, learned, images):
        shallow = learned["ctx"] @ learned["proj"]["kernel"] + learned["proj"]["bias"]
        p = learned["compound_projections"]
        deep = jnp.einsum("jnd,jde->jne", learned["compound_prompts_text"], p["kernel"]) + p["bias"][:, None]
        vision = self._deep(deep, self.model.config.vision.layers)
        return self.model.apply(self.variables, images, method=lambda m, x: m.visual(
            x, prompts=shallow, deep_prompts=vision)).astype(jnp.float32)

    def class_embeddings(self, learned):
        emb = jnp.asarray(self.embedded)
        ctx = jnp.broadcast_to(learned["ctx"].astype(emb.dtype), (emb.shape[0],) + learned["ctx"].shape)
        embeddings = jnp.concatenate([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], axis=1)
        text = self._deep(learned["compound_prompts_text"], self.model.config.text.layers)
        out = self.model.apply(self.variables, jnp.asarray(self.tokens), method=lambda m, t: m.text(
            t, embeddings=embeddings, deep_prompts=text))
        return l2_normalize(out)

    def logits(self, learned, features, train=False, rng=None):
        return self.scale * l2_normalize(features) @ self.class_embeddings(learned).T

    def text_features(self, learned):
        return self.class_embeddings(learned)

    def export(self, learned):
        out = {"prompt_learner.ctx": learned["ctx"], "prompt_learner.proj.weight": learned["proj"]["kernel"].T,
               "prompt_learner.proj.bias": learned["proj"]["bias"]}
        for i in range(self.depth - 1):
            out[f"prompt_learner.compound_prompts_text.{i}"] = learned["compound_prompts_text"][i]
            out[f"prompt_learner.compound_prompt_projections.{i}.weight"] = \
                learned["compound_projections"]["kernel"][i].T
            out[f"prompt_learner.compound_prompt_projections.{i}.bias"] = learned["compound_projections"]["bias"][i]
        return out


def make_adapter(settings, model, variables, classnames, prompts) -> Adapter:
    return ADAPTERS.get(settings.method)(settings, model, variables, classnames, prompts)

