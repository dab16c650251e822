"""The host's part of an evaluation: which images each process reads, reading them ahead,
and binning them into batches every process agrees on.

Image i belongs to process i % process_count (every image exactly once; the shorter lists
are padded with empty slots). The resize to each test scale runs here, in `read_ahead`'s
threads, by the very call mmcv makes (cv2.resize INTER_LINEAR on uint8: OpenCV's
fixed-point arithmetic, which a float resize misses by one grey level on ~11 % of an
upscaled image's values; 6 ms per 512x683 image for six scales on a 2-core CPU, where an
emulation in XLA took 31 ms). All processes run the same jitted programs in the same order
with the same shapes: after reading each image they exchange, by a tiny allgather, the shape
of the bin that became full, and all run that shape together; a process with fewer images of
that shape runs masked empty slots (`batch_stream`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.data.transforms import resize_image, resize_label
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import metrics as metrics_lib


def host_indices(num_images: int, process_index: int, process_count: int) -> list[int | None]:
  """Images of one process: i % process_count == process_index, padded with None so every
  process has the same count (each image is evaluated exactly once over all processes)."""
  per_host = -(-num_images // process_count)
  own = list(range(process_index, num_images, process_count))
  return own + [None] * (per_host - len(own))


@dataclasses.dataclass
class Batch:
  shape: geometry.BatchShape
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


def prepare_record(record: dict[str, Any], settings: geometry.EvalSettings, *, num_classes: int,
                   with_labels: bool = True, gt_classes: bool = False) -> dict[str, Any]:
  """`record` checked, with what the device needs of it made on the host: "scaled_images",
  the image at each of `settings.scales` as mmcv.imrescale makes it (OpenCV's bilinear on
  uint8, whose fixed-point arithmetic a float resize misses by one grey level on ~11 % of
  an upscaled image's values), and for +GT "scaled_classes" (scales, C) bool, the classes
  of the label nearest-resized to each scale: the reference loads the label before
  MultiScaleFlipAug, whose Resize rescales it with the image, and its oracle takes that."""
  check_record(record, num_classes, with_labels)
  sizes = settings.scaled_sizes(*record["image"].shape[:2])
  out = dict(record, scaled_images=[resize_image(record["image"], h, w) for h, w in sizes])
  if gt_classes:
    label = np.asarray(record["label"])
    out["scaled_classes"] = np.zeros((len(sizes), num_classes), bool)
    for k, (h, w) in enumerate(sizes):
      resized = resize_label(label, h, w)
      out["scaled_classes"][k, np.unique(resized[resized >= 0])] = True
  return out


def check_record(record: dict[str, Any], num_classes: int, with_labels: bool):
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


def batch_stream(items: Iterable[tuple[int, dict[str, Any]] | None],
                 shape_of: Callable[[dict[str, Any]], geometry.BatchShape], batch_size: int,
                 code_len: int,
                 allgather: Callable[[np.ndarray], np.ndarray] = metrics_lib.process_allgather,
                 ) -> Iterator[Batch]:
  """Bins records by static shape and yields batches, in the same order on every process.

  `items` are this process's (index, record) pairs, None for padding, as many on every
  process. After each item, every process proposes the shape of a bin that just became full
  (or nothing); the proposals are gathered and every proposed shape is run by all processes,
  each with what its own bin holds, possibly nothing. At the end the bins are flushed the
  same way, one shape per process per round. `code_len` is the length of
  `BatchShape.encode()`.
  """
  bins: dict[geometry.BatchShape, list[tuple[int, dict[str, Any]]]] = {}
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


def _agree(bins: dict[geometry.BatchShape, list[tuple[int, dict[str, Any]]]],
           proposal: geometry.BatchShape | None, *, batch_size: int, code_len: int,
           allgather: Callable[[np.ndarray], np.ndarray]) -> list[Batch]:
  """Every process's proposal gathered; the batches of every proposed shape, taken from
  this process's `bins` (possibly empty), in the same order on every process."""
  code = (np.full((code_len,), -1, np.int32) if proposal is None
          else np.asarray(proposal.encode(), np.int32))
  gathered = allgather(code)
  batches = []
  for shape in sorted({geometry.BatchShape.decode(row) for row in gathered if row[0] >= 0}):
    queue = bins.pop(shape, [])
    items, rest = queue[:batch_size], queue[batch_size:]
    if rest:
      bins[shape] = rest
    counts = allgather(np.asarray([len(items)], np.int32))
    batches.append(Batch(shape, items, int(counts.max())))
  return batches
