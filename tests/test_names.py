"""The name table of `checkpoints.names` read both ways: every parameter's written name is read back as
the same slot, with a transform whose inverse undoes it."""

import dataclasses

import numpy as np
import pytest

from mistral4_jax.checkpoints import names
from mistral4_jax.checkpoints.read import abstract_model, layers_of, param_shapes, stacked_paths
from mistral4_jax.config import ModelConfig
from mistral4_jax.model.layers import text_stacks

CONFIGS = {
    "tiny": ModelConfig.tiny(),
    # a dense layer before the MoE ones, so stacked layer numbers and on-disk ones differ
    "dense_first": ModelConfig.tiny().replace_text(num_hidden_layers=3, first_k_dense_replace=1),
}


@pytest.mark.parametrize("released", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_round_trips(name, released):
    cfg = CONFIGS[name]
    model = abstract_model(cfg, np.float32)
    shapes, stacked = param_shapes(model), stacked_paths(model)
    n_vision = shapes.get("vision_tower/transformer/layers/attention_norm/weight", (None,))[0]
    seen = set()
    for path, shape in shapes.items():
        for layer in layers_of(shape, path in stacked):
            disk, transform = names.disk_name(path, layer, cfg, released=released)
            assert disk not in seen
            seen.add(disk)
            slot = names.slot_of(disk, cfg, n_vision)
            assert slot == names.Slot(path, layer, None, transform), disk
            slot_shape = shape if layer is None else shape[1:]
            x = np.arange(np.prod(slot_shape)).reshape(slot_shape)
            on_disk = transform.to_disk(x)
            assert on_disk.shape == transform.disk_shape(slot_shape)
            np.testing.assert_array_equal(transform.to_ours(on_disk), x)


def test_on_disk_layer_numbers_follow_the_dense_layers():
    cfg = CONFIGS["dense_first"]
    assert names.disk_name("language_model/dense_layers/mlp/gate_proj/kernel", 0, cfg)[0] == \
        "model.language_model.layers.0.mlp.gate_proj.weight"
    assert names.disk_name("language_model/layers/mlp/gate/kernel", 0, cfg)[0] == \
        "model.language_model.layers.1.mlp.gate.weight"
    assert names.slot_of("language_model.model.layers.1.mlp.experts.3.up_proj.weight", cfg, None) == \
        names.Slot("language_model/layers/mlp/experts/gate_up_proj", 0, 3, names.EXPERT_UP)
    assert names.slot_of("language_model.model.layers.3.mlp.gate.weight", cfg, None) is None  # past the last layer


def test_per_expert_halves_fill_the_fused_slot():
    # gate_up_proj [E, H, 2I]: one expert's gate and up tensors are [I, H] each
    assert names.EXPERT_GATE.disk_shape((8, 64, 2 * 16)) == (16, 64)
    assert names.EXPERT_DOWN.disk_shape((8, 16, 64)) == (64, 16)
    assert names.CONV.disk_shape((14, 14, 3, 32)) == (32, 3, 14, 14)


def test_native_names_and_vision_rows():
    cfg = ModelConfig.tiny()
    assert names.native_to_hf("layers.2.attention.wkv_a_with_mqa.weight") == \
        ("language_model.model.layers.2.self_attn.kv_a_proj_with_mqa.weight", False)
    assert names.native_to_hf("layers.0.experts.5.w3.weight") == \
        ("language_model.model.layers.0.mlp.experts.5.up_proj.weight", False)
    assert names.native_to_hf("vision_encoder.transformer.layers.0.attention.wk.weight")[1] is True
    assert names.native_to_hf("vision_encoder.transformer.layers.0.attention.wv.weight")[1] is False
    assert names.native_to_hf("mystery.weight") is None
    slot = names.slot_of("vision_encoder.transformer.layers.0.attention.wq.weight", cfg, 1, native=True)
    heads = cfg.vision.num_attention_heads
    assert slot.transform == dataclasses.replace(names.LINEAR, interleaved_heads=heads)
    # Interleaved RoPE pairs (row 2p+i of a head) go to rotate-half order (row i*d/2 + p), docs/model.md 2.5 item 3.
    d = 4
    w = np.arange(heads * d)[:, None] * np.ones((1, 3))
    half = names.interleaved_to_half(w, heads)
    assert list(half[:d, 0]) == [0, 2, 1, 3]
    np.testing.assert_array_equal(names.half_to_interleaved(half, heads), w)
    assert names.slot_of("vision_encoder.transformer.layers.1.attention.wq.weight", cfg, 1, native=True) == names.SKIP


def test_scales_and_buffers_are_not_weights():
    for name in ("model.layers.0.self_attn.o_proj.weight_scale_inv", "model.layers.0.mlp.experts.down_proj_scale_inv",
                 "model.layers.0.self_attn.o_proj.activation_scale", "layers.0.attention.wo.qscale_weight",
                 "model.rotary_emb.inv_freq"):
        assert not names.is_weight(name), name
    assert names.is_weight("model.layers.0.self_attn.o_proj.weight")
    assert names.scale_name("a.o_proj.weight") == "a.o_proj.weight_scale_inv" == names.scale_names("a.o_proj.weight")[0]
    assert names.scale_name("a.experts.down_proj") == "a.experts.down_proj_scale_inv" == \
        names.scale_names("a.experts.down_proj")[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stacked_from_the_layers_axis_and_layer_numbers_from_the_stacks(name):
    cfg = CONFIGS[name]
    model = abstract_model(cfg, np.float32)
    # the leading "layers" axis selects what the former path rule selected
    assert stacked_paths(model) == {p for p in param_shapes(model) if "/layers/" in p or "/dense_layers/" in p}
    stacks = text_stacks(cfg.text)
    assert [(s.name, s.first, s.depth) for s in stacks] == [
        (st, first, depth) for st, first, depth in (("dense_layers", 0, cfg.text.first_k_dense_replace),
                                                   ("layers", cfg.text.first_k_dense_replace, cfg.text.num_moe_layers))
        if depth]
    assert [(s.first, s.depth) for s in stacks] == [
        (first, depth) for _, first, depth in model.language_model.stacks()]
    for absolute in range(cfg.text.num_hidden_layers):  # every layer read back at its (stack, index)
        disk = f"language_model.model.layers.{absolute}.input_layernorm.weight"
        slot = names.slot_of(disk, cfg, None)
        assert names.absolute_layer(slot.path, slot.layer, cfg) == absolute
