"""Resizing that matches PyTorch's `F.interpolate(..., align_corners=False)`.

`jax.image.resize` differs from PyTorch in two ways that matter here: its cubic kernel
uses a = -0.5 (PyTorch: a = -0.75) and it antialiases when shrinking (PyTorch does not).
Position embeddings resized from 24x24 to 32x32, logits upsampled from 1/16 to label size
and predictions shrunk back to the original image must all match the reference, so both
kernels are written out here as separable interpolation matrices.

The matrices are built in NumPy from static shapes and applied with one einsum per axis,
which XLA turns into two small matmuls (fast on every backend, exact in float32).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient.


def _source_coords(in_size: int, out_size: int) -> np.ndarray:
  """Half-pixel source coordinate of each output pixel (align_corners=False).

  In float32, step by step as ATen computes it for float tensors: the last bits of the
  coordinate move the interpolated values by ~1e-5.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  return scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)


@functools.lru_cache(maxsize=256)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's linear interpolation weights."""
  src = np.maximum(_source_coords(in_size, out_size), np.float32(0))  # PyTorch clamps at 0.
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = np.clip(src - i0.astype(np.float32), 0, 1)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), np.float32(1) - frac)
  np.add.at(m, (rows, i1), frac)
  return m.astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic weights for offsets -1, 0, 1, 2 at fractional position t: (n, 4)."""
  a = np.float32(_CUBIC_A)
  t = t.astype(np.float32)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  one = np.float32(1)
  return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


@functools.lru_cache(maxsize=256)
def cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's bicubic weights (border replicated)."""
  src = _source_coords(in_size, out_size)  # Not clamped for cubic, as in PyTorch.
  i = np.floor(src).astype(np.int64)
  w = _cubic_weights(src - i.astype(np.float32))
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(4):
    idx = np.clip(i - 1 + k, 0, in_size - 1)
    np.add.at(m, (rows, idx), w[:, k])
  return m.astype(np.float32)


def cubic_matrices(in_size: int, out_len: int) -> np.ndarray:
  """(out_len + 1, out_len, in_size): entry n is `cubic_matrix(in_size, n)` in its first n
  rows, zero below. Indexed by a traced size, one program serves every output size with
  the very matrices of the static resize."""
  table = np.zeros((out_len + 1, out_len, in_size), np.float32)
  for n in range(1, out_len + 1):
    table[n, :n] = cubic_matrix(in_size, n)
  return table


def _resize(x, size, matrix_fn, spatial_axes):
  ah, aw = spatial_axes
  out_h, out_w = size
  in_h, in_w = x.shape[ah], x.shape[aw]
  dtype = x.dtype
  if (in_h, in_w) == (out_h, out_w):
    return x
  compute = jnp.promote_types(dtype, jnp.float32)
  x = x.astype(compute)
  if in_h != out_h:
    mh = jnp.asarray(matrix_fn(in_h, out_h), compute)
    x = jnp.moveaxis(jnp.tensordot(mh, x, axes=[[1], [ah]]), 0, ah)
  if in_w != out_w:
    mw = jnp.asarray(matrix_fn(in_w, out_w), compute)
    x = jnp.moveaxis(jnp.tensordot(mw, x, axes=[[1], [aw]]), 0, aw)
  return x.astype(dtype)


def resize_bilinear(x, size, spatial_axes=(-3, -2)):
  """Bilinear resize of `x` (channels-last by default) to `size` = (H, W).

  Same numbers as `F.interpolate(mode="bilinear", align_corners=False)`, no antialias.
  """
  return _resize(x, size, linear_matrix, spatial_axes)


def resize_bicubic(x, size, spatial_axes=(-3, -2)):
  """Bicubic resize matching `F.interpolate(mode="bicubic", align_corners=False)`."""
  return _resize(x, size, cubic_matrix, spatial_axes)


def upsample_logits(logits, size):
  """(B, h, w, C) -> (B, *size, C), bilinear, align_corners=False, in float32: mmseg's
  `resize(mode="bilinear", align_corners=False)`, the padded token grid resized straight
  to the image size."""
  return resize_bilinear(logits.astype(jnp.float32), tuple(size))
