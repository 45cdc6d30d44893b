"""The same model on one device, on an 8-device mesh, and on two processes (jax.distributed)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import reference as R
from mistral4_jax import from_pretrained, generate, score
from mistral4_jax.sharding import make_mesh

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
PROMPTS = [[1, 5, 9, 30, 31], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 2]]
REQUESTS = [([1, 2, 3], [4, 5]), ([1, 9, 8, 7, 6, 5], [40, 41, 42])]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ref = R.build(R.hf_config(), seed=81)
    return R.save(ref, tmp_path_factory.mktemp("shard"), fp8=True)


@pytest.fixture(scope="module")
def single(ckpt):
    jm = from_pretrained(ckpt, dtype="float32")
    ids = np.random.default_rng(82).integers(0, 256, (2, 24))
    return dict(logits=np.asarray(jm(ids)), ids=ids, gen=generate(jm, PROMPTS, max_new_tokens=6, stop_tokens=[]),
                scores=score(jm, REQUESTS))


@needs8
def test_mesh_model_equals_single_device(ckpt, single):
    mesh = make_mesh(data=2, expert=2, tensor=2)
    jm = from_pretrained(ckpt, dtype="float32", mesh=mesh)
    experts = jm.language_model.layers.mlp.experts.gate_up_proj[...]
    assert {s.data.shape[1] for s in experts.addressable_shards} == {experts.shape[1] // 2}
    assert {s.data.shape[1] for s in jm.lm_head.kernel[...].addressable_shards} == {128}
    got = np.asarray(jm(single["ids"]))
    assert R.rel_err(got, single["logits"]) < 1e-5
    assert generate(jm, PROMPTS, max_new_tokens=6, stop_tokens=[]) == single["gen"]
    streamed = []  # the streaming callback works on a mesh too: one call per step, in order
    generate(jm, PROMPTS, max_new_tokens=6, stop_tokens=[], callback=lambda i, toks: streamed.append((i, toks)))
    assert [i for i, _ in streamed] == list(range(6))
    assert [[toks[r] for _, toks in streamed] for r in range(len(PROMPTS))] == single["gen"]
    for (a, ga), (b, gb) in zip(score(jm, REQUESTS), single["scores"]):
        assert abs(a - b) < 1e-4 and ga == gb


def test_two_processes_with_jax_distributed(ckpt, single, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.json"
    spec = {"prompts": PROMPTS, "max_new": 6, "requests": REQUESTS}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DIST_SPEC=json.dumps(spec),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(ckpt), str(port), str(i), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    res = json.loads(out.read_text())
    assert res["local_experts"] == [4]  # 8 experts over expert=2
    assert res["generations"] == single["gen"]
    for (a, ga), (b, gb) in zip(res["scores"], single["scores"]):
        assert abs(a - b) < 1e-4 and ga == gb
