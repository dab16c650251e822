"""Parameter trees as checkpoints hold them: nested dicts <-> {path tuple: array}, and the
one shape change a checkpoint may need (a position embedding on another token grid)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mlseg_jax import errors
from mlseg_jax.models.vit import resize_pos_embed


class ConversionError(errors.CheckpointError):
  """A checkpoint that does not fit the model or format it was given for."""


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def resize_pos_embed_np(value: np.ndarray, target_shape: Sequence[int],
                        grid: Optional[Sequence[int]] = None) -> np.ndarray:
  """(1, 1 + n, D) -> target_shape. The stored grid must be square (every released ViT's
  is); the new one is `grid` when given, else the square that fits target_shape."""
  if value.ndim != 3 or len(target_shape) != 3 or value.shape[2] != target_shape[2]:
    raise ConversionError(f"pos_embed {value.shape} cannot become {tuple(target_shape)}")
  old_n, new_n = value.shape[1] - 1, target_shape[1] - 1
  old_g = int(round(old_n ** 0.5))
  new_grid = tuple(grid) if grid is not None else (int(round(new_n ** 0.5)),) * 2
  if old_g * old_g != old_n or new_grid[0] * new_grid[1] != new_n:
    raise ConversionError(f"pos_embed {value.shape} -> {tuple(target_shape)}: only square "
                          "grids can be resized without knowing the grid")
  return np.asarray(resize_pos_embed(value.astype(np.float32), new_grid, (old_g, old_g)))
