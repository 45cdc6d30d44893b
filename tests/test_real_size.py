"""`bench/real_size.py` at 2 layers of the real width (hidden 4096, 128 experts, vocabulary 131072): the FP8
batch-1 decode step reads what the model must read (non-expert weights once, 4 experts per layer) and no more
than 1.3x of it, and XLA:CPU leaves no f16/f8 copy of an expert stack in it. Nothing model-sized is allocated."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import real_size  # noqa: E402


def test_fp8_decode_reads_only_the_routed_experts():
    rows = real_size.main(["--layers", "2", "--mesh", "1", "--weights", "fp8", "--programs", "decode B=1"])
    (row,) = rows
    assert row.params > 8  # the real width: 2 layers of 128 experts hold ~7.5 GiB of E4M3 bits
    assert 0.99 < row.reads / row.must < 1.3, (row.reads, row.must)
    assert "f16/f8" not in row.note
    # reading every expert of both layers would be 7.5 GB more: the check tells the two apart
    assert row.reads < row.must + 0.5
