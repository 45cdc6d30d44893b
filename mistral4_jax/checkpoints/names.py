"""THE table between on-disk tensor names and the module tree (docs/model.md 2.2, 2.3, 2.5).

Each row pairs an on-disk name (below one of the known prefixes) with the parameter it fills and the
`Transform` that turns the on-disk layout into ours. Rows are templates: `{l}` a layer number, `{e}` an
expert number, `{m}` one of the row's module names, `{stack}` the text layer stack of the layer. The same
rows read forwards (a name -> its slot, for loading) and backwards (a parameter -> its name and layout,
for `save_pretrained` and the synthetic writer). Mistral's native names are renamed to HF names by a
second table, so the native layout needs no rows of its own.

The module tree mirrors transformers', so below a prefix only layer numbers, leaf names and layouts change.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..model.layers import DENSE_STACK, MOE_STACK, text_stacks


# ---------------------------------------------------------------------- layout transforms
@dataclass(frozen=True)
class Transform:
    """How one on-disk tensor becomes (part of) a parameter slot: a slot is a whole unstacked parameter, or
    one layer of a stacked one.

    perm: our axis i is the on-disk axis perm[i] (None: the same layout). kernel: a matmul kernel, which
    an E4M3 source may keep as E4M3 (converted float8 checkpoints, weights="fp8"). per_expert: the tensor
    is one expert of a fused [E, ...] slot; half: it fills the first (0) or second (1) half of the slot's
    last axis (gate / up of `gate_up_proj`). interleaved_heads: the on-disk rows are in interleaved-RoPE
    order for this many heads (Mistral-native vision q/k, docs/model.md 2.5 item 3); ours are in rotate-half order.
    The methods work on numpy and jax arrays alike."""

    name: str
    perm: tuple[int, ...] | None = None
    kernel: bool = False
    per_expert: bool = False
    half: int | None = None
    interleaved_heads: int | None = None

    def _inverse(self) -> tuple[int, ...]:
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    def to_ours(self, x):
        if self.interleaved_heads:
            x = interleaved_to_half(x, self.interleaved_heads)
        return x if self.perm is None else x.transpose(self.perm)

    def to_disk(self, x):
        x = x if self.perm is None else x.transpose(self._inverse())
        return half_to_interleaved(x, self.interleaved_heads) if self.interleaved_heads else x

    def disk_shape(self, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The on-disk shape of the tensor that fills (its part of) a slot of `slot_shape`."""
        part = tuple(slot_shape[1:] if self.per_expert else slot_shape)
        if self.half is not None:
            part = (*part[:-1], part[-1] // 2)
        return part if self.perm is None else tuple(part[i] for i in self._inverse())


COPY = Transform("copy")
LINEAR = Transform("linear", (1, 0), kernel=True)  # [out, in] -> [in, out]
TIED = Transform("tied", (1, 0))  # the embedding [V, D] read as the lm_head kernel [D, V]
CONV = Transform("conv", (2, 3, 1, 0))  # [D, C, p, p] -> [p, p, C, D]
EXPERTS = Transform("experts", (0, 2, 1), kernel=True)  # fused [E, out, in] -> [E, in, out]
# One expert's [out, in] tensor into the fused [E, in, out] slot (gate columns before up columns).
EXPERT_GATE = Transform("gate_proj", (1, 0), kernel=True, per_expert=True, half=0)
EXPERT_UP = Transform("up_proj", (1, 0), kernel=True, per_expert=True, half=1)
EXPERT_DOWN = Transform("down_proj", (1, 0), kernel=True, per_expert=True)


def interleaved_to_half(w, n_heads: int):
    """Rows of a q/k weight [H*d, in] from interleaved RoPE pairs to rotate-half order (docs/model.md 2.5 item 3).

    Within each head, row 2p+i moves to i*d/2 + p: view [H, d/2, 2, in], swap the middle axes."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w, n_heads: int):
    """The inverse of `interleaved_to_half` (HF order -> native order)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


# ---------------------------------------------------------------------- the HF table
# On-disk prefix -> part of the model. Released files use the first form of each pair, transformers 5
# (in memory, and `save_pretrained`) the second. "model." alone is a text-only Mistral4ForCausalLM.
PREFIXES = [
    ("language_model.model.", "text"), ("model.language_model.", "text"),
    ("language_model.lm_head.", "head"), ("lm_head.", "head"),
    ("vision_tower.", "vision"), ("model.vision_tower.", "vision"),
    ("multi_modal_projector.", "projector"), ("model.multi_modal_projector.", "projector"),
    ("model.", "text"),
]
# The prefixes names are written with: the released spelling, and transformers 5's (multimodal, text-only).
RELEASED_PREFIXES = {"text": "language_model.model.", "head": "language_model.lm_head.",
                     "vision": "vision_tower.", "projector": "multi_modal_projector."}
EXPORT_PREFIXES = {"text": "model.language_model.", "head": "lm_head.", "vision": "model.vision_tower.",
                   "projector": "model.multi_modal_projector."}
TEXT_ONLY_EXPORT_PREFIXES = {"text": "model.", "head": "lm_head."}

# Tensors that carry no information for a bf16/fp32 forward (static FP8 activation scales, NVFP4's W4A4 input
# scales, buffers).
IGNORED = re.compile(r"(\.activation_scale|_activation_scale|\.input_scale|\.qscale_act|\.input_global_scale"
                     r"|rotary_emb\.inv_freq)$")
# FP8 weight scales and NVFP4 block / global scales: read with their weight, never on their own.
SCALES = re.compile(r"(weight_scale_inv|_scale_inv|weight_scale|_proj_scale|qscale_weight|weight_global_scale)$")
# An NVFP4 weight (compressed-tensors' nvfp4-pack-quantized, docs/model.md 2.6): `X.weight_packed` holds the
# codes of the matrix every row names as `X.weight`, with `X.weight_scale` and `X.weight_global_scale` beside it.
NVFP4_PACKED = ".weight_packed"

TEXT = "language_model/"  # the text model's module path; its layer stacks are `layers.text_stacks`
TEXT_STACKS = (TEXT + DENSE_STACK, TEXT + MOE_STACK)  # what `{stack}` in a row's path stands for

_ATTN = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Row:
    part: str
    disk: str  # on-disk name below the part's prefix
    path: str  # parameter path in the module tree
    transform: Transform
    m: tuple[str, ...] = ()  # the module names `{m}` stands for


HF_ROWS = [
    Row("text", "embed_tokens.weight", "language_model/embed_tokens/embedding", COPY),
    Row("text", "norm.weight", "language_model/norm/weight", COPY),
    Row("text", "layers.{l}.{m}.weight", "{stack}/{m}/weight", COPY, ("input_layernorm", "post_attention_layernorm")),
    Row("text", "layers.{l}.self_attn.{m}.weight", "{stack}/self_attn/{m}/weight", COPY,
        ("q_a_layernorm", "kv_a_layernorm")),
    Row("text", "layers.{l}.self_attn.{m}.weight", "{stack}/self_attn/{m}/kernel", LINEAR, _ATTN),
    Row("text", "layers.{l}.self_attn.{m}.bias", "{stack}/self_attn/{m}/bias", COPY, _ATTN),
    Row("text", "layers.{l}.mlp.gate.weight", "{stack}/mlp/gate/kernel", LINEAR),
    Row("text", "layers.{l}.mlp.shared_experts.{m}.weight", "{stack}/mlp/shared_experts/{m}/kernel", LINEAR, _MLP),
    Row("text", "layers.{l}.mlp.{m}.weight", "{stack}/mlp/{m}/kernel", LINEAR, _MLP),
    # Fused experts before per-expert ones: the first row that fits a parameter is the one names are written with.
    Row("text", "layers.{l}.mlp.experts.{m}", "{stack}/mlp/experts/{m}", EXPERTS, ("gate_up_proj", "down_proj")),
    Row("text", "layers.{l}.mlp.experts.{e}.gate_proj.weight", "{stack}/mlp/experts/gate_up_proj", EXPERT_GATE),
    Row("text", "layers.{l}.mlp.experts.{e}.up_proj.weight", "{stack}/mlp/experts/gate_up_proj", EXPERT_UP),
    Row("text", "layers.{l}.mlp.experts.{e}.down_proj.weight", "{stack}/mlp/experts/down_proj", EXPERT_DOWN),
    Row("head", "weight", "lm_head/kernel", LINEAR),
    Row("vision", "patch_conv.weight", "vision_tower/patch_conv/kernel", CONV),
    Row("vision", "ln_pre.weight", "vision_tower/ln_pre/weight", COPY),
    Row("vision", "transformer.layers.{l}.attention.{m}.weight", "vision_tower/transformer/layers/attention/{m}/kernel",
        LINEAR, ("q_proj", "k_proj", "v_proj", "o_proj")),
    Row("vision", "transformer.layers.{l}.{m}.weight", "vision_tower/transformer/layers/{m}/weight", COPY,
        ("attention_norm", "ffn_norm")),
    Row("vision", "transformer.layers.{l}.feed_forward.{m}.weight",
        "vision_tower/transformer/layers/feed_forward/{m}/kernel", LINEAR, _MLP),
    Row("projector", "norm.weight", "multi_modal_projector/norm/weight", COPY),
    Row("projector", "patch_merger.merging_layer.weight", "multi_modal_projector/patch_merger/merging_layer/kernel",
        LINEAR),
    Row("projector", "{m}.weight", "multi_modal_projector/{m}/kernel", LINEAR, ("linear_1", "linear_2")),
    Row("projector", "{m}.bias", "multi_modal_projector/{m}/bias", COPY, ("linear_1", "linear_2")),
]


def _alt(names) -> str:
    return "|".join(sorted(map(re.escape, names), key=len, reverse=True))


def _pattern(template: str, m: tuple[str, ...]) -> re.Pattern:
    """A row template as an anchored regex with named groups l, e, m and stack."""
    rx = re.escape(template)
    for field, group in (("l", r"\d+"), ("e", r"\d+"), ("m", _alt(m)), ("stack", _alt(TEXT_STACKS))):
        rx = rx.replace(re.escape("{" + field + "}"), f"(?P<{field}>{group})")
    return re.compile(rx + "$")


_DISK = [(row, _pattern(row.disk, row.m)) for row in HF_ROWS]
_PATHS = [(row, _pattern(row.path, row.m)) for row in HF_ROWS]


# ---------------------------------------------------------------------- the native table
_NATIVE_LM, _NATIVE_HEAD = "language_model.model.", "language_model.lm_head."
_NATIVE_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                "wkv_a_with_mqa": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
                "wo": "o_proj"}
_NATIVE_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class NativeRow:
    native: str  # native name template
    hf: str  # released HF name template
    m: dict[str, str] | None = None  # native module name -> HF module name
    interleaved: bool = False  # rows in interleaved-RoPE order (vision q/k, docs/model.md 2.5 item 3)


# docs/model.md 2.3. Native per-expert `w1`/`w3` are separate tensors with their own `qscale_weight`: each half is
# dequantised with its own scale (the HF converter's common-scale re-quantisation is lossy, docs/model.md 2.5 item 2).
NATIVE_ROWS = [
    NativeRow("tok_embeddings.weight", _NATIVE_LM + "embed_tokens.weight"),
    NativeRow("norm.weight", _NATIVE_LM + "norm.weight"),
    NativeRow("output.weight", _NATIVE_HEAD + "weight"),
    NativeRow("layers.{l}.attention_norm.weight", _NATIVE_LM + "layers.{l}.input_layernorm.weight"),
    NativeRow("layers.{l}.ffn_norm.weight", _NATIVE_LM + "layers.{l}.post_attention_layernorm.weight"),
    NativeRow("layers.{l}.attention.{m}.weight", _NATIVE_LM + "layers.{l}.self_attn.{m}.weight", _NATIVE_ATTN),
    NativeRow("layers.{l}.gate.weight", _NATIVE_LM + "layers.{l}.mlp.gate.weight"),
    NativeRow("layers.{l}.shared_experts.{m}.weight", _NATIVE_LM + "layers.{l}.mlp.shared_experts.{m}.weight",
              _NATIVE_FFN),
    NativeRow("layers.{l}.experts.{e}.{m}.weight", _NATIVE_LM + "layers.{l}.mlp.experts.{e}.{m}.weight", _NATIVE_FFN),
    # Dense layers (first_k_dense_replace > 0; none in the released model): Mistral's dense FFN naming.
    NativeRow("layers.{l}.feed_forward.{m}.weight", _NATIVE_LM + "layers.{l}.mlp.{m}.weight", _NATIVE_FFN),
    NativeRow("vision_encoder.{m}.weight", "vision_tower.{m}.weight", {"patch_conv": "patch_conv", "ln_pre": "ln_pre"}),
    NativeRow("vision_encoder.transformer.layers.{l}.attention.{m}.weight",
              "vision_tower.transformer.layers.{l}.attention.{m}.weight", {"wq": "q_proj", "wk": "k_proj"},
              interleaved=True),
    NativeRow("vision_encoder.transformer.layers.{l}.attention.{m}.weight",
              "vision_tower.transformer.layers.{l}.attention.{m}.weight", {"wv": "v_proj", "wo": "o_proj"}),
    NativeRow("vision_encoder.transformer.layers.{l}.{m}.weight", "vision_tower.transformer.layers.{l}.{m}.weight",
              {"attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}),
    NativeRow("vision_encoder.transformer.layers.{l}.feed_forward.{m}.weight",
              "vision_tower.transformer.layers.{l}.feed_forward.{m}.weight", _NATIVE_FFN),
    NativeRow("pre_mm_projector_norm.weight", "multi_modal_projector.norm.weight"),
    NativeRow("patch_merger.merging_layer.weight", "multi_modal_projector.patch_merger.merging_layer.weight"),
    NativeRow("vision_language_adapter.w_in.{m}", "multi_modal_projector.linear_1.{m}", {"weight": "weight", "bias": "bias"}),
    NativeRow("vision_language_adapter.w_out.{m}", "multi_modal_projector.linear_2.{m}",
              {"weight": "weight", "bias": "bias"}),
]
_NATIVE = [(row, _pattern(row.native, tuple(row.m or ()))) for row in NATIVE_ROWS]


def native_to_hf(name: str) -> tuple[str, bool] | None:
    """(released HF name, rows interleaved) of a native tensor name, or None if no row matches."""
    for row, rx in _NATIVE:
        found = rx.match(name)
        if found:
            g = found.groupdict()
            if row.m is not None:
                g["m"] = row.m[g["m"]]
            return row.hf.format(**g), row.interleaved
    return None


# ---------------------------------------------------------------------- reading: a name -> its slot
@dataclass(frozen=True)
class Slot:
    """What an on-disk tensor fills: parameter `path`, its stacked layer, its expert, and how."""

    path: str
    layer: int | None
    expert: int | None
    transform: Transform


SKIP = "skip"  # a known tensor that nothing reads (a vision block after vision_feature_layer)


def is_weight(name: str) -> bool:
    """Whether an on-disk tensor is matched to a slot (not an ignored buffer, not an FP8 scale)."""
    return not (IGNORED.search(name) or SCALES.search(name))


def is_packed(name: str) -> bool:
    """Whether an on-disk tensor holds NVFP4 codes (its matrix is `nvfp4_matrix(name)`)."""
    return name.endswith(NVFP4_PACKED)


def nvfp4_matrix(name: str) -> str:
    """The name the rows know an NVFP4 matrix by: `X.weight` for the codes `X.weight_packed`."""
    return name[: -len(NVFP4_PACKED)] + ".weight"


def nvfp4_names(name: str) -> tuple[str, str]:
    """(block scale, global scale) tensor names of the NVFP4 codes `name`."""
    stem = name[: -len(NVFP4_PACKED)]
    return f"{stem}.weight_scale", f"{stem}.weight_global_scale"


def scale_names(name: str) -> tuple[str, ...]:
    """The names an FP8 weight's scale may have, in the order they are looked for."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return (f"{stem}.weight_scale_inv", f"{stem}_scale_inv", f"{stem}.weight_scale", f"{stem}_scale",
            f"{stem}.qscale_weight")


def scale_name(name: str) -> str:
    """The name an FP8 weight's scale is written with, as the released files do."""
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def activation_scale_name(name: str) -> str:
    """The name of a weight's static activation scale (ignored when loading), as the released files write it."""
    return name[: -len(".weight")] + ".activation_scale" if name.endswith(".weight") else name + "_activation_scale"


def _split_prefix(name: str) -> tuple[str, str] | None:
    for prefix, part in PREFIXES:
        if name.startswith(prefix):
            return part, name[len(prefix):]
    return None


def slot_of(name: str, cfg: ModelConfig, n_vision: int | None, native: bool = False) -> Slot | str | None:
    """The slot an on-disk tensor fills; SKIP for a tensor nothing reads; None when no row fits.

    n_vision: the vision layers the model holds (blocks after vision_feature_layer are never used).
    native: `name` is in Mistral's native layout (renamed to its HF name first). NVFP4 codes (`X.weight_packed`)
    fill the slot of their matrix `X.weight`."""
    interleaved = False
    if is_packed(name):
        name = nvfp4_matrix(name)
    if native:
        renamed = native_to_hf(name)
        if renamed is None:
            return None
        name, interleaved = renamed
    split = _split_prefix(name)
    if split is None:
        return None
    part, rest = split
    for row, rx in _DISK:
        found = row.part == part and rx.match(rest)
        if not found:
            continue
        g = found.groupdict()
        layer = int(g["l"]) if g.get("l") is not None else None
        fmt = dict(g)
        if part == "text" and layer is not None:
            found = next((s for s in text_stacks(cfg.text) if s.first <= layer < s.first + s.depth), None)
            if found is None:  # past the last layer
                return None
            fmt["stack"], layer = TEXT + found.name, layer - found.first
        if part == "vision" and layer is not None and (n_vision is None or layer >= n_vision):
            return SKIP
        transform = row.transform
        if interleaved:
            transform = dataclasses.replace(transform, interleaved_heads=cfg.vision.num_attention_heads)
        expert = int(g["e"]) if g.get("e") is not None else None
        return Slot(row.path.format(**fmt), layer, expert, transform)
    return None


# ---------------------------------------------------------------------- writing: a parameter -> its name
def split_stack(path: str) -> tuple[str, str]:
    """(stack module, path inside one layer) of a stacked parameter (one whose leading axis is "layers",
    `layers.is_stacked`), e.g. ('language_model/layers', 'mlp/gate/kernel'): the stack is the module the
    stacking `nnx.vmap` created, the last `layers` / `dense_layers` attribute on the path."""
    parts = path.split("/")
    i = max(k for k, p in enumerate(parts) if p in (DENSE_STACK, MOE_STACK))
    return "/".join(parts[: i + 1]), "/".join(parts[i + 1:])


def absolute_layer(path: str, layer: int, cfg: ModelConfig) -> int:
    """The on-disk layer number of layer `layer` of stacked parameter `path`: its text stack's first layer
    (`layers.text_stacks`) plus `layer`; vision layers are numbered in their own stack."""
    stack = split_stack(path)[0]
    return layer + next((s.first for s in text_stacks(cfg.text) if TEXT + s.name == stack), 0)


def disk_name(path: str, layer: int | None, cfg: ModelConfig, released: bool = False) -> tuple[str, Transform]:
    """(on-disk name, transform) of parameter `path` (layer `layer` of a stacked one): the first row that
    fits, so fused experts. released: the released spelling (`language_model.model.*`), else transformers 5's
    (`model.language_model.*`, `model.*` when there is no vision tower)."""
    for row, rx in _PATHS:
        found = rx.match(path)
        if not found:
            continue
        g = found.groupdict()
        if layer is not None:
            g["l"] = absolute_layer(path, layer, cfg)
        if released:
            prefixes = RELEASED_PREFIXES
        else:
            prefixes = EXPORT_PREFIXES if cfg.vision is not None else TEXT_ONLY_EXPORT_PREFIXES
        return prefixes[row.part] + row.disk.format(**g), row.transform
    raise KeyError(f"parameter {path!r} has no on-disk name (no row of checkpoints.names.HF_ROWS fits it)")
