"""Every numeric setting of the configs is range-checked before anything runs, naming the field
and the allowed range (the trainer's and the adaptation's)."""

import re

import pytest

from clip_jax.adapt.config import RANGES as ADAPT_RANGES
from clip_jax.adapt.config import adapt_config, check_adapt_ranges
from clip_jax.config import all_ranges, base_config, check_ranges, describe_range


def _set(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _outside(rule):
    """A value just outside the rule (of the bound's type: ints stay ints)."""
    if rule[0] == ">=":
        return rule[1] - 1 if isinstance(rule[1], int) else rule[1] - 1e-3
    if rule[0] == ">":
        return rule[1]
    return 1.0 if rule[0] == "[0,1)" else 1.5


@pytest.mark.parametrize("table,make,check", [(all_ranges(), base_config, check_ranges),
                                              (ADAPT_RANGES, adapt_config, check_adapt_ranges)])
def test_every_range_is_checked_and_named(table, make, check):
    check(make())  # the defaults are in range
    for key, rule in table.items():
        config = make()
        _set(config, key, _outside(rule))
        allowed = re.escape(describe_range(rule))
        with pytest.raises(ValueError, match=f"config.{key}=.* out of range: it must be {allowed}"):
            check(config)


def test_scales_and_sizes():
    c = base_config()
    c.data.crop_scale = (0.9, 0.5)
    with pytest.raises(ValueError, match=r"config.data.crop_scale=\(0.9, 0.5\): use \(low, high\)"):
        check_ranges(c)
    c = base_config()
    c.data.shapes_sizes = {"train": 0}
    with pytest.raises(ValueError, match="config.data.shapes_sizes.train=0 is out of range"):
        check_ranges(c)
    a = adapt_config()
    a.cache_crop_scale = (0.0, 1.0)
    with pytest.raises(ValueError, match=r"config.cache_crop_scale=\(0.0, 1.0\)"):
        check_adapt_ranges(a)
    a = adapt_config()
    a.search_scale = (7.0, 0.05)
    with pytest.raises(ValueError, match="each > 0.1"):
        check_adapt_ranges(a)


def test_the_trainer_refuses_a_negative_learning_rate_before_reading_data(tmp_path):
    from clip_jax import train

    c = base_config()
    c.data.train = "tfrecord:/nonexistent/*.tfrecord"  # never reached: the range check comes first
    c.optim.learning_rate = -1e-3
    with pytest.raises(ValueError, match=r"config.optim.learning_rate=-0.001 is out of range: it must be >= 0"):
        train.train_and_evaluate(c, str(tmp_path / "w"))


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "clip_adapter", "tip_adapter", "tip_adapter_f"])
def test_unknown_keys_in_overrides_are_refused_for_every_adaptation_config(method):
    """--config.KEY=VALUE goes through ml_collections' config_path: a key the config lacks, at any
    depth, is refused by name (the CLI prints it); a known key is set."""
    from ml_collections.config_flags import config_path

    from clip_jax.adapt.config import method_config

    config = method_config(method)
    for key in ("bogus", "mesh.bogus", "data.bogus"):
        with pytest.raises(KeyError, match=f"bogus is not a valid key .*in: {re.escape(key)}"):
            config_path.set_value(key, config, 1)
    config_path.set_value("shots", config, 2)
    assert config.shots == 2


def test_the_vit_smoke_config_is_the_smoke_run_with_a_vit_and_passes_the_trainers_checks():
    """configs/smoke_vit.py (the frozen model MaPLe adapts) is configs/smoke.py with ViT-Shapes-M, and valid."""

    from conftest import config_of

    from clip_jax.train import trainer

    configs = {name: config_of(name) for name in ("smoke", "smoke_vit")}
    vit, smoke = configs["smoke_vit"], configs["smoke"]
    assert vit.model == "ViT-Shapes-M" and vit.total_steps == 800
    assert vit.optim.learning_rate == 1e-3
    vit.optim.learning_rate = smoke.optim.learning_rate
    assert (vit.data.to_dict(), vit.optim.to_dict(), vit.batch_size) == (smoke.data.to_dict(), smoke.optim.to_dict(),
                                                                         smoke.batch_size)
    trainer.validate(vit)
