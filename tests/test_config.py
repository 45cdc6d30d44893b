"""Configuration parsing, validation and the pure RoPE / scale math, against the numbers of docs/model.md."""

import json
import math

import numpy as np
import pytest

from mistral4_jax import ConfigError, ModelConfig
from mistral4_jax.model import ops
from mistral4_jax.config import RopeConfig

# docs/model.md 3.3.2: omega_i for the released rope settings.
SPEC_OMEGA = [1.0, 0.74989, 0.56234, 0.42170, 0.31623, 0.23714, 0.17783, 0.13335, 0.1, 0.074989, 0.056234,
              0.042170, 0.031623, 0.021904, 0.015068, 0.010282, 6.9471e-3, 4.6373e-3, 3.0483e-3, 1.9640e-3,
              1.2315e-3, 7.4248e-4, 4.2106e-4, 2.1397e-4, 8.4135e-5, 5.8585e-6, 4.3933e-6, 3.2945e-6,
              2.4705e-6, 1.8526e-6, 1.3893e-6, 1.0418e-6]


def test_yarn_inverse_frequencies_match_spec():
    r = RopeConfig()
    got = ops.yarn_inv_freq(64, r.rope_theta, r.factor, r.original_max_position_embeddings, r.beta_fast,
                            r.beta_slow)
    np.testing.assert_allclose(got, SPEC_OMEGA, rtol=1e-4)


def test_yarn_matches_transformers():
    import torch  # noqa: F401
    from transformers import Mistral4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, orig in ((128.0, 8192), (8.0, 32), (4.0, 64)):
        hf = Mistral4Config(qk_rope_head_dim=16, qk_nope_head_dim=16, max_position_embeddings=int(orig * factor),
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
                                             "original_max_position_embeddings": orig, "beta_fast": 32.0,
                                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                             "llama_4_scaling_beta": 0.1, "partial_rotary_factor": 0.5})
        ref, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        got = ops.yarn_inv_freq(16, 10000.0, factor, orig, 32.0, 1.0)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
        assert attn_factor == 1.0


# docs/model.md 3.3.4 values; for 262143 the once-quoted 1.34965 drops the floor: floor(262143/8192) = 31 gives 1 + 0.1 ln 32.
@pytest.mark.parametrize("pos,value", [(0, 1.0), (8191, 1.0), (8192, 1.06931), (16384, 1.10986),
                                       (65536, 1.21972), (131072, 1.28332), (262143, 1 + 0.1 * math.log(32))])
def test_llama4_query_scale_matches_spec(pos, value):
    got = float(ops.llama4_query_scale(np.array([[pos]]), 0.1, 8192)[0, 0])
    assert got == pytest.approx(value, abs=1e-5)


def test_softmax_scale_release_and_switch():
    t = ModelConfig.mistral_small_4().text
    assert t.softmax_scale == pytest.approx(0.088388347648, abs=1e-12)  # docs/model.md 3.3.5, release semantics
    assert t.rope_attention_factor == 1.0
    import dataclasses
    switched = dataclasses.replace(t, apply_yarn_mscale=True)
    assert switched.softmax_scale == pytest.approx(0.194969494733, abs=1e-9)  # SGLang PR #26203 numbers


def test_real_model_parameter_count():
    """docs/model.md 1.5: the weights (no FP8 scales) of the released model sum to 119,401,298,944."""
    import jax.numpy as jnp
    from mistral4_jax.checkpoints.read import abstract_model, param_shapes

    shapes = param_shapes(abstract_model(ModelConfig.mistral_small_4(), jnp.bfloat16))
    assert sum(math.prod(s) for s in shapes.values()) == 119_401_298_944
    assert shapes["language_model/layers/mlp/experts/gate_up_proj"] == (36, 128, 4096, 4096)


def test_parse_defaults_follow_transformers(tmp_path):
    d = {"model_type": "mistral3", "text_config": {"model_type": "mistral4", "eos_token_id": 2},
         "vision_config": {"model_type": "pixtral"}}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.tie_word_embeddings is True  # Mistral3Config default when the key is absent
    assert cfg.vision.hidden_act == "gelu" and cfg.vision.patch_size == 16  # PixtralVisionConfig defaults
    assert cfg.text.eos_token_id == (2,)
    d["tie_word_embeddings"] = False
    assert ModelConfig.from_hf_dict(d).tie_word_embeddings is False


def test_released_config_round_trips_through_transformers():
    from transformers import Mistral3Config

    cfg = ModelConfig.mistral_small_4()
    d = cfg.to_hf_dict()
    hf = Mistral3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.text_config.kv_lora_rank == 256 and hf.vision_config.patch_size == 14
    assert hf.tie_word_embeddings is False
    back = ModelConfig.from_hf_dict(json.loads(hf.to_json_string()))
    assert back.text == cfg.text and back.vision == cfg.vision and back.tie_word_embeddings is False


@pytest.mark.parametrize("change,needle", [
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (dict(n_group=3), "n_group (3) must divide"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(hidden_act="swish2"), "hidden_act"),
    (dict(rope=RopeConfig(rope_type="dynamic")), "rope_type 'dynamic'"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok (9) exceeds"),
])
def test_inconsistent_text_config_is_refused(change, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        ModelConfig.tiny(**change)


def test_vision_heads_must_divide():
    d = ModelConfig.tiny().to_hf_dict()
    d["vision_config"]["num_attention_heads"] = 5
    with pytest.raises(ConfigError, match="must divide hidden_size"):
        ModelConfig.from_hf_dict(d)


def test_unknown_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_hf_dict({"model_type": "llama"})


# ---------------------------------------------------------------------- value types
def _tiny_dict():
    return ModelConfig.tiny().to_hf_dict()


def test_wrong_value_types_are_listed_in_one_error(tmp_path):
    d = _tiny_dict()
    d["text_config"].update(num_hidden_layers="2", rms_norm_eps=None, hidden_size=64.5, eos_token_id="2")
    d["text_config"]["rope_parameters"]["factor"] = "4"
    d["vision_config"]["num_hidden_layers"] = [2]
    d["image_token_index"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: wrong value types: ") and "\n" not in msg
    for part in ('text_config.num_hidden_layers must be int, got "2" (str)',
                 "text_config.rms_norm_eps must be float, got null",
                 "text_config.hidden_size must be int (a float is accepted only when integral, e.g. 2.0), got 64.5",
                 'text_config.eos_token_id must be an int or a list of ints or null, got "2"',
                 'text_config.rope_parameters.factor must be float, got "4"',
                 "vision_config.num_hidden_layers must be int, got [2]",
                 "config.image_token_index must be int, got true (bool)"):
        assert part in msg
    assert msg.count(" must be ") == 7


def test_integral_floats_and_ints_for_floats_are_accepted():
    d = _tiny_dict()
    d["text_config"].update(num_hidden_layers=2.0, rms_norm_eps=1, n_group=None)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.text.num_hidden_layers == 2 and type(cfg.text.num_hidden_layers) is int
    assert cfg.text.rms_norm_eps == 1.0 and type(cfg.text.rms_norm_eps) is float
    assert cfg.text.n_group == 1  # null: the transformers default


def test_unknown_keys_change_nothing():
    d = _tiny_dict()
    d["text_config"]["not_a_field"] = "anything"
    d["future_option"] = {"x": 1}
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict(_tiny_dict())
