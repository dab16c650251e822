"""How many images share a batch and how many windows a model call takes: the options
(`Batching`, built from `config.eval` here and nowhere else) and the call sizes they give.

Windows go to the model `windows_per_call` per process at a time, windows of several images
together, sharded over the mesh's data axes; the windows left after the full calls go in
calls of a power of two times `min_windows_per_call` (rounded up to the process's device
count; `call_sizes`: 6 left of 8 -> 4 + 2), so padding is never computed past the last
device's share and a forward compiles for a few sizes only per window shape
(`min_windows_per_call` = `windows_per_call`: one size, the last call padded). Images are
binned by shape and run `images_per_batch` at a time; a batch whose bin flushed part-full
(the last images of a shape) runs with the power of two of image slots that holds them
(`image_slots`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Batching:
  """Per process: images whose windows share the model calls of a batch, and the most and
  fewest windows of one model call."""
  images_per_batch: int = 4
  windows_per_call: int = 8
  min_windows_per_call: int = 1

  def __post_init__(self):
    for name in ("images_per_batch", "windows_per_call", "min_windows_per_call"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if self.min_windows_per_call > self.windows_per_call:
      raise ValueError(f"min_windows_per_call={self.min_windows_per_call} is more than "
                       f"windows_per_call={self.windows_per_call}")

  @classmethod
  def from_config(cls, eval_config: Any) -> "Batching":
    """The options of `config.eval`, for every evaluation, the API's `predict` and the
    AOT compile of the evaluation's programs."""
    return cls(images_per_batch=int(eval_config.images_per_batch),
               windows_per_call=int(eval_config.windows_per_call),
               min_windows_per_call=int(eval_config.min_windows_per_call))

  @classmethod
  def for_predict(cls, eval_config: Any) -> "Batching":
    """`--mode predict`: the config's call sizes, one image per batch. A folder's images
    rarely share a shape, so batches of several would mostly wait for the final flush,
    holding every image read so far; one at a time, each image's pictures are written as
    soon as its passes are done."""
    return dataclasses.replace(cls.from_config(eval_config), images_per_batch=1)

  def plan(self, local_shards: int) -> tuple[int, int, int]:
    """(image slots, most windows, fewest windows) per process of a batch and a model
    call: the options rounded up to a multiple of the process's devices over the data
    axes."""
    chunk = _round_up(self.windows_per_call, local_shards)
    return (_round_up(self.images_per_batch, local_shards), chunk,
            min(chunk, _round_up(self.min_windows_per_call, local_shards)))


# `predict.predict_images`' default: the exception of `Batching.for_predict`.
ONE_IMAGE = Batching(images_per_batch=1)


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
