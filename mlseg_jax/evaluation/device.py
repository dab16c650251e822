"""The evaluation's jitted stages and how their arrays lie on the devices.

Every array of a batch is sharded over the mesh's data axes. Each process's windows are
dealt out over its devices (`to_blocks`: window i on device i % lanes), so a model call
takes the same slice of every device's own share (`take_chunk`, `put_chunk`) and compiles
with no collective. The stages: normalise the host-resized images (mmcv's per-grey-level
table, bit for bit), flip (after the resize) and cut the windows (`cut_windows`); add a
pass's logits at the original size (`add_pass`, by `geometry.axis_matrices`), softmax for
several passes; for MLSeg the largest image logit per class and the union of the windows'
top-k (`add_image_logits`); the argmax and the int32 confusion counts per device
(`predict_and_count`), added on the host into an int64 accumulator.

MLSeg models' logits carry -100 in the classes a window did not select, and that fill goes
through the averaging and resizing unchanged (every step is a convex combination). The +GT
oracle's class sets are laid out like the windows (`window_classes`), so images with
different sets share a batch and one compilation.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mlseg_jax.evaluation import geometry

_HIGHEST = jax.lax.Precision.HIGHEST


def data_layout(mesh: Mesh, axes: tuple[str, ...]) -> tuple[int, int, int]:
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


def _constrain(x, sharding):
  return jax.lax.with_sharding_constraint(x, sharding)


def to_blocks(x, blocks: int, per_block: int, padded: int, lanes: int):
  """(blocks * per_block, ...) -> (blocks * padded, ...): each host's part padded at its end
  and dealt out over the host's `lanes` devices, item i of the part on device i % lanes.
  A model call then takes the same slice of every device's own share (`take_chunk`):
  with the part split in contiguous runs, a call's windows would lie on one or two devices
  and every call would all-gather the whole part (XLA:CPU's rendezvous of 8 virtual
  devices can also stall on that all-gather)."""
  x = x.reshape(blocks, per_block, *x.shape[1:])
  x = jnp.pad(x, [(0, 0), (0, padded - per_block)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(blocks, padded // lanes, lanes, *x.shape[2:]).swapaxes(1, 2)
  return x.reshape(blocks * padded, *x.shape[3:])


def from_blocks(x, blocks: int, per_block: int, padded: int, lanes: int):
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
def cut_windows(images, scaled_hw, flip, *, shape: geometry.PassShape,
                settings: geometry.EvalSettings, layout: tuple[int, int, int, int], sharding):
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
    y1, _ = geometry.window_starts(shw[0], ch, sh, shape.rows)
    x1, _ = geometry.window_starts(shw[1], cw, sw, shape.cols)

    def cut(y, x0):
      return jax.lax.dynamic_slice(x, (y, x0, 0), (shape.window_h, shape.window_w, 3))

    w = jax.vmap(lambda y: jax.vmap(lambda x0: cut(y, x0))(x1))(y1)  # (rows, cols, wh, ww, 3)
    return w.reshape(-1, shape.window_h, shape.window_w, 3)

  windows = jax.vmap(one)(images, scaled_hw)  # (B, rows * cols, wh, ww, 3)
  windows = windows.reshape(-1, *windows.shape[2:])
  return _constrain(to_blocks(windows, *layout), sharding)


@functools.partial(jax.jit, static_argnames=("shards", "size", "sharding"))
def take_chunk(windows, offset, *, shards: int, size: int, sharding):
  """Windows offset .. offset + size of every device's share of `windows` (laid out by
  `to_blocks`): (shards * size, ...), each device's from its own share."""
  w = windows.reshape(shards, -1, *windows.shape[1:])
  w = jax.lax.dynamic_slice_in_dim(w, offset, size, axis=1)
  return _constrain(w.reshape(shards * size, *w.shape[2:]), sharding)


@functools.partial(jax.jit, static_argnames=("per_image", "layout", "sharding"))
def window_classes(classes, *, per_image: int, layout: tuple[int, int, int, int], sharding):
  """+GT: (B, C) class sets of the images -> (blocks * padded, C), each window's image's
  set, laid out like `cut_windows`'s windows."""
  return _constrain(to_blocks(jnp.repeat(classes, per_image, axis=0), *layout), sharding)


@functools.partial(jax.jit, static_argnames=("per_image", "settings", "layout", "sharding"))
def window_grids(scaled_hw, *, per_image: int, settings: geometry.EvalSettings,
                 layout: tuple[int, int, int, int], sharding):
  """Masked padding: (B, 2) resized image sizes -> (blocks * padded, 2) int32, each
  window's own token grid (an image smaller than the crop is one window of its size),
  laid out like `cut_windows`'s windows."""
  true = jnp.minimum(scaled_hw, jnp.asarray(settings.crop, jnp.int32))
  grid = (-(-true // settings.patch_size)).astype(jnp.int32)
  return _constrain(to_blocks(jnp.repeat(grid, per_image, axis=0), *layout), sharding)


@functools.partial(jax.jit, static_argnames=("shards", "sharding"), donate_argnums=0)
def put_chunk(buffer, values, offset, *, shards: int, sharding):
  """`values` of one model call (`take_chunk`'s layout) into every device's share of
  `buffer` at `offset`."""
  # A small window's logits grid goes into the crop-sized grid of the buffer, zero-padded.
  values = jnp.pad(values.astype(buffer.dtype),
                   [(0, 0)] + [(0, b - v) for b, v in zip(buffer.shape[1:], values.shape[1:])])
  b = buffer.reshape(shards, -1, *buffer.shape[1:])
  v = values.reshape(shards, -1, *values.shape[1:])
  b = jax.lax.dynamic_update_slice_in_dim(b, v, offset, axis=1)
  return _constrain(b.reshape(buffer.shape), sharding)


@functools.partial(jax.jit, static_argnames=("shape", "value", "dtype", "sharding"))
def filled(*, shape, value, dtype, sharding):
  return _constrain(jnp.full(shape, value, dtype), sharding)


@functools.partial(
    jax.jit, donate_argnums=0,
    static_argnames=("shape", "orig", "settings", "layout", "softmax", "sharding"))
def add_pass(scores, grids, orig_hw, scaled_hw, flip, *, shape: geometry.PassShape,
             orig: tuple[int, int], settings: geometry.EvalSettings,
             layout: tuple[int, int, int, int], softmax: bool, sharding):
  """scores (B, Ho, Wo, C) += this pass's logits (or probabilities) at the original size;
  scores=None for the first pass (no zero buffer to fill and add to)."""
  grids = from_blocks(grids, *layout)
  b = orig_hw.shape[0]
  gh, gw, c = grids.shape[1:]
  grids = grids.reshape(b, shape.rows, shape.cols, gh, gw, c)
  common = dict(patch=settings.patch_size)
  rows_first = shape.rows * gh > shape.cols * gw

  def one(grid, ohw, shw):
    a = geometry.axis_matrices(ohw[0], shw[0], False, orig_len=orig[0], canvas_len=shape.canvas_h,
                       window_len=shape.window_h, grid_len=gh, n=shape.rows,
                       crop=settings.crop[0], stride=settings.stride[0], **common)
    bm = geometry.axis_matrices(ohw[1], shw[1], flip, orig_len=orig[1], canvas_len=shape.canvas_w,
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
def add_image_logits(image_scores, selected, image_logits, scaled_hw, *,
                     shape: geometry.PassShape, settings: geometry.EvalSettings, layout,
                     topk: int, sharding):
  """MLSeg: largest image logit per class and union of top-k sets over an image's windows."""
  il = from_blocks(image_logits, *layout).astype(jnp.float32)
  b, n_cls = scaled_hw.shape[0], il.shape[-1]
  il = il.reshape(b, shape.rows, shape.cols, n_cls)

  def valid_windows(shw):
    _, vr = geometry.window_starts(shw[0], settings.crop[0], settings.stride[0], shape.rows)
    _, vc = geometry.window_starts(shw[1], settings.crop[1], settings.stride[1], shape.cols)
    return vr[:, None] & vc[None, :]

  valid = jax.vmap(valid_windows)(scaled_hw)[..., None]  # (B, rows, cols, 1)
  best = jnp.where(valid, il, -jnp.inf).max(axis=(1, 2))
  top = jax.lax.top_k(il, topk)[1]  # (B, rows, cols, k)
  chosen = (jax.nn.one_hot(top, n_cls, dtype=jnp.int32).sum(-2) > 0) & valid
  return (_constrain(jnp.maximum(image_scores, best), sharding),
          _constrain(selected | chosen.any(axis=(1, 2)), sharding))


@functools.partial(jax.jit, static_argnames=("num_classes", "groups", "sharding"))
def predict_and_count(scores, labels, *, num_classes: int, groups: int, sharding):
  """Argmax, and the int32 confusion matrix [label, prediction] of each group of images
  (one group per device: the counts of a device's images never exceed 2^31)."""
  preds = jnp.argmax(scores, axis=-1).astype(jnp.int32)  # (B, Ho, Wo)
  c = num_classes
  idx = jnp.where(labels >= 0, labels * c + preds, c * c).reshape(groups, -1)
  counts = jax.vmap(lambda i: jnp.zeros(c * c, jnp.int32).at[i].add(1, mode="drop"))(idx)
  return _constrain(preds, sharding), _constrain(counts.reshape(groups, c, c), sharding)
