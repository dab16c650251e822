"""The reference's image transforms (mmseg 0.17 `datasets/pipelines/transforms.py`).

Each works on one record and draws its randomness from the `np.random.Generator` it is given,
so what happens to a record depends only on the seed Grain derives for its pipeline position.
Images are uint8 RGB until `normalize`; labels are int32 train ids with IGNORE_LABEL.

Where the reference calls OpenCV (through mmcv), so do we, for the same numbers: the image
resize (cv2.INTER_LINEAR, OpenCV's fixed-point arithmetic) and the 8-bit RGB<->HSV
conversions of PhotoMetricDistortion (H in 0..179). The label resize states
cv2.INTER_NEAREST's rule in NumPy (source index floor(dst * src_size / dst_size); identical
to OpenCV's, and exact for any integer label type).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cv2
import numpy as np

from mlseg_jax import IGNORE_LABEL

# One OpenCV thread per caller: the parallelism is Grain's reading threads and worker
# processes, which OpenCV's own pool per process would oversubscribe (mmseg does the same).
cv2.setNumThreads(1)

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1)


# ---------------------------------------------------------------------------------------------
# Resize.

def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
  """mmcv's keep-ratio rule: the largest size with long side <= max(scale), short side <=
  min(scale); returns (new_h, new_w) rounded half up as mmcv does."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def sample_scale(rng: np.random.Generator, img_scale: Sequence[int],
                 ratio_range: Sequence[float]) -> tuple[int, int]:
  """mmseg's `random_sample_ratio`: img_scale times a ratio drawn uniformly from the range."""
  lo, hi = ratio_range
  ratio = rng.random() * (hi - lo) + lo
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def resize_image(image: np.ndarray, out_h: int, out_w: int, window: Box | None = None):
  """Bilinear resize of uint8 (H, W, C) to (out_h, out_w) as mmcv.imresize does
  (cv2.INTER_LINEAR), or only the `window` (y0, y1, x0, x1) of it."""
  out = cv2.resize(np.ascontiguousarray(image), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  if out.ndim == 2:  # OpenCV drops a single channel.
    out = out[..., None]
  if window is not None:
    y0, y1, x0, x1 = window
    out = out[y0:y1, x0:x1]
  return out


def resize_label(label: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """cv2.INTER_NEAREST: output pixel d takes source pixel floor(d * in / out)."""
  in_h, in_w = label.shape[:2]
  rows = np.minimum(np.floor(np.arange(out_h) * (1.0 / (out_h / in_h))).astype(np.int64),
                    in_h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (1.0 / (out_w / in_w))).astype(np.int64),
                    in_w - 1)
  return np.take(np.take(label, rows, axis=0), cols, axis=1)  # 2x faster than one 2-D index.


# ---------------------------------------------------------------------------------------------
# Crop, flip, pad.

def sample_crop_box(rng: np.random.Generator, shape: Sequence[int],
                    crop_size: Sequence[int]) -> Box:
  """mmseg's `get_crop_bbox`: a uniform offset in each margin (0 where the image is smaller)."""
  margin_h = max(shape[0] - crop_size[0], 0)
  margin_w = max(shape[1] - crop_size[1], 0)
  oy = int(rng.integers(0, margin_h + 1))
  ox = int(rng.integers(0, margin_w + 1))
  return oy, oy + crop_size[0], ox, ox + crop_size[1]


def crop_is_varied(label_crop: np.ndarray, cat_max_ratio: float,
                   ignore_label: int = IGNORE_LABEL) -> bool:
  """mmseg's acceptance test: more than one label value, none with cat_max_ratio or more of
  the pixels; `ignore_label` (RandomCrop's ignore_index in our ids) is not counted, every
  other value is, IGNORE_LABEL included when it is not the one left out."""
  counts = np.bincount(label_crop.ravel() + 1)  # IGNORE_LABEL (-1) lands in bin 0.
  if 0 <= ignore_label + 1 < len(counts):
    counts[ignore_label + 1] = 0
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def choose_crop_box(rng: np.random.Generator, label: np.ndarray, crop_size: Sequence[int],
                    cat_max_ratio: float, ignore_label: int = IGNORE_LABEL) -> Box:
  """RandomCrop's box: with cat_max_ratio < 1, up to 10 draws are tested and the first that
  passes is kept; after 10 failures an 11th draw is taken untested (the reference's loop)."""
  box = sample_crop_box(rng, label.shape, crop_size)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      y0, y1, x0, x1 = box
      if crop_is_varied(label[y0:y1, x0:x1], cat_max_ratio, ignore_label):
        break
      box = sample_crop_box(rng, label.shape, crop_size)
  return box


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                prob: float = 0.5):
  """Horizontal flip of image and label together with probability `prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def pad_to(image: np.ndarray, label: np.ndarray | None, size: Sequence[int]):
  """Pad bottom and right up to `size` (h, w): image with 0, label with IGNORE_LABEL."""
  ph, pw = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
  if ph or pw:
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
    if label is not None:
      label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_LABEL)
  return image, label


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per RGB channel, float32 (mmcv multiplies by 1 / std)."""
  mean = np.asarray(mean, np.float32)
  inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
  out = image.astype(np.float32)
  np.subtract(out, mean, out=out)
  return np.multiply(out, inv_std, out=out)


# ---------------------------------------------------------------------------------------------
# Colour: PhotoMetricDistortion and OpenCV's 8-bit HSV.

def _cvt_color(pixels: np.ndarray, code: int) -> np.ndarray:
  """cv2.cvtColor on an (H, W, 3) uint8 image as it is (OpenCV's vectorised and scalar
  paths can differ by one level, and which pixels take which depends on the row length,
  so the image keeps its shape); other (..., 3) arrays go through as one row."""
  image = np.ascontiguousarray(pixels, np.uint8)
  if image.ndim != 3:
    image = image.reshape(1, -1, 3)
  return cv2.cvtColor(image, code).reshape(pixels.shape)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> HSV with H in 0..179 (mmcv.bgr2hsv on the BGR image)."""
  return _cvt_color(image, cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """uint8 HSV (H in 0..179) -> RGB (mmcv.hsv2bgr, channels reversed)."""
  return _cvt_color(hsv, cv2.COLOR_HSV2RGB)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """x * alpha + beta in float32, clipped to 0..255 and truncated to uint8 (the reference)."""
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(
      np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
  """Brightness, then contrast before or after (coin) the saturation and hue changes in HSV;
  each change applied with probability 1/2, as mmseg's PhotoMetricDistortion."""
  brightness_delta: int = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
      image = _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
      image = self._contrast(image, rng)
    if rng.integers(2):
      hsv = rgb_to_hsv(image)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
      image = hsv_to_rgb(hsv)
    if rng.integers(2):
      hsv = rgb_to_hsv(image)
      # numpy's randint(-d, d) as in the reference: -d..d-1.
      shift = int(rng.integers(-self.hue_delta, self.hue_delta))
      hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
      image = hsv_to_rgb(hsv)
    if not contrast_first:
      image = self._contrast(image, rng)
    return image

  def _contrast(self, image, rng):
    if rng.integers(2):
      return _convert(image, alpha=rng.uniform(*self.contrast_range))
    return image


# ---------------------------------------------------------------------------------------------
# The training and test pipelines of one record.

@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Resize (random ratio, keep ratio) -> RandomCrop(cat_max_ratio) -> RandomFlip ->
  PhotoMetricDistortion -> Normalize -> Pad, as every reference Segmenter config trains.

  The label is resized first and the crop chosen on it, then the image. Random draws happen
  in the reference's order: ratio, crop offsets, flip, photometric.
  """
  crop_size: tuple[int, int]
  img_scale: tuple[int, int]
  ratio_range: tuple[float, float] | None
  cat_max_ratio: float
  flip_prob: float
  photometric: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  crop_ignore_label: int = IGNORE_LABEL  # The label value cat_max_ratio's test leaves out.

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = record["image"], record["label"]
    scale = (sample_scale(rng, self.img_scale, self.ratio_range) if self.ratio_range
             else self.img_scale)
    h, w = rescale_size(*image.shape[:2], scale)
    label = resize_label(label, h, w)
    box = choose_crop_box(rng, label, self.crop_size, self.cat_max_ratio,
                          self.crop_ignore_label)
    y0, y1, x0, x1 = box
    label = label[y0:y1, x0:x1]
    box = (y0, min(y1, h), x0, min(x1, w))
    image = resize_image(image, h, w, window=box)
    image, label = random_flip(image, label, rng, self.flip_prob)
    if self.photometric:
      image = PhotoMetricDistortion()(image, rng)
    image = normalize(image, self.mean, self.std)
    image, label = pad_to(image, label, self.crop_size)
    return {"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label)}
