"""Random-weight checkpoints in the released HF on-disk layout (spec 2.2), written with numpy only.

Used by the demo (a tiny model that needs no download) and by benchmarks (multi-GB files with the
real tensor names, dtypes and FP8 scales). Written shard by shard, so memory stays at one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..config import ModelConfig

E4M3_MAX = 448.0


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{name: (shape, stored_in_fp8)} of every weight of the released layout (no scales)."""
    t, out = cfg.text, {}
    lm = "language_model.model."
    out[lm + "embed_tokens.weight"] = ((t.vocab_size, t.hidden_size), False)
    out[lm + "norm.weight"] = ((t.hidden_size,), False)
    for n in range(t.num_hidden_layers):
        p = f"{lm}layers.{n}."
        out[p + "input_layernorm.weight"] = ((t.hidden_size,), False)
        out[p + "post_attention_layernorm.weight"] = ((t.hidden_size,), False)
        a = p + "self_attn."
        if t.q_lora_rank is None:
            out[a + "q_proj.weight"] = ((t.num_attention_heads * t.qk_head_dim, t.hidden_size), True)
        else:
            out[a + "q_a_proj.weight"] = ((t.q_lora_rank, t.hidden_size), True)
            out[a + "q_a_layernorm.weight"] = ((t.q_lora_rank,), False)
            out[a + "q_b_proj.weight"] = ((t.num_attention_heads * t.qk_head_dim, t.q_lora_rank), True)
        out[a + "kv_a_proj_with_mqa.weight"] = ((t.kv_lora_rank + t.qk_rope_head_dim, t.hidden_size), True)
        out[a + "kv_a_layernorm.weight"] = ((t.kv_lora_rank,), False)
        out[a + "kv_b_proj.weight"] = ((t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank), True)
        out[a + "o_proj.weight"] = ((t.hidden_size, t.num_attention_heads * t.v_head_dim), True)
        if n < t.first_k_dense_replace:
            for name, shape in (("gate_proj", (t.intermediate_size, t.hidden_size)),
                                ("up_proj", (t.intermediate_size, t.hidden_size)),
                                ("down_proj", (t.hidden_size, t.intermediate_size))):
                out[f"{p}mlp.{name}.weight"] = (shape, True)
            continue
        e, i, h = t.n_routed_experts, t.moe_intermediate_size, t.hidden_size
        out[p + "mlp.gate.weight"] = ((e, h), False)
        out[p + "mlp.experts.gate_up_proj"] = ((e, 2 * i, h), True)
        out[p + "mlp.experts.down_proj"] = ((e, h, i), True)
        if t.n_shared_experts:
            s = i * t.n_shared_experts
            out[p + "mlp.shared_experts.gate_proj.weight"] = ((s, h), True)
            out[p + "mlp.shared_experts.up_proj.weight"] = ((s, h), True)
            out[p + "mlp.shared_experts.down_proj.weight"] = ((h, s), True)
    out["language_model.lm_head.weight"] = ((t.vocab_size, t.hidden_size), False)
    v = cfg.vision
    if v is not None:
        out["vision_tower.patch_conv.weight"] = ((v.hidden_size, v.num_channels, v.patch_size, v.patch_size), False)
        out["vision_tower.ln_pre.weight"] = ((v.hidden_size,), False)
        for n in range(v.num_hidden_layers):
            p = f"vision_tower.transformer.layers.{n}."
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{p}attention.{m}.weight"] = ((v.hidden_size, v.hidden_size), False)
            out[p + "attention_norm.weight"] = ((v.hidden_size,), False)
            out[p + "ffn_norm.weight"] = ((v.hidden_size,), False)
            out[p + "feed_forward.gate_proj.weight"] = ((v.intermediate_size, v.hidden_size), False)
            out[p + "feed_forward.up_proj.weight"] = ((v.intermediate_size, v.hidden_size), False)
            out[p + "feed_forward.down_proj.weight"] = ((v.hidden_size, v.intermediate_size), False)
        m, d, th = cfg.spatial_merge_size, v.hidden_size, t.hidden_size
        out["multi_modal_projector.norm.weight"] = ((d,), False)
        out["multi_modal_projector.patch_merger.merging_layer.weight"] = ((d, d * m * m), False)
        out["multi_modal_projector.linear_1.weight"] = ((th, d), False)
        out["multi_modal_projector.linear_2.weight"] = ((th, th), False)
    return out


def _random(rng: np.random.Generator, name: str, shape, std: float) -> np.ndarray:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("ln_pre.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def quantize_e4m3(w: np.ndarray, per_leading_axis: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weights and the float32 `scale_inv` (a multiplier) that dequantises them: w ~ q * s."""
    axes = tuple(range(1, w.ndim)) if per_leading_axis else None
    amax = np.max(np.abs(w), axis=axes, keepdims=per_leading_axis)
    s = np.asarray(np.maximum(amax, 1e-12) / E4M3_MAX, dtype=np.float32)
    q = np.clip(w / s, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def write_checkpoint(path, cfg: ModelConfig, *, fp8: bool = True, seed: int = 0, std: float = 0.05,
                     max_shard_bytes: int = 2 << 30, progress=None) -> Path:
    """Write `cfg` with random weights as an HF checkpoint (config.json, shards, index).

    fp8: store the projections the released checkpoint stores in FP8 as E4M3 with per-tensor (per
    expert for fused experts) `weight_scale_inv` and `activation_scale`, as the released files do.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(cfg)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    files: list[tuple[str, dict[str, np.ndarray]]] = []
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal size
        if shards[-1]:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(path / fname), metadata={"format": "pt"})
            files.append((fname, {}))
            weight_map.update({k: fname for k in shards[-1]})
            shards[-1] = {}
            size = 0

    for name, (shape, is_fp8) in shapes.items():
        w = _random(rng, name, shape, std)
        if fp8 and is_fp8:
            fused = name.endswith("_proj") and ".experts." in name
            q, s = quantize_e4m3(w, per_leading_axis=fused)
            shards[-1][name] = q
            if fused:
                shards[-1][name + "_scale_inv"] = s.reshape(-1, 1, 1)
                shards[-1][name + "_activation_scale"] = np.ones(shape[0], np.float32)
            else:
                stem = name[: -len(".weight")]
                shards[-1][stem + ".weight_scale_inv"] = s.reshape(())
                shards[-1][stem + ".activation_scale"] = np.ones((), np.float32)
            size += q.nbytes
        else:
            shards[-1][name] = w.astype(ml_dtypes.bfloat16)
            size += w.nbytes // 2
        if progress is not None:
            progress(w.nbytes)
        if size >= max_shard_bytes:
            flush()
    flush()
    n = len(files)
    renamed = {}
    for i, (fname, _) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / fname).rename(path / new)
        renamed[fname] = new
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = cfg.to_hf_dict()
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
