"""The plan: every on-disk tensor matched to the parameter slot it fills, checked before any weight is read.

Names are matched through `names` (the one table); shapes, FP8 scales and completeness are checked here.
Every problem is collected and reported in one error, so a bad checkpoint is fixed in one round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from .names import SKIP, TIED, Transform, is_packed, is_weight, nvfp4_names, scale_names, slot_of
from .safetensors_io import FP8, SafetensorsFile

NVFP4 = "nvfp4"

_VISION_NORM = "vision_tower/transformer/layers/attention_norm/weight"


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor and the slot of a parameter it fills."""

    file: SafetensorsFile
    key: str
    transform: Transform
    layer: int | None = None  # index into the parameter's stacked axis
    expert: int | None = None
    scale: tuple[SafetensorsFile, str] | None = None  # (file, name) of an FP8 weight's scale, or NVFP4 block scales
    global_scale: tuple[SafetensorsFile, str] | None = None  # (file, name) of an NVFP4 matrix's global scale
    kind: str | None = None  # "nvfp4": `key` holds packed E2M1 codes (names.NVFP4_PACKED)


def _find(name: str, index: dict[str, SafetensorsFile]) -> tuple[SafetensorsFile, str] | None:
    return (index[name], name) if name in index else None


def _scale_for(name: str, index: dict[str, SafetensorsFile]) -> tuple[SafetensorsFile, str] | None:
    for cand in scale_names(name):
        if cand in index:
            return index[cand], cand
    return None


def plan_checkpoint(cfg: ModelConfig, index: dict[str, SafetensorsFile], expected: dict[str, tuple],
                    stacked: frozenset[str], native: bool = False) -> dict[str, list[Piece]]:
    """Match every tensor to a parameter slot. Returns {param path: [Piece]}; raises listing all problems.

    expected: {param path: shape}; stacked: the paths with a leading layer axis (`read.stacked_paths`).
    native: the names are Mistral's native ones (`names.NATIVE_ROWS`); pieces and messages keep the
    on-disk name."""
    n_vision = expected[_VISION_NORM][0] if cfg.vision is not None and _VISION_NORM in expected else None
    plan: dict[str, list[Piece]] = {}
    unexpected = []
    for name, f in index.items():
        if not is_weight(name):
            continue
        slot = slot_of(name, cfg, n_vision, native)
        if slot == SKIP:
            continue
        if slot is not None and slot.path in expected and is_packed(name):
            block, glob = (_find(n, index) for n in nvfp4_names(name))
            plan.setdefault(slot.path, []).append(Piece(f, name, slot.transform, slot.layer, slot.expert, block, glob,
                                                        NVFP4))
        elif slot is not None and slot.path in expected:
            scale = _scale_for(name, index) if f.dtype_name(name) in FP8 else None
            plan.setdefault(slot.path, []).append(Piece(f, name, slot.transform, slot.layer, slot.expert, scale))
        elif 0 not in f.shape(name):  # an empty tensor with no slot is a zero-width module: nothing to load
            unexpected.append(name)
    if "lm_head/kernel" not in plan and cfg.tie_word_embeddings and "language_model/embed_tokens/embedding" in plan:
        emb = plan["language_model/embed_tokens/embedding"][0]
        plan["lm_head/kernel"] = [dataclasses.replace(emb, transform=TIED)]
    problems = _check_plan(plan, expected, stacked)
    for name in unexpected:
        problems.append(f"unexpected tensor {name!r} in {index[name].path}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the config ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:200]) + ("\n  ..." if len(problems) > 200 else ""))
    return plan


def _check_plan(plan: dict[str, list[Piece]], expected: dict[str, tuple], stacked_paths: frozenset[str]) -> list[str]:
    problems = []
    for path, shape in expected.items():
        stacked = path in stacked_paths
        pieces = plan.get(path, [])
        slot_shape = shape[1:] if stacked else shape
        n_layers = shape[0] if stacked else 1
        for p in pieces:
            src = p.file.shape(p.key)
            want = p.transform.disk_shape(slot_shape)
            if p.kind == NVFP4:
                problems += _check_nvfp4(p, want)
            elif tuple(src) != want:
                problems.append(f"tensor {p.key!r} in {p.file.path} has shape {list(src)}, expected {list(want)}")
            if p.file.dtype_name(p.key) in FP8 and p.scale is None:
                problems.append(f"FP8 tensor {p.key!r} in {p.file.path} has no weight_scale_inv")
            if p.expert is not None and p.expert >= slot_shape[0]:
                problems.append(f"tensor {p.key!r}: expert {p.expert} >= n_routed_experts ({slot_shape[0]})")
        if len({p.kind for p in pieces}) > 1:
            problems.append(f"{path}: NVFP4 and other tensors are mixed in one parameter "
                            f"({', '.join(sorted({p.key for p in pieces if p.kind == NVFP4})[:4])} ...)")
        by_layer: dict[int | None, list[Piece]] = {}
        for p in pieces:
            by_layer.setdefault(p.layer if stacked else None, []).append(p)
        for layer in (range(n_layers) if stacked else [None]):
            got = by_layer.get(layer, [])
            where = f"{path}" + (f" (layer {layer})" if stacked else "")
            if path.endswith("/mlp/experts/gate_up_proj") or path.endswith("/mlp/experts/down_proj"):
                problems += _check_experts(got, slot_shape[0], where, path.endswith("gate_up_proj"))
            elif not got:
                problems.append(f"missing tensor for {where}")
            elif len(got) > 1:
                problems.append(f"{where} is given more than once: {', '.join(p.key for p in got)}")
    return problems


def _check_experts(got: list[Piece], n_experts: int, where: str, gate_up: bool) -> list[str]:
    """One fused tensor, or exactly one tensor per expert (and per half of gate_up_proj)."""
    fused = [p for p in got if not p.transform.per_expert]
    per = [p for p in got if p.transform.per_expert]
    if fused and per:
        return [f"{where}: both fused and per-expert tensors are present"]
    if len(fused) > 1:
        return [f"{where} is given more than once: {', '.join(p.key for p in fused)}"]
    if fused:
        return []
    halves = ("gate_proj", "up_proj") if gate_up else ("down_proj",)
    have = {(p.expert, p.transform.name) for p in per}
    if len(have) != len(per):
        return [f"{where}: a per-expert tensor is given more than once"]
    missing = [f"{e}.{h}" for e in range(n_experts) for h in halves if (e, h) not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        return [f"missing tensor for {where}: experts {shown}"]
    return []


def _check_nvfp4(p: Piece, matrix: tuple[int, ...]) -> list[str]:
    """An NVFP4 matrix of on-disk shape `matrix` [out, in]: uint8 codes [out, in/2], E4M3 block scales
    [out, in/16] and a one-element float global scale, each present (docs/model.md 2.6)."""
    where = f"{p.file.path}: NVFP4 tensor {p.key!r}"
    if len(matrix) != 2 or not p.transform.kernel:
        return [f"{where} fills a parameter that is not one matrix ({p.transform.name}): NVFP4 is read per matrix"]
    out, d_in = matrix
    problems = []
    if d_in % 16:
        problems.append(f"{where}: input width {d_in} is not a multiple of 16")
    block, glob = nvfp4_names(p.key)
    want = [(p.key, p.file, "U8", (out, d_in // 2)), (*_named(p.scale, block), "F8_E4M3", (out, d_in // 16)),
            (*_named(p.global_scale, glob), "F32", None)]
    for name, f, dt, shape in want:
        if f is None:
            problems.append(f"{where} has no {name!r} beside it")
            continue
        got_dt, got = f.dtype_name(name), tuple(f.shape(name))
        ok_shape = (int(np.prod(got, dtype=np.int64)) == 1) if shape is None else got == shape
        if got_dt != dt or not ok_shape:
            problems.append(f"{f.path}: tensor {name!r} is {got_dt}{list(got)}, expected {dt}"
                            f"{list(shape) if shape else '[1]'} (NVFP4 {'codes' if name == p.key else 'scales'} of "
                            f"a [{out}, {d_in}] matrix)")
    return problems


def _named(ref: tuple[SafetensorsFile, str] | None, name: str) -> tuple[str, SafetensorsFile | None]:
    return (name, None) if ref is None else (ref[1], ref[0])
