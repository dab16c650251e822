"""Grain input pipeline of training batches, sharded by JAX process.

Training is one deterministic global stream, source -> shuffle (reshuffled each epoch) ->
repeat -> augment (each position with its own seed), and process p of P takes positions
p, p + P, p + 2P, ... of it. So each host reads only its records, one global batch is always
the same B consecutive positions whatever the number of hosts, and a host's position, hence
its whole batch, can be recomputed from the iterator state alone: that state (a few integers)
is what `checkpoint_args` saves with the model.

With `data.on_error = "skip"` a record that does not read (a corrupt image, a label map of
the wrong size or with values out of range) is logged once per process and replaced by the
record of the next position whose record reads: what a position holds is still a function
of the position alone, so the state stays the same few integers and a resumed run sees the
same batches. Each batch counts the positions it replaced; the iterator adds them up in
`skipped_records` (this process's, since it was made) and drops the count from the batch.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from mlseg_jax import errors
from mlseg_jax.data import datasets
from mlseg_jax.data import transforms


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in 0..{count - 1}")
  return index, count


def _to_iter(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
  """In-process reading threads, then `num_workers` worker processes when asked."""
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=int(config.get("read_threads", 2)),
      prefetch_buffer_size=int(config.prefetch_buffer)))
  if config.num_workers > 0:
    # Grain's workers read absl flags; outside absl.app (tests, notebooks) none were parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.num_workers),
        per_worker_buffer_size=int(config.prefetch_buffer)))
  return it


def train_transform(config: ml_collections.ConfigDict,
                    dataset: datasets.Dataset) -> transforms.TrainTransform:
  return transforms.TrainTransform(
      crop_size=tuple(int(v) for v in config.crop_size),
      img_scale=tuple(int(v) for v in config.img_scale),
      ratio_range=tuple(float(v) for v in config.ratio_range) if config.ratio_range else None,
      cat_max_ratio=float(config.cat_max_ratio),
      crop_ignore_label=int(config.crop_ignore_label),
      flip_prob=float(config.flip_prob),
      photometric=bool(config.photometric),
      mean=dataset.mean, std=dataset.std)


class _ReadRecord:
  """(position, record index) -> the record, with "skipped": 1 where it stands in for a bad
  one. With `skip`, a record that does not read gives way to the record of the next
  position of `order` that does: a function of the position, whichever process or thread
  reads it (the records known to be bad only save reading them again)."""

  def __init__(self, dataset: datasets.Dataset, order: grain.MapDataset, skip: bool):
    self.dataset, self.order, self.skip = dataset, order, skip
    self._bad, self._lock = {}, threading.Lock()  # This process's bad records: index -> why.

  def __getstate__(self):  # Worker processes start with their own.
    return {**self.__dict__, "_bad": {}, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __call__(self, position: int, index: int) -> dict[str, Any]:
    if not self.skip:
      return dict(self.dataset[index], skipped=np.int32(0))
    for offset in range(2 * len(self.dataset)):  # Two epochs' worth hold one whole epoch.
      if offset:
        index = self.order[position + offset]
      if index in self._bad:
        continue
      try:
        return dict(self.dataset[index], skipped=np.int32(offset > 0))
      except datasets.RECORD_ERRORS as e:
        self._note_bad(index, e)
    raise errors.DataError(f"none of the {len(self.dataset)} training records reads, e.g. "
                           f"{next(iter(self._bad.values()))}")

  def _note_bad(self, index: int, error: BaseException) -> None:
    with self._lock:
      if index in self._bad:
        return
      self._bad[index] = str(error)
    logging.warning("data.on_error='skip': leaving out a bad training record: %s", error)


@dataclasses.dataclass(frozen=True)
class _Augment:
  """The training transform, keeping the record's "skipped" mark for the batch."""
  transform: transforms.TrainTransform

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return dict(self.transform(record, rng), skipped=record["skipped"])


class _CountSkipped(grain.DatasetIterator):
  """Batches without their "skipped" field, which `skipped_records` adds up; the state is
  the wrapped iterator's own. `num_records`: the split's records, for the summary line."""

  def __init__(self, parent: grain.DatasetIterator, num_records: int):
    super().__init__(parent)
    self.skipped_records = 0
    self.num_records = num_records

  def __next__(self):
    batch = next(self._parent)
    self.skipped_records += int(np.sum(batch.pop("skipped")))
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_train_iterator(config: ml_collections.ConfigDict, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Endless iterator of this host's batches: {"image": float32 (b, crop_h, crop_w, 3)
  normalised, "label": int32 (b, crop_h, crop_w)}, b = global_batch_size / process_count.

  `config.shuffle_seed` fixes the data order, `seed` the augmentations. The iterator's
  get_state()/set_state() (or `checkpoint_args`) resume it exactly. `config.on_error`:
  "raise" stops at a bad record, "skip" leaves it out (the module's docstring); the
  iterator's `skipped_records` counts those left out, its `num_records` the split's records.
  """
  index, count = _process(process_index, process_count)
  if global_batch_size % count:
    raise ValueError(f"global batch {global_batch_size} does not split over {count} processes")
  skip = datasets.on_error_mode(config) == "skip"
  dataset = datasets.get_dataset(config, "train", skip_unpaired=skip)
  for _, why in dataset.unpaired:
    logging.warning("data.on_error='skip': leaving out a file without its partner: %s", why)
  if len(dataset) == 0:
    raise errors.DataError(f"{config.root}: no training image has its label map "
                           f"({len(dataset.unpaired)} files without a partner)")
  order = grain.MapDataset.range(len(dataset)).shuffle(seed=int(config.shuffle_seed)).repeat()
  ds = (order  # Position -> record index: the same order as shuffling the records.
        .map_with_index(_ReadRecord(dataset, order, skip))
        .random_map(_Augment(train_transform(config, dataset)), seed=int(seed))
        [index::count]
        .batch(global_batch_size // count, drop_remainder=True))
  return _CountSkipped(iter(_to_iter(ds, config)), len(dataset))


def make_global_batch(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Per-host numpy batch -> global jax.Arrays laid out by `sharding` (batch on axis 0)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
  """Orbax args that save (or restore in place) the iterator's state, to put beside the
  model's in `ocp.args.Composite(state=..., data=checkpoint_args(it))`."""
  return (grain.checkpoint.CheckpointRestore(iterator) if restore
          else grain.checkpoint.CheckpointSave(iterator))


class _Raised:
  """What the prefetch thread hands over when reading failed (or the iterator ended)."""

  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetch:
  """Iterator of device batches read ahead by a background thread.

  `to_device(next(iterator))` for the next `size` batches runs while the devices work, so
  reading, collating and the host-to-device copy overlap the training step even where the
  loop waits on the devices (log steps, checkpoints, evaluation).

  Checkpointing saves the position after the last batch *returned*, not after the last one
  read ahead, so a resumed run sees every batch exactly once. The saved state is the
  wrapped iterator's own (same file as without prefetch). Errors raised while reading
  (a corrupt image, a missing file) are raised by the `next()` that would have returned
  that batch.
  """

  def __init__(self, iterator, to_device=lambda x: x, size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be at least 1, got {size}")
    self._it, self._to_device, self._size = iterator, to_device, size
    self._checkpointable = hasattr(iterator, "get_state")
    self._thread = None
    self._state = None  # The wrapped iterator's state after the last returned batch.

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, _Raised):
      self._queue.put(item)  # Every later next() raises it too.
      raise item.error
    batch, self._state = item
    return batch

  def _start(self):
    self._state = self._it.get_state() if self._checkpointable else None
    self._queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, name="device-prefetch",
                                    daemon=True)
    self._thread.start()

  def _produce(self):
    def put(item):
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    try:
      while not self._stop.is_set():
        host = next(self._it)
        state = self._it.get_state() if self._checkpointable else None
        if not put((self._to_device(host), state)):
          return
    except BaseException as e:  # noqa: BLE001  (StopIteration included: handed over)
      put(_Raised(e))

  def close(self, timeout: float | None = None) -> bool:
    """Stops the thread; batches read ahead are dropped (the state does not count them).

    With a `timeout`, waits at most that long for a read in progress (a stalled network
    file system) and returns False if the thread is still in it; it is a daemon thread
    and ends with the process.
    """
    if self._thread is None:
      return True
    self._stop.set()
    self._thread.join(timeout)
    stopped = not self._thread.is_alive()
    if not stopped:
      logging.warning("the device-prefetch thread is still reading after %.0f s; leaving "
                      "it behind", timeout)
    self._thread = None
    return stopped

  # Grain's checkpoint handler saves `get_state()` bytes of iterators that are not its
  # own DatasetIterator, restores with `set_state(bytes)`, then calls `start_prefetch()`.
  def get_state(self) -> bytes:
    if not self._checkpointable:
      raise TypeError(f"{type(self._it).__name__} has no get_state(): it cannot be "
                      "checkpointed")
    state = self._state if self._thread is not None else self._it.get_state()
    if isinstance(state, bytes):
      return state
    return json.dumps(state, indent=4).encode()

  def set_state(self, state) -> None:
    self.close()
    if isinstance(state, (bytes, str)) and not isinstance(self._it.get_state(), bytes):
      state = json.loads(state)  # get_state() encoded it.
    self._it.set_state(state)

  def start_prefetch(self) -> None:
    if self._thread is None and hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()
