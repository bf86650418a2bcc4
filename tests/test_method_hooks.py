"""What a method brings goes through its hooks (clip_jax.methods.base.Method: config sections,
checks, model overrides, phases, FLOPs): the trainer and the base config name no method, the
phases give the steps the flags gave, and an old workdir's config.json still reads."""

import os
import re

import pytest

from clip_jax.config import base_config, from_saved
from clip_jax.methods.base import Phase
from clip_jax.train.build import model_from_config, optimizer_phases, phase_at, phase_of_checkpoint, phases_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What names a method, its loss, its model change or its phases (case-insensitive unless upper case).
FORBIDDEN = [
    ("SLIP", re.compile(r"(?<![a-z])slip(?![a-z])", re.I)),
    ("SigLIP", re.compile(r"siglip", re.I)),
    ("FLIP", re.compile(r"FLIP")),  # upper case only: a horizontal 'flip' is data augmentation
    ("the sigmoid loss", re.compile(r"sigmoid", re.I)),
    ("SimCLR", re.compile(r"simclr", re.I)),
    ("patch dropout", re.compile(r"patch[_ ]dropout|mask_patches|unmasked", re.I)),
    ("a second stage", re.compile(r"unfreeze|(?<![a-z])stage(?![a-rt-z])", re.I)),
    ("views", re.compile(r"(?<![a-z])views(?![a-z])|image_views", re.I)),
]
def _generic_files():
    train = os.path.join(ROOT, "clip_jax", "train")
    return [os.path.join("clip_jax", "train", f) for f in sorted(os.listdir(train)) if f.endswith(".py")] + [
        os.path.join("clip_jax", "config.py")]


def forbidden_mentions(path: str, source: str) -> list[str]:
    return [f"{path}:{n}: {what}: {line.strip()}" for n, line in enumerate(source.splitlines(), 1)
            for what, pattern in FORBIDDEN if pattern.search(line)]


def test_the_trainer_and_the_base_config_name_no_method():
    found = []
    for path in _generic_files():
        found += forbidden_mentions(path, open(os.path.join(ROOT, path)).read())
    assert not found, "method names in generic code (give the method a hook instead):\n" + "\n".join(found)


def test_the_check_would_catch_what_the_flags_were():
    """The patterns catch the identifiers the trainer used to hold, and pass generic words."""
    for line in ("if config.unfreeze_at_step:", "run.unmasked_step_fn", "{'slip': 2}.get(method)", "stage_of(c, 3)",
                 'if config.loss == "sigmoid":', "SIGLIP_INIT", "# FLIP's tuning", "config.patch_dropout",
                 'views=2 if "image_views" in keys', "run.stage == 1", "stage2"):
        assert forbidden_mentions("x.py", line), line
    for line in ("random horizontal flip", "slippery = staged", "the phase's optimizer", "reviews", "backstage"):
        assert not forbidden_mentions("x.py", line), line


def test_the_base_config_holds_each_methods_section():
    c = base_config()
    assert dict(c.clip) == {"loss": "softmax", "patch_dropout": 0.0, "unmasked_from_step": 0, "unfreeze_at_step": 0,
                            "image_embeddings": ""}
    assert c.slip.ssl_temp == 0.1 and c.slip.mlp_dim == 4096
    for old in ("loss", "patch_dropout", "unmasked_from_step", "unfreeze_at_step", "image_embeddings"):
        assert old not in c


def test_an_old_workdirs_config_reads_its_moved_keys():
    old = {"method": "slip", "loss": "sigmoid", "patch_dropout": 0.5, "unmasked_from_step": 7, "unfreeze_at_step": 3,
           "slip": {"ssl_scale": 2.0}, "optim": {"frozen": "visual/.*"}, "total_steps": 9, "image_embeddings": "/e"}
    c = from_saved(old)
    assert c.clip.image_embeddings == "/e"
    assert (c.clip.loss, c.clip.patch_dropout, c.clip.unmasked_from_step, c.clip.unfreeze_at_step) == (
        "sigmoid", 0.5, 7, 3)
    assert c.slip.ssl_scale == 2.0 and c.slip.ssl_temp == 0.1 and c.optim.frozen == "visual/.*"
    new = from_saved({"clip": {"loss": "softmax_ring"}})
    assert new.clip.loss == "softmax_ring" and new.clip.patch_dropout == 0.0
    assert from_saved(c.to_dict()).to_dict() == c.to_dict()


def test_the_loss_and_the_method_bring_their_model_changes():
    c = base_config()
    c.model = "ViT-Tiny-test"
    plain = model_from_config(c).config
    c.clip.loss, c.clip.patch_dropout = "sigmoid", 0.25
    changed = model_from_config(c).config
    assert plain.init_logit_bias is None and plain.vision.patch_dropout == 0.0
    assert changed.init_logit_bias == -10.0 and changed.init_logit_scale == pytest.approx(2.302585, rel=1e-6)
    assert changed.vision.patch_dropout == 0.25
    c.model_overrides = {"init_logit_bias": -5.0}  # the run's own overrides win over the loss's init
    assert model_from_config(c).config.init_logit_bias == -5.0


def _stage(unfreeze_at_step: int, steps_done: int) -> int:
    """The trainer's former rule: a checkpoint after more than S steps holds the second stage's state."""
    return 2 if unfreeze_at_step and steps_done > unfreeze_at_step else 1


@pytest.mark.parametrize("unfreeze,unmasked", [(0, 0), (4, 0), (0, 3), (4, 2), (4, 6), (4, 4)])
def test_phases_step_as_the_flags_did(unfreeze, unmasked):
    c = base_config()
    c.total_steps, c.optim.frozen = 10, "visual/.*"
    c.clip.patch_dropout, c.clip.unmasked_from_step, c.clip.unfreeze_at_step = 0.5, unmasked, unfreeze
    phases = phases_of(c)
    assert phases[0].start == 0 and [p.start for p in phases] == sorted({p.start for p in phases})
    for step in range(c.total_steps):
        phase = phase_at(phases, step)
        settled = phases[:phase + 1]
        masks = dict(a for p in settled for a in p.attributes).get("mask_patches", True)
        assert masks == (not unmasked or step < unmasked), step  # the unmasked step from unmasked_from_step on
        fresh = optimizer_phases(phases, phase)[0]
        assert phases[fresh].start == (unfreeze if unfreeze and step >= unfreeze else 0), step
        frozen = [p.frozen for p in phases[:fresh + 1] if p.frozen is not None]
        assert (frozen[-1] if frozen else c.optim.frozen) == ("" if unfreeze and step >= unfreeze else "visual/.*")
    for done in range(c.total_steps + 1):  # the optimizer state a checkpoint holds: as stage_of said
        holds = optimizer_phases(phases, phase_of_checkpoint(phases, done))[0]
        assert (2 if phases[holds].fresh_optimizer else 1) == _stage(unfreeze, done), done


def test_a_phase_that_changes_what_is_frozen_needs_a_fresh_optimizer():
    with pytest.raises(ValueError, match="changes what is frozen.*fresh_optimizer=True"):
        Phase(5, "thaw", frozen="")


def test_slips_flops_add_its_two_views_image_passes():
    from clip_jax.models import create_model
    from clip_jax.train.flops import clip_forward_flops, method_train_flops

    model = create_model("ViT-Tiny-test", attn_impl="xla")
    f = clip_forward_flops(model, 4)
    assert method_train_flops(model, 4, "clip") == 3 * (f["image"] + f["text"] + f["logits"])
    assert method_train_flops(model, 4, "slip") == 3 * (f["image"] + f["text"] + f["logits"]) + 2 * 3 * f["image"]
