"""Lazy, validated access to `.safetensors` files as numpy arrays, FP8 included.

The `safetensors` package's numpy backend cannot return float8 tensors, which the released
checkpoint is made of, so the (simple, documented) file format is read here: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data. Tensors are
memory-mapped views: reading a slice reads only those bytes, and nothing is ever unpickled.
Writing uses the `safetensors` package (`save_file`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FP8 = ("F8_E4M3", "F8_E5M2")
# Weight files in pickle formats: never opened, since unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """One `.safetensors` file: `keys()`, `dtype(name)`, `shape(name)` and `get(name)` (a lazy view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (claims {n} bytes, file has {size})")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dt, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            if dt not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dt}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} header says {end - begin} bytes, its shape "
                                      f"{list(shape)} x {dt} needs {nbytes}")
            if end > data_size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data, "
                                      f"which holds only {data_size} bytes")
            self._info[name] = (dt, shape, begin, end)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def dtype_name(self, name: str) -> str:
        return self._info[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def nbytes(self, name: str) -> int:
        _, _, b, e = self._info[name]
        return e - b

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no bytes are read until used)."""
        dt, shape, begin, end = self._info[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start)
        return self._mmap[begin:end].view(DTYPES[dt]).reshape(shape)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """A private copy of the tensor (or of the `rows` of its leading axis) read with plain file reads:
        unlike `get`, no pages stay mapped, so streaming a large file this way does not grow the process's
        resident memory."""
        dt, shape, begin, end = self._info[name]
        if shape:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape = begin + start * row_bytes, begin + max(stop, start) * row_bytes, (
                max(stop - start, 0), *shape[1:])
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            x = np.fromfile(f, dtype=np.uint8, count=end - begin)
        if x.size != end - begin:
            raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} could not be read in full")
        return x.view(DTYPES[dt]).reshape(shape)

    def close(self):
        self._mmap = None


def indexed_shards(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` lists (its `weight_map` values), all present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e!r}; expected a 'weight_map' object)") from None
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index} lists shards that do not exist: {', '.join(missing)}")
    return files


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def check_shard_numbers(files: list[Path]) -> list[Path]:
    """`files` unchanged, after checking that every `NAME-0000i-of-0000n.safetensors` series among them is
    complete: without an index, a missing shard would otherwise surface only as missing tensors."""
    series: dict[tuple[str, str], set[int]] = {}
    for f in files:
        m = _SHARD.match(Path(f).name)
        if m:
            series.setdefault((m["stem"], m["n"]), set()).add(int(m["i"]))
    for (stem, n), have in sorted(series.items()):
        if len(have) < int(n):
            gaps = [i for i in range(1, min(int(n), 100_000) + 1) if i not in have]
            names = ", ".join(f"{stem}-{i:0{len(n)}d}-of-{n}.safetensors" for i in gaps[:8])
            raise CheckpointError(f"{Path(files[0]).parent}: shard file(s) missing (no index to say more): {names}"
                                  + (f" and {int(n) - len(have) - 8} more" if int(n) - len(have) > 8 else ""))
    return files


def pickle_files(d: Path) -> list[str]:
    """The names of the pickle-format weight files in directory `d`, sorted."""
    return sorted(p.name for p in d.iterdir() if p.name.endswith(PICKLE_SUFFIXES))


def pickle_refusal(d: Path, pickled: list[str]) -> str:
    """The message for a directory whose only weights are the pickle files `pickled`."""
    return (f"{d}: only pickle weight files ({', '.join(pickled)}); they are never loaded (unpickling runs "
            "arbitrary code). Provide the weights as .safetensors (for example with safetensors' `convert.py` or "
            "`save_pretrained(..., safe_serialization=True)`)")


def hf_weight_files(path: str | os.PathLike) -> list[Path]:
    """The .safetensors files of an HF checkpoint directory (index-listed shards or every file)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a checkpoint directory with config.json and "
                              "*.safetensors files)")
    index = d / "model.safetensors.index.json"
    if index.exists():
        return indexed_shards(index)
    files = sorted(d.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    if hf_files and (d / "params.json").exists():  # a full snapshot: the native copy sits beside the HF one
        files = hf_files
    if not files:
        pickled = pickle_files(d)
        if pickled:
            raise CheckpointError(pickle_refusal(d, pickled))
        raise CheckpointError(f"{d}: no *.safetensors weight files found")
    return check_shard_numbers(files)


def index_files(files) -> dict[str, SafetensorsFile]:
    """{tensor name: its file} over `files`; a name in two files is an error."""
    index: dict[str, SafetensorsFile] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.keys():
            if name in index:
                raise CheckpointError(f"tensor {name!r} appears in both {index[name].path} and {st.path}")
            index[name] = st
    return index
