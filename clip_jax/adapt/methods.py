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


class Adapter:
    """The interface: init(rng) -> learned tensors; logits(learned, features, train, rng) -> [B, C]."""

    trains = True  # False: training-free (Tip-Adapter), nothing to optimize

    def __init__(self, settings, model, variables, classnames: Sequence[str], prompts: Sequence[Sequence[str]]):
        self.settings, self.model, self.variables = settings, model, variables
        self.classnames = list(classnames)
        self.prompts = prompts
        self.scale = float(np.exp(min(float(variables["params"]["logit_scale"]), np.log(100.0))))

    def init(self, rng):
        raise NotImplementedError

    def logits(self, learned, features, train: bool = False, rng=None):
        raise NotImplementedError

    def export(self, learned) -> dict:
        """The learned tensors under the reference implementation's state-dict names."""
        raise NotImplementedError


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


def tip_logits(features, keys, values, clip_weights, alpha, beta, clip_scale: float = 100.0):
    """clip_scale f W^T + alpha exp(-beta (1 - f K^T)) L, f unit-norm [B, E], keys [NK, E], values
    one-hot [NK, C]."""
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
        return tip_logits(features, learned["cache_keys"], self.values, self.weights, self.alpha, self.beta)

    def search(self, learned, features, labels, search_scale, search_step=(200, 20)):
        """(best val top-1, beta, alpha) over the reference's grid, in one vectorized pass; ties go to
        the first in the reference's loop order (beta outer, alpha inner)."""
        betas, alphas = search_grid(search_scale, search_step)
        f = l2_normalize(jnp.asarray(features))
        clip = 100.0 * f @ self.weights.T
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


def make_adapter(settings, model, variables, classnames, prompts) -> Adapter:
    return ADAPTERS.get(settings.method)(settings, model, variables, classnames, prompts)

