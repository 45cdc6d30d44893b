"""Image preprocessing for the Pixtral tower (docs/model.md 3.6 step 1).

An image becomes a float32 CHW array whose sides are multiples of `patch_size * spatial_merge_size`
(28 for the released model), plus the `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` token block that stands for
it in the prompt. Several images are zero-padded bottom/right to one `[N, 3, H, W]` array with their
true `image_sizes`, as the HF `PixtralImageProcessor` pads a batch.

Two pipelines, chosen by `ImageConfig.processor`:
- "mistral-common" (default): exactly mistral-common's `ImageEncoder`, the preprocessing the model was
  trained with and vLLM / SGLang serve: sides scaled by Python's `round` (at least 1 pixel), OpenCV
  bicubic resize on float32 pixels, transparency pasted onto white.
- "hf": transformers' `PixtralImageProcessor`: sides floored, PIL bicubic resize on uint8 pixels,
  transparency alpha-composited onto white. Resized pixels differ from mistral-common's by up to ~1.6
  in normalised units, so keep to one pipeline between training and inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError

# OpenAI CLIP statistics (mistral-common `DATASET_MEAN` / `DATASET_STD`), RGB order.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSORS = ("mistral-common", "hf")


@dataclass(frozen=True)
class ImageConfig:
    """What preprocessing needs from the model (longest side, patch and merge size) and the pipeline
    (`processor`, see the module docstring)."""

    image_size: int = 1540
    patch_size: int = 14
    spatial_merge_size: int = 2
    processor: str = "mistral-common"

    def __post_init__(self):
        if self.processor not in PROCESSORS:
            raise InputError(f"ImageConfig.processor must be one of {PROCESSORS}, got {self.processor!r}")

    @property
    def token_size(self) -> int:
        """Pixels per `[IMG]` token along each side (28 for the released model)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_model_config(cls, cfg, processor: str = "mistral-common") -> ImageConfig:
        """From a `ModelConfig` (its `vision` config and `spatial_merge_size`)."""
        if cfg.vision is None:
            raise InputError("this model has no vision_config: it cannot take images")
        return cls(cfg.vision.image_size, cfg.vision.patch_size, cfg.spatial_merge_size, processor)


def open_image(image: Any, what: str = "image") -> Image.Image:
    """A path, PIL image or uint8 array (HW, HWC with 3 or 4 channels) as a PIL image (any mode)."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                img = f.copy()
        except (OSError, ValueError) as e:
            raise InputError(f"{what}: cannot read image file {os.fspath(image)!r}: {e}") from None
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(f"{what}: an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], "
                             f"got {image.dtype} {image.shape}")
        img = Image.fromarray(image)
    else:
        raise InputError(f"{what}: expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError(f"{what}: image has no pixels ({img.width}x{img.height})")
    return img


def load_image(image: Any, what: str = "image", processor: str = "mistral-common") -> Image.Image:
    """`open_image`, then RGB with transparency on white, as the chosen pipeline does it
    (mistral-common `_convert_to_rgb` pastes through the alpha mask; transformers alpha-composites)."""
    img = open_image(image, what)
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    if processor == "hf":
        return Image.alpha_composite(white, rgba).convert("RGB")
    white.paste(rgba, (0, 0), rgba)
    return white.convert("RGB")


def token_grid(width: int, height: int, cfg: ImageConfig) -> tuple[int, int]:
    """(W_t, H_t): `[IMG]` tokens per row and rows for an image of `width` x `height` pixels.

    ratio = max(w, h) / image_size; if ratio > 1 the sides become side / ratio, rounded as
    mistral-common does (Python's round, at least 1 pixel) or floored as transformers does (where an
    extreme aspect ratio leaves no pixel: an InputError). Then W_t = (w - 1) // token_size + 1.
    """
    ratio = max(width / cfg.image_size, height / cfg.image_size)
    if ratio > 1:
        if cfg.processor == "hf":
            w, h = math.floor(width / ratio), math.floor(height / ratio)
            if w < 1 or h < 1:
                raise InputError(f"a {width}x{height} image scales to {w}x{h} pixels with processor='hf' "
                                 f"(longest side {cfg.image_size}): no pixel is left on one side")
            width, height = w, h
        else:
            width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    t = cfg.token_size
    return (width - 1) // t + 1, (height - 1) // t + 1


def normalize(x_hwc: np.ndarray) -> np.ndarray:
    """float32 HWC pixels in [0, 255] -> CHW, /255 then CLIP mean/std, in float32 (as mistral-common)."""
    x_hwc = np.asarray(x_hwc, np.float32) / np.float32(255.0)
    x_hwc = (x_hwc - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x_hwc.transpose(2, 0, 1))


def preprocess(image: Any, cfg: ImageConfig, what: str = "image") -> np.ndarray:
    """One image -> float32 [3, 28*H_t, 28*W_t]: bicubic resize, /255, CLIP mean/std (docs/model.md 3.6)."""
    img = load_image(image, what, cfg.processor)
    cols, rows = token_grid(img.width, img.height, cfg)
    size = (cols * cfg.token_size, rows * cfg.token_size)
    if cfg.processor == "hf":  # PIL bicubic on uint8, as the HF processor does
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return normalize(np.asarray(img))
    import cv2  # mistral-common resizes float32 pixels with OpenCV (always, even to the same size)

    return normalize(cv2.resize(np.asarray(img, dtype=np.float32), size, interpolation=cv2.INTER_CUBIC))


def image_token_ids(cols: int, rows: int, img: int, img_break: int, img_end: int) -> list[int]:
    """The prompt block of one image: `rows` rows of `cols` x `[IMG]`, each closed by `[IMG_BREAK]`,
    the last by `[IMG_END]` (docs/model.md 3.7 step 4)."""
    ids = ([img] * cols + [img_break]) * rows
    ids[-1] = img_end
    return ids


def batch_images(images_chw: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad CHW images bottom/right to the largest height and width.

    Returns pixel_values float32 [N, 3, H_max, W_max] and image_sizes int32 [N, 2] as (height, width).
    """
    if not images_chw:
        raise InputError("batch_images: no images")
    sizes = np.asarray([x.shape[1:] for x in images_chw], dtype=np.int32)
    h, w = sizes.max(axis=0)
    out = np.zeros((len(images_chw), images_chw[0].shape[0], h, w), np.float32)
    for i, x in enumerate(images_chw):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out, sizes
