"""Mistral's native checkpoint layout: `params.json` + `consolidated*.safetensors` (docs/model.md 1.4, 2.3, 2.5).

One decision lives here: how `params.json` maps to a `ModelConfig` (as transformers'
`convert_mistral4_weight_to_hf.py` does it); and which directories are native. The tensor names are
`names.NATIVE_ROWS` (renamed to HF names for matching; reads and error messages keep the native name),
and loading is the HF machinery of `load.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError
from .safetensors_io import check_shard_numbers, indexed_shards


# ---------------------------------------------------------------------- params.json
def is_native_dir(path: str | os.PathLike) -> bool:
    """params.json + consolidated*.safetensors, and no HF copy beside them. The released repository
    ships both copies (byte-identical tensors, docs/model.md 2.1); a full snapshot is read through its HF side,
    whose config.json is the one the reference reads."""
    d = Path(path)
    if not (d.is_dir() and (d / "params.json").exists() and any(d.glob("consolidated*.safetensors"))):
        return False
    hf_weights = (d / "model.safetensors.index.json").exists() or any(
        not f.name.startswith("consolidated") for f in d.glob("*.safetensors"))
    return not ((d / "config.json").exists() and hf_weights)


def _need(d: dict, key: str, source: str, where: str = ""):
    if key not in d:
        raise ConfigError(f"{source}: missing {where}{key!r}")
    return d[key]


def hf_config_dict(params: dict, source: str = "params.json") -> tuple[dict, dict]:
    """params.json -> (an HF `config.json` dict, port-switch overrides), following docs/model.md 1.4 and the
    transformers converter's `convert_config`."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    moe = _need(params, "moe", source)
    yarn = _need(params, "yarn", source)
    # Read, never defaulted: the sources disagree on rope_theta (10000 or 1e7, docs/model.md 2.6), and a wrong
    # theta or query scale changes every position's attention.
    rope_theta = _need(params, "rope_theta", source)
    llama4 = _need(params, "llama_4_scaling", source)
    if not isinstance(llama4, dict) or "beta" not in llama4:
        raise ConfigError(f"{source}: missing 'llama_4_scaling.beta'")
    l0 = llama4.get("original_max_position_embeddings")
    if l0 is not None and l0 != _need(yarn, "original_max_position_embeddings", source, "yarn."):
        raise ConfigError(f"{source}: llama_4_scaling.original_max_position_embeddings ({l0}) differs from "
                          f"yarn.original_max_position_embeddings ({yarn['original_max_position_embeddings']}); the "
                          "query scale uses the latter (docs/model.md 3.3.4)")
    rope_dim, nope_dim = params.get("qk_rope_head_dim", 64), params.get("qk_nope_head_dim", 64)
    text = {
        "model_type": "mistral4",
        "hidden_size": _need(params, "dim", source), "num_hidden_layers": _need(params, "n_layers", source),
        "intermediate_size": params.get("hidden_dim", 12288), "num_attention_heads": _need(params, "n_heads", source),
        "num_key_value_heads": params.get("n_kv_heads", params["n_heads"]),
        "rms_norm_eps": _need(params, "norm_eps", source), "vocab_size": _need(params, "vocab_size", source),
        "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
        "max_position_embeddings": params.get("max_position_embeddings", params.get("max_seq_len", 1048576)),
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
        "n_routed_experts": moe.get("num_experts", 128), "num_experts_per_tok": moe.get("num_experts_per_tok", 4),
        "first_k_dense_replace": moe.get("first_k_dense_replace", 0),
        "n_shared_experts": moe.get("num_shared_experts", 1), "moe_intermediate_size": moe.get("expert_hidden_dim", 2048),
        "routed_scaling_factor": moe.get("routed_scale", 1.0), "n_group": moe.get("num_expert_groups", 1),
        "topk_group": moe.get("num_expert_groups_per_tok", 1), "norm_topk_prob": True,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": float(rope_theta),
            "factor": float(_need(yarn, "factor", source, "yarn.")),
            "original_max_position_embeddings": _need(yarn, "original_max_position_embeddings", source, "yarn."),
            "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)),
            "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": float(llama4["beta"]),
            "partial_rotary_factor": rope_dim / (rope_dim + nope_dim),
        },
    }
    for key in ("q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "kv_lora_rank", "v_head_dim"):
        if key in params:
            text[key] = params[key]
    if text.get("q_lora_rank") == 0:  # Mistral / DeepSeek reference code: rank 0 means a plain `wq`, no LoRA
        text["q_lora_rank"] = None
    overrides = {"apply_yarn_mscale": True} if yarn.get("apply_scale", False) else {}
    quant = params.get("quantization") or {}
    qcfg = None
    if str(quant.get("quant_method", "")).lower().replace("_", "-") == "compressed-tensors":
        # llm-compressor's config, passed through as vLLM does (docs/model.md 2.6); config.py checks it is NVFP4
        qcfg = dict(quant, quant_method="compressed-tensors")
    elif quant.get("qformat_weight") == "fp8_e4m3":
        if quant.get("qscheme_act", "TENSOR") != "TENSOR":
            raise ConfigError(f"{source}: quantization.qscheme_act {quant.get('qscheme_act')!r} is not supported "
                              "(expected 'TENSOR')")
        qcfg = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    elif quant:
        raise ConfigError(f"{source}: quantization {quant} is not supported (expected qformat_weight 'fp8_e4m3', or "
                          "quant_method 'compressed-tensors' with NVFP4 weights)")
    ve = params.get("vision_encoder")
    if ve is None:
        out = dict(text, architectures=["Mistral4ForCausalLM"])
    else:
        vision = {k: v for k, v in ve.items() if k not in (
            "mm_projector_id", "add_pre_mm_projector_layer_norm", "image_break_token_id", "image_end_token_id",
            "max_image_size", "adapter_bias", "spatial_merge_size", "image_token_id")}
        vision.setdefault("image_size", ve.get("max_image_size", 1540))
        vision.update(model_type="pixtral", hidden_act="silu")
        out = {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"], "text_config": text,
               "vision_config": vision, "multimodal_projector_bias": bool(ve.get("adapter_bias", False)),
               "image_token_index": ve.get("image_token_id", 10),
               "spatial_merge_size": _need(ve, "spatial_merge_size", source, "vision_encoder."),
               "vision_feature_layer": -1, "tie_word_embeddings": text["tie_word_embeddings"]}
    if qcfg is not None:
        out["quantization_config"] = qcfg
    return out, overrides


def load_params_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a native directory's params.json (port switches included)."""
    src = Path(path) / "params.json"
    try:
        params = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{src}: not readable JSON ({e})") from None
    hf, overrides = hf_config_dict(params, str(src))
    cfg = ModelConfig.from_hf_dict(hf, source=str(src))
    return cfg.replace_text(**overrides) if overrides else cfg


def native_files(path: str | os.PathLike) -> list[Path]:
    d = Path(path)
    index = d / "consolidated.safetensors.index.json"
    if index.exists():
        return indexed_shards(index)
    return check_shard_numbers(sorted(d.glob("consolidated*.safetensors")))
