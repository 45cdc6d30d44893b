"""Configs, checkpoint layouts and inputs beyond the released shape, through the public API only.

Each model here combines several config fields a user may vary (head dims, RoPE layout and YaRN keys,
routing, shared experts, activations, vocab and hidden sizes, the vision tower and projector), is
built and saved by the transformers reference (tests/reference.py), loaded with `from_pretrained`
and compared on full logits, greedy `generate` (the absorbed-attention decode path) and `score`.
"""

import json

import numpy as np
import pytest
import torch

import reference as R
from mistral4_jax import ConfigError, ModelConfig, from_pretrained, generate, score
from mistral4_jax.config import ACTIVATIONS

TOL = 1e-4  # relative error of float32 logits

# A YaRN dict as a hand-written config.json may carry it: no mscale / mscale_all_dim (transformers then
# scales cos/sin by 0.1 ln(factor) + 1), no original_max_position_embeddings and no beta_fast/beta_slow.
BARE_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, llama_4_scaling_beta=0.1)

CASES = {
    # text-only; n_shared_experts 0 saves zero-width shared-expert tensors. (Hidden sizes stay multiples of 4:
    # the reference's grouped expert matmul needs 16-byte strides.)
    "text": dict(
        with_vision=False,
        text=dict(vocab_size=251, hidden_size=52, intermediate_size=70, moe_intermediate_size=20, q_lora_rank=18,
                  kv_lora_rank=14, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=10, rope_interleave=False,
                  norm_topk_prob=False, routed_scaling_factor=1.7, n_shared_experts=0, hidden_act="gelu_new",
                  rms_norm_eps=1e-3, max_position_embeddings=64, eos_token_id=[2, 3]),
        rope=dict(mscale=None, mscale_all_dim=None, original_max_position_embeddings=16),
        save=dict(experts="per_expert", shards=2)),
    # bare YaRN keys, one dense layer, group-limited routing, two shared experts, FP8, transformers names
    "bare_yarn": dict(
        with_vision=False,
        text=dict(first_k_dense_replace=1, num_hidden_layers=3, n_group=4, topk_group=2, n_routed_experts=8,
                  num_experts_per_tok=3, n_shared_experts=2, q_lora_rank=None, qk_nope_head_dim=6,
                  qk_rope_head_dim=10, hidden_act="swish", tie_word_embeddings=True),
        bare_rope=BARE_YARN, save=dict(fp8=True, prefix="transformers")),
    # the vision tower and projector off their defaults
    "vision": dict(
        vision=dict(patch_size=8, image_size=96, num_channels=1, hidden_act="quick_gelu", hidden_size=24,
                    num_attention_heads=2),
        top=dict(spatial_merge_size=3, multimodal_projector_bias=True, projector_hidden_act="gelu_pytorch_tanh",
                 image_token_index=200, vision_feature_layer=[-2], tie_word_embeddings=True),
        text=dict(num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=1, n_routed_experts=4)),
}


def _config(case):
    c = CASES[case]
    cfg = R.hf_config(text=c.get("text"), vision=c.get("vision"), rope=c.get("rope"),
                      with_vision=c.get("with_vision", True), **c.get("top", {}))
    text = cfg if not c.get("with_vision", True) else cfg.text_config
    if "bare_rope" in c:
        text.rope_parameters = dict(c["bare_rope"], partial_rotary_factor=text.qk_rope_head_dim / text.qk_head_dim)
    else:  # None values as absent keys
        text.rope_parameters = {k: v for k, v in text.rope_parameters.items() if v is not None}
    return cfg


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    ref = R.build(_config(request.param), seed=3)
    path = R.save(ref, tmp_path_factory.mktemp(request.param), **CASES[request.param].get("save", {}))
    return request.param, ref, from_pretrained(path, dtype="float32")


def _images(cfg):
    """Two images, one with partial merge windows (dropped), padded as the processor pads; their prompt."""
    v = cfg.vision
    unit = v.patch_size * cfg.spatial_merge_size
    sizes = [(2 * unit, 3 * unit), (unit + v.patch_size, 2 * unit + 3)]
    g = np.random.default_rng(5)
    px = np.zeros((2, v.num_channels, 2 * unit + v.patch_size, 3 * unit), np.float32)
    for i, (h, w) in enumerate(sizes):
        px[i, :, :h, :w] = g.standard_normal((v.num_channels, h, w))
    swap = {R.IMG: cfg.image_token_id}
    prompt = [swap.get(i, i) for i in R.image_prompt(sizes, patch=v.patch_size, merge=cfg.spatial_merge_size)]
    return px, np.asarray(sizes), prompt


def test_logits_generate_and_score_match_reference(pair):
    case, ref, jm = pair
    cfg, t = jm.config, jm.config.text
    g = np.random.default_rng(4)
    # a length-1 prompt, an odd batch size, and a row that ends exactly at max_position_embeddings
    longest = t.max_position_embeddings - 6 if t.max_position_embeddings < 100 else 20
    prompts = [g.integers(0, t.vocab_size, n).tolist() for n in (1, 9, longest)]
    px = isz = None
    if cfg.vision is None:
        ids = g.integers(0, t.vocab_size, (3, 40))
        assert R.rel_err(np.asarray(jm(ids)), R.logits(ref, ids)) < TOL
    else:
        px, isz, prompts[1] = _images(cfg)
        ids = np.asarray([prompts[1]])
        assert R.rel_err(np.asarray(jm(ids, px, isz)), R.logits(ref, ids, px, isz)) < TOL
    out = generate(jm, prompts, max_new_tokens=6, stop_tokens=[], prefill_chunk=16, pixel_values=px, image_sizes=isz)
    for i, (p, o) in enumerate(zip(prompts, out)):
        assert len(o) == 6
        R.assert_teacher_forced(ref, p, o, *((px, isz) if i == 1 and px is not None else ()))
    requests = [(prompts[2][:4], [5, 7, 9]), ([3], [4])]
    for (c, x), (lp, _) in zip(requests, score(jm, requests)):
        lg = torch.log_softmax(torch.as_tensor(R.logits(ref, np.asarray([c + x]))[0], dtype=torch.float64), -1)
        want = sum(float(lg[len(c) - 1 + k, tok]) for k, tok in enumerate(x))
        assert abs(lp - want) < TOL * max(1.0, abs(want))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_match_transformers(name):
    import jax.numpy as jnp
    from transformers.activations import ACT2FN

    from mistral4_jax.model import ops

    x = np.linspace(-12, 12, 481, dtype=np.float32)
    want = ACT2FN[name](torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(ops.activation(name)(jnp.asarray(x))), want, atol=1e-5)


def _hf_dict(**top):
    cfg = R.hf_config(**top)
    return json.loads(cfg.to_json_string())


def test_bare_yarn_keys_take_transformers_meaning():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = _hf_dict(text=dict(max_position_embeddings=128))
    d["text_config"]["rope_parameters"] = dict(BARE_YARN, partial_rotary_factor=0.5, beta_fast=0)
    t = ModelConfig.from_hf_dict(d).text
    assert t.rope.original_max_position_embeddings == 128 and t.rope.beta_fast == 32.0
    hf = R.hf_config(text=dict(max_position_embeddings=128)).text_config
    hf.rope_parameters = dict(BARE_YARN, partial_rotary_factor=0.5, original_max_position_embeddings=128)
    _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert t.rope_attention_factor == pytest.approx(attention_factor, rel=1e-12)  # 0.1 ln 8 + 1, not 1


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["text_config"]["rope_parameters"].pop("llama_4_scaling_beta"), "llama_4_scaling_beta is missing"),
    (lambda d: d.update(vision_feature_layer=[-1, -2]), "vision_feature_layer [-1, -2] is not supported"),
    (lambda d: d["text_config"]["rope_parameters"].update(rope_type="default"), "rope_type 'default'"),
    (lambda d: d["text_config"].update(num_key_value_heads=2), "num_key_value_heads"),
])
def test_configs_the_reference_cannot_run_are_refused(edit, needle):
    """transformers builds these configs but its forward fails on them; we refuse them when loading."""
    d = _hf_dict()
    edit(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict(d)
    assert needle in str(e.value)
