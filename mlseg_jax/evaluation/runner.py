"""The passes of an evaluation run batch by batch: records in, per-image predictions
(`segment`) or the dataset's metrics (`evaluate`) out.

For each batch the host inputs go to the devices, every test pass cuts its windows, runs
the model `batching.call_sizes` at a time and adds its logits at the original size, then
the argmax and the confusion counts are taken on the device (`_dispatch`); one batch is in
flight while the next is read, and its results are pulled to the host after the next one
is dispatched (`_collect`). `forward_calls` lists the model calls `segment` would make for
given image sizes without running them (the AOT compile's programs).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlseg_jax import IGNORE_LABEL
from mlseg_jax.evaluation import batching as batching_lib
from mlseg_jax.evaluation import device
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import host
from mlseg_jax.evaluation import metrics as metrics_lib


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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every batch of one `segment` call shares: the model, the settings, the layout."""
  logits_fn: Callable[..., Any]
  settings: geometry.EvalSettings
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


def _make_run(logits_fn, settings: geometry.EvalSettings, *, num_classes: int, topk: int | None,
              mesh: Mesh | None, data_axis: str | Sequence[str],
              batching: batching_lib.Batching, with_labels: bool,
              gt_classes: bool,
              keep_predictions: bool, keep_scores: bool) -> _Run:
  axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
  if mesh is None:
    if jax.process_count() > 1:
      raise ValueError("several processes: pass the mesh whose data axes span them")
    mesh = Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(axes)), axes)
  blocks, local_shards, shards = device.data_layout(mesh, axes)
  if topk is not None and not 0 < topk <= num_classes:
    raise ValueError(f"topk={topk} must lie in [1, num_classes={num_classes}]")
  if gt_classes and not with_labels:
    raise ValueError("gt_classes: the +GT oracle takes each image's class set from its labels")
  spec = PartitionSpec(axes)
  images, chunk, smallest = batching.plan(local_shards)
  return _Run(logits_fn=logits_fn, settings=settings, num_classes=num_classes, topk=topk,
              mesh=mesh, spec=spec, sharding=NamedSharding(mesh, spec), blocks=blocks,
              shards=shards, images=images, chunk=chunk, unit=local_shards,
              smallest=smallest,
              with_labels=with_labels, gt_classes=gt_classes,
              keep_predictions=keep_predictions, keep_scores=keep_scores,
              settle=shards > 1 and mesh.devices.flat[0].platform == "cpu")


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


def forward_calls(settings: geometry.EvalSettings, sizes: Sequence[tuple[int, int]], *,
                  processes: int = 1, local_shards: int = 1,
                  batching: batching_lib.Batching = batching_lib.Batching(),
                  ) -> collections.Counter:
  """The model calls `segment` makes for images of `sizes` (h, w), without running them:
  {(window_h, window_w, windows of the call over all processes): number of calls}, one
  forward program per key. Binning, batch shapes, call sizes and image slots come from
  the functions `segment` runs; on several processes, process 0's share (images 0, P, 2P,
  ...) stands for every process's (the processes run each other's shapes in lockstep)."""
  images, chunk, smallest = batching.plan(local_shards)
  mine = [(i, hw) for i, hw in enumerate(sizes) if i % processes == 0]
  code_len = 2 + 6 * len(settings.passes)
  calls = collections.Counter()
  for batch in host.batch_stream(mine, lambda hw: settings.batch_shape(*hw), images, code_len,
                            allgather=lambda x: np.asarray(x)[None]):
    for ps in batch.shape.passes:
      for size in batching_lib.call_sizes(batch.max_items * ps.rows * ps.cols, chunk, smallest):
        calls[(ps.window_h, ps.window_w, processes * size)] += 1
  return calls


def _to_device(run: _Run, local: np.ndarray) -> jax.Array:
  return jax.make_array_from_process_local_data(run.sharding, local)


def _to_host(run: _Run, x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, run.mesh, run.spec))


def _shape_of(run: _Run, record: dict[str, Any]) -> geometry.BatchShape:
  return run.settings.batch_shape(*record["image"].shape[:2])


def _slots(run: _Run, batch: host.Batch) -> int:
  """Image slots per process of `batch`: a bin flushed part-full runs at a smaller size."""
  return batching_lib.image_slots(batch.max_items, run.images, run.unit)


def _host_inputs(run: _Run, batch: host.Batch) -> dict[str, Any]:
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


def _run_model(run: _Run, windows, classes, grids_in, n_windows: int, ps: geometry.PassShape,
               layout):
  """logits_fn over the first n_windows windows of every process's part (`call_sizes` at a
  time) -> logits grids and image logits, laid out like the windows (windows never run stay
  0; they only hold padding slots)."""
  grids = image_logits = None
  sizes = batching_lib.call_sizes(n_windows, run.chunk, run.smallest)
  lanes = run.unit
  for size, start in zip(sizes, np.cumsum([0] + sizes[:-1])):
    # Traced: one program per call size, whatever the offset. Sizes and offsets are
    # multiples of the host's device count: a device's share of a call is size // lanes.
    index = np.int32(start // lanes)
    take = functools.partial(device.take_chunk, shards=run.shards, size=size // lanes,
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
      grids = device.filled(shape=(layout[0] * layout[2], *crop_grid, run.num_classes), value=0.0,
                    dtype=jnp.float32, sharding=run.sharding)
    grids = device.put_chunk(grids, logits, index, shards=run.shards, sharding=run.sharding)
    if il is not None:
      if run.topk is None:
        raise ValueError("logits_fn returns image_logits (an MLSeg model): pass topk, the "
                         "k of its top-k selection")
      if image_logits is None:
        image_logits = device.filled(shape=(layout[0] * layout[2], run.num_classes), value=0.0,
                             dtype=jnp.float32, sharding=run.sharding)
      image_logits = device.put_chunk(image_logits, il, index, shards=run.shards,
                                sharding=run.sharding)
  return grids, image_logits


def _run_pass(run: _Run, batch: host.Batch, p: int, inputs: dict[str, Any], totals: tuple):
  """Test pass p (one scale, flipped or not) of `batch` added to totals = (scores (B, Ho,
  Wo, C), image scores (B, C), selected (B, C)), each None until a pass fills it."""
  (_, flip), ps = run.settings.passes[p], batch.shape.passes[p]
  k = run.settings.scale_index(p)
  flip, scaled = np.bool_(flip), inputs["scaled_hw"][k]
  per_host = _slots(run, batch) * ps.rows * ps.cols
  # Room for the calls over every slot's windows (more than the images need).
  layout = (run.blocks, per_host, sum(batching_lib.call_sizes(per_host, run.chunk, run.smallest)),
            run.unit)
  common = dict(settings=run.settings, layout=layout, sharding=run.sharding)
  windows = device.cut_windows(inputs["scaled"][k], scaled, flip, shape=ps, **common)
  classes = (None if inputs["classes"] is None else device.window_classes(
      inputs["classes"][k], per_image=ps.rows * ps.cols, layout=layout, sharding=run.sharding))
  valid_grids = (device.window_grids(scaled, per_image=ps.rows * ps.cols, **common)
                 if run.settings.masked_padding else None)
  _settle(run, windows, classes, valid_grids)
  # Only the first max_items images of each process's part hold an image anywhere.
  grids, image_logits = _run_model(run, windows, classes, valid_grids,
                                   batch.max_items * ps.rows * ps.cols, ps, layout)
  # After the model, every small-window size of this pass shares one program.
  common["shape"] = ps.at_crop(run.settings.crop)
  scores, image_scores, selected = totals
  scores = device.add_pass(scores, grids, inputs["orig"], scaled, flip,
                     orig=(batch.shape.orig_h, batch.shape.orig_w),
                     softmax=len(run.settings.passes) > 1, **common)
  if image_logits is not None:
    if image_scores is None:
      shape = (run.blocks * _slots(run, batch), run.num_classes)
      image_scores = device.filled(shape=shape, value=-np.inf, dtype=jnp.float32,
                                   sharding=run.sharding)
      selected = device.filled(shape=shape, value=False, dtype=jnp.bool_, sharding=run.sharding)
    image_scores, selected = device.add_image_logits(image_scores, selected, image_logits, scaled,
                                               topk=run.topk, **common)
  _settle(run, scores, image_scores, selected)
  return scores, image_scores, selected


def _dispatch(run: _Run, batch: host.Batch) -> dict[str, jax.Array | None]:
  """Starts every pass of `batch`, the argmax and the confusion counts on the device;
  returns their (not yet computed) device arrays."""
  local = _host_inputs(run, batch)
  inputs = dict(scaled=[_to_device(run, x) for x in local["scaled"]],
                scaled_hw=[_to_device(run, x) for x in local["scaled_hw"]],
                orig=_to_device(run, local["orig_hw"]),
                classes=(None if local["classes"] is None else
                         [_to_device(run, x) for x in local["classes"]]))
  totals = (None, None, None)
  for p in range(len(run.settings.passes)):
    totals = _run_pass(run, batch, p, inputs, totals)
  scores, image_scores, selected = totals
  ho, wo = batch.shape.orig_h, batch.shape.orig_w
  labels = (_to_device(run, local["labels"]) if run.with_labels else
            device.filled(shape=(run.blocks * _slots(run, batch), ho, wo), value=IGNORE_LABEL,
                  dtype=jnp.int32, sharding=run.sharding))
  preds, counts = device.predict_and_count(scores, labels, num_classes=run.num_classes,
                                     groups=run.shards, sharding=run.sharding)
  return dict(preds=preds if run.keep_predictions else None,
              counts=counts if run.with_labels else None,
              scores=scores if run.keep_scores else None,
              image_scores=image_scores, selected=selected)


def _collect(run: _Run, batch: host.Batch, out: dict[str, jax.Array | None]) -> BatchResult:
  """`_dispatch`'s arrays pulled to the host, cut to each image's own size."""
  pulled = {k: None if v is None else _to_host(run, v) for k, v in out.items()}
  confusion = None if pulled["counts"] is None else pulled["counts"].astype(np.int64).sum(0)
  images = []
  for slot, (index, record) in enumerate(batch.items):
    h, w = record["image"].shape[:2]
    r = ImageResult(index=index, name=str(record.get("name", index)))
    if pulled["preds"] is not None:
      r.prediction = pulled["preds"][slot, :h, :w]
    if pulled["scores"] is not None:
      r.scores = pulled["scores"][slot, :h, :w]
    if pulled["image_scores"] is not None:
      r.image_scores = pulled["image_scores"][slot]
      r.selected = pulled["selected"][slot]
    if run.with_labels:
      label = record["label"]
      r.label_hist = np.bincount(label[label >= 0].ravel(),
                                 minlength=run.num_classes).astype(np.int64)
    images.append(r)
  return BatchResult(images, confusion, pulled["image_scores"] is not None)


def segment(logits_fn: Callable[..., Any], records: Sequence[dict[str, Any]],
            settings: geometry.EvalSettings, *, num_classes: int, topk: int | None = None,
            mesh: Mesh | None = None, data_axis: str | Sequence[str] = "data",
            batching: batching_lib.Batching = batching_lib.Batching(), with_labels: bool = True,
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
  the first local device. Every process must call this with the same arguments (`host.py`
  says why).
  """
  run = _make_run(logits_fn, settings, num_classes=num_classes, topk=topk, mesh=mesh,
                  data_axis=data_axis, batching=batching, with_labels=with_labels,
                  gt_classes=gt_classes, keep_predictions=keep_predictions,
                  keep_scores=keep_scores)
  indices = host.host_indices(len(records), jax.process_index(), jax.process_count())
  code_len = 2 + 6 * len(settings.passes)
  prepare = functools.partial(host.prepare_record, settings=settings, num_classes=num_classes,
                              with_labels=with_labels, gt_classes=gt_classes)
  items = host.read_ahead(records, indices, read_threads, prepare=prepare)
  pending = None
  # One batch in flight: the next batch is read and dispatched before the previous one's
  # results are pulled to the host, so reading overlaps device work.
  for batch in host.batch_stream(items, functools.partial(_shape_of, run), run.images, code_len,
                            allgather):
    current = batch, _dispatch(run, batch)
    if pending is not None:
      yield _collect(run, *pending)
    pending = current
  if pending is not None:
    yield _collect(run, *pending)


def evaluate(logits_fn: Callable[..., Any], records: Sequence[dict[str, Any]],
             settings: geometry.EvalSettings, *, num_classes: int,
             class_names: Sequence[str] | None = None, topk: int | None = None,
             log_every: int = 0,
             allgather: Callable[[np.ndarray], np.ndarray] = metrics_lib.process_allgather,
             **segment_kwargs) -> dict[str, Any]:
  """mIoU, aAcc, mAcc, per-class IoU / Acc (and for MLSeg models the multi-label metrics) of
  `logits_fn` on `records`, as the reference evaluates: single scale with `settings.ratios =
  (1.0,)`, multi-scale + flip with `ratios=geometry.MS_RATIOS, flip=True`. Every process
  calls it alike; every process gets the totals. `segment_kwargs` (mesh, data_axis,
  batching, gt_classes, read_threads) and the rest are `segment`'s arguments."""
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
