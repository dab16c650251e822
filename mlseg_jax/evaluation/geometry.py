"""Test-time geometry: the reference's scales, window grids and batch shapes, and the
interpolation matrices that take a window's logits to the original image.

The host side is Python ints and mmseg's own formulas (`num_windows`, `EvalSettings`). The
device side builds, from the true (traced) sizes, one (original, grid) matrix per window row
and one per window column (`axis_matrices`): mmseg's steps 3 and 4 (upsample each window's
logits to the window, sum into a canvas, divide by the count, resize to the original size)
are linear in the logits and its window grid is a product of a row grid and a column grid,
so they fold into these matrices and two einsums (`device.add_pass`). Nothing at the resized
resolution times the class count is ever materialised; the numbers are the reference's up
to float32 summation order.

Image sizes vary, so every image is assigned a static `BatchShape`: its original size
rounded up to a bucket (`bucket_length`: steps of at most 1/8 of the size) and per test pass
the window counts and window size (`PassShape`), so one compilation serves every image of a
bin.

A small image's window (a resized image smaller than the crop): with `masked_padding`
(heads that mask padding, the evaluators' default for them) it runs zero-padded to the crop
and the model is told each window's own token grid, so its logits are the unpadded
window's and one model program serves every window of a call size. Otherwise it is cut at
its size rounded up to `small_window_multiple` (the patch by default: exactly the
reference's model input, one model compilation per distinct small size). Its logits grid is
zero-padded to the crop's before the resize stages (`PassShape.at_crop`), so those compile
once per crop-sized pass shape whatever the small size. `small_window_multiple=0` pads
unmasked: the logits grid cells that cover the true image, ceil(size / 16), are resized to
the true size exactly as mmseg does, so only the extra zero tokens the backbone attends to
differ (every ADE20K image at ratios 0.5 and 0.75).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

# mmcv's keep-ratio rule, shared with training.
from mlseg_jax.data.transforms import rescale_size

_HIGHEST = jax.lax.Precision.HIGHEST


def scales_for_ratios(test_scale: Sequence[int], ratios: Sequence[float]) -> list[tuple[int, int]]:
  """MultiScaleFlipAug's scales: the test scale times each ratio, truncated."""
  return [(int(test_scale[0] * r), int(test_scale[1] * r)) for r in ratios]


def num_windows(size: int, crop: int, stride: int) -> int:
  """mmseg's window count along one axis (the last window is aligned to the border)."""
  return max(size - crop + stride - 1, 0) // stride + 1


def bucket_length(n: int) -> int:
  """Static length that holds `n`: n rounded up to a multiple of 1/8 of its power of two.

  At most 1/8 (12.5 %) padding per axis, and few distinct lengths (8 per octave), so few
  compilations over a dataset of varied image sizes.
  """
  if n <= 64:
    return 64
  step = 2 ** (int(math.floor(math.log2(n - 1))) - 3)
  return -(-n // step) * step


@dataclasses.dataclass(frozen=True, order=True)
class PassShape:
  """Static shapes of one test pass (one scale, flipped or not) for a bin of images."""
  rows: int  # windows per column (h_grids)
  cols: int  # windows per row (w_grids)
  window_h: int  # static window size fed to the model
  window_w: int
  canvas_h: int  # static size of the resized image buffer: crop + (windows - 1) * stride
  canvas_w: int

  def at_crop(self, crop: Sequence[int]) -> "PassShape":
    """The pass with crop-sized windows: the static shape of the stages after the model,
    one program for every small-window size of a bin (a small window's logits grid is
    zero-padded to the crop's, and the resize matrices give the padding weight 0)."""
    return dataclasses.replace(self, window_h=int(crop[0]), window_w=int(crop[1]))


@dataclasses.dataclass(frozen=True, order=True)
class BatchShape:
  """Static shapes shared by every image of a batch: original-size buffer and passes."""
  orig_h: int
  orig_w: int
  passes: tuple[PassShape, ...]

  def encode(self) -> tuple[int, ...]:
    out = [self.orig_h, self.orig_w]
    for p in self.passes:
      out += [p.rows, p.cols, p.window_h, p.window_w, p.canvas_h, p.canvas_w]
    return tuple(out)

  @staticmethod
  def decode(code: Sequence[int]) -> "BatchShape":
    code = [int(v) for v in code]
    passes = tuple(PassShape(*code[i:i + 6]) for i in range(2, len(code), 6))
    return BatchShape(code[0], code[1], passes)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Everything about how an image is tested, apart from the model."""
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  test_scale: tuple[int, int]
  crop: tuple[int, int]
  stride: tuple[int, int]
  ratios: tuple[float, ...] = (1.0,)
  flip: bool = False
  patch_size: int = 16
  # Resized images smaller than the crop: None (the patch size) or a multiple m of the patch
  # cuts their window at the image's size rounded up to m (m = patch: exactly mmseg's model
  # input, one model compilation per distinct small size); 0 pads it to the crop.
  small_window_multiple: int | None = None
  # The model masks padding (`DecoderSpec.masks_padding`): small windows run padded to the
  # crop, and `logits_fn` also takes `valid_grid=` (N, 2), each window's own token grid,
  # giving in those cells the unpadded window's logits: the reference's numbers at one
  # model program per call size. Needs small_window_multiple unset or 0.
  masked_padding: bool = False

  def __post_init__(self):
    # Plain tuples of Python numbers: the settings are a static (hashed) argument of jit.
    coerce = dict(mean=float, std=float, test_scale=int, crop=int, stride=int, ratios=float)
    for name, kind in coerce.items():
      value = getattr(self, name)
      try:
        object.__setattr__(self, name, tuple(kind(v) for v in value))
      except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
    object.__setattr__(self, "flip", bool(self.flip))
    object.__setattr__(self, "patch_size", int(self.patch_size))
    for name in ("mean", "std"):
      if len(getattr(self, name)) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std}")
    for name in ("test_scale", "crop", "stride"):
      v = getattr(self, name)
      if len(v) != 2 or min(v) <= 0:
        raise ValueError(f"{name} must be two positive ints (h, w), got {v}")
    if self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]:
      raise ValueError(f"stride {self.stride} larger than the crop {self.crop} leaves pixels "
                       "that no window covers")
    if not self.ratios or min(self.ratios) <= 0:
      raise ValueError(f"ratios must be positive, got {self.ratios}")
    object.__setattr__(self, "masked_padding", bool(self.masked_padding))
    m = self.small_window_multiple
    if self.masked_padding and m not in (None, 0):
      raise ValueError(f"masked_padding runs small windows padded to the crop: "
                       f"small_window_multiple={m} cuts them instead")
    m = 0 if self.masked_padding else self.patch_size if m is None else int(m)
    if m < 0 or m % self.patch_size:
      raise ValueError(f"small_window_multiple={m} must be 0 (pad to the crop) or a multiple "
                       f"of the patch size {self.patch_size}")
    object.__setattr__(self, "small_window_multiple", m)

  @property
  def scales(self) -> list[tuple[int, int]]:
    return scales_for_ratios(self.test_scale, self.ratios)

  @property
  def passes(self) -> list[tuple[tuple[int, int], bool]]:
    """(scale, flip) of every test pass, in MultiScaleFlipAug's order."""
    return [(s, f) for s in self.scales for f in self.flips]

  @property
  def flips(self) -> tuple[bool, ...]:
    return (False, True) if self.flip else (False,)

  def scale_index(self, p: int) -> int:
    """Which of `scales` test pass p resizes to (the flips of a scale share its image)."""
    return p // len(self.flips)

  def scaled_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
    """(h, w) at each of `scales` (not per pass)."""
    return [rescale_size(h, w, scale) for scale in self.scales]

  def _window_len(self, n: int, crop: int) -> int:
    m = self.small_window_multiple
    if n >= crop or m == 0:
      return crop
    return min(crop, -(-n // m) * m)

  def pass_shape(self, hs: int, ws: int) -> PassShape:
    (ch, cw), (sh, sw) = self.crop, self.stride
    rows, cols = num_windows(hs, ch, sh), num_windows(ws, cw, sw)
    return PassShape(rows, cols, self._window_len(hs, ch), self._window_len(ws, cw),
                     ch + (rows - 1) * sh, cw + (cols - 1) * sw)

  def batch_shape(self, h: int, w: int) -> BatchShape:
    passes = tuple(self.pass_shape(hs, ws) for hs, ws in self.scaled_sizes(h, w)
                   for _ in self.flips)
    return BatchShape(bucket_length(h), bucket_length(w), passes)


# MultiScaleFlipAug's ratios in every reference config with multi-scale testing.
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _linear_taps(in_size, out_size, out_len: int, flip=False):
  """Per output entry of a bilinear (align_corners=False) resize of `in_size` entries to
  `out_size` (traced sizes): the two source entries, the weight of the second, validity.

  PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` along one axis, computed in
  float32 step by step as ATen does. With `flip`, output o holds output out_size - 1 - o (a
  flip after the resize).
  """
  f32 = jnp.float32
  in_size = jnp.asarray(in_size, jnp.int32)
  out_size = jnp.asarray(out_size, jnp.int32)
  o = jnp.arange(out_len, dtype=jnp.int32)
  o_src = jnp.where(flip, out_size - 1 - o, o)
  scale = in_size.astype(f32) / jnp.maximum(out_size, 1).astype(f32)
  src = jnp.maximum(scale * (o_src.astype(f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = jnp.minimum(src.astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  frac = jnp.clip(src - i0.astype(f32), 0.0, 1.0)
  return i0, i1, frac, o < out_size


def interp_matrix(in_size, out_size, in_len: int, out_len: int, flip=False):
  """(out_len, in_len) matrix of the bilinear resize of `_linear_taps`; lengths are static,
  entries outside the true sizes are 0."""
  i0, i1, frac, valid = _linear_taps(in_size, out_size, out_len, flip)
  cols = jnp.arange(in_len, dtype=jnp.int32)[None, :]
  m = (jnp.where(cols == i0[:, None], (1 - frac)[:, None], 0.0)
       + jnp.where(cols == i1[:, None], frac[:, None], 0.0))
  return jnp.where(valid[:, None], m, 0.0)


def window_starts(size, crop: int, stride: int, n: int):
  """Start of each of `n` windows along an axis of true (traced) length `size`, and which of
  them exist for that length (mmseg's grid)."""
  i = jnp.arange(n, dtype=jnp.int32)
  y2 = jnp.minimum(i * stride + crop, size)
  y1 = jnp.maximum(y2 - crop, 0)
  valid = (i < jnp.maximum(size - crop + stride - 1, 0) // stride + 1) & (size > 0)
  return y1, valid


def axis_matrices(orig_size, scaled_size, flip, *, orig_len: int, canvas_len: int,
                  window_len: int, grid_len: int, n: int, crop: int, stride: int, patch: int):
  """Per window along one axis, the (orig_len, grid_len) matrix taking its logits grid to the
  original image: upsample to the window, place, divide by the count, resize to the original.
  Zero for windows that do not exist for this image."""
  starts, valid = window_starts(scaled_size, crop, stride, n)
  true_window = jnp.minimum(crop, scaled_size)
  pos = jnp.arange(canvas_len)[None, :]
  cover = (pos >= starts[:, None]) & (pos < starts[:, None] + true_window) & valid[:, None]
  count = cover.sum(0)
  inv_count = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1), 0.0)
  back = interp_matrix(scaled_size, orig_size, canvas_len, orig_len, flip) * inv_count[None]
  # mmseg resizes the grid cells that cover the true window, ceil(size / patch) of them.
  up = interp_matrix(-(-true_window // patch), true_window, grid_len, window_len)

  def one(start, ok):
    cols = jax.lax.dynamic_slice_in_dim(back, start, window_len, axis=1)
    return jnp.where(ok, jnp.dot(cols, up, precision=_HIGHEST), 0.0)

  return jax.vmap(one)(starts, valid)  # (n, orig_len, grid_len)
