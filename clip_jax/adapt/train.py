"""Run a few-shot adaptation: load the frozen CLIP, draw the few-shot sets, learn the method's
tensors with the trainer's one step (clip_jax.adapt.method: the towers a frozen parameter group,
laid out on config.mesh; resumable exactly; SIGTERM checkpoints and exits), select on
validation, report on test.

    python -m clip_jax.adapt --config=configs/adapt/coop.py --workdir=DIR [--config.shots=16 ...]

DIR gets results.json, adapt_config.json, checkpoints/ (the learned tensors and optimizer) and
metrics.jsonl (one row per epoch).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.adapt.data import FewShot, Split, base_and_novel, load_few_shot
from clip_jax.adapt.method import augment, build_adaptation, row_weights, towers_variables
from clip_jax.adapt.methods import ADAPTERS, TipAdapter, frozen_image_features, make_adapter, text_classifier
from clip_jax.models.clip import l2_normalize
from clip_jax.parallel import sharding
from clip_jax.preprocessing import normalize_images
from clip_jax.train import optim

# CoOp's epochs by shots (COOP.md): 50 for 1 shot, 100 for 2 and 4, 200 for 8 and 16.
COOP_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def epochs_for(settings) -> int:
    if int(settings.epochs) > 0:
        return int(settings.epochs)
    shots = int(settings.shots)
    if shots in COOP_EPOCHS:
        return COOP_EPOCHS[shots]
    return 200 if shots > 16 else COOP_EPOCHS[min(COOP_EPOCHS, key=lambda k: abs(k - shots))]


# -- the run --------------------------------------------------------------------------------
class Runner:
    """The frozen CLIP on the mesh of config.mesh (towers laid out by their logical axes) and the
    batched, fixed-shape passes over few-shot images around the train step."""

    def __init__(self, settings, model, variables, mesh, accum_steps: int = 1):
        self.settings, self.model, self.mesh = settings, model, mesh
        self.devices = sharding.batch_devices(mesh)
        self.unit = self.devices * max(int(accum_steps), 1)  # a train batch splits into microbatches per device
        self.rows = sharding.batch_sharding(mesh)
        self.variables = jax.device_put(variables, sharding.variable_shardings(model, mesh))
        self.size = model.config.vision.image_size
        self._features = jax.jit(lambda v, x: frozen_image_features(model, v, normalize_images(x)))

    def pad(self, n: int, unit: int = 0) -> int:
        unit = unit or self.devices
        return -(-max(n, 1) // unit) * unit

    def chunks(self, images: np.ndarray, batch: int):
        """(start, rows, the rows zero-padded to `batch` and sharded) over `images`: a fixed shape, one compile."""
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            yield start, len(chunk), self.shard(padded)

    def shard(self, x: np.ndarray):
        return jax.make_array_from_callback(x.shape, self.rows, lambda index: x[index])

    def features(self, images: np.ndarray, batch: int = 256, adapter=None, learned=None) -> np.ndarray:
        """Eval-transform features of uint8 images [N, E], sharded batches of a fixed size: the frozen
        tower's, or with an adapter that prompts the image tower (MaPLe), its own."""
        fn = lambda x: self._features(self.variables, x)  # noqa: E731
        if adapter is not None and adapter.prompts_images:
            @jax.jit
            def prompted(variables, learned, x):
                with adapter.bound(variables):
                    return adapter.image_features(learned, normalize_images(x))

            fn = lambda x: prompted(self.variables, learned, x)  # noqa: E731
        out = [np.asarray(fn(rows))[:n] for _, n, rows in self.chunks(images, self.pad(min(batch, len(images))))]
        return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)

    def augmented_features(self, images: np.ndarray, passes: int, scale, seed: int) -> np.ndarray:
        """[passes, N, E]: the features of `passes` random-resized-crop views of every image."""
        fn = jax.jit(lambda v, x, key: frozen_image_features(self.model, v, augment(x, key, scale, self.size)))
        batch = self.pad(min(256, len(images)))
        out = []
        for p in range(passes):
            key = jax.random.fold_in(jax.random.key(seed), p)
            out.append(np.concatenate([np.asarray(fn(self.variables, rows, jax.random.fold_in(key, start)))[:n]
                                       for start, n, rows in self.chunks(images, batch)]))
        return np.stack(out)

    def logits(self, adapter, learned, features: np.ndarray, batch: int = 512) -> np.ndarray:
        """The adapter's class logits for precomputed image features [N, E] (the frozen weights an
        input of the compiled function, not constants in it)."""
        @jax.jit
        def fn(variables, learned, f):
            with adapter.bound(variables):
                return adapter.logits(learned, f)

        return np.concatenate([np.asarray(fn(self.variables, learned, jnp.asarray(features[i:i + batch])))
                               for i in range(0, len(features), batch)]) if len(features) else np.zeros((0, 0))


def optim_config(settings, steps_per_epoch: int) -> dict:
    """config.optim of the one optimizer factory (clip_jax.train.optim) for an adaptation's settings:
    SGD (Dassl's): constant warmup_lr for warmup_epochs, then cosine by epoch over all epochs; AdamW
    (Tip-Adapter-F): optax.adamw's betas, cosine over every step; the decay on every learned tensor."""
    common = {"optimizer": settings.optimizer, "learning_rate": float(settings.learning_rate), "end_learning_rate": 0.0,
              "weight_decay": float(settings.weight_decay), "weight_decay_on": "all", "grad_clip_norm": 0.0}
    if settings.optimizer == "adamw":
        return {**common, "b1": 0.9, "b2": 0.999, "eps": float(settings.adam_eps), "schedule": "warmup_cosine",
                "warmup_steps": 0}
    if settings.optimizer == "sgd":
        return {**common, "momentum": float(settings.momentum), "schedule": "constant_warmup_cosine",
                "warmup_steps": int(settings.warmup_epochs) * steps_per_epoch,
                "warmup_learning_rate": float(settings.warmup_lr), "schedule_every_steps": steps_per_epoch}
    raise ValueError(f"config.optimizer={settings.optimizer!r}: use 'sgd' or 'adamw'")


def make_optimizer(settings, steps_per_epoch: int, epochs: int):
    """(optimizer, schedule) of the one factory over `epochs` epochs of `steps_per_epoch` steps."""
    config = optim_config(settings, steps_per_epoch)
    total = max(epochs * steps_per_epoch, 1)
    schedule = optim.make_schedule(config, total)
    return optim.make_optimizer(config, None, total, schedule=schedule), schedule


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatches:
    """The in-memory training set's global batches from step `step` on: epoch e's order a seeded
    permutation, each batch padded to `rows` (row weights 0 on the padding) and sharded. The step is
    the whole position (the train state holds it), so a resume is exact and checkpoints hold no input."""

    def __init__(self, runner: Runner, train_set: Split, batch: int, seed: int, step: int):
        self.runner, self.set, self.batch, self.seed, self.step = runner, train_set, batch, seed, step
        self.steps_per_epoch = -(-len(train_set) // batch)
        self.rows = runner.pad(batch, runner.unit)
        self.real = 0  # the real rows of the batch last given

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, i = divmod(self.step, self.steps_per_epoch)
        order = _epoch_order(len(self.set), self.seed, epoch)[i * self.batch:(i + 1) * self.batch]
        pad, images_all = self.rows - len(order), self.set.images
        images = np.concatenate([images_all[order], np.zeros((pad,) + images_all.shape[1:], np.uint8)])
        labels = np.concatenate([self.set.labels[order], np.zeros(pad, np.int32)])
        self.step, self.real = self.step + 1, len(order)
        shard = self.runner.shard
        return {"image": shard(images), "label": shard(labels), "weight": shard(row_weights(len(order), self.rows))}

    def state(self):
        return None


class Preempted(Exception):
    """SIGTERM reached the training loop: a checkpoint holds the step; the same command resumes."""


def train(runner: Runner, adapter, train_set: Split, workdir: str, log=print):
    """Optimize the adapter's learned tensors with the one train step (the towers a frozen parameter
    group) through the trainer's loop (clip_jax.train.loop); resumes from DIR/checkpoints, and on
    SIGTERM checkpoints and raises Preempted. -> the final TrainState (its params hold the towers too)."""
    from clip_jax.train import checkpoint
    from clip_jax.train.loop import Loop, PreemptionNotice

    s = runner.settings
    n, batch = len(train_set), int(s.batch_size)
    steps_per_epoch = -(-n // batch)
    epochs = epochs_for(s)
    total = steps_per_epoch * epochs
    optimizer, schedule = make_optimizer(s, steps_per_epoch, epochs)
    run = build_adaptation(adapter, optimizer, runner.variables, runner.mesh, crop_scale=s.crop_scale,
                           seed=int(s.seed), accum_steps=int(s.accum_steps))
    state, groups = run.state, run.groups
    # Checkpoints hold what changes (the learned tensors, optimizer state, counters), not the towers.
    saved = lambda state: state.replace(params=groups.trainable(state.params))  # noqa: E731
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=2,
                                      save_every=max(int(s.checkpoint_every_steps), 1))
    if manager.all_steps():
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          saved(state))
        restored = checkpoint.restore_latest_good(manager, abstract, log)
        if restored is not None:
            kept, _, step = restored
            state = kept.replace(params=optim.merge(kept.params, groups.fixed(state.params)))
            log(f"resumed from step {step}")
    step = int(state.step)
    batches = EpochBatches(runner, train_set, batch, int(s.seed), step)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if step == 0 and jax.process_index() == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    started, epoch = time.perf_counter(), {"loss": 0.0, "correct": 0.0}

    def after_step(step: int, metrics, state) -> None:
        """A metrics row per epoch: the loss and top-1 over its real rows."""
        real = batches.real
        epoch["loss"] += float(metrics["loss"]) * real
        epoch["correct"] += float(metrics["train_top1"]) * real
        if step % steps_per_epoch and step != total:
            return
        done = step % steps_per_epoch or steps_per_epoch
        seen = min(done * batch, n)
        row = {"step": step, "epoch": -(-step // steps_per_epoch), "loss": epoch["loss"] / seen,
               "train_top1": epoch["correct"] / seen, "learning_rate": float(schedule(step - 1)),
               "elapsed_s": time.perf_counter() - started}
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if row["epoch"] % max(int(s.log_every_epochs), 1) == 0 or step == total:
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        epoch.update(loss=0.0, correct=0.0)

    preemption = PreemptionNotice()
    try:
        loop = Loop(manager, total, preemption, int(s.max_nonfinite_steps), saved=saved, log=log,
                    advice="Lower config.learning_rate or use dtype=float32.")
        outcome = loop.run(state, batches, lambda step, state: (run.step_fn, state), after_step)
    finally:
        preemption.restore()
    if outcome.stopped:  # in-memory batches never stall: SIGTERM reached the loop, which checkpointed the step
        raise Preempted(f"preemption notice (SIGTERM): saved a checkpoint at step {outcome.step} in {workdir}; "
                        "the same command resumes from it")
    return outcome.state


def top1(logits, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels))) if len(labels) else 0.0


def fit(runner: Runner, settings, classnames, prompts, data: FewShot, workdir: str, log=print):
    """(adapter, learned tensors) for the classes of `data`: trained, or (Tip-Adapter) cached and
    searched on validation."""
    adapter = make_adapter(settings, runner.model, runner.variables, classnames, prompts)
    if isinstance(adapter, TipAdapter):
        passes = runner.augmented_features(data.train.images, int(settings.augment_passes),
                                           tuple(settings.cache_crop_scale), int(settings.seed))
        adapter.build_cache(passes, data.train.labels)
    learned = adapter.init(jax.random.key(int(settings.seed)))
    if adapter.trains:
        state = train(runner, adapter, data.train, workdir, log)
        # the step donated the towers' buffers with its state: the state's are the live ones now
        runner.variables = adapter.variables = towers_variables(state.params, state.model_state)
        learned = state.params["learned"]
    learned = jax.device_get(learned)
    if isinstance(adapter, TipAdapter):
        val_f = runner.features(data.val.images)
        acc, beta, alpha = adapter.search(learned, val_f, data.val.labels, tuple(settings.search_scale),
                                          tuple(settings.search_step))
        log(f"Tip-Adapter search on validation: top-1 {acc:.4f} at beta={beta:.4g}, alpha={alpha:.4g}")
    return adapter, learned


def linear_probe_top1(runner: Runner, data: FewShot, test_f: np.ndarray) -> float:
    """CoOp's paper baseline on the same shots: logistic regression on the frozen image features of the
    K-shot train set, C chosen on the few-shot validation set, tested on test_f (the test features)."""
    from clip_jax.evaluate.linear_probe import linear_probe

    train_f, val_f = runner.features(data.train.images), runner.features(data.val.images)
    fit = linear_probe(train_f, data.train.labels, test_f, data.test.labels, num_classes=len(data.classnames),
                       val_features=val_f, val_labels=data.val.labels)
    return float(fit["top1"])


def zero_shot_top1(runner: Runner, prompts, features: np.ndarray, labels: np.ndarray) -> float:
    weights = text_classifier(runner.model, runner.variables, prompts)
    return top1(np.asarray(l2_normalize(jnp.asarray(features))) @ weights.T, labels)


def run(settings, workdir: str, log=print) -> dict:
    """The whole protocol; writes and returns DIR/results.json's content."""
    from clip_jax.adapt.config import check_adapt_ranges
    from clip_jax.train.workdir import check_writable, lock

    ADAPTERS.get(settings.method)  # an unknown method lists the known ones, first
    check_adapt_ranges(settings)
    _check_class_agnostic(settings)
    check_writable(workdir)
    held = lock(workdir) if jax.process_index() == 0 else None  # one run per workdir
    try:
        return _run(settings, workdir, log)
    finally:
        if held is not None:
            held.release()


def _run(settings, workdir: str, log) -> dict:
    from clip_jax.adapt.weights import load_frozen
    from clip_jax.parallel.sharding import make_mesh
    from clip_jax.runs import ADAPTATION_CONFIG

    with open(os.path.join(workdir, ADAPTATION_CONFIG), "w") as f:  # what marks the workdir an adaptation's
        f.write(settings.to_json_best_effort(indent=2))
    model, variables = load_frozen(settings)
    mesh = make_mesh(settings.mesh.to_dict())
    runner = Runner(settings, model, variables, mesh, int(settings.accum_steps))
    from clip_jax.adapt.prompts import class_prompts

    data = load_few_shot(settings.dataset, settings.label_key, int(settings.shots), int(settings.seed),
                         runner.size, settings.data.to_dict(), class_names_of(settings))
    prompts = class_prompts(settings, data.classnames)
    results: dict[str, Any] = {"method": settings.method, "dataset": str(settings.dataset),
                               "label_key": settings.label_key, "shots": int(settings.shots),
                               "seed": int(settings.seed)}
    test_f = runner.features(data.test.images)
    if settings.base_to_novel:
        base, novel = base_and_novel(len(data.classnames))
        sub = lambda split, classes: split.of_classes(classes)  # noqa: E731
        base_data = FewShot([data.classnames[c] for c in base], sub(data.train, base), sub(data.val, base),
                            sub(data.test, base))
        adapter, learned = fit(runner, settings, base_data.classnames, [prompts[c] for c in base], base_data, workdir,
                               log)
        novel_names = [data.classnames[c] for c in novel]
        try:
            novel_adapter = make_adapter(settings, runner.model, runner.variables, novel_names,
                                         [prompts[c] for c in novel])
        except ValueError as e:
            raise ValueError(f"base-to-novel: {e}") from None
        keep = lambda classes: np.isin(data.test.labels, classes)  # noqa: E731
        base_f, novel_f = test_f[keep(base)], test_f[keep(novel)]
        method_f = runner.features(data.test.images, adapter=adapter, learned=learned) if adapter.prompts_images \
            else test_f
        base_y, novel_y = base_data.test.labels, sub(data.test, novel).labels
        results["base_top1"] = top1(runner.logits(adapter, learned, method_f[keep(base)]), base_y)
        results["novel_top1"] = top1(runner.logits(novel_adapter, learned, method_f[keep(novel)]), novel_y)
        a, b = results["base_top1"], results["novel_top1"]
        results["hm"] = 2 * a * b / (a + b) if a + b else 0.0
        results["zero_shot_base_top1"] = zero_shot_top1(runner, [prompts[c] for c in base], base_f, base_y)
        results["zero_shot_novel_top1"] = zero_shot_top1(runner, [prompts[c] for c in novel], novel_f, novel_y)
        results["top1"] = results["base_top1"]
        results["zero_shot_top1"] = results["zero_shot_base_top1"]
        val_f = runner.features(base_data.val.images, adapter=adapter, learned=learned)
        results["val_top1"] = top1(runner.logits(adapter, learned, val_f), base_data.val.labels)
    else:
        adapter, learned = fit(runner, settings, data.classnames, prompts, data, workdir, log)
        val_f = runner.features(data.val.images, adapter=adapter, learned=learned)
        method_f = runner.features(data.test.images, adapter=adapter, learned=learned) if adapter.prompts_images \
            else test_f
        results["zero_shot_top1"] = zero_shot_top1(runner, prompts, test_f, data.test.labels)
        results["val_top1"] = top1(runner.logits(adapter, learned, val_f), data.val.labels)
        results["top1"] = top1(runner.logits(adapter, learned, method_f), data.test.labels)
        results["linear_probe_top1"] = linear_probe_top1(runner, data, test_f)
    if isinstance(adapter, TipAdapter):
        results["alpha"], results["beta"] = adapter.alpha, adapter.beta
    if settings.transfer:
        results["transfer"] = {spec: transfer(runner, settings, adapter, learned, spec) for spec in settings.transfer}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        write_adapter(workdir, settings, adapter, learned)
    return results


def _check_class_agnostic(settings) -> None:
    """Base-to-novel and transfer score the learned tensors on other classes: refused, before any
    work, for tensors that belong to the training classes (Tip's cache, class-specific contexts)."""
    bound = settings.method in ("tip_adapter", "tip_adapter_f") or (settings.method == "coop" and settings.csc)
    for asked, name in ((settings.base_to_novel, "base_to_novel"), (settings.transfer, "transfer")):
        if asked and bound:
            raise ValueError(f"config.{name} scores the learned tensors on other classes; {settings.method}'s "
                             "belong to the training classes (a cache, or class-specific contexts): unset it")


def transfer(runner: Runner, settings, adapter, learned, spec: str) -> dict:
    """Top-1 of the learned tensors on another dataset's whole test split with its classes (and the
    frozen model's zero-shot there): 'DATASET' or 'DATASET@LABEL_KEY'."""
    from clip_jax.adapt.data import test_split
    from clip_jax.adapt.prompts import class_prompts

    dataset, _, label_key = spec.partition("@")
    target = settings.copy_and_resolve_references()
    target.dataset, target.label_key, target.classnames, target.templates = dataset, label_key or settings.label_key, \
        "", ()
    classnames, test = test_split(dataset, target.label_key, runner.size, settings.data.to_dict())
    prompts = class_prompts(target, classnames)
    other = make_adapter(settings, runner.model, runner.variables, classnames, prompts)
    frozen = runner.features(test.images)
    method_f = runner.features(test.images, adapter=other, learned=learned) if other.prompts_images else frozen
    return {"top1": top1(runner.logits(other, learned, method_f), test.labels),
            "zero_shot_top1": zero_shot_top1(runner, prompts, frozen, test.labels), "classes": len(classnames)}


def write_adapter(workdir: str, settings, adapter, learned) -> None:
    """DIR/adapter.safetensors (the learned tensors under the reference's names, and text_features
    [C, E], the class embeddings used) and DIR/adapter.json (what they mean)."""
    from clip_jax.convert import write_safetensors

    # np.array(order="C") keeps 0-d tensors 0-d (alpha, beta), as the reference saves them
    tensors = {k: np.array(np.asarray(v, np.float32), order="C") for k, v in adapter.export(learned).items()}
    tensors["text_features"] = np.array(np.asarray(adapter.text_features(learned), np.float32), order="C")
    write_safetensors(tensors, os.path.join(workdir, "adapter.safetensors"))
    meta = {"method": settings.method, "classnames": adapter.classnames, "prompts": adapter.prompts,
            "logit_scale": adapter.scale, "n_ctx": int(settings.n_ctx), "ctx_init": settings.ctx_init,
            "class_token_position": settings.class_token_position, "csc": bool(settings.csc),
            "weights": settings.weights, "model": settings.model}
    if isinstance(adapter, TipAdapter):
        meta.update(alpha=adapter.alpha, beta=adapter.beta)
    with open(os.path.join(workdir, "adapter.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)


def class_names_of(settings):
    """config.classnames: a JSON file {'classnames': [...]} or a list; '' takes the dataset's."""
    names = settings.classnames
    if not names:
        return None
    if isinstance(names, str):
        with open(names) as f:
            return list(json.load(f)["classnames"])
    return list(names)
