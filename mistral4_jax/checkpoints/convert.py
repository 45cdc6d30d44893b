"""The conversion driver: source checks, streaming by group, progress, verification, atomic rename.

HF or Mistral-native safetensors -> the sharded Orbax layout of
`mistral4_jax.checkpoints.orbax`, in bounded memory.

    mistral4-jax convert SRC DST [--dtype bfloat16|float32|float8] [--experts nvfp4] [--experts-from DIR]
                                 [--overwrite] [--quiet]
    python -m convert SRC DST ...               (the same command; its flags are defined in cli.py)

NVFP4 weights (the NVFP4 release's experts) are written packed, whatever `--dtype`. `--experts nvfp4`
writes the routed experts as NVFP4, quantising them when the source holds them in another format (the FP8
release: with `--dtype float8`, the one-80-GB-card hybrid). `--experts-from DIR` takes the routed experts
from another safetensors checkpoint of the same model (the NVFP4 release beside the FP8 one: the same
hybrid, with the experts exactly as released).

Design card:
- Input is untrusted. Only `.safetensors` are read (headers validated, tensors memory-mapped); pickle
  files are refused. Every tensor is matched to a parameter slot and every shape checked against the
  config before the first byte of weights is read (`checkpoints.plan.plan_checkpoint`), so a bad source fails
  fast with one message naming file and tensor.
- Bounded memory: the output is written one group at a time (the unstacked parameters, then each
  decoder / vision layer), each group read slot by slot from the memory-mapped source, saved as its own
  Orbax checkpoint, and released. Peak host memory is about one decoder layer, whatever the depth.
- Safe output: everything goes to a hidden sibling `.DST.partial-PID`, is verified (every array's shape
  and dtype, read back from Orbax metadata), and only then renamed to DST. A crash or kill leaves no DST;
  stale partial directories of dead runs are removed by the next run. An existing DST is replaced only
  with --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import CheckpointError, Mistral4Error
from . import orbax as ck
from .load import expert_paths, experts_plan, open_safetensors
from .native import is_native_dir
from .read import param_shapes, stacked_paths, stored_kinds
from .safetensors_io import pickle_files, pickle_refusal
from ..text.tokenizer import ASSET_FILES

DTYPES = ("bfloat16", "float32", "float8")
EXPERTS = ("nvfp4",)


class ConvertError(Mistral4Error):
    """The conversion cannot start or finish (bad source layout, destination exists, ...)."""


def source_layout(src: Path) -> str:
    """'hf' or 'native'; raises naming what was found when it is neither."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (expected an HF checkpoint directory with config.json and "
                           "*.safetensors, or a Mistral-native one with params.json and consolidated*.safetensors)")
    names = sorted(p.name for p in src.iterdir())
    pickled = pickle_files(src)
    has_st = any(n.endswith(".safetensors") for n in names)
    if pickled and not has_st:
        raise ConvertError(pickle_refusal(src, pickled))
    if is_native_dir(src):
        return "native"
    if (src / "config.json").exists() and has_st:
        return "hf"
    raise ConvertError(f"{src}: neither an HF checkpoint (config.json + *.safetensors) nor a Mistral-native one "
                       f"(params.json + consolidated*.safetensors); found: {', '.join(names[:20]) or 'nothing'}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(dst: Path) -> None:
    """Remove `.DST.partial-PID` / `.DST.old-PID` siblings left by runs that no longer exist."""
    for p in dst.parent.glob(f".{dst.name}.*-*"):
        kind, _, pid = p.name[len(dst.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConvertError(f"{dst}: the destination must not be, contain or lie inside the source {src}")
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst} already exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        raise ConvertError(f"{dst.parent}: the destination's parent directory does not exist")


def convert(src, dst, dtype: str = "bfloat16", overwrite: bool = False, quiet: bool = False,
            experts: str | None = None, experts_from=None) -> Path:
    """Convert the checkpoint directory `src` (HF or native layout) to the Orbax layout at `dst`.

    dtype: "bfloat16" / "float32" dequantise FP8 weights; "float8" keeps E4M3 weights and their scales
    (other weights in bfloat16). NVFP4 weights stay packed. experts: "nvfp4" writes the routed experts as
    NVFP4 (quantised when stored otherwise). experts_from: a safetensors checkpoint of the same model whose
    routed experts are written instead of `src`'s. Returns `dst`. Raises a `Mistral4Error` naming the file /
    tensor at fault; `dst` then does not exist (or is untouched, when it existed)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if experts not in (None, *EXPERTS):
        raise ConvertError(f"--experts must be one of {', '.join(EXPERTS)}, got {experts!r}")
    src, dst = Path(src), Path(dst)
    layout = source_layout(src)
    if experts_from is not None:
        source_layout(Path(experts_from))
    _check_destination(src, dst, overwrite)
    _clean_stale(dst)
    t0 = time.perf_counter()
    load_dtype = "bfloat16" if dtype == "float8" else dtype
    cfg, model, plan = open_safetensors(src, load_dtype)
    if experts_from is not None:
        plan = {**plan, **experts_plan(experts_from, model, load_dtype)}
    shapes = param_shapes(model)
    packed = set(stored_kinds(plan)) | (expert_paths(model) if experts == "nvfp4" else set())
    specs = ck.array_specs(plan, shapes, dtype, packed)
    groups = ck.groups(shapes, stacked_paths(model))
    total = sum(ck.slot_bytes(ps) for ps in plan.values())
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"convert: {src} ({layout} layout, {len(groups)} groups, {total / 2**30:.2f} GiB to read) -> {dst} ({dtype})")

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "params").mkdir(parents=True)
        _write_groups(tmp, groups, plan, shapes, dtype, total, quiet, packed)
        _write_config(src, tmp, layout, cfg, dtype)
        for name in ASSET_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        problems = ck.verify(tmp, specs)
        if problems:
            raise CheckpointError(f"{dst}: the written checkpoint failed verification:\n  " + "\n  ".join(problems[:50]))
        # The marker is what makes a directory a converted checkpoint: written last, then renamed into place.
        overrides = {k: v for k, v in (("apply_yarn_mscale", cfg.text.apply_yarn_mscale),) if v}
        ck.write_marker(tmp, overrides, dtype, specs)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # --overwrite of a plain file (or a link): rmtree would leave it behind
                old.unlink()
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    say(f"convert: wrote {dst} in {dt:.1f}s ({total / 1e6 / max(dt, 1e-9):.1f} MB/s of source read)")
    return dst


def _write_groups(tmp: Path, groups, plan, shapes, dtype: str, total: int, quiet: bool, packed) -> None:
    from tqdm import tqdm

    np_dtype = "float8" if dtype == "float8" else dtype
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet, file=sys.stderr,
              desc="convert", dynamic_ncols=True) as bar:
        for gdir, members in groups.items():
            bar.set_postfix_str(gdir)
            tree = ck.group_tree(members, plan, shapes, np_dtype, progress=bar.update, nvfp4_paths=packed)
            ck.save_tree(tmp / "params" / gdir, tree)
            del tree


def _write_config(src: Path, tmp: Path, layout: str, cfg, dtype: str) -> None:
    hf = cfg.to_hf_dict()
    if dtype != "float8":
        hf.pop("quantization_config", None)
    if layout == "hf":  # keep the source's own fields (ours are a subset), with the quantization as written
        try:
            orig = json.loads((src / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            orig = None
        if isinstance(orig, dict):
            if dtype != "float8":
                orig.pop("quantization_config", None)
            hf = orig
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
