"""Mesh construction, rule-based parameter shardings, sharded init equal to plain init."""

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from clip_jax.models import create_model, init_variables
from clip_jax.parallel.sharding import check_batch, make_mesh, sharded_init, spec_for

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 simulated devices")


@needs8
def test_mesh_shapes_and_errors():
    mesh = make_mesh({"data": -1, "fsdp": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="holds 6 devices but there are 8"):
        make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})
    with pytest.raises(ValueError, match="does not divide over the 8 devices"):
        check_batch(12, mesh)
    check_batch(16, mesh)


@needs8
def test_rules_give_expected_specs():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert spec_for(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
    assert spec_for(("embed", None, "heads", "kv"), (64, 3, 4, 16), mesh) == P("fsdp", None, "tensor", None)
    assert spec_for(("layers", "embed"), (12, 63), mesh) == P(None, None)  # 63 does not divide: whole
    assert spec_for((None, None, "conv_in", "conv_out"), (3, 3, 3, 32), mesh) == P(None, None, None, "fsdp")


@needs8
@pytest.mark.parametrize("name", ["ViT-Tiny-test", "RN-Tiny-test", "cn-ViT-Tiny-test", "ViT-SigLIP-Tiny-test"])
def test_sharded_init_equals_plain_init(name):
    model = create_model(name, scan=True)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    variables, shardings = sharded_init(model, mesh, jax.random.key(3))
    plain = init_variables(model, jax.random.key(3))
    flat = traverse_util.flatten_dict(variables)
    for path, ref in traverse_util.flatten_dict(plain).items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(ref), err_msg=str(path))
    # The big tensors are split over fsdp: no device holds all of them.
    specs = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.spec, shardings))
    table = "word_embeddings" if name.startswith("cn-") else "token_embedding"
    emb = specs[("params", "text", table, "embedding")]
    assert emb == P(None, "fsdp")
    per_device = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(variables) for s in leaf.addressable_shards
                     if s.device == jax.devices()[0])
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
    assert per_device < 0.5 * total
