"""The one optimizer factory against torch's optimizers (the few-shot references train with them):
SGD with momentum and weight decay under Dassl's constant warmup + per-epoch cosine, and AdamW under
a per-step cosine, the learning rate of each step computed by hand on the torch side."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax.adapt.config import adapt_config
from clip_jax.adapt.train import make_optimizer as adaptation_optimizer
from clip_jax.train.optim import make_optimizer, make_schedule

STEPS_PER_EPOCH, EPOCHS = 3, 4


def _run(optimizer, params, grads):
    """The params after one optimizer step per gradient."""
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return jax.device_get(params)


def _torch(optimizer: str, settings, params, grads) -> dict:
    from conftest import reference, torch_reference

    reference("torch", load=False)
    lr, warmup_lr, warmup = float(settings.learning_rate), float(settings.warmup_lr), int(settings.warmup_epochs)
    make = {"sgd": f"torch.optim.SGD(ps, lr={lr}, momentum={float(settings.momentum)}, "
                   f"weight_decay={float(settings.weight_decay)})",
            "adamw": f"torch.optim.AdamW(ps, lr={lr}, eps={float(settings.adam_eps)}, "
                     f"weight_decay={float(settings.weight_decay)})"}[optimizer]
    # Dassl: warmup_lr for the warmup epochs, then cosine by epoch over all of them; Tip-Adapter-F: cosine by step
    rate = {"sgd": f"{warmup_lr} if t // {STEPS_PER_EPOCH} < {warmup} else "
                   f"0.5 * {lr} * (1 + math.cos(math.pi * (t // {STEPS_PER_EPOCH}) / {EPOCHS}))",
            "adamw": f"0.5 * {lr} * (1 + math.cos(math.pi * t / {STEPS_PER_EPOCH * EPOCHS}))"}[optimizer]
    names = sorted(params)
    return torch_reference(f"""
import math, torch
names = {names!r}
ps = [torch.nn.Parameter(torch.from_numpy(inputs["p_" + k].copy())) for k in names]
opt = {make}
rates = []
for t in range(len(inputs["g_" + names[0]])):
    rate = {rate}
    rates.append(rate)
    for group in opt.param_groups:
        group["lr"] = rate
    for k, p in zip(names, ps):
        p.grad = torch.from_numpy(inputs["g_" + k][t].copy())
    opt.step()
outputs.update({{k: p.detach().numpy() for k, p in zip(names, ps)}})
outputs["rates"] = np.array(rates)
""", **{f"p_{k}": v for k, v in params.items()}, **{f"g_{k}": np.stack([g[k] for g in grads]) for k in names})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_adaptations_optimizer_is_torchs(optimizer):
    s = adapt_config()
    s.optimizer, s.warmup_epochs = optimizer, 1
    if optimizer == "adamw":
        s.learning_rate, s.weight_decay = 1e-2, 1e-2
    else:
        s.learning_rate, s.weight_decay = 0.5, 5e-2  # large enough that decay and momentum show in the figures
    rng = np.random.default_rng(0)
    params = {"ctx": rng.normal(size=(4, 8)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)}
    total = STEPS_PER_EPOCH * EPOCHS
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(total)]
    ref = _torch(optimizer, s, params, grads)
    opt, schedule = adaptation_optimizer(s, STEPS_PER_EPOCH, EPOCHS)
    np.testing.assert_allclose([float(schedule(jnp.int32(t))) for t in range(total)], ref["rates"], rtol=1e-5)
    got = _run(opt, {k: jnp.asarray(v) for k, v in params.items()}, grads)
    for k in params:
        assert not np.allclose(ref[k], params[k], atol=1e-3), k  # the steps moved the params
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if optimizer == "sgd":  # the trainer's config selects the same optimizer by its settings, given the params
        config = {"optimizer": "sgd", "momentum": float(s.momentum), "learning_rate": float(s.learning_rate),
                  "weight_decay": float(s.weight_decay), "weight_decay_on": "all", "grad_clip_norm": 0.0,
                  "schedule": "constant_warmup_cosine", "warmup_steps": STEPS_PER_EPOCH,
                  "warmup_learning_rate": float(s.warmup_lr), "schedule_every_steps": STEPS_PER_EPOCH}
        params_j = {k: jnp.asarray(v) for k, v in params.items()}
        got = _run(make_optimizer(config, params_j, total), params_j, grads)
        for k in params:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_audioclips_nesterov_sgd_under_a_per_epoch_exponential_decay_is_torchs():
    """AudioCLIP's protocol: torch.optim.SGD(momentum 0.9, nesterov, weight decay) with ExponentialLR stepped at
    each epoch's end, against config.optim's sgd + nesterov + 'exponential' schedule."""
    from conftest import reference, torch_reference

    reference("torch", load=False)
    lr, gamma, wd = 0.5, 0.8, 5e-2  # large enough that the decay, the momentum and the schedule show
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    total = STEPS_PER_EPOCH * EPOCHS
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(total)]
    names = sorted(params)
    ref = torch_reference(f"""
import torch
names = {names!r}
ps = [torch.nn.Parameter(torch.from_numpy(inputs["p_" + k].copy())) for k in names]
opt = torch.optim.SGD(ps, lr={lr}, momentum=0.9, nesterov=True, weight_decay={wd})
sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma={gamma})
for t in range({total}):
    for k, p in zip(names, ps):
        p.grad = torch.from_numpy(inputs["g_" + k][t].copy())
    opt.step()
    if (t + 1) % {STEPS_PER_EPOCH} == 0:
        sched.step()
outputs.update({{k: p.detach().numpy() for k, p in zip(names, ps)}})
""", **{f"p_{k}": v for k, v in params.items()}, **{f"g_{k}": np.stack([g[k] for g in grads]) for k in names})
    config = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "learning_rate": lr, "weight_decay": wd,
              "weight_decay_on": "all", "grad_clip_norm": 0.0, "schedule": "exponential", "decay_factor": gamma,
              "schedule_every_steps": STEPS_PER_EPOCH}
    params_j = {k: jnp.asarray(v) for k, v in params.items()}
    got = _run(make_optimizer(config, params_j, total), params_j, grads)
    for k in params:
        assert not np.allclose(ref[k], params[k], atol=1e-3), k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ValueError, match=r"config.optim.optimizer='lamb' is not known: use one of 'adamw', 'sgd'"):
        make_optimizer({"optimizer": "lamb"}, {"w": jnp.ones(2)}, 10)
    with pytest.raises(ValueError, match="schedule_every_steps=4 does not divide the run's 10 steps"):
        make_schedule({"schedule": "constant_warmup_cosine", "schedule_every_steps": 4}, 10)
    with pytest.raises(ValueError, match="weight_decay_on='all'"):
        make_optimizer({}, None, 10)  # without the params the paper's weight matrices cannot be found
