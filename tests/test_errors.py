"""Bad checkpoints and inputs get one clear error naming the file, tensor or argument."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mistral4_jax import CheckpointError, InputError, ModelConfig, from_pretrained
from mistral4_jax.demo import synthetic


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ok") / "m", ModelConfig.tiny(), fp8=False)


@pytest.fixture(scope="module")
def model(ckpt):
    return from_pretrained(ckpt, dtype="float32")


def _copy(ckpt, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(ckpt, dst)
    return dst


def _edit(path, fn):
    (f,) = sorted(path.glob("*.safetensors"))
    tensors = dict(load_file(str(f)))
    fn(tensors)
    save_file(tensors, str(f))


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nope")


def test_no_config(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(d)


def test_no_weights(ckpt, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_pretrained(d)


def test_pickle_files_are_refused(ckpt, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never loaded"):
        from_pretrained(d)


def test_wrong_shape_names_the_tensor(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    name = "language_model.model.layers.1.self_attn.o_proj.weight"
    _edit(d, lambda t: t.__setitem__(name, np.zeros((3, 3), t[name].dtype)))
    with pytest.raises(CheckpointError, match=f"'{name}'.*shape \\[3, 3\\], expected \\[64, 64\\]"):
        from_pretrained(d)


def test_missing_and_unexpected_are_listed_together(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)

    def edit(t):
        del t["language_model.model.layers.0.mlp.gate.weight"]
        del t["vision_tower.ln_pre.weight"]
        t["language_model.model.layers.0.mystery.weight"] = np.zeros(2, np.float32)

    _edit(d, edit)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d)
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing tensor for language_model/layers/mlp/gate/kernel (layer 0)" in msg
    assert "missing tensor for vision_tower/ln_pre/weight" in msg
    assert "unexpected tensor 'language_model.model.layers.0.mystery.weight'" in msg


def test_truncated_file(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (f,) = sorted(d.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated file"):
        from_pretrained(d)


def test_fp8_without_scale(tmp_path):
    from safetensors.torch import load_file as load_torch, save_file as save_torch  # numpy cannot read FP8

    d = synthetic.write_checkpoint(tmp_path / "m", ModelConfig.tiny(), fp8=True)
    (f,) = sorted(d.glob("*.safetensors"))
    tensors = load_torch(str(f))
    del tensors["language_model.model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_torch(tensors, str(f))
    with pytest.raises(CheckpointError, match="FP8 tensor 'language_model.model.layers.0.self_attn.o_proj.weight'"):
        from_pretrained(d)


def test_image_token_count_mismatch(model):
    px = np.zeros((1, 3, 56, 56), np.float32)  # 2 x 2 merged tokens
    ids = np.asarray([[1, 10, 10, 10, 2]])
    with pytest.raises(InputError, match="3 image tokens .* 4 features"):
        model(ids, px, [(56, 56)])


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(InputError, match=r"input_ids\[0, 2\] = 5000 is outside the vocabulary \[0, 1024\)"):
        model(np.asarray([[1, 2, 5000]]))


def test_bad_pixel_values_shape(model):
    with pytest.raises(InputError, match="pixel_values must be"):
        model(np.asarray([[1, 2]]), np.zeros((3, 56, 56), np.float32))


def test_bad_dtype_argument(ckpt):
    with pytest.raises(ValueError, match="dtype must be one of"):
        from_pretrained(ckpt, dtype="int8")


def test_demo_fine_tunes_exports_and_converts(tmp_path):
    """The demo's default fine-tuning branch (`demo --train-steps N`, N > 0): the random model is trained, exported
    with its tokenizer to DIR/trained and that is converted. The rest of the demo (the batched chat and scoring
    on the converted model) is the same code with or without training: test_frontdoor runs `demo` through the CLI
    with --train-steps 0. Two steps take this branch as the default 40 do."""
    from mistral4_jax.demo.tiny import build_tiny
    from mistral4_jax.text.tokenizer import Tokenizer

    said = []
    paths = build_tiny(tmp_path, train_steps=2, log=said.append)
    assert any(m.startswith("fine-tuned 2 steps") for m in said), said
    assert {"config.json", "tekken.json"} <= {p.name for p in (tmp_path / "trained").iterdir()}
    assert any((tmp_path / "trained").glob("*.safetensors"))
    assert "converted trained/" in said[-1], said
    model = from_pretrained(paths["orbax"], dtype="float32")
    ids = Tokenizer.from_pretrained(paths["orbax"]).encode("Hello", add_bos=True)
    assert np.isfinite(np.asarray(model(np.asarray([ids])))).all()
