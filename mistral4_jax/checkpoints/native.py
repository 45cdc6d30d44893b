"""Mistral's native checkpoint layout: `params.json` + `consolidated*.safetensors` (spec 1.4, 2.3, 2.5).

Two decisions live here: how `params.json` maps to a `ModelConfig` (as transformers'
`convert_mistral4_weight_to_hf.py` does it), and the native -> HF rename table. Loading itself is the HF
machinery of `loading.py`: every native name is renamed to its HF name for matching, while reads and error
messages keep the native name. Native per-expert `w1`/`w3` are separate tensors with their own
`qscale_weight`, so each half is dequantised with its own scale before the halves are fused (spec 2.5 item
2; the HF converter's common-scale re-quantisation is lossy). Vision q/k rows are stored for interleaved
RoPE and are permuted to the rotate-half order our Pixtral tower uses (spec 2.5 item 3).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from .safetensors_io import SafetensorsFile, check_shard_numbers, indexed_shards

_LM, _HEAD = "language_model.model.", "language_model.lm_head."
_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a_with_mqa": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_VISION_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def _alt(d: dict[str, str]) -> str:
    return "|".join(sorted(map(re.escape, d), key=len, reverse=True))


# (native name regex, HF name template; `{m}` is looked up in the rule's table). Spec 2.3.
RENAMES: list[tuple[str, str, dict[str, str] | None]] = [
    (r"tok_embeddings\.weight", _LM + "embed_tokens.weight", None),
    (r"norm\.weight", _LM + "norm.weight", None),
    (r"output\.weight", _HEAD + "weight", None),
    (r"layers\.(?P<l>\d+)\.attention_norm\.weight", _LM + "layers.{l}.input_layernorm.weight", None),
    (r"layers\.(?P<l>\d+)\.ffn_norm\.weight", _LM + "layers.{l}.post_attention_layernorm.weight", None),
    (rf"layers\.(?P<l>\d+)\.attention\.(?P<m>{_alt(_ATTN)})\.weight", _LM + "layers.{l}.self_attn.{m}.weight", _ATTN),
    (r"layers\.(?P<l>\d+)\.gate\.weight", _LM + "layers.{l}.mlp.gate.weight", None),
    (r"layers\.(?P<l>\d+)\.shared_experts\.(?P<m>w[123])\.weight", _LM + "layers.{l}.mlp.shared_experts.{m}.weight", _FFN),
    (r"layers\.(?P<l>\d+)\.experts\.(?P<e>\d+)\.(?P<m>w[123])\.weight", _LM + "layers.{l}.mlp.experts.{e}.{m}.weight", _FFN),
    # Dense layers (first_k_dense_replace > 0; none in the released model): Mistral's dense FFN naming.
    (r"layers\.(?P<l>\d+)\.feed_forward\.(?P<m>w[123])\.weight", _LM + "layers.{l}.mlp.{m}.weight", _FFN),
    (r"vision_encoder\.(?P<m>patch_conv|ln_pre)\.weight", "vision_tower.{m}.weight", None),
    (rf"vision_encoder\.transformer\.layers\.(?P<l>\d+)\.attention\.(?P<m>{_alt(_VISION_ATTN)})\.weight",
     "vision_tower.transformer.layers.{l}.attention.{m}.weight", _VISION_ATTN),
    (r"vision_encoder\.transformer\.layers\.(?P<l>\d+)\.(?P<m>attention_norm|ffn_norm)\.weight",
     "vision_tower.transformer.layers.{l}.{m}.weight", None),
    (r"vision_encoder\.transformer\.layers\.(?P<l>\d+)\.feed_forward\.(?P<m>w[123])\.weight",
     "vision_tower.transformer.layers.{l}.feed_forward.{m}.weight", _FFN),
    (r"pre_mm_projector_norm\.weight", "multi_modal_projector.norm.weight", None),
    (r"patch_merger\.merging_layer\.weight", "multi_modal_projector.patch_merger.merging_layer.weight", None),
    (r"vision_language_adapter\.w_in\.(?P<m>weight|bias)", "multi_modal_projector.linear_1.{m}", None),
    (r"vision_language_adapter\.w_out\.(?P<m>weight|bias)", "multi_modal_projector.linear_2.{m}", None),
]
_COMPILED = [(re.compile(rx + "$"), tmpl, table) for rx, tmpl, table in RENAMES]
_VISION_QK = re.compile(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight$")


def hf_name(name: str) -> str | None:
    """The HF (released-layout) name of a native tensor name, or None if no rule matches."""
    for rx, tmpl, table in _COMPILED:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            if table is not None:
                g["m"] = table[g["m"]]
            return tmpl.format(**g)
    return None


# ---------------------------------------------------------------------- vision q/k rows
def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k weight [H*d, in] from interleaved RoPE pairs to rotate-half order (spec 2.5 item 3).

    Within each head, row 2p+i moves to i*d/2 + p: view [H, d/2, 2, in], swap the middle axes."""
    out_dim, in_dim = w.shape
    return np.asarray(w).reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `interleaved_to_half` (HF order -> native order)."""
    out_dim, in_dim = w.shape
    return np.asarray(w).reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


class _PermutedQK:
    """A `SafetensorsFile` whose vision q/k weights read back in rotate-half row order."""

    def __init__(self, file: SafetensorsFile, n_heads: int):
        self._file, self._n_heads = file, n_heads
        self.path = file.path

    def __getattr__(self, attr):
        return getattr(self._file, attr)

    def get(self, name: str) -> np.ndarray:
        x = self._file.get(name)
        return interleaved_to_half(x, self._n_heads) if _VISION_QK.match(name) else x

    def read(self, name: str) -> np.ndarray:
        x = self._file.read(name)
        return interleaved_to_half(x, self._n_heads) if _VISION_QK.match(name) else x


# ---------------------------------------------------------------------- params.json
def is_native_dir(path: str | os.PathLike) -> bool:
    """params.json + consolidated*.safetensors, and no HF copy beside them. The released repository
    ships both copies (byte-identical tensors, spec 2.1); a full snapshot is read through its HF side,
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
    """params.json -> (an HF `config.json` dict, port-switch overrides), following spec 1.4 and the
    transformers converter's `convert_config`."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    moe = _need(params, "moe", source)
    yarn = _need(params, "yarn", source)
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
            "rope_type": "yarn", "rope_theta": params.get("rope_theta", 10000.0),
            "factor": float(_need(yarn, "factor", source, "yarn.")),
            "original_max_position_embeddings": _need(yarn, "original_max_position_embeddings", source, "yarn."),
            "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)),
            "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": (params.get("llama_4_scaling") or {}).get("beta", 0.1),
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
    if quant.get("qformat_weight") == "fp8_e4m3":
        if quant.get("qscheme_act", "TENSOR") != "TENSOR":
            raise ConfigError(f"{source}: quantization.qscheme_act {quant.get('qscheme_act')!r} is not supported "
                              "(expected 'TENSOR')")
        qcfg = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    elif quant:
        raise ConfigError(f"{source}: quantization {quant} is not supported (expected qformat_weight 'fp8_e4m3')")
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


def open_native(path: str | os.PathLike):
    """(config, {native name: file}, rename) of a native directory, for `loading.plan_checkpoint`."""
    from .load import index_files

    cfg = load_params_config(path)
    index = index_files(native_files(path))
    if cfg.vision is not None:
        wrapped: dict[int, _PermutedQK] = {}
        for name, f in index.items():
            if _VISION_QK.match(name):
                index[name] = wrapped.setdefault(id(f), _PermutedQK(f, cfg.vision.num_attention_heads))
    return cfg, index, hf_name
