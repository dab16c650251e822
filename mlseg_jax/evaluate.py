"""Evaluation as the reference does it (mmseg 0.17 `slide` test mode), jitted with static shapes.

What the reference computes for one image (REFERENCE.md §5; `encoder_decoder.py`,
`test_time_aug.py`):

  1. Keep-ratio resize to the test scale: factor = min(long / max(h, w), short / min(h, w)),
     new size int(h * factor + 0.5) x int(w * factor + 0.5) (mmcv `rescale_size`), by
     OpenCV's bilinear on the uint8 image. For multi-scale, the scale itself is first
     multiplied by each ratio and truncated: (int(2048 r), int(512 r)) for r in 0.5, 0.75,
     ..., 1.75, each also flipped horizontally (after the resize).
  2. Normalise, then slide a crop-sized window with the configured stride over the resized
     image: h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1 windows per column,
     window i spans y1 = i * stride, y2 = min(y1 + crop, h), y1 = max(y2 - crop, 0) (the last
     window is aligned to the border); the same along x. An image smaller than the crop is
     one window of its own size, which the ViT pads with zeros to a multiple of the patch.
  3. Each window's logits (1/16 of the window, on the model's padded token grid) are resized
     bilinearly (align_corners=False) straight to the window size, summed into a canvas and
     divided by the number of windows covering each pixel.
  4. The canvas is resized bilinearly to the original image size; softmax; a flipped pass is
     flipped back; multi-scale sums the probabilities of all passes; argmax.
  5. Scoring: a confusion matrix at the original resolution, ignore pixels excluded
     (see `metrics.py`).

How it runs here, with static shapes and nothing per window in Python:

  - Steps 3 and 4 are linear in the window logits, and mmseg's window grid is a product of a
    row grid and a column grid (so is the count map). Upsampling, placement, the division by
    the count and the resize to the original size therefore fold into one (original, grid)
    matrix per window row and one per window column, built in jnp from the true (traced)
    sizes; two einsums take all windows of an image from the low-resolution logits straight
    to the original resolution. Nothing at the resized resolution times the class count is
    ever materialised. Same numbers as the reference up to float32 summation order.
  - Image sizes vary, so every image is assigned a static `BatchShape`: its original size
    rounded up to a bucket (steps of at most 1/8 of the size), and per test pass the window
    counts and window size. Images are binned by shape and processed `images_per_batch` at a
    time; the window offsets, validity masks and interpolation matrices come from the true
    sizes on device, so one compilation serves every image of a bin.
  - The resize to each test scale runs on the host, in `read_ahead`'s threads, by the very
    call mmcv makes (cv2.resize INTER_LINEAR on uint8: OpenCV's fixed-point arithmetic,
    which a float resize misses by one grey level on ~11 % of an upscaled image's values);
    the resized images go to the device (~9 MB per ADE20K image for six scales). On a
    2-core CPU this takes 6 ms per 512x683 image for the six scales, where an emulation of
    OpenCV's integer arithmetic in XLA took 31 ms. Flip (after the resize, on device) and
    mmcv's normalisation (a per-grey-level table, bit for bit) follow on the device.
  - A small image's window: with `masked_padding` (heads that mask padding, the default
    of the evaluators for them) it runs zero-padded to the crop, and `logits_fn` gets each
    window's own token grid (`valid_grid`): the model resizes the position embedding to
    that grid and hides the padding from attention and pooling, so its logits in those
    cells are the unpadded window's, and one model program serves every window of a call
    size. Otherwise it is cut at its size rounded up to `small_window_multiple` (the patch
    by default: exactly the reference's model input, one model compilation per distinct
    small size). Its logits grid is zero-padded to the crop's before the resize stages,
    so those compile once per crop-sized pass shape whatever the small size.
  - Windows are cut with `lax.dynamic_slice` and sent to `logits_fn` `windows_per_call` per
    host at a time, windows of several images together, sharded over the mesh's data axis;
    the windows left after the full calls go in calls of a power of two times
    `min_windows_per_call` (rounded up to the host's device count; `call_sizes`: 6 left of
    8 -> 4 + 2), so padding is never computed past the last device's share and a forward
    compiles for a few sizes only per window shape (`min_windows_per_call` =
    `windows_per_call`: one size, the last call padded). A batch whose bin
    flushed part-full (the last images of a shape) runs with the power of two of image
    slots that holds them (`image_slots`), not `images_per_batch`.
  - The argmax and the confusion matrix are computed on device; one int32 matrix per host and
    batch comes back and is added to an int64 accumulator (`metrics.py` sums hosts).
  - Hosts: image i belongs to process i % process_count (every image exactly once; the
    shorter lists are padded with empty slots). All processes run the same jitted programs in
    the same order with the same shapes: after reading each image they exchange, by a tiny
    allgather, the shape of the bin that became full, and all run that shape together; a
    process with fewer images of that shape runs masked empty slots.

Opt-in, for speed: `small_window_multiple=0` pads a small image's window to the crop with
zeros (= image 0 after normalisation, what the model's own padding inserts) instead; the
logits grid cells that cover the true image, ceil(size / 16), are resized to the true size
exactly as mmseg does, so only the extra zero tokens the backbone attends to differ (every
ADE20K image at ratios 0.5 and 0.75), at one compilation per crop-sized shape.

MLSeg models: `logits_fn` may return `{"logits": ..., "image_logits": (N, n_cls)}`; the
logits carry -100 in the classes a window did not select, and that fill goes through the
averaging and resizing unchanged (every step is a convex combination). Image-level outputs for
the multi-label metrics are taken over all windows of all passes of an image: the score of a
class is its largest image logit, the selected set the union of the windows' top-k.

The +GT oracle (`gt_classes=True`): `logits_fn(windows, classes)` also takes, per window, the
class set of its whole image's label as the reference hands it over: the label resized (nearest)
to that pass's scale with the image, so each scale has its own set; laid out on the device like
the windows, so images with different sets share a batch and one compilation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlseg_jax import IGNORE_LABEL
from mlseg_jax import metrics as metrics_lib
# mmcv's keep-ratio rule and its OpenCV resizes, shared with training.
from mlseg_jax.data.transforms import rescale_size, resize_image, resize_label

_HIGHEST = jax.lax.Precision.HIGHEST

# ---------------------------------------------------------------------------------------------
# Test-time geometry (host side, Python ints; the reference's own formulas).
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Device side: interpolation matrices from traced sizes, and the jitted stages.
# ---------------------------------------------------------------------------------------------


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


def _constrain(x, sharding):
  return jax.lax.with_sharding_constraint(x, sharding)


def _to_blocks(x, blocks: int, per_block: int, padded: int, lanes: int):
  """(blocks * per_block, ...) -> (blocks * padded, ...): each host's part padded at its end
  and dealt out over the host's `lanes` devices, item i of the part on device i % lanes.
  A model call then takes the same slice of every device's own share (`_take_chunk`):
  with the part split in contiguous runs, a call's windows would lie on one or two devices
  and every call would all-gather the whole part (XLA:CPU's rendezvous of 8 virtual
  devices can also stall on that all-gather)."""
  x = x.reshape(blocks, per_block, *x.shape[1:])
  x = jnp.pad(x, [(0, 0), (0, padded - per_block)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(blocks, padded // lanes, lanes, *x.shape[2:]).swapaxes(1, 2)
  return x.reshape(blocks * padded, *x.shape[3:])


def _from_blocks(x, blocks: int, per_block: int, padded: int, lanes: int):
  x = x.reshape(blocks, lanes, padded // lanes, *x.shape[1:]).swapaxes(1, 2)
  return x.reshape(blocks, padded, *x.shape[3:])[:, :per_block].reshape(
      blocks * per_block, *x.shape[3:])


def normalise_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(3, 256) float32: each channel's normalised value of each grey level as mmcv's
  Normalize computes it (float32 image minus the float32 mean, times the float64 1 / std,
  rounded to float32; a float32 division differs in the last bit for some levels)."""
  levels = np.arange(256, dtype=np.float32)[None, :]
  centred = levels - np.asarray(mean, np.float32)[:, None]
  return (centred.astype(np.float64) * (1 / np.asarray(std, np.float64))[:, None]).astype(
      np.float32)


@functools.partial(jax.jit, static_argnames=("shape", "settings", "layout", "sharding"))
def _cut_windows(images, scaled_hw, flip, *, shape: PassShape, settings: EvalSettings,
                 layout: tuple[int, int, int, int], sharding):
  """uint8 images resized on the host (B, canvas_h, canvas_w, 3), true sizes (B, 2) ->
  normalised windows (blocks * padded, wh, ww, 3); with `flip`, of the flipped image (the
  reference flips after resizing)."""
  (ch, cw), (sh, sw) = settings.crop, settings.stride
  table = jnp.asarray(normalise_table(settings.mean, settings.std))  # (3, 256)

  def one(image, shw):
    cols = jnp.arange(shape.canvas_w)
    x = jnp.where(flip, jnp.take(image, jnp.clip(shw[1] - 1 - cols, 0, shape.canvas_w - 1),
                                 axis=1), image)
    x = table[jnp.arange(3), x.astype(jnp.int32)]  # (Hc, Wc, 3) float32
    inside = (jnp.arange(shape.canvas_h) < shw[0])[:, None] & (cols < shw[1])[None, :]
    x = jnp.where(inside[..., None], x, 0.0)  # Padding is 0 after normalisation.
    y1, _ = window_starts(shw[0], ch, sh, shape.rows)
    x1, _ = window_starts(shw[1], cw, sw, shape.cols)

    def cut(y, x0):
      return jax.lax.dynamic_slice(x, (y, x0, 0), (shape.window_h, shape.window_w, 3))

    w = jax.vmap(lambda y: jax.vmap(lambda x0: cut(y, x0))(x1))(y1)  # (rows, cols, wh, ww, 3)
    return w.reshape(-1, shape.window_h, shape.window_w, 3)

  windows = jax.vmap(one)(images, scaled_hw)  # (B, rows * cols, wh, ww, 3)
  windows = windows.reshape(-1, *windows.shape[2:])
  return _constrain(_to_blocks(windows, *layout), sharding)


@functools.partial(jax.jit, static_argnames=("shards", "size", "sharding"))
def _take_chunk(windows, offset, *, shards: int, size: int, sharding):
  """Windows offset .. offset + size of every device's share of `windows` (laid out by
  `_to_blocks`): (shards * size, ...), each device's from its own share."""
  w = windows.reshape(shards, -1, *windows.shape[1:])
  w = jax.lax.dynamic_slice_in_dim(w, offset, size, axis=1)
  return _constrain(w.reshape(shards * size, *w.shape[2:]), sharding)


@functools.partial(jax.jit, static_argnames=("per_image", "layout", "sharding"))
def _window_classes(classes, *, per_image: int, layout: tuple[int, int, int, int], sharding):
  """+GT: (B, C) class sets of the images -> (blocks * padded, C), each window's image's
  set, laid out like `_cut_windows`'s windows."""
  return _constrain(_to_blocks(jnp.repeat(classes, per_image, axis=0), *layout), sharding)


@functools.partial(jax.jit, static_argnames=("per_image", "settings", "layout", "sharding"))
def _window_grids(scaled_hw, *, per_image: int, settings: EvalSettings,
                  layout: tuple[int, int, int, int], sharding):
  """Masked padding: (B, 2) resized image sizes -> (blocks * padded, 2) int32, each
  window's own token grid (an image smaller than the crop is one window of its size),
  laid out like `_cut_windows`'s windows."""
  true = jnp.minimum(scaled_hw, jnp.asarray(settings.crop, jnp.int32))
  grid = (-(-true // settings.patch_size)).astype(jnp.int32)
  return _constrain(_to_blocks(jnp.repeat(grid, per_image, axis=0), *layout), sharding)


@functools.partial(jax.jit, static_argnames=("shards", "sharding"), donate_argnums=0)
def _put_chunk(buffer, values, offset, *, shards: int, sharding):
  """`values` of one model call (`_take_chunk`'s layout) into every device's share of
  `buffer` at `offset`."""
  # A small window's logits grid goes into the crop-sized grid of the buffer, zero-padded.
  values = jnp.pad(values.astype(buffer.dtype),
                   [(0, 0)] + [(0, b - v) for b, v in zip(buffer.shape[1:], values.shape[1:])])
  b = buffer.reshape(shards, -1, *buffer.shape[1:])
  v = values.reshape(shards, -1, *values.shape[1:])
  b = jax.lax.dynamic_update_slice_in_dim(b, v, offset, axis=1)
  return _constrain(b.reshape(buffer.shape), sharding)


@functools.partial(jax.jit, static_argnames=("shape", "value", "dtype", "sharding"))
def _full(*, shape, value, dtype, sharding):
  return _constrain(jnp.full(shape, value, dtype), sharding)


def _axis_matrices(orig_size, scaled_size, flip, *, orig_len: int, canvas_len: int,
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


@functools.partial(
    jax.jit, donate_argnums=0,
    static_argnames=("shape", "orig", "settings", "layout", "softmax", "sharding"))
def _add_pass(scores, grids, orig_hw, scaled_hw, flip, *, shape: PassShape,
              orig: tuple[int, int], settings: EvalSettings, layout: tuple[int, int, int, int],
              softmax: bool, sharding):
  """scores (B, Ho, Wo, C) += this pass's logits (or probabilities) at the original size;
  scores=None for the first pass (no zero buffer to fill and add to)."""
  grids = _from_blocks(grids, *layout)
  b = orig_hw.shape[0]
  gh, gw, c = grids.shape[1:]
  grids = grids.reshape(b, shape.rows, shape.cols, gh, gw, c)
  common = dict(patch=settings.patch_size)
  rows_first = shape.rows * gh > shape.cols * gw

  def one(grid, ohw, shw):
    a = _axis_matrices(ohw[0], shw[0], False, orig_len=orig[0], canvas_len=shape.canvas_h,
                       window_len=shape.window_h, grid_len=gh, n=shape.rows,
                       crop=settings.crop[0], stride=settings.stride[0], **common)
    bm = _axis_matrices(ohw[1], shw[1], flip, orig_len=orig[1], canvas_len=shape.canvas_w,
                        window_len=shape.window_w, grid_len=gw, n=shape.cols,
                        crop=settings.crop[1], stride=settings.stride[1], **common)
    # Contract the longer window axis first: the second einsum, at the original resolution,
    # then has the shorter inner dimension.
    if rows_first:
      t = jnp.einsum("iyp,ijpqc->jyqc", a, grid, precision=_HIGHEST)
      return jnp.einsum("jxq,jyqc->yxc", bm, t, precision=_HIGHEST)
    t = jnp.einsum("jxq,ijpqc->ixpc", bm, grid, precision=_HIGHEST)
    return jnp.einsum("iyp,ixpc->yxc", a, t, precision=_HIGHEST)

  out = jax.vmap(one)(grids, orig_hw, scaled_hw)  # (B, Ho, Wo, C)
  if softmax:
    out = jax.nn.softmax(out, axis=-1)
  return _constrain(out if scores is None else scores + out, sharding)


@functools.partial(
    jax.jit, donate_argnums=(0, 1),
    static_argnames=("shape", "settings", "layout", "topk", "sharding"))
def _add_image_logits(image_scores, selected, image_logits, scaled_hw, *, shape: PassShape,
                      settings: EvalSettings, layout, topk: int, sharding):
  """MLSeg: largest image logit per class and union of top-k sets over an image's windows."""
  il = _from_blocks(image_logits, *layout).astype(jnp.float32)
  b, n_cls = scaled_hw.shape[0], il.shape[-1]
  il = il.reshape(b, shape.rows, shape.cols, n_cls)

  def valid_windows(shw):
    _, vr = window_starts(shw[0], settings.crop[0], settings.stride[0], shape.rows)
    _, vc = window_starts(shw[1], settings.crop[1], settings.stride[1], shape.cols)
    return vr[:, None] & vc[None, :]

  valid = jax.vmap(valid_windows)(scaled_hw)[..., None]  # (B, rows, cols, 1)
  best = jnp.where(valid, il, -jnp.inf).max(axis=(1, 2))
  top = jax.lax.top_k(il, topk)[1]  # (B, rows, cols, k)
  chosen = (jax.nn.one_hot(top, n_cls, dtype=jnp.int32).sum(-2) > 0) & valid
  return (_constrain(jnp.maximum(image_scores, best), sharding),
          _constrain(selected | chosen.any(axis=(1, 2)), sharding))


@functools.partial(jax.jit, static_argnames=("num_classes", "groups", "sharding"))
def _predict_and_count(scores, labels, *, num_classes: int, groups: int, sharding):
  """Argmax, and the int32 confusion matrix [label, prediction] of each group of images
  (one group per device: the counts of a device's images never exceed 2^31)."""
  preds = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # (B, Ho, Wo)
  c = num_classes
  idx = jnp.where(labels >= 0, labels * c + preds, c * c).reshape(groups, -1)
  counts = jax.vmap(lambda i: jnp.zeros(c * c, jnp.int32).at[i].add(1, mode="drop"))(idx)
  return _constrain(preds, sharding), _constrain(counts.reshape(groups, c, c), sharding)


# ---------------------------------------------------------------------------------------------
# Hosts: which images each process evaluates, and agreeing on what to run next.
# ---------------------------------------------------------------------------------------------


def host_indices(num_images: int, process_index: int, process_count: int) -> list[int | None]:
  """Images of one process: i % process_count == process_index, padded with None so every
  process has the same count (each image is evaluated exactly once over all processes)."""
  per_host = -(-num_images // process_count)
  own = list(range(process_index, num_images, process_count))
  return own + [None] * (per_host - len(own))


@dataclasses.dataclass
class _Batch:
  shape: BatchShape
  items: list[tuple[int, dict[str, Any]]]  # (dataset index, record), this host's part
  max_items: int  # largest part over hosts: how many slots hold images anywhere


def read_ahead(records: Sequence[dict[str, Any]], indices: Sequence[int | None],
               threads: int = 4, depth: int = 16,
               prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
               ) -> Iterator[tuple[int, dict[str, Any]] | None]:
  """(index, prepare(records[index])) in order, None for padding slots, read `depth` ahead
  by `threads` threads (image decoders and OpenCV release the GIL); threads=0 reads in the
  caller."""
  def read(index):
    record = records[index]
    return record if prepare is None else prepare(record)

  if threads <= 0:
    for index in indices:
      yield None if index is None else (index, read(index))
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = collections.deque()
    for index in indices:
      pending.append(None if index is None else (index, pool.submit(read, index)))
      if len(pending) > depth:
        item = pending.popleft()
        yield None if item is None else (item[0], item[1].result())
    while pending:
      item = pending.popleft()
      yield None if item is None else (item[0], item[1].result())


def prepare_record(record: dict[str, Any], settings: EvalSettings, *, num_classes: int,
                   with_labels: bool = True, gt_classes: bool = False) -> dict[str, Any]:
  """`record` checked, with what the device needs of it made on the host: "scaled_images",
  the image at each of `settings.scales` as mmcv.imrescale makes it (OpenCV's bilinear on
  uint8, whose fixed-point arithmetic a float resize misses by one grey level on ~11 % of
  an upscaled image's values), and for +GT "scaled_classes" (scales, C) bool, the classes
  of the label nearest-resized to each scale: the reference loads the label before
  MultiScaleFlipAug, whose Resize rescales it with the image, and its oracle takes that."""
  _check_record(record, num_classes, with_labels)
  sizes = settings.scaled_sizes(*record["image"].shape[:2])
  out = dict(record, scaled_images=[resize_image(record["image"], h, w) for h, w in sizes])
  if gt_classes:
    label = np.asarray(record["label"])
    out["scaled_classes"] = np.zeros((len(sizes), num_classes), bool)
    for k, (h, w) in enumerate(sizes):
      resized = resize_label(label, h, w)
      out["scaled_classes"][k, np.unique(resized[resized >= 0])] = True
  return out


def batch_stream(items: Iterable[tuple[int, dict[str, Any]] | None],
                 shape_of: Callable[[dict[str, Any]], BatchShape], batch_size: int,
                 code_len: int,
                 allgather: Callable[[np.ndarray], np.ndarray] = metrics_lib.process_allgather,
                 ) -> Iterator[_Batch]:
  """Bins records by static shape and yields batches, in the same order on every process.

  `items` are this process's (index, record) pairs, None for padding, as many on every
  process. After each item, every process proposes the shape of a bin that just became full
  (or nothing); the proposals are gathered and every proposed shape is run by all processes,
  each with what its own bin holds, possibly nothing. At the end the bins are flushed the
  same way, one shape per process per round. `code_len` is the length of
  `BatchShape.encode()`.
  """
  bins: dict[BatchShape, list[tuple[int, dict[str, Any]]]] = {}
  agree = functools.partial(_agree, bins, batch_size=batch_size, code_len=code_len,
                            allgather=allgather)
  for item in items:
    proposal = None
    if item is not None:
      index, record = item
      shape = shape_of(record)
      bins.setdefault(shape, []).append((index, record))
      if len(bins[shape]) >= batch_size:
        proposal = shape
    yield from agree(proposal)
  while True:
    batches = agree(min(bins) if bins else None)
    if not batches:
      return
    yield from batches


def _agree(bins: dict[BatchShape, list[tuple[int, dict[str, Any]]]],
           proposal: BatchShape | None, *, batch_size: int, code_len: int,
           allgather: Callable[[np.ndarray], np.ndarray]) -> list[_Batch]:
  """Every process's proposal gathered; the batches of every proposed shape, taken from
  this process's `bins` (possibly empty), in the same order on every process."""
  code = (np.full((code_len,), -1, np.int32) if proposal is None
          else np.asarray(proposal.encode(), np.int32))
  gathered = allgather(code)
  batches = []
  for shape in sorted({BatchShape.decode(row) for row in gathered if row[0] >= 0}):
    queue = bins.pop(shape, [])
    items, rest = queue[:batch_size], queue[batch_size:]
    if rest:
      bins[shape] = rest
    counts = allgather(np.asarray([len(items)], np.int32))
    batches.append(_Batch(shape, items, int(counts.max())))
  return batches


# ---------------------------------------------------------------------------------------------
# Driver: records in, predictions and confusion matrices out.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageResult:
  """One image of this process. Arrays are at the original resolution."""
  index: int
  name: str
  prediction: np.ndarray | None = None  # (H, W) int32, with keep_predictions
  scores: np.ndarray | None = None  # (H, W, C) float32 with keep_scores: averaged logits
  #   (one pass) or summed probabilities (several passes), what the argmax is taken of.
  image_scores: np.ndarray | None = None  # (n_cls,) MLSeg: largest image logit per class
  selected: np.ndarray | None = None  # (n_cls,) bool, MLSeg: union of the windows' top-k
  label_hist: np.ndarray | None = None  # (n_cls,) int64 labelled pixels per class


@dataclasses.dataclass
class BatchResult:
  images: list[ImageResult]
  confusion: np.ndarray | None  # (C, C) int64 [label, prediction] over this batch's images
  has_image_logits: bool = False  # the model returned image logits (same on every process)


def _data_layout(mesh: Mesh, axes: tuple[str, ...]) -> tuple[int, int, int]:
  """(blocks, local shards, shards) of the data axes (major to minor, as PartitionSpec reads
  a tuple of axes): each process must hold a contiguous, equal run of their positions."""
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh has axes {mesh.axis_names}, no data axis {missing}")
  dims = [mesh.axis_names.index(a) for a in axes]
  sizes = [mesh.shape[a] for a in axes]
  shards = int(np.prod(sizes))
  me = jax.process_index()
  mine = sorted({int(np.ravel_multi_index([idx[d] for d in dims], sizes))
                 for idx in np.ndindex(mesh.devices.shape)
                 if mesh.devices[idx].process_index == me})
  if not mine:
    raise ValueError(f"process {me} has no device in the mesh {mesh}")
  contiguous = mine == list(range(mine[0], mine[0] + len(mine)))
  if not contiguous or len(mine) * jax.process_count() != shards:
    raise ValueError(
        f"the data axes {axes} ({shards} positions) must be split evenly and contiguously "
        f"over the {jax.process_count()} processes; process {me} holds positions {mine}")
  return jax.process_count(), len(mine), shards


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def call_sizes(n: int, largest: int, smallest: int = 1) -> list[int]:
  """Sizes of the model calls that cover `n` windows: `largest` while that many are left,
  then the rest rounded up to `smallest` in calls of smallest * 2^j, largest first (6 of
  at most 8 -> [4, 2]; 13 -> [8, 4, 1]). Nothing beyond the last multiple of `smallest` is
  computed, and a forward compiles for at most 1 + log2(largest / smallest) sizes per
  window shape (smallest = largest: one size, the rest padded to a full call)."""
  sizes = [largest] * (n // largest)
  rest = _round_up(n - largest * len(sizes), smallest)
  if rest >= largest:
    return sizes + [largest]
  rest //= smallest
  bit = 1 << max(rest.bit_length() - 1, 0)
  while rest:
    if rest & bit:
      sizes.append(smallest * bit)
      rest -= bit
    bit >>= 1
  return sizes


def image_slots(n: int, largest: int, unit: int = 1) -> int:
  """Image slots of a batch holding at most `n` images per process: the power of two that
  holds them (a multiple of `unit`), at most `largest`; few distinct shapes, little padding
  where a bin flushes part-full."""
  return min(largest, _round_up(1 << max(n - 1, 0).bit_length(), unit))


def _check_record(record: dict[str, Any], num_classes: int, with_labels: bool):
  name = record.get("name", "<unnamed>")
  for key in ("image",) + (("label",) if with_labels else ()):
    if key not in record:
      raise KeyError(f"record {name!r} has no {key!r} (keys: {sorted(record)})")
  image = record["image"]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"{name}: image must be uint8 (H, W, 3) RGB, got {image.dtype} "
                     f"{image.shape}")
  if with_labels:
    label = record["label"]
    if label.shape != image.shape[:2]:
      raise ValueError(f"{name}: label is {label.shape}, image is {image.shape[:2]}")
    if not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f"{name}: label must be an integer array, got {label.dtype}")
    if label.size:
      lo, hi = int(label.min()), int(label.max())
      if (lo < 0 and lo != IGNORE_LABEL) or hi >= num_classes:
        bad = label[((label < 0) & (label != IGNORE_LABEL)) | (label >= num_classes)]
        raise ValueError(
            f"{name}: label values {np.unique(bad)[:10].tolist()} are neither a class in "
            f"[0, {num_classes}) nor the ignore value {IGNORE_LABEL}")


def _unpack_model_output(out, n_windows: int, window: tuple[int, int], patch: int,
                         num_classes: int):
  if isinstance(out, dict):
    if "logits" not in out:
      raise KeyError(f"logits_fn returned a dict without 'logits' (keys: {sorted(out)})")
    logits, image_logits = out["logits"], out.get("image_logits")
  else:
    logits, image_logits = out, None
  grid = (-(-window[0] // patch), -(-window[1] // patch))
  if logits.shape != (n_windows, *grid, num_classes):
    raise ValueError(
        f"logits_fn on windows {(n_windows, *window, 3)} returned logits {logits.shape}; "
        f"expected {(n_windows, *grid, num_classes)} (the padded 1/{patch} token grid, "
        "channels last)")
  if image_logits is not None and image_logits.shape != (n_windows, num_classes):
    raise ValueError(f"logits_fn returned image_logits {image_logits.shape}; expected "
                     f"{(n_windows, num_classes)}")
  return logits, image_logits


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every batch of one `segment` call shares: the model, the settings, the layout."""
  logits_fn: Callable[..., Any]
  settings: EvalSettings
  num_classes: int
  topk: int | None
  mesh: Mesh
  spec: PartitionSpec
  sharding: NamedSharding
  blocks: int  # processes: each holds one contiguous block of every sharded array
  shards: int  # devices over the data axes
  images: int  # most image slots per process and batch
  chunk: int  # most windows per process and model call
  unit: int  # devices of this process over the data axes: the smallest share of a call
  smallest: int  # fewest windows per process and model call (a multiple of unit)
  with_labels: bool
  gt_classes: bool  # logits_fn also takes each window's image class set (+GT)
  keep_predictions: bool
  keep_scores: bool
  # XLA:CPU runs the devices of every program in flight on one fixed pool of threads: two
  # independent programs with collectives in flight at once can each hold part of it and
  # wait forever for the rest (the rendezvous aborts the process after 40 s). On a CPU
  # mesh of several devices each such program is waited for before the next starts.
  settle: bool = False


def _settle(run: _Run, *arrays):
  if run.settle:
    jax.block_until_ready([a for a in arrays if a is not None])


def _make_run(logits_fn, settings: EvalSettings, *, num_classes: int, topk: int | None,
              mesh: Mesh | None, data_axis: str | Sequence[str], images_per_batch: int,
              windows_per_call: int, min_windows_per_call: int, with_labels: bool,
              gt_classes: bool,
              keep_predictions: bool, keep_scores: bool) -> _Run:
  axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
  if mesh is None:
    if jax.process_count() > 1:
      raise ValueError("several processes: pass the mesh whose data axes span them")
    mesh = Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(axes)), axes)
  blocks, local_shards, shards = _data_layout(mesh, axes)
  if topk is not None and not 0 < topk <= num_classes:
    raise ValueError(f"topk={topk} must lie in [1, num_classes={num_classes}]")
  if gt_classes and not with_labels:
    raise ValueError("gt_classes: the +GT oracle takes each image's class set from its labels")
  spec = PartitionSpec(axes)
  images, chunk, smallest = call_plan(images_per_batch, windows_per_call,
                                      min_windows_per_call, local_shards)
  return _Run(logits_fn=logits_fn, settings=settings, num_classes=num_classes, topk=topk,
              mesh=mesh, spec=spec, sharding=NamedSharding(mesh, spec), blocks=blocks,
              shards=shards, images=images, chunk=chunk, unit=local_shards,
              smallest=smallest,
              with_labels=with_labels, gt_classes=gt_classes,
              keep_predictions=keep_predictions, keep_scores=keep_scores,
              settle=shards > 1 and mesh.devices.flat[0].platform == "cpu")


def call_plan(images_per_batch: int, windows_per_call: int, min_windows_per_call: int,
              local_shards: int) -> tuple[int, int, int]:
  """(image slots, most windows, fewest windows) per process of a batch and a model call:
  the options rounded up to a multiple of the process's devices over the data axes."""
  chunk = _round_up(max(windows_per_call, 1), local_shards)
  return (_round_up(max(images_per_batch, 1), local_shards), chunk,
          min(chunk, _round_up(max(min_windows_per_call, 1), local_shards)))


def forward_calls(settings: EvalSettings, sizes: Sequence[tuple[int, int]], *,
                  processes: int = 1, local_shards: int = 1, images_per_batch: int = 4,
                  windows_per_call: int = 8, min_windows_per_call: int = 1,
                  ) -> collections.Counter:
  """The model calls `segment` makes for images of `sizes` (h, w), without running them:
  {(window_h, window_w, windows of the call over all processes): number of calls}, one
  forward program per key. Binning, batch shapes, call sizes and image slots come from
  the functions `segment` runs; on several processes, process 0's share (images 0, P, 2P,
  ...) stands for every process's (the processes run each other's shapes in lockstep)."""
  images, chunk, smallest = call_plan(images_per_batch, windows_per_call,
                                      min_windows_per_call, local_shards)
  mine = [(i, hw) for i, hw in enumerate(sizes) if i % processes == 0]
  code_len = 2 + 6 * len(settings.passes)
  calls = collections.Counter()
  for batch in batch_stream(mine, lambda hw: settings.batch_shape(*hw), images, code_len,
                            allgather=lambda x: np.asarray(x)[None]):
    for ps in batch.shape.passes:
      for size in call_sizes(batch.max_items * ps.rows * ps.cols, chunk, smallest):
        calls[(ps.window_h, ps.window_w, processes * size)] += 1
  return calls


def _to_device(run: _Run, local: np.ndarray) -> jax.Array:
  return jax.make_array_from_process_local_data(run.sharding, local)


def _to_host(run: _Run, x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, run.mesh, run.spec))


def _shape_of(run: _Run, record: dict[str, Any]) -> BatchShape:
  return run.settings.batch_shape(*record["image"].shape[:2])


def _slots(run: _Run, batch: _Batch) -> int:
  """Image slots per process of `batch`: a bin flushed part-full runs at a smaller size."""
  return image_slots(batch.max_items, run.images, run.unit)


def _host_inputs(run: _Run, batch: _Batch) -> dict[str, Any]:
  """This process's slots of `batch` (records from `prepare_record`) as zero-padded arrays:
  per scale the resized images (bl, canvas_h, canvas_w, 3) and their sizes (bl, 2), the
  original sizes (bl, 2), labels (bl, Ho, Wo) and, for +GT, per scale each image's class
  set (bl, C)."""
  bl, s = _slots(run, batch), run.settings
  canvases = [batch.shape.passes[k * len(s.flips)] for k in range(len(s.scales))]
  ho, wo = batch.shape.orig_h, batch.shape.orig_w
  out = dict(scaled=[np.zeros((bl, c.canvas_h, c.canvas_w, 3), np.uint8) for c in canvases],
             scaled_hw=np.zeros((len(canvases), bl, 2), np.int32),
             orig_hw=np.zeros((bl, 2), np.int32),
             labels=(np.full((bl, ho, wo), IGNORE_LABEL, np.int32) if run.with_labels
                     else None),
             classes=(np.zeros((len(canvases), bl, run.num_classes), bool) if run.gt_classes
                      else None))
  for slot, (_, record) in enumerate(batch.items):
    h, w = record["image"].shape[:2]
    out["orig_hw"][slot] = (h, w)
    for k, image in enumerate(record["scaled_images"]):
      out["scaled"][k][slot, :image.shape[0], :image.shape[1]] = image
      out["scaled_hw"][k, slot] = image.shape[:2]
    if run.with_labels:
      out["labels"][slot, :h, :w] = record["label"]
    if run.gt_classes:
      out["classes"][:, slot] = record["scaled_classes"]
  return out


def _run_model(run: _Run, windows, classes, grids_in, n_windows: int, ps: PassShape,
               layout):
  """logits_fn over the first n_windows windows of every process's part (`call_sizes` at a
  time) -> logits grids and image logits, laid out like the windows (windows never run stay
  0; they only hold padding slots)."""
  grids = image_logits = None
  sizes = call_sizes(n_windows, run.chunk, run.smallest)
  lanes = run.unit
  for size, start in zip(sizes, np.cumsum([0] + sizes[:-1])):
    # Traced: one program per call size, whatever the offset. Sizes and offsets are
    # multiples of the host's device count: a device's share of a call is size // lanes.
    index = np.int32(start // lanes)
    take = functools.partial(_take_chunk, shards=run.shards, size=size // lanes,
                             sharding=run.sharding)
    args = [take(windows, index)] + ([] if classes is None else [take(classes, index)])
    out = (run.logits_fn(*args) if grids_in is None
           else run.logits_fn(*args, valid_grid=take(grids_in, index)))
    _settle(run, *jax.tree.leaves(out))
    logits, il = _unpack_model_output(out, run.blocks * size,
                                      (ps.window_h, ps.window_w), run.settings.patch_size,
                                      run.num_classes)
    if grids is None:
      crop_grid = [-(-c // run.settings.patch_size) for c in run.settings.crop]
      grids = _full(shape=(layout[0] * layout[2], *crop_grid, run.num_classes), value=0.0,
                    dtype=jnp.float32, sharding=run.sharding)
    grids = _put_chunk(grids, logits, index, shards=run.shards, sharding=run.sharding)
    if il is not None:
      if run.topk is None:
        raise ValueError("logits_fn returns image_logits (an MLSeg model): pass topk, the "
                         "k of its top-k selection")
      if image_logits is None:
        image_logits = _full(shape=(layout[0] * layout[2], run.num_classes), value=0.0,
                             dtype=jnp.float32, sharding=run.sharding)
      image_logits = _put_chunk(image_logits, il, index, shards=run.shards,
                                sharding=run.sharding)
  return grids, image_logits


def _run_pass(run: _Run, batch: _Batch, p: int, inputs: dict[str, Any], totals: tuple):
  """Test pass p (one scale, flipped or not) of `batch` added to totals = (scores (B, Ho,
  Wo, C), image scores (B, C), selected (B, C)), each None until a pass fills it."""
  (_, flip), ps = run.settings.passes[p], batch.shape.passes[p]
  k = run.settings.scale_index(p)
  flip, scaled = np.bool_(flip), inputs["scaled_hw"][k]
  per_host = _slots(run, batch) * ps.rows * ps.cols
  # Room for the calls over every slot's windows (more than the images need).
  layout = (run.blocks, per_host, sum(call_sizes(per_host, run.chunk, run.smallest)),
            run.unit)
  common = dict(settings=run.settings, layout=layout, sharding=run.sharding)
  windows = _cut_windows(inputs["scaled"][k], scaled, flip, shape=ps, **common)
  classes = (None if inputs["classes"] is None else _window_classes(
      inputs["classes"][k], per_image=ps.rows * ps.cols, layout=layout, sharding=run.sharding))
  valid_grids = (_window_grids(scaled, per_image=ps.rows * ps.cols, **common)
                 if run.settings.masked_padding else None)
  _settle(run, windows, classes, valid_grids)
  # Only the first max_items images of each process's part hold an image anywhere.
  grids, image_logits = _run_model(run, windows, classes, valid_grids,
                                   batch.max_items * ps.rows * ps.cols, ps, layout)
  # After the model, every small-window size of this pass shares one program.
  common["shape"] = ps.at_crop(run.settings.crop)
  scores, image_scores, selected = totals
  scores = _add_pass(scores, grids, inputs["orig"], scaled, flip,
                     orig=(batch.shape.orig_h, batch.shape.orig_w),
                     softmax=len(run.settings.passes) > 1, **common)
  if image_logits is not None:
    if image_scores is None:
      shape = (run.blocks * _slots(run, batch), run.num_classes)
      image_scores = _full(shape=shape, value=-np.inf, dtype=jnp.float32, sharding=run.sharding)
      selected = _full(shape=shape, value=False, dtype=jnp.bool_, sharding=run.sharding)
    image_scores, selected = _add_image_logits(image_scores, selected, image_logits, scaled,
                                               topk=run.topk, **common)
  _settle(run, scores, image_scores, selected)
  return scores, image_scores, selected


def _dispatch(run: _Run, batch: _Batch) -> dict[str, jax.Array | None]:
  """Starts every pass of `batch`, the argmax and the confusion counts on the device;
  returns their (not yet computed) device arrays."""
  host = _host_inputs(run, batch)
  inputs = dict(scaled=[_to_device(run, x) for x in host["scaled"]],
                scaled_hw=[_to_device(run, x) for x in host["scaled_hw"]],
                orig=_to_device(run, host["orig_hw"]),
                classes=(None if host["classes"] is None else
                         [_to_device(run, x) for x in host["classes"]]))
  totals = (None, None, None)
  for p in range(len(run.settings.passes)):
    totals = _run_pass(run, batch, p, inputs, totals)
  scores, image_scores, selected = totals
  ho, wo = batch.shape.orig_h, batch.shape.orig_w
  labels = (_to_device(run, host["labels"]) if run.with_labels else
            _full(shape=(run.blocks * _slots(run, batch), ho, wo), value=IGNORE_LABEL,
                  dtype=jnp.int32, sharding=run.sharding))
  preds, counts = _predict_and_count(scores, labels, num_classes=run.num_classes,
                                     groups=run.shards, sharding=run.sharding)
  return dict(preds=preds if run.keep_predictions else None,
              counts=counts if run.with_labels else None,
              scores=scores if run.keep_scores else None,
              image_scores=image_scores, selected=selected)


def _collect(run: _Run, batch: _Batch, out: dict[str, jax.Array | None]) -> BatchResult:
  """`_dispatch`'s arrays pulled to the host, cut to each image's own size."""
  host = {k: None if v is None else _to_host(run, v) for k, v in out.items()}
  confusion = None if host["counts"] is None else host["counts"].astype(np.int64).sum(0)
  images = []
  for slot, (index, record) in enumerate(batch.items):
    h, w = record["image"].shape[:2]
    r = ImageResult(index=index, name=str(record.get("name", index)))
    if host["preds"] is not None:
      r.prediction = host["preds"][slot, :h, :w]
    if host["scores"] is not None:
      r.scores = host["scores"][slot, :h, :w]
    if host["image_scores"] is not None:
      r.image_scores = host["image_scores"][slot]
      r.selected = host["selected"][slot]
    if run.with_labels:
      label = record["label"]
      r.label_hist = np.bincount(label[label >= 0].ravel(),
                                 minlength=run.num_classes).astype(np.int64)
    images.append(r)
  return BatchResult(images, confusion, host["image_scores"] is not None)


def segment(logits_fn: Callable[..., Any], records: Sequence[dict[str, Any]],
            settings: EvalSettings, *, num_classes: int, topk: int | None = None,
            mesh: Mesh | None = None, data_axis: str | Sequence[str] = "data",
            images_per_batch: int = 4, windows_per_call: int = 8,
            min_windows_per_call: int = 1, with_labels: bool = True,
            gt_classes: bool = False, keep_predictions: bool = False,
            keep_scores: bool = False, read_threads: int = 4,
            allgather: Callable[[np.ndarray], np.ndarray] = metrics_lib.process_allgather,
            ) -> Iterator[BatchResult]:
  """Runs the test passes over this process's share of `records`, batch by batch.

  `records[i]` = {"image": uint8 (H, W, 3) RGB, "label": int (H, W) with ignore =
  IGNORE_LABEL (only with `with_labels`), "name": str}. `logits_fn(windows)` takes
  normalised windows (N, wh, ww, 3) float32 (a global array sharded over `data_axis`) and
  returns logits (N, ceil(wh / p), ceil(ww / p), C) or {"logits": ..., "image_logits":
  (N, C)}. With `gt_classes` (the +GT oracle) it is `logits_fn(windows, classes)`, classes
  (N, C) bool the set of classes in each window's whole image's labels. Windows and images
  are sharded over `data_axis`, one mesh axis name or several (e.g. ("data", "fsdp"): every
  device of such a mesh takes a share of the windows); with no mesh, everything runs on
  the first local device. Every process must call this with the same arguments (see the
  module docstring).
  """
  run = _make_run(logits_fn, settings, num_classes=num_classes, topk=topk, mesh=mesh,
                  data_axis=data_axis, images_per_batch=images_per_batch,
                  windows_per_call=windows_per_call,
                  min_windows_per_call=min_windows_per_call, with_labels=with_labels,
                  gt_classes=gt_classes, keep_predictions=keep_predictions,
                  keep_scores=keep_scores)
  indices = host_indices(len(records), jax.process_index(), jax.process_count())
  code_len = 2 + 6 * len(settings.passes)
  prepare = functools.partial(prepare_record, settings=settings, num_classes=num_classes,
                              with_labels=with_labels, gt_classes=gt_classes)
  items = read_ahead(records, indices, read_threads, prepare=prepare)
  pending = None
  # One batch in flight: the next batch is read and dispatched before the previous one's
  # results are pulled to the host, so reading overlaps device work.
  for batch in batch_stream(items, functools.partial(_shape_of, run), run.images, code_len,
                            allgather):
    current = batch, _dispatch(run, batch)
    if pending is not None:
      yield _collect(run, *pending)
    pending = current
  if pending is not None:
    yield _collect(run, *pending)


def evaluate(logits_fn: Callable[..., Any], records: Sequence[dict[str, Any]],
             settings: EvalSettings, *, num_classes: int,
             class_names: Sequence[str] | None = None, topk: int | None = None,
             log_every: int = 0,
             allgather: Callable[[np.ndarray], np.ndarray] = metrics_lib.process_allgather,
             **segment_kwargs) -> dict[str, Any]:
  """mIoU, aAcc, mAcc, per-class IoU / Acc (and for MLSeg models the multi-label metrics) of
  `logits_fn` on `records`, as the reference evaluates: single scale with `settings.ratios =
  (1.0,)`, multi-scale + flip with `ratios=MS_RATIOS, flip=True`. Every process calls it
  alike; every process gets the totals. `segment_kwargs` (mesh, data_axis,
  images_per_batch, windows_per_call, min_windows_per_call, gt_classes, read_threads) and
  the rest are `segment`'s arguments."""
  if len(records) == 0:
    raise ValueError("no images to evaluate")
  confusion = np.zeros((num_classes, num_classes), np.int64)
  multilabel = metrics_lib.MultiLabelMetrics()
  seen, has_image_logits = 0, False
  start = time.perf_counter()
  batches = segment(logits_fn, records, settings, num_classes=num_classes, topk=topk,
                    allgather=allgather, **segment_kwargs)
  for n, batch in enumerate(batches):
    confusion += batch.confusion
    has_image_logits |= batch.has_image_logits
    for image in batch.images:
      seen += 1
      if image.image_scores is not None:
        multilabel.add(image.image_scores, image.selected, image.label_hist)
    if log_every and (n + 1) % log_every == 0:
      rate = seen / (time.perf_counter() - start)
      logging.info("eval: %d images on this process, %.2f images/s", seen, rate)
  results = metrics_lib.segmentation_metrics(
      metrics_lib.sum_across_hosts(confusion, allgather), class_names)
  if has_image_logits:
    results["multilabel"] = dict(multilabel.summary(allgather), topk=topk)
  results["num_images"] = len(records)
  results["settings"] = dataclasses.asdict(settings)
  return results


# MultiScaleFlipAug's ratios in every reference config with multi-scale testing.
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
