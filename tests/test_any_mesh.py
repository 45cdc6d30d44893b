"""A mesh from `jax.make_mesh` (Explicit axes on jax >= 0.9) runs the model as `sharding.make_mesh`'s does."""

import jax
import numpy as np
import pytest
from flax import nnx

import reference as R
from mistral4_jax import InputError, from_pretrained, generate, score
from mistral4_jax.sharding import as_auto_mesh, make_mesh
from mistral4_jax.train import TrainConfig, Trainer
from test_train import _examples, _model, step_mismatch

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
PROMPTS = [[1, 5, 9, 30, 31], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
REQUESTS = [([1, 2, 3], [4, 5]), ([1, 9, 8, 7, 6, 5], [40, 41, 42])]
SHAPE = (2, 2, 2)  # data, expert, tensor: every axis split


def explicit_mesh():
    mesh = jax.make_mesh(SHAPE, ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    return mesh


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return R.save(R.build(R.hf_config(), seed=83), tmp_path_factory.mktemp("anymesh"))


def _run(ckpt, mesh):
    jm = from_pretrained(ckpt, dtype="float32", mesh=mesh)
    ids = np.random.default_rng(84).integers(0, 256, (2, 24))
    return dict(logits=np.asarray(jm(ids)), gen=generate(jm, PROMPTS, max_new_tokens=5, stop_tokens=[]),
                scores=score(jm, REQUESTS))


@needs8
def test_explicit_and_auto_meshes_give_the_single_device_results(ckpt):
    one, auto, explicit = (_run(ckpt, m) for m in (None, make_mesh(*SHAPE[1:2], data=SHAPE[0], tensor=SHAPE[2]),
                                                   explicit_mesh()))
    # Explicit axes are turned into Auto ones over the same devices: the very same programs
    np.testing.assert_array_equal(explicit["logits"], auto["logits"])
    assert explicit["gen"] == auto["gen"] and explicit["scores"] == auto["scores"]
    # and those match one device up to float32 reordering across shards (as in test_sharding)
    assert R.rel_err(explicit["logits"], one["logits"]) < 1e-5
    assert explicit["gen"] == one["gen"]
    for (a, ga), (b, gb) in zip(explicit["scores"], one["scores"]):
        assert abs(a - b) < 1e-4 and ga == gb


@needs8
def test_train_step_on_an_explicit_mesh(tmp_path):
    cfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, batch_size=8, max_len=16)
    out = {}
    # (the Auto make_mesh step against one device is test_train's test_step_on_8_devices_equals_1_device)
    for name, mesh in (("one", None), ("explicit", jax.make_mesh(
            (1, 8, 1), ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3))):
        tr = Trainer(_model(), _examples(), cfg, tmp_path / name, mesh=mesh)
        out[name] = (tr.train_step(), jax.tree.map(np.asarray, tr.state["trainable"]), tr.seq_len)
    (m1, p1, seq_len), (_, pe, _) = out["one"], out["explicit"]
    init = jax.tree.map(np.asarray, nnx.state(_model(), nnx.Param))
    scale, n_summed = min(m1["grad_norm"], cfg.clip_norm), cfg.batch_size * seq_len
    for (path, a), (_, e), (_, c) in zip(*(nnx.to_flat_state(t) for t in (p1, pe, init))):
        assert step_mismatch(a.get_value(), e.get_value(), c.get_value(), m1["lr"], scale, n_summed) <= 1, path


def test_meshes_that_cannot_work_are_refused_with_what_to_pass():
    devices = np.asarray(jax.devices()[:1]).reshape(1, 1)
    with pytest.raises(InputError, match=r"\['x'\] are not mesh axes.*name them from \('data', 'expert', 'tensor'\)"):
        as_auto_mesh(jax.sharding.Mesh(devices, ("x", "expert")))
    with pytest.raises(InputError, match="must be a jax.sharding.Mesh"):
        as_auto_mesh((1, 8, 1))
    assert as_auto_mesh(None) is None
    auto = make_mesh(1, devices=jax.devices()[:1])
    assert as_auto_mesh(auto) is auto
