"""Tiny random models built with the transformers reference, saved in the released on-disk layouts.

Every number a test compares against comes from these reference models (float32, eager attention),
never from mistral4_jax itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

IMG, IMG_BREAK, IMG_END = 10, 12, 13

TEXT_DEFAULTS = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    max_position_embeddings=256, initializer_range=0.1,
)
VISION_DEFAULTS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=14, image_size=112, hidden_act="silu", initializer_range=0.1)
ROPE_DEFAULTS = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                     beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)

# Projections stored in FP8 in the released checkpoint (docs/model.md 2.4).
FP8_LINEAR = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa",
              "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.shared_experts.")


def hf_config(text=None, vision=None, rope=None, with_vision=True, **top) -> Mistral3Config:
    t = dict(TEXT_DEFAULTS, **(text or {}))
    rp = dict(ROPE_DEFAULTS, **(rope or {}))
    rp["partial_rotary_factor"] = t["qk_rope_head_dim"] / (t["qk_rope_head_dim"] + t["qk_nope_head_dim"])
    t["rope_parameters"] = rp
    text_cfg = Mistral4Config(**t)
    if not with_vision:
        return text_cfg
    vision_cfg = PixtralVisionConfig(**dict(VISION_DEFAULTS, **(vision or {})))
    return Mistral3Config(text_config=text_cfg, vision_config=vision_cfg, **dict(dict(tie_word_embeddings=False), **top))


def build(cfg, seed: int = 0, release_scale: bool = True) -> torch.nn.Module:
    """A float32 reference model with random weights (norm weights around 1, not exactly 1)."""
    from transformers import Mistral4ForCausalLM

    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    if getattr(cfg, "text_config", None) is not None:
        cfg.text_config._attn_implementation = "eager"
        cfg.vision_config._attn_implementation = "eager"
        model = Mistral3ForConditionalGeneration(cfg)
    else:
        model = Mistral4ForCausalLM(cfg)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_pre.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    if release_scale:
        set_release_scale(model)
    return model


def set_release_scale(model) -> None:
    """Patch the reference to the release softmax scale 1/sqrt(qk_head_dim) (docs/model.md 3.3.5)."""
    for m in model.modules():
        if type(m).__name__ == "Mistral4Attention":
            m.scaling = m.qk_head_dim**-0.5


def _quantize(w: torch.Tensor, per_expert: bool):
    """E4M3 weights with a per-tensor (or per-expert) scale_inv, as the released files store them."""
    w = w.float()
    if per_expert:
        s = w.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-12) / 448.0
    else:
        s = w.abs().max().clamp(min=1e-12) / 448.0
    q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s.float()


def _released_name(name: str) -> str:
    for a, b in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(a):
            return b + name[len(a):]
    return name


def save(model, path, *, prefix="released", experts="fused", fp8=False, shards=1, extra_config=None):
    """Write `model` as an HF checkpoint directory.

    prefix: "released" (`language_model.model.*`, as the published files) or "transformers"
    (`model.language_model.*`, as transformers 5 names them). experts: "fused" (`gate_up_proj` [E, 2I, H])
    or "per_expert" (`experts.M.gate_proj.weight`). fp8: store the released FP8 projections as E4M3
    with scales, and load the dequantised weights back into `model` so that it is the reference for
    exactly what was written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text_only = not hasattr(model.config, "text_config")
    tensors: dict[str, torch.Tensor] = {}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, w in sd.items():
        out = name if (prefix == "transformers" or text_only) else _released_name(name)
        is_experts = name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")
        quant = fp8 and (is_experts or (name.endswith(".weight") and any(f".{k}" in name for k in FP8_LINEAR)))
        if is_experts and experts == "per_expert":
            base, which = out.rsplit(".", 1)
            half = w.shape[1] // 2
            parts = [("gate_proj", slice(0, half)), ("up_proj", slice(half, None))] if which == "gate_up_proj" \
                else [("down_proj", slice(None))]
            deq = w.clone()
            for e in range(w.shape[0]):
                for pn, rows in parts:
                    key = f"{base}.{e}.{pn}.weight"
                    if quant:  # each expert projection with its own scale, as the native files store them
                        q, s = _quantize(w[e, rows], per_expert=False)
                        tensors[key] = q
                        tensors[key.replace(".weight", ".weight_scale_inv")] = s.reshape(())
                        tensors[key.replace(".weight", ".activation_scale")] = torch.tensor(1.0)
                        deq[e, rows] = q.float() * s
                    else:
                        tensors[key] = w[e, rows].contiguous()
            if quant:
                with torch.no_grad():
                    model.get_parameter(name).copy_(deq)
            continue
        if quant:
            q, s = _quantize(w, per_expert=is_experts)
            with torch.no_grad():
                model.get_parameter(name).copy_(q.float() * s)
        if quant:
            tensors[out] = q.contiguous()
            if is_experts:
                tensors[out + "_scale_inv"] = s.reshape(-1, 1, 1)
                tensors[out + "_activation_scale"] = torch.ones(w.shape[0])
            else:
                stem = out[: -len(".weight")]
                tensors[stem + ".weight_scale_inv"] = s.reshape(())
                tensors[stem + ".activation_scale"] = torch.tensor(1.0)
        else:
            tensors[out] = w.contiguous()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {k: tensors[k] for k in names[i * per:(i + 1) * per]}
            save_file(chunk, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in chunk})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    if fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    cfg.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def image_prompt(sizes, text_before=(1, 3), text_after=(20, 4), patch=14, merge=2):
    """Token ids with one `[IMG]...[IMG_END]` block per image of `sizes` [(h, w)]."""
    ids = list(text_before)
    for h, w in sizes:
        gh, gw = h // (patch * merge), w // (patch * merge)
        for r in range(gh):
            ids += [IMG] * gw + [IMG_END if r == gh - 1 else IMG_BREAK]
    return ids + list(text_after)


def pixel_batch(sizes, seed=0):
    """pixel_values [N, 3, Hmax, Wmax] zero-padded, as the HF processor pads, and image_sizes [N, 2]."""
    g = np.random.default_rng(seed)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    px = np.zeros((len(sizes), 3, hmax, wmax), np.float32)
    for i, (h, w) in enumerate(sizes):
        px[i, :, :h, :w] = g.standard_normal((3, h, w))
    return px, np.asarray(sizes, np.int64)


@torch.no_grad()
def logits(model, input_ids, pixel_values=None, image_sizes=None, **kw) -> np.ndarray:
    args = dict(input_ids=torch.as_tensor(np.asarray(input_ids)))
    if pixel_values is not None:
        args.update(pixel_values=torch.as_tensor(pixel_values), image_sizes=torch.as_tensor(image_sizes))
    return model(**args, **kw).logits.float().numpy()


# A generated token may differ from the reference argmax only on a near-tie of the logits.
TIE = 1e-4


def assert_teacher_forced(model, prompt, new, pixel_values=None, image_sizes=None) -> np.ndarray:
    """Greedy tokens `new` after `prompt` are the reference's argmax at every step (up to a near-tie);
    returns the reference logits of prompt + new."""
    out = logits(model, np.asarray([list(prompt) + list(new)]), pixel_values, image_sizes)[0]
    for k, tok in enumerate(new):
        row = out[len(prompt) - 1 + k]
        assert row.max() - row[tok] <= TIE, f"step {k}: got {tok}, reference argmax {row.argmax()}"
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
