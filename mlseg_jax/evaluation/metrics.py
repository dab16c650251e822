"""Segmentation and multi-label metrics, as mmseg 0.17 and the MLSeg reference compute them.

Segmentation (mmseg `core/evaluation/metrics.py`): from the dataset's confusion matrix
(rows = label, columns = prediction, ignore pixels excluded)
  intersect = diagonal, area_label = row sums, area_pred = column sums,
  union = area_label + area_pred - intersect,
  aAcc = sum(intersect) / sum(area_label), IoU = intersect / union, Acc = intersect / area_label,
  mIoU = nanmean(IoU), mAcc = nanmean(Acc).
A class with neither label nor prediction has IoU 0/0 = NaN and is left out of mIoU; a class
that is predicted but never labelled has IoU 0 (counted) and Acc NaN (left out of mAcc).

Multi-label (MLSeg `losses/accuracy.py`), per image from its image logits and the classes
present in its label map (ignore excluded), then averaged over images that have a class:
  AP (get_average_precision): rank the classes by score; with r_1 < ... < r_G the 0-based ranks
    of the G present classes, AP = (1/G) sum_n n / (r_n + 1);
  recall (img_recall): present classes that were selected / present classes;
  pixel recall (pixel_recall): labelled pixels of selected classes / labelled pixels;
  precision (img_accuracy): selected classes that are present / selected classes.

Counts are int64 on the host. Across processes they are gathered as two int32 halves (JAX
arrays are 32-bit unless x64 is on), so sums beyond 2^31 (COCO+LVIS has 1284^2 cells and
billions of pixels) stay exact.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

_LOW_BITS = 31


def process_allgather(x: np.ndarray) -> np.ndarray:
  """(process_count, *x.shape): every process's `x`."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(x))


def sum_across_hosts(counts: np.ndarray,
                     allgather: Callable[[np.ndarray], np.ndarray] = process_allgather) -> np.ndarray:
  """Exact int64 sum over processes of non-negative int64 `counts` (< 2^62 per process)."""
  counts = np.asarray(counts)
  if counts.dtype != np.int64:
    raise TypeError(f"counts must be int64, got {counts.dtype}")
  if counts.size and (counts.min() < 0 or counts.max() >= 2 ** 62):
    raise ValueError("counts must lie in [0, 2^62) to be split into two int32 halves")
  halves = np.stack([counts >> _LOW_BITS, counts & (2 ** _LOW_BITS - 1)]).astype(np.int32)
  gathered = np.asarray(allgather(halves)).astype(np.int64)  # (processes, 2, ...)
  return (gathered[:, 0].sum(0) << _LOW_BITS) + gathered[:, 1].sum(0)


def sum_floats_across_hosts(values: np.ndarray,
                            allgather: Callable[[np.ndarray], np.ndarray] = process_allgather
                            ) -> np.ndarray:
  """float64 sum over processes, gathered as a float32 value and its float32 remainder."""
  values = np.asarray(values, np.float64)
  high = values.astype(np.float32)
  low = (values - high.astype(np.float64)).astype(np.float32)
  gathered = np.asarray(allgather(np.stack([high, low]))).astype(np.float64)
  return gathered[:, 0].sum(0) + gathered[:, 1].sum(0)


def segmentation_metrics(confusion: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """aAcc, mIoU, mAcc and per-class IoU / Acc (fractions; NaN where undefined), and the
  confusion matrix they come from (int64, rows = label, columns = prediction)."""
  confusion = np.asarray(confusion, np.int64)
  n = confusion.shape[0]
  if confusion.shape != (n, n):
    raise ValueError(f"confusion matrix must be square, got {confusion.shape}")
  names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
  if len(names) != n:
    raise ValueError(f"{len(names)} class names for {n} classes")
  intersect = np.diag(confusion).astype(np.float64)
  area_label = confusion.sum(1).astype(np.float64)
  area_pred = confusion.sum(0).astype(np.float64)
  union = area_label + area_pred - intersect
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersect / union
    acc = intersect / area_label
    all_acc = intersect.sum() / area_label.sum()
  return {
      "aAcc": float(all_acc),
      "mIoU": _nanmean(iou),
      "mAcc": _nanmean(acc),
      "IoU": dict(zip(names, iou.tolist())),
      "Acc": dict(zip(names, acc.tolist())),
      "labelled_pixels": int(area_label.sum()),
      "confusion": confusion,
  }


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def average_precision(scores: np.ndarray, present: np.ndarray) -> float:
  """The reference's per-image AP over the full ranking of `scores`; NaN without a class."""
  present = np.asarray(present, bool)
  g = int(present.sum())
  if g == 0:
    return float("nan")
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order))
  r = np.sort(rank[present])
  return float((np.arange(1, g + 1) / (r + 1)).sum() / g)


class MultiLabelMetrics:
  """Accumulates the MLSeg image-level metrics over images (and processes)."""

  KEYS = ("mAP", "recall", "pixel_recall", "precision")

  def __init__(self):
    self.sums = np.zeros(len(self.KEYS), np.float64)
    self.counts = np.zeros(len(self.KEYS), np.int64)

  def add(self, scores: np.ndarray, selected: np.ndarray, label_hist: np.ndarray):
    """One image: its class scores, selected classes (bool) and labelled pixels per class."""
    present = label_hist > 0
    selected = np.asarray(selected, bool)
    values = [float("nan")] * len(self.KEYS)
    if present.any():
      values[0] = average_precision(scores, present)
      values[1] = (present & selected).sum() / present.sum()
      values[2] = label_hist[selected].sum() / label_hist.sum()
    if selected.any():
      values[3] = (present & selected).sum() / selected.sum()
    for i, v in enumerate(values):
      if not math.isnan(v):
        self.sums[i] += v
        self.counts[i] += 1

  def summary(self, allgather: Callable[[np.ndarray], np.ndarray] = process_allgather,
              ) -> dict[str, float]:
    sums = sum_floats_across_hosts(self.sums, allgather)
    counts = sum_across_hosts(self.counts, allgather)
    with np.errstate(invalid="ignore", divide="ignore"):
      means = sums / counts
    out = {k: float(v) for k, v in zip(self.KEYS, means)}
    out["images"] = int(counts[0])
    return out


# What `train.best_metric` may name: the summary numbers every evaluation reports (the
# multi-label ones only for MLSeg models). Higher is better for all of them.
BEST_METRICS = ("mIoU", "aAcc", "mAcc") + MultiLabelMetrics.KEYS


def format_table(results: dict[str, Any]) -> str:
  """Per-class IoU / Acc and the summary in percent, as mmseg prints them."""
  names = list(results["IoU"])
  width = max([len("Class")] + [len(n) for n in names])

  def pct(v):
    return "  nan" if v is None or math.isnan(v) else f"{100 * v:5.2f}"

  lines = [f"{'Class':<{width}} |   IoU |   Acc", f"{'-' * width}-+-------+------"]
  for n in names:
    lines.append(f"{n:<{width}} | {pct(results['IoU'][n])} | {pct(results['Acc'][n])}")
  lines += ["", "Summary:", "  aAcc  |  mIoU  |  mAcc",
            f"  {pct(results['aAcc'])} | {pct(results['mIoU'])} | {pct(results['mAcc'])}"]
  ml = results.get("multilabel")
  if ml:
    lines += ["", f"Multi-label (top-{ml.get('topk', '?')}, {ml['images']} images):",
              "   mAP  | recall | pixel recall | precision",
              f"  {pct(ml['mAP'])} | {pct(ml['recall'])}  |     {pct(ml['pixel_recall'])}    |"
              f"   {pct(ml['precision'])}"]
  return "\n".join(lines) + "\n"


def _json_safe(x):
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return None if math.isnan(x) else float(x)  # JSON has no NaN: undefined -> null.
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.ndarray):
    return _json_safe(x.tolist())
  return x


def write_results(results: dict[str, Any], directory: str | os.PathLike,
                  name: str = "eval") -> epath.Path:
  """Writes `name`.json (fractions, null where undefined), `name`.txt (the table) and, when
  the results hold it, `name`_confusion.npy (the confusion matrix), in a local directory or
  a `gs://` one."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"{name}.json"
  # COCO+LVIS's matrix has 1.6M cells: a .npy of its own, not JSON.
  summary = {k: v for k, v in results.items() if k != "confusion"}
  path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
  (directory / f"{name}.txt").write_text(format_table(results))
  if results.get("confusion") is not None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(results["confusion"], np.int64))
    (directory / f"{name}_confusion.npy").write_bytes(buffer.getvalue())
  return path


def tensorboard_scalars(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
  """The summary numbers (fractions, as mmseg logs them) under `prefix`/."""
  out = {f"{prefix}/{k}": float(results[k]) for k in ("aAcc", "mIoU", "mAcc")}
  for k, v in (results.get("multilabel") or {}).items():
    if k in MultiLabelMetrics.KEYS:
      out[f"{prefix}/{k}"] = float(v)
  return out
