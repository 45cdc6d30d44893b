"""Each parameter declares its logical axes, FP8 eligibility and LoRA group where it is created.

The references of the change are literal copies of the path-regex tables these tags replaced: the
tags must select exactly what those tables selected, and the shardings derived from the axes must be
the ones the old rules table gave wherever its axes divided.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from mistral4_jax import InputError
from mistral4_jax.config import ModelConfig
from mistral4_jax.model import Mistral3ForConditionalGeneration, fp8
from mistral4_jax.model.layers import LORA_GROUPS, linear
from mistral4_jax.sharding import LOGICAL_TO_MESH, make_mesh, param_axes, param_shardings
from mistral4_jax.train.lora import LoRAConfig, init_adapters
from mistral4_jax.train.step import TrainConfig, init_state, make_optimizer, state_shardings

_DENSE = dict(first_k_dense_replace=1, num_hidden_layers=3)
CONFIGS = {
    "vision_dense": ModelConfig.tiny(**_DENSE),
    "text_only_dense": dataclasses.replace(ModelConfig.tiny(**_DENSE), vision=None),
    "plain_q_biases": dataclasses.replace(ModelConfig.tiny(q_lora_rank=None, attention_bias=True),
                                          multimodal_projector_bias=True),
}

# The old tables, copied literally (sharding.PARAM_AXES, quant.FP8_TARGETS, train/lora.TARGETS).
_STACK = r"language_model/(dense_)?layers/"
OLD_PARAM_AXES = [
    (_STACK + r"mlp/experts/(gate_up_proj|down_proj)$", ("layers", "expert", None, None)),
    (_STACK + r"self_attn/(q_proj|q_b_proj|kv_b_proj)/kernel$", ("layers", None, "heads")),
    (_STACK + r"self_attn/(q_proj|q_b_proj|kv_b_proj)/bias$", ("layers", "heads")),
    (_STACK + r"self_attn/o_proj/kernel$", ("layers", "heads", None)),
    (_STACK + r"mlp/(shared_experts/)?(gate_proj|up_proj)/kernel$", ("layers", None, "mlp")),
    (_STACK + r"mlp/(shared_experts/)?down_proj/kernel$", ("layers", "mlp", None)),
    (r"language_model/embed_tokens/embedding$", ("vocab", None)),
    (r"^lm_head/kernel$", (None, "vocab")),
]
OLD_FP8_TARGETS = re.compile(
    r"^language_model/(dense_)?layers/("
    r"self_attn/(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)/kernel"
    r"|mlp/shared_experts/(gate_proj|up_proj|down_proj)/kernel"
    r"|mlp/(gate_proj|up_proj|down_proj)/kernel"
    r"|mlp/experts/(gate_up_proj|down_proj))$")
OLD_LORA_TARGETS = {
    "attention": r"language_model/(dense_)?layers/self_attn/(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
                 r"|o_proj)/kernel$",
    "shared_experts": r"language_model/layers/mlp/shared_experts/(gate_proj|up_proj|down_proj)/kernel$",
    "experts": r"language_model/layers/mlp/experts/(gate_up_proj|down_proj)$",
    "dense_mlp": r"language_model/dense_layers/mlp/(gate_proj|up_proj|down_proj)/kernel$",
}


def _abstract(cfg):
    return nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0)))


def _params(model) -> dict:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _old_spec(path, shape, mesh) -> tuple:
    """The old `param_spec`: the first matching rule of the right rank; an axis that does not divide, or
    no rule, replicated."""
    for pattern, axes in OLD_PARAM_AXES:
        if re.search(pattern, path) and len(axes) == len(shape):
            out = []
            for size, name in zip(shape, axes):
                axis = LOGICAL_TO_MESH.get(name) if name else None
                ok = axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
                out.append(axis if ok else None)
            return tuple(out)
    return (None,) * len(shape)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_param_carries_logical_axes_of_its_rank(name):
    params = _params(_abstract(CONFIGS[name]))
    assert any("/dense_layers/" in p for p in params) == (name != "plain_q_biases")
    assert any(p.startswith("vision_tower/") for p in params) == (name != "text_only_dense")
    for path, v in params.items():
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(v.shape), (path, v.shape, axes)
        assert all(a is None or a in LOGICAL_TO_MESH for a in axes), (path, axes)
        stacked = "/layers/" in path or "/dense_layers/" in path
        assert (axes[0] == "layers") == stacked, (path, axes)  # the stacked axis comes from nnx.vmap
    assert param_axes(nnx.state(_abstract(CONFIGS[name]), nnx.Param)).keys() == params.keys()


def test_a_param_without_axes_is_an_error():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 2)))
            self.ok = linear(4, 2, jnp.float32, nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"w \(4, 2\): logical axes None"):
        param_shardings(Bare(), None)


@pytest.mark.parametrize("name", CONFIGS)
def test_shardings_equal_the_old_rules_table_where_it_divided(name):
    """On a 1 x 2 x 2 mesh every tagged axis of the tiny configs divides (8 experts, even head and FFN
    widths, vocab 1024), so the old table's specs are the reference."""
    model = _abstract(CONFIGS[name])
    mesh = make_mesh(data=1, expert=2, tensor=2, devices=jax.devices()[:4])
    got = param_shardings(model, mesh)
    for path, v in _params(model).items():
        want = _old_spec(path, tuple(v.shape), mesh)
        assert tuple(got[path].spec) + (None,) * (len(v.shape) - len(got[path].spec)) == want, path
    # by the spec: routed experts over "expert", heads / FFN width / vocab over "tensor"
    assert got["language_model/layers/mlp/experts/gate_up_proj"].spec == PartitionSpec(None, "expert", None, None)
    assert got["language_model/layers/self_attn/o_proj/kernel"].spec == PartitionSpec(None, "tensor", None)
    assert got["lm_head/kernel"].spec == PartitionSpec(None, "tensor")


@pytest.mark.parametrize("overrides, path, axis", [
    (dict(n_routed_experts=6), "language_model/layers/mlp/experts/down_proj", "'expert' of size 4"),
    (dict(vocab_size=1001), "language_model/embed_tokens/embedding", "'tensor' of size 2"),
])
def test_an_axis_that_does_not_divide_names_the_parameter(overrides, path, axis):
    model = _abstract(ModelConfig.tiny(**overrides))
    mesh = make_mesh(data=1, expert=4, tensor=2, devices=jax.devices()[:8])
    shape = tuple(_params(model)[path].shape)
    with pytest.raises(InputError, match=re.escape(f"parameter {path} of shape {shape}")) as e:
        param_shardings(model, mesh)
    assert f"mesh axis {axis}" in str(e.value)
    # a mesh axis of size 1 splits nothing, so any size is fine there
    param_shardings(model, make_mesh(data=1, expert=1, tensor=1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("name", CONFIGS)
def test_fp8_tags_select_what_the_old_regex_selected(name):
    model = _abstract(CONFIGS[name])
    want = {p for p in _params(model) if OLD_FP8_TARGETS.match(p)}
    assert want and fp8.fp8_paths(model) == want


@pytest.mark.parametrize("name", CONFIGS)
def test_lora_groups_select_what_the_old_regexes_selected(name):
    params = nnx.state(_abstract(CONFIGS[name]), nnx.Param)
    paths = list(_params(params))
    for group in LORA_GROUPS:
        want = {p for p in paths if re.search(OLD_LORA_TARGETS[group], p)}
        got = {p for p, v in _params(params).items() if v.get_metadata().get("lora") == group}
        assert got == want, group
        if want:  # adapter keys are the parameter paths, as before
            assert init_adapters(params, LoRAConfig(targets=(group,)), jax.random.key(0)).keys() == want
        else:
            with pytest.raises(InputError, match="match no parameter"):
                init_adapters(params, LoRAConfig(targets=(group,)), jax.random.key(0))


def test_lora_adapters_split_like_their_weight_with_the_rank_replicated():
    model = Mistral3ForConditionalGeneration(ModelConfig.tiny(**_DENSE), jnp.float32, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    adapters = init_adapters(params, LoRAConfig(rank=2, targets=LORA_GROUPS), jax.random.key(0))
    tx = make_optimizer(TrainConfig(steps=1))
    mesh = make_mesh(data=1, expert=2, tensor=2, devices=jax.devices()[:4])
    sh = state_shardings(init_state(adapters, tx), tx, mesh, params)["trainable"]
    # rank 2 would divide the tensor axis: it stays replicated because it is not a head axis
    assert sh["language_model/layers/self_attn/q_b_proj/kernel"]["a"].spec == PartitionSpec(None, None, None)
    assert sh["language_model/layers/self_attn/q_b_proj/kernel"]["b"].spec == PartitionSpec(None, None, "tensor")
    assert sh["language_model/layers/self_attn/o_proj/kernel"]["a"].spec == PartitionSpec(None, "tensor", None)
    assert sh["language_model/layers/mlp/experts/down_proj"]["b"].spec == PartitionSpec(None, "expert", None, None)
    placed = jax.device_put(adapters, sh)
    a = placed["language_model/layers/mlp/experts/gate_up_proj"]["a"]
    assert {s.data.shape for s in a.addressable_shards} == {(2, 4, 64, 2)}  # 8 experts over expert=2
    want = adapters["language_model/layers/mlp/experts/gate_up_proj"]["a"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
