"""Image preprocessing (docs/model.md 3.6 step 1) on synthetic images, and the "hf" pipeline against transformers'
Pixtral processor (the default pipeline is compared with mistral-common in test_mistral_common.py)."""

import numpy as np
import pytest
from PIL import Image

from mistral4_jax import InputError, ModelConfig
from mistral4_jax.text.images import CLIP_MEAN, CLIP_STD, ImageConfig, batch_images, image_token_ids, load_image, preprocess, token_grid

CFG = ImageConfig()  # 1540, patch 14, merge 2: 28 pixels per token


@pytest.mark.parametrize("size,grid", [
    ((1540, 1540), (55, 55)),   # docs/model.md 3.6 example: 3025 [IMG]
    ((1024, 768), (37, 28)),    # docs/model.md 3.6 example: resized to 1036x784
    ((28, 28), (1, 1)),
    ((29, 28), (2, 1)),
    ((1, 1), (1, 1)),
    ((3080, 1540), (55, 28)),   # ratio 2 -> 1540x770
    ((1600, 1048), (55, 37)),   # 1048 / (1600/1540) = 1008.7 -> round 1009 -> 37 rows (HF floors to 1008: 36)
    ((3100, 1), (55, 1)),       # 1 / (3100/1540) = 0.497 -> round 0, clamped to 1 pixel as mistral-common does
    ((1, 3100), (1, 55)),
])
def test_token_grid(size, grid):
    assert token_grid(*size, CFG) == grid


def test_token_grid_hf_floors_and_refuses_what_floors_to_nothing():
    hf = ImageConfig(processor="hf")
    assert token_grid(1600, 1048, hf) == (55, 36)  # floor(1008.7) = 1008 = 36 * 28
    with pytest.raises(InputError, match="3100x1 image scales to 1540x0 pixels"):
        token_grid(3100, 1, hf)
    with pytest.raises(InputError, match="processor must be one of"):
        ImageConfig(processor="pil")


def test_config_from_model():
    cfg = ModelConfig.tiny()
    assert ImageConfig.from_model_config(cfg) == ImageConfig(112, 14, 2)
    assert ImageConfig.from_model_config(ModelConfig.mistral_small_4()) == CFG


def test_shape_and_constant_colour():
    img = np.zeros((768, 1024, 3), np.uint8)
    img[...] = (10, 128, 250)
    x = preprocess(img, CFG)
    assert x.shape == (3, 784, 1036) and x.dtype == np.float32
    want = (np.array([10, 128, 250]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    # OpenCV's separable bicubic sums 4 + 4 float32 products of a pixel <= 255: 8 roundings of 2^-24 * 255,
    # then /255 and /std; plus float32 rounding of the normalisation itself (rtol).
    atol = 8 * 2.0**-24 * 255 / (255 * min(CLIP_STD))
    np.testing.assert_allclose(x.reshape(3, -1).min(1), want, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(x.reshape(3, -1).max(1), want, rtol=1e-6, atol=atol)


def test_rgba_composited_on_white():
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[:, :28] = (0, 0, 0, 0)        # fully transparent black -> white
    rgba[:, 28:] = (0, 0, 0, 255)      # opaque black stays black
    x = preprocess(rgba, CFG)
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    black = -np.array(CLIP_MEAN) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[:, :, :28].reshape(3, -1).T, np.broadcast_to(white, (56 * 28, 3)), rtol=1e-6)
    np.testing.assert_allclose(x[:, :, 28:].reshape(3, -1).T, np.broadcast_to(black, (56 * 28, 3)), rtol=1e-6)
    la = Image.new("LA", (10, 10), (0, 0))  # grey + alpha, transparent -> white
    assert np.asarray(load_image(la)).min() == 255


def test_matches_transformers_pixtral_processor(tmp_path):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (200, 300, 3), dtype=np.uint8),   # upscaled to 224x308
            rng.integers(0, 256, (100, 57, 4), dtype=np.uint8),    # RGBA
            rng.integers(0, 256, (900, 1700, 3), dtype=np.uint8)]  # downscaled (floor and round agree here)
    Image.fromarray(imgs[0]).save(tmp_path / "a.png")
    proc = PixtralImageProcessorPil(patch_size={"height": 28, "width": 28}, size={"longest_edge": 1540})
    ref = proc([Image.fromarray(a) for a in imgs], return_tensors="np")
    hf = ImageConfig(processor="hf")
    pv, sizes = batch_images([preprocess(tmp_path / "a.png", hf), preprocess(imgs[1], hf), preprocess(imgs[2], hf)])
    np.testing.assert_array_equal(sizes, np.asarray(ref["image_sizes"]))
    assert pv.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5)


def test_batch_padding_and_token_block():
    a, b = np.ones((3, 56, 28), np.float32), np.full((3, 28, 84), 2, np.float32)
    pv, sizes = batch_images([a, b])
    assert pv.shape == (2, 3, 56, 84) and sizes.tolist() == [[56, 28], [28, 84]]
    assert (pv[0, :, :, 28:] == 0).all() and (pv[1, :, 28:] == 0).all() and (pv[1, :, :28] == 2).all()
    assert image_token_ids(3, 2, 10, 12, 13) == [10, 10, 10, 12, 10, 10, 10, 13]


def test_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read image file"):
        preprocess(tmp_path / "nope.png", CFG)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InputError, match="bad.png"):
        preprocess(tmp_path / "bad.png", CFG)
    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), np.float32), CFG)
    with pytest.raises(InputError, match="file path, a PIL image or a uint8 array"):
        preprocess([[1, 2]], CFG)
