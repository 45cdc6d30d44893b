"""Model configuration: frozen dataclasses parsed from an HF `config.json` (docs/model.md 1).

The tree mirrors the file: `ModelConfig` (the `Mistral3ForConditionalGeneration` fields) holds a
`TextConfig` (`text_config`, `model_type: mistral4`), an optional `VisionConfig` (`vision_config`,
`model_type: pixtral`) and an optional `QuantConfig` (`quantization_config`). A key missing from the
file takes the default of the transformers class that would read it, so a file written by
`save_pretrained` (which omits values equal to the class default) means the same thing here.
Presets for the released model and for tiny test models are classmethods of `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# transformers' ACT2FN names that ops.activation implements (the parameter-free ones)
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new",
               "gelu_fast", "gelu_accurate", "gelu_10", "quick_gelu", "relu", "relu2", "relu6", "leaky_relu", "mish",
               "hardswish", "sigmoid", "tanh", "linear")


@dataclass(frozen=True)
class RopeConfig:
    """YaRN rotary embedding of the text model (docs/model.md 3.3.2) plus the Llama-4 query scale (3.3.4)."""

    rope_type: str = "yarn"
    rope_theta: float = 10000.0
    factor: float = 128.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    attention_factor: float | None = None  # None: derived from factor / mscale / mscale_all_dim
    truncate: bool = True
    llama_4_scaling_beta: float = 0.1


@dataclass(frozen=True)
class TextConfig:
    """The DeepSeek-V3-style text stack (`Mistral4Config`)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 12288  # dense MLP width, only used by the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 256
    q_lora_rank: int | None = 1024
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 64
    v_head_dim: int = 128
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 11
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Port switches (docs/model.md 7). Release semantics by default.
    apply_yarn_mscale: bool = False  # True: softmax scale * mscale^2, as transformers >= PR #47435 does
    router_softmax_fp32: bool = True  # False: softmax in the activation dtype, as transformers does
    # "auto" (gather at a few (token, expert) pairs, the routed loop above; see moe.py), "routed" (a loop over
    # the experts that received tokens), "gather" (each pair's expert slices), "grouped" (ragged_dot, dense over
    # all experts unless XLA fuses it) or "dense" (every expert on every token; the test reference)
    expert_impl: str = "auto"
    # "auto" (cuDNN's fused attention on GPU where the shapes allow, else blockwise), "blockwise" (online
    # softmax over key blocks, memory linear in length) or "reference" (the materialised scores)
    attention_impl: str = "auto"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_mscale(self) -> float:
        """YaRN's magnitude factor 0.1 * mscale_all_dim * ln(factor) + 1 (1.0 when not applicable)."""
        r = self.rope
        if r.rope_type != "yarn" or not r.mscale_all_dim or r.factor <= 1:
            return 1.0
        return 0.1 * r.mscale_all_dim * math.log(r.factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim); times mscale^2 only with `apply_yarn_mscale` (docs/model.md 3.3.5)."""
        scale = self.qk_head_dim**-0.5
        if self.apply_yarn_mscale:
            scale *= self.yarn_mscale**2
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Factor on cos/sin, derived as transformers' YaRN init does; 1.0 for the released model."""
        r = self.rope
        if r.attention_factor is not None:
            return float(r.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if r.mscale and r.mscale_all_dim:
            return get_mscale(r.factor, r.mscale) / get_mscale(r.factor, r.mscale_all_dim)
        return get_mscale(r.factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral encoder (`PixtralVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 1540
    patch_size: int = 14
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


NVFP4_FORMAT = "nvfp4-pack-quantized"


@dataclass(frozen=True)
class QuantConfig:
    """`quantization_config` of a quantised checkpoint: FP8 with per-tensor E4M3 scales (docs/model.md 2.4), or
    compressed-tensors NVFP4 (`quant_method` "compressed-tensors", `format` "nvfp4-pack-quantized", 4-bit E2M1
    weights with one E4M3 scale per `group_size` = 16 inputs; `ignore` lists the modules left in 16 bits;
    docs/model.md 2.6)."""

    quant_method: str = "fp8"
    activation_scheme: str = "static"
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    format: str | None = None
    group_size: int | None = None
    ignore: tuple[str, ...] = ()

    @property
    def is_nvfp4(self) -> bool:
        return self.quant_method == "compressed-tensors"


@dataclass(frozen=True)
class ModelConfig:
    """`Mistral3ForConditionalGeneration`: vision tower + projector around the text stack.

    `vision` is None for a text-only (`model_type: mistral4`) checkpoint.
    """

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    quantization: QuantConfig | None = None
    image_token_id: int = 10
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    multimodal_projector_bias: bool = False
    spatial_merge_size: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self):
        validate(self)

    # ------------------------------------------------------------------ presets
    @classmethod
    def mistral_small_4(cls) -> ModelConfig:
        """The released `mistralai/Mistral-Small-4-119B-2603` (docs/model.md 1)."""
        return cls(quantization=QuantConfig(modules_to_not_convert=(
            "model.vision_tower", "model.multi_modal_projector", "lm_head")))

    @classmethod
    def tiny(cls, **text_overrides: Any) -> ModelConfig:
        """A few-kB model with every feature of the real one, for tests and the demo."""
        text = TextConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2,
            rope=RopeConfig(factor=4.0, original_max_position_embeddings=64),
            max_position_embeddings=256,
        )
        text = dataclasses.replace(text, **text_overrides)
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=112, patch_size=14)
        return cls(text=text, vision=vision)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse_hf(d, source)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in the HF `config.json` layout, readable by transformers and by `from_hf_dict`."""
        return _to_hf(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def replace_text(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **changes))


# ---------------------------------------------------------------------- validation
def validate(cfg: ModelConfig) -> None:
    """Raise one ConfigError listing every inconsistency found."""
    t, problems = cfg.text, []

    def need(ok: bool, msg: str):
        if not ok:
            problems.append(msg)

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size",
                 "n_routed_experts", "num_experts_per_tok"):
        need(getattr(t, name) > 0, f"text_config.{name} must be positive, got {getattr(t, name)}")
    need(t.q_lora_rank is None or t.q_lora_rank > 0, f"text_config.q_lora_rank must be positive or null, got {t.q_lora_rank}")
    need(t.qk_rope_head_dim % 2 == 0, f"text_config.qk_rope_head_dim must be even (RoPE rotates pairs), got {t.qk_rope_head_dim}")
    need(t.num_experts_per_tok <= t.n_routed_experts,
         f"text_config.num_experts_per_tok ({t.num_experts_per_tok}) exceeds n_routed_experts ({t.n_routed_experts})")
    need(t.n_group >= 1 and t.n_routed_experts % t.n_group == 0,
         f"text_config.n_group ({t.n_group}) must divide n_routed_experts ({t.n_routed_experts})")
    if t.n_group > 1:
        need(t.n_routed_experts // t.n_group >= 2, "text_config: group-limited routing needs at least 2 experts per group")
    need(1 <= t.topk_group <= t.n_group, f"text_config.topk_group ({t.topk_group}) must be in [1, n_group={t.n_group}]")
    need(t.topk_group * (t.n_routed_experts // max(t.n_group, 1)) >= t.num_experts_per_tok,
         "text_config: topk_group groups hold fewer experts than num_experts_per_tok")
    need(0 <= t.first_k_dense_replace <= t.num_hidden_layers,
         f"text_config.first_k_dense_replace ({t.first_k_dense_replace}) must be in [0, num_hidden_layers]")
    need(t.n_shared_experts >= 0, f"text_config.n_shared_experts must be >= 0, got {t.n_shared_experts}")
    need(t.hidden_act in ACTIVATIONS, f"text_config.hidden_act {t.hidden_act!r} is not one of {ACTIVATIONS}")
    need(t.num_key_value_heads == t.num_attention_heads,
         f"text_config.num_key_value_heads ({t.num_key_value_heads}) must equal num_attention_heads "
         f"({t.num_attention_heads}): MLA decompresses a key and value for every head")
    r = t.rope
    need(r.rope_type == "yarn", f"text_config.rope_parameters.rope_type {r.rope_type!r} is not supported (expected 'yarn')")
    need(r.factor > 0 and r.rope_theta > 0, "text_config.rope_parameters: factor and rope_theta must be positive")
    need(r.original_max_position_embeddings > 0, "text_config.rope_parameters.original_max_position_embeddings must be positive")
    need(t.rms_norm_eps > 0, "text_config.rms_norm_eps must be positive")
    need(t.expert_impl in ("auto", "routed", "gather", "grouped", "dense"),
         f"expert_impl must be 'auto', 'routed', 'gather', 'grouped' or 'dense', got {t.expert_impl!r}")
    need(t.attention_impl in ("auto", "blockwise", "reference"),
         f"attention_impl must be 'auto', 'blockwise' or 'reference', got {t.attention_impl!r}")
    v = cfg.vision
    if v is not None:
        need(v.hidden_size % v.num_attention_heads == 0,
             f"vision_config.num_attention_heads ({v.num_attention_heads}) must divide hidden_size ({v.hidden_size})")
        need(v.head_dim % 2 == 0, f"vision_config head_dim ({v.head_dim}) must be even (RoPE rotates pairs)")
        need(v.hidden_act in ACTIVATIONS, f"vision_config.hidden_act {v.hidden_act!r} is not one of {ACTIVATIONS}")
        need(v.patch_size > 0 and v.image_size >= v.patch_size, "vision_config: patch_size must be in (0, image_size]")
        need(cfg.projector_hidden_act in ACTIVATIONS,
             f"projector_hidden_act {cfg.projector_hidden_act!r} is not one of {ACTIVATIONS}")
        need(cfg.spatial_merge_size >= 1, "spatial_merge_size must be >= 1")
        need(-(v.num_hidden_layers + 1) <= cfg.vision_feature_layer <= v.num_hidden_layers,
             f"vision_feature_layer ({cfg.vision_feature_layer}) is out of range for {v.num_hidden_layers} vision layers")
        need(0 <= cfg.image_token_id < t.vocab_size, f"image_token_index ({cfg.image_token_id}) is outside the vocabulary")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------- parsing
# Keys that may be null in a config.json: the parser then takes the transformers default.
_NULL_MEANS_DEFAULT = {
    "text_config": {"n_group", "topk_group", "first_k_dense_replace", "num_experts_per_tok", "norm_topk_prob",
                    "rope_interleave", "num_key_value_heads"},
    "rope_parameters": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                        "llama_4_scaling_beta"},
}


def _typed(section: str, key: str, val: Any, annotation: str, problems: list[str]) -> Any:
    """`val` as the field's type (an integral float becomes an int), or None after noting the problem.

    `annotation` is the dataclass field's type as written ("int", "float | None", ...); tuple-typed
    fields are checked where they are parsed.
    """
    kinds = {k.strip() for k in annotation.split("|")}
    if val is None:
        if "None" in kinds or key in _NULL_MEANS_DEFAULT.get(section.rsplit(".", 1)[-1], ()):
            return None
    elif isinstance(val, bool):
        if "bool" in kinds:
            return val
    elif isinstance(val, int):
        if "int" in kinds:
            return val
        if "float" in kinds:
            return float(val)
    elif isinstance(val, float):
        if "float" in kinds:
            return val
        if "int" in kinds and val.is_integer():
            return int(val)
    elif isinstance(val, str) and "str" in kinds:
        return val
    want = " or ".join(sorted(kinds - {"None"})) + (" or null" if "None" in kinds else "")
    if "int" in kinds and isinstance(val, float):
        want += " (a float is accepted only when integral, e.g. 2.0)"
    problems.append(f"{section}.{key} must be {want}, got {_json_repr(val)}")
    return None


def _json_repr(val: Any) -> str:
    """The value as the file spells it, and its Python type: `"2" (str)`, `null (NoneType)`."""
    return f"{json.dumps(val, default=repr)} ({type(val).__name__})"


def _typed_section(d: dict, cls, section: str, problems: list[str], renames: dict[str, str] | None = None,
                   skip=()) -> dict:
    """A copy of `d` with every key that names a scalar field of `cls` type-checked (unknown keys kept)."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    out = dict(d)
    for k, val in d.items():
        name = (renames or {}).get(k, k)
        if name in skip or name not in fields or "tuple" in str(fields[name]) or "Config" in str(fields[name]):
            continue
        out[k] = _typed(section, k, val, str(fields[name]), problems)
    return out


def _int_list(section: str, key: str, val: Any, problems: list[str], allow_int: bool) -> None:
    ok = (allow_int and isinstance(val, int) and not isinstance(val, bool)) or (
        isinstance(val, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in val))
    if val is not None and not ok:
        problems.append(f"{section}.{key} must be {'an int or ' if allow_int else ''}a list of ints or null, "
                        f"got {_json_repr(val)}")


def check_types(d: dict[str, Any], source: str) -> dict[str, Any]:
    """The config.json dict with every known field of the right JSON type (integral floats as ints);
    one ConfigError lists every field that is not. Unknown keys are kept and, as for transformers,
    mean nothing."""
    problems: list[str] = []

    def text(t: dict, section: str) -> dict:
        t = _typed_section(t, TextConfig, section, problems)
        _int_list(section, "eos_token_id", t.get("eos_token_id"), problems, allow_int=True)
        for key in ("rope_parameters", "rope_scaling"):
            rope = t.get(key)
            if rope is not None and not isinstance(rope, dict):
                problems.append(f"{section}.{key} must be an object, got {_json_repr(rope)}")
            elif rope is not None:
                t[key] = _typed_section(rope, RopeConfig, f"{section}.{key}", problems)
                if "partial_rotary_factor" in rope:
                    t[key]["partial_rotary_factor"] = _typed(f"{section}.{key}", "partial_rotary_factor",
                                                             rope["partial_rotary_factor"], "float | None", problems)
        if "rope_theta" in t:
            t["rope_theta"] = _typed(section, "rope_theta", t["rope_theta"], "float", problems)
        return t

    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    d = dict(d)
    if d.get("model_type") in ("mistral4", "deepseek_v3"):
        d = text(d, "text_config")
    else:
        d = _typed_section(d, ModelConfig, "config", problems, renames={"image_token_index": "image_token_id"},
                           skip=("vision_feature_layer",))
        _int_list("config", "vision_feature_layer", d.get("vision_feature_layer"), problems, allow_int=True)
        for key, fn in (("text_config", lambda t: text(t, "text_config")),
                        ("vision_config", lambda v: _typed_section(v, VisionConfig, "vision_config", problems,
                                                                   skip=("image_size", "patch_size")))):
            sub = d.get(key)
            if sub is not None and not isinstance(sub, dict):
                problems.append(f"{key} must be an object, got {_json_repr(sub)}")
            elif sub is not None:
                d[key] = fn(sub)
        vision = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else {}
        for key in ("image_size", "patch_size"):
            _int_list("vision_config", key, vision.get(key), problems, allow_int=True)
    q = d.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        problems.append(f"quantization_config must be an object, got {_json_repr(q)}")
    elif q:
        for key in ("quant_method", "activation_scheme"):
            if key in q and not isinstance(q[key], str):
                problems.append(f"quantization_config.{key} must be str, got {_json_repr(q[key])}")
        _int_list("quantization_config", "weight_block_size", q.get("weight_block_size"), problems, allow_int=False)
        mods = q.get("modules_to_not_convert")
        if mods is not None and not (isinstance(mods, list) and all(isinstance(m, str) for m in mods)):
            problems.append(f"quantization_config.modules_to_not_convert must be a list of str or null, "
                            f"got {_json_repr(mods)}")
    if problems:
        raise ConfigError(f"{source}: wrong value type{'s' * (len(problems) > 1)}: " + "; ".join(problems))
    return d


def _pick(d: dict, cls, source: str, renames: dict[str, str] | None = None, skip=()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, val in d.items():
        k = (renames or {}).get(k, k)
        if k in names and k not in skip:
            out[k] = val
    return out


def _parse_rope(d: dict[str, Any] | None, source: str, max_position_embeddings: int) -> RopeConfig:
    """An absent dict is Mistral4Config's default one (the RopeConfig defaults). In a given dict, an
    absent key means what it means to transformers' YaRN init: no mscale / mscale_all_dim (the cos/sin
    factor is then 0.1 ln(factor) + 1), original_max_position_embeddings = max_position_embeddings,
    factor = max_position_embeddings / original_max, and beta_fast / beta_slow 0 or null = 32 / 1."""
    if d is None:
        return RopeConfig()
    d = dict(d)
    if "rope_type" not in d and "type" in d:
        d["rope_type"] = d["type"]
    if d.get("llama_4_scaling_beta") is None:
        raise ConfigError(f"{source}: text_config.rope_parameters.llama_4_scaling_beta is missing (Mistral 4 scales "
                          "queries by 1 + beta * ln(1 + floor(pos / original_max)); the released value is 0.1)")
    d.setdefault("mscale", None)
    d.setdefault("mscale_all_dim", None)
    if d.get("original_max_position_embeddings") is None:
        d["original_max_position_embeddings"] = max_position_embeddings
    if d.get("factor") is None:
        d["factor"] = max_position_embeddings / d["original_max_position_embeddings"]
    d["beta_fast"] = d.get("beta_fast") or 32.0
    d["beta_slow"] = d.get("beta_slow") or 1.0
    return RopeConfig(**_pick(d, RopeConfig, source))


def _parse_text(d: dict[str, Any], source: str) -> TextConfig:
    d = dict(d)
    mt = d.get("model_type", "mistral4")
    if mt not in ("mistral4", "deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"{source}: text_config.model_type {mt!r} is not a Mistral 4 text config (expected 'mistral4')")
    rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
    if rope is not None and "rope_theta" not in rope and "rope_theta" in d:
        rope = {**rope, "rope_theta": d["rope_theta"]}
    kw = _pick(d, TextConfig, source, skip=("rope",))
    eos = kw.get("eos_token_id", 2)
    kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = kw.get("num_attention_heads", TextConfig.num_attention_heads)
    for k in ("n_group", "topk_group", "first_k_dense_replace", "num_experts_per_tok"):
        if k in kw and kw[k] is None:
            kw[k] = getattr(TextConfig, k) if k != "first_k_dense_replace" else 0
    if kw.get("norm_topk_prob") is None:
        kw.pop("norm_topk_prob", None)
    if kw.get("rope_interleave") is None:
        kw.pop("rope_interleave", None)
    prf = (rope or {}).get("partial_rotary_factor")
    if prf is not None:
        qk = kw.get("qk_nope_head_dim", TextConfig.qk_nope_head_dim) + kw.get("qk_rope_head_dim", TextConfig.qk_rope_head_dim)
        if int(qk * prf) != kw.get("qk_rope_head_dim", TextConfig.qk_rope_head_dim):
            raise ConfigError(f"{source}: text_config.rope_parameters.partial_rotary_factor ({prf}) times qk_head_dim "
                              f"({qk}) must equal qk_rope_head_dim: RoPE covers exactly the rope part of each head")
    try:
        max_pos = kw.get("max_position_embeddings", TextConfig.max_position_embeddings)
        return TextConfig(rope=_parse_rope(rope, source, max_pos), **kw)
    except TypeError as e:
        raise ConfigError(f"{source}: bad text_config ({e})") from None


def _parse_vision(d: dict[str, Any], source: str) -> VisionConfig:
    d = dict(d)
    mt = d.get("model_type", "pixtral")
    if mt != "pixtral":
        raise ConfigError(f"{source}: vision_config.model_type {mt!r} is not supported (expected 'pixtral')")
    # PixtralVisionConfig defaults, which differ from the released model's values.
    kw = {"hidden_act": "gelu", "patch_size": 16, "image_size": 1024}
    kw.update(_pick(d, VisionConfig, source, skip=("rope_theta",)))
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"{source}: vision_config.rope_parameters.rope_type must be 'axial', got {rope.get('rope_type')!r}")
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    for k in ("image_size", "patch_size"):
        if isinstance(kw.get(k), (list, tuple)):
            a, b = kw[k]
            if a != b:
                raise ConfigError(f"{source}: vision_config.{k} must be square, got {kw[k]}")
            kw[k] = a
    return VisionConfig(**kw)


def _parse_compressed_tensors(d: dict[str, Any], source: str) -> QuantConfig:
    """A compressed-tensors config (docs/model.md 2.6): only NVFP4 weights are supported. Its schemes sit in
    `config_groups` (llm-compressor's layout) or at the top level; `input_activations` (the W4A4 activation
    scales) are not needed for a weight-only forward."""
    status = d.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{source}: quantization_config.quantization_status {status!r} is not supported (expected "
                          "'compressed': packed weights)")
    groups = d.get("config_groups") or {"": d}
    if not isinstance(groups, dict):
        raise ConfigError(f"{source}: quantization_config.config_groups must be an object")
    formats = set()
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        where = "quantization_config" + (f".config_groups.{name}" if name else "")
        got = (w.get("num_bits"), w.get("type"), w.get("group_size"))
        if got != (4, "float", 16):
            raise ConfigError(f"{source}: {where}.weights is num_bits {got[0]!r}, type {got[1]!r}, group_size "
                              f"{got[2]!r}; only NVFP4 (num_bits 4, type 'float', group_size 16) is supported")
        formats.add(g.get("format") or d.get("format") or NVFP4_FORMAT)
    if formats != {NVFP4_FORMAT}:
        raise ConfigError(f"{source}: quantization_config format {sorted(formats)} is not supported "
                          f"(expected {NVFP4_FORMAT!r})")
    ignore = d.get("ignore") or []
    if not (isinstance(ignore, list) and all(isinstance(m, str) for m in ignore)):
        raise ConfigError(f"{source}: quantization_config.ignore must be a list of str, got {_json_repr(ignore)}")
    return QuantConfig(quant_method="compressed-tensors", activation_scheme="none", format=NVFP4_FORMAT, group_size=16,
                       ignore=tuple(ignore))


def _parse_quant(d: dict[str, Any] | None, source: str) -> QuantConfig | None:
    if not d:
        return None
    method = d.get("quant_method", "fp8")
    if str(method).lower().replace("_", "-") == "compressed-tensors":
        return _parse_compressed_tensors(d, source)
    if method != "fp8":
        raise ConfigError(f"{source}: quantization_config.quant_method {method!r} is not supported (expected 'fp8', "
                          "or 'compressed-tensors' with NVFP4 weights)")
    block = d.get("weight_block_size")
    return QuantConfig(
        quant_method=method,
        activation_scheme=d.get("activation_scheme", "static"),
        weight_block_size=tuple(block) if block else None,
        modules_to_not_convert=tuple(d.get("modules_to_not_convert") or ()),
    )


def _parse_hf(d: dict[str, Any], source: str) -> ModelConfig:
    d = check_types(d, source)
    mt = d.get("model_type")
    quant = _parse_quant(d.get("quantization_config"), source)
    if mt in ("mistral4", "deepseek_v3"):  # a text-only checkpoint (Mistral4ForCausalLM)
        text = _parse_text(d, source)
        return ModelConfig(text=text, vision=None, quantization=quant, tie_word_embeddings=text.tie_word_embeddings)
    if mt not in ("mistral3", None):
        raise ConfigError(f"{source}: model_type {mt!r} is not supported (expected 'mistral3' or 'mistral4')")
    if "text_config" not in d:
        raise ConfigError(f"{source}: missing 'text_config'")
    text = _parse_text(d["text_config"], source)
    vision = _parse_vision(d.get("vision_config") or {}, source)
    kw = _pick(d, ModelConfig, source, renames={"image_token_index": "image_token_id"},
               skip=("text", "vision", "quantization"))
    vfl = kw.get("vision_feature_layer")
    if isinstance(vfl, (list, tuple)):
        # transformers concatenates the listed layers' features, which its projector (norm and merger
        # sized for one layer's vision hidden_size) accepts only for a single layer
        if len(vfl) != 1:
            raise ConfigError(f"{source}: vision_feature_layer {list(vfl)} is not supported: the projector takes one "
                              "layer's features (expected an int or a one-element list)")
        kw["vision_feature_layer"] = vfl[0]
    # Mistral3Config defaults tie_word_embeddings to true: an absent key means tied (docs/model.md 1.1).
    kw.setdefault("tie_word_embeddings", True)
    return ModelConfig(text=text, vision=vision, quantization=quant, **kw)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.text
    r = dataclasses.asdict(t.rope)
    r = {k: v for k, v in r.items() if v is not None}
    r["type"] = r["rope_type"]
    text = {k: v for k, v in dataclasses.asdict(t).items()
            if k not in ("rope", "apply_yarn_mscale", "router_softmax_fp32", "expert_impl", "attention_impl",
                         "eos_token_id")}
    text.update(model_type="mistral4", rope_parameters=r, head_dim=t.qk_head_dim,
                eos_token_id=t.eos_token_id[0] if len(t.eos_token_id) == 1 else list(t.eos_token_id))
    out: dict[str, Any] = {}
    if cfg.vision is None:
        out = dict(text, architectures=["Mistral4ForCausalLM"])
    else:
        v = cfg.vision
        vision = {k: val for k, val in dataclasses.asdict(v).items() if k != "rope_theta"}
        vision.update(model_type="pixtral", head_dim=v.head_dim,
                      rope_parameters={"rope_theta": v.rope_theta, "rope_type": "axial"})
        out = {
            "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
            "text_config": text, "vision_config": vision, "image_token_index": cfg.image_token_id,
            "projector_hidden_act": cfg.projector_hidden_act, "vision_feature_layer": cfg.vision_feature_layer,
            "multimodal_projector_bias": cfg.multimodal_projector_bias,
            "spatial_merge_size": cfg.spatial_merge_size, "tie_word_embeddings": cfg.tie_word_embeddings,
        }
    if cfg.quantization is not None and cfg.quantization.is_nvfp4:
        q = cfg.quantization
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": q.group_size,
                   "symmetric": True, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
        out["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": q.format, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": q.format}},
            "ignore": list(q.ignore)}
    elif cfg.quantization is not None:
        q = cfg.quantization
        out["quantization_config"] = {
            "quant_method": q.quant_method, "activation_scheme": q.activation_scheme,
            "weight_block_size": list(q.weight_block_size) if q.weight_block_size else None,
            "modules_to_not_convert": list(q.modules_to_not_convert),
        }
    return out
