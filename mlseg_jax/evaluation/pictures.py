"""Pictures of an evaluation: the confusion matrix as a heatmap, the per-class IoU as bars.

Both are drawn from the results `runner.evaluate` returns (its "confusion" and "IoU") into
RGB arrays, which `write_pictures` saves next to the results files as
`NAME_confusion.png` and `NAME_iou.png` and the trackers log as images.

  heatmap  rows = ground truth, columns = prediction, each row divided by the class's
           labelled pixels (so a row reads "where this class's pixels went"); with more than
           `MAX_HEATMAP_CLASSES` classes, only the classes with the most pixels confused
           either way are shown (rows still normalised by all of the class's pixels).
  bars     IoU per class, best first, in the dataset's palette colours; classes neither
           labelled nor predicted (IoU undefined) are left out; with more than `MAX_BARS`
           classes, the best and the worst `MAX_BARS // 2`.

matplotlib, with its display-free Agg backend, is imported when a picture is drawn.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
from etils import epath

MAX_HEATMAP_CLASSES = 40
MAX_BARS = 60
_DPI = 100


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # No display on pods and CI; the figures are only ever rasterised.
  import matplotlib.pyplot as plt

  return plt


def _to_array(fig) -> np.ndarray:
  """(H, W, 3) uint8 of a drawn figure, which is closed."""
  plt = _pyplot()
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return pixels


def most_confused(confusion: np.ndarray, n: int) -> np.ndarray:
  """Indices (ascending) of the n classes with the most pixels confused with other classes,
  as ground truth or as prediction; all classes when there are at most n."""
  confusion = np.asarray(confusion, np.int64)
  if len(confusion) <= n:
    return np.arange(len(confusion))
  diag = np.diag(confusion)
  confused = confusion.sum(0) + confusion.sum(1) - 2 * diag
  return np.sort(np.argsort(-confused, kind="stable")[:n])


def confusion_picture(confusion: np.ndarray, class_names: Sequence[str], *,
                      title: str = "") -> np.ndarray:
  """The row-normalised confusion matrix as a heatmap with class names, (H, W, 3) uint8."""
  plt = _pyplot()
  confusion = np.asarray(confusion, np.int64)
  n_all = len(confusion)
  shown = most_confused(confusion, MAX_HEATMAP_CLASSES)
  rows = confusion.sum(1).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    normalised = confusion[np.ix_(shown, shown)] / rows[shown, None]  # NaN: never labelled.
  names = [class_names[i] for i in shown]
  n = len(shown)
  side = min(max(4.0, 0.32 * n + 2.0), 15.0)
  fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=_DPI)
  cmap = plt.get_cmap("Blues").with_extremes(bad="#dddddd")  # Never labelled: grey rows.
  image = ax.imshow(np.ma.masked_invalid(normalised), cmap=cmap, vmin=0.0, vmax=1.0,
                    interpolation="nearest")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row's pixels")
  font = 8 if n <= 20 else 6
  ax.set_xticks(range(n), names, rotation=90, fontsize=font)
  ax.set_yticks(range(n), names, fontsize=font)
  ax.set_xlabel("prediction")
  ax.set_ylabel("ground truth")
  if n <= 15:  # Few cells: the numbers are readable.
    for i in range(n):
      for j in range(n):
        v = normalised[i, j]
        if not math.isnan(v) and v >= 0.005:
          ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if v > 0.5 else "black")
  subtitle = (f"{n} most confused of {n_all} classes" if n < n_all else f"{n_all} classes")
  ax.set_title(f"{title}\n{subtitle}, rows normalised" if title else
               f"{subtitle}, rows normalised", fontsize=10)
  fig.tight_layout()
  return _to_array(fig)


def iou_picture(iou: dict[str, float], *, palette: Sequence[Sequence[int]] | None = None,
                title: str = "") -> np.ndarray:
  """Per-class IoU as horizontal bars, best first, with names, (H, W, 3) uint8."""
  plt = _pyplot()
  names = list(iou)
  colours = {name: (np.asarray(palette[i]) / 255.0 if palette is not None else "tab:blue")
             for i, name in enumerate(names)}
  defined = [(name, v) for name, v in iou.items() if v is not None and not math.isnan(v)]
  defined.sort(key=lambda nv: -nv[1])
  left_out = len(names) - len(defined)
  miou = np.mean([v for _, v in defined]) if defined else float("nan")  # As metrics.py.
  hidden = 0
  if len(defined) > MAX_BARS:
    half = MAX_BARS // 2
    hidden = len(defined) - 2 * half
    defined = defined[:half] + [(None, float("nan"))] + defined[-half:]
  fig, ax = plt.subplots(figsize=(7.0, 0.8 + 0.22 * max(len(defined), 4)), dpi=_DPI)
  y = np.arange(len(defined))
  values = [0.0 if name is None else 100 * v for name, v in defined]
  ax.barh(y, values, color=[colours.get(name, "white") for name, _ in defined],
          edgecolor="#444444", linewidth=0.5)
  labels = [f"... {hidden} classes ..." if name is None else name for name, _ in defined]
  ax.set_yticks(y, labels, fontsize=7 if len(defined) > 30 else 8)
  ax.invert_yaxis()  # Best on top.
  for yi, (name, v) in zip(y, defined):
    if name is not None:
      ax.text(100 * v + 0.8, yi, f"{100 * v:.1f}", va="center", fontsize=7)
  ax.set_xlim(0, 108)
  ax.set_xlabel("IoU (%)")
  line = f"per-class IoU (mIoU {100 * miou:.1f})"
  if left_out:
    line += f"; {left_out} classes neither labelled nor predicted"
  ax.set_title(f"{title}\n{line}" if title else line, fontsize=9)
  fig.tight_layout()
  return _to_array(fig)


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
  """A PNG in a local directory or a `gs://` one."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
  epath.Path(path).write_bytes(buffer.getvalue())


def pictures(results: dict[str, Any], *, palette: Sequence[Sequence[int]] | None = None,
             title: str = "") -> dict[str, np.ndarray]:
  """{"confusion": heatmap, "iou": bars} of an evaluation's results (those it can draw)."""
  out = {}
  if results.get("confusion") is not None:
    out["confusion"] = confusion_picture(results["confusion"], list(results["IoU"]),
                                         title=title)
  if results.get("IoU"):
    out["iou"] = iou_picture(results["IoU"], palette=palette, title=title)
  return out


def write_pictures(drawn: dict[str, np.ndarray], directory: str | os.PathLike,
                   name: str) -> dict[str, epath.Path]:
  """`drawn` (from `pictures`) as DIRECTORY/NAME_confusion.png and NAME_iou.png."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = {}
  for kind, pixels in drawn.items():
    paths[kind] = directory / f"{name}_{kind}.png"
    write_png(paths[kind], pixels)
  return paths
