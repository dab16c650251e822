"""Pictures of what a model predicts: colour-coded masks and overlays for any image files.

For every input image (a file, or every image in a directory) this writes, at the input's own
size, into the output directory:
  <stem>_mask.png      the predicted class of every pixel in the dataset's palette colours;
  <stem>_overlay.png   the mask blended over the image (alpha = mask weight);
  <stem>_overlay_legend.png  the overlay with a legend on its right: a swatch and the name of
                       every class in the mask with its share of the pixels, and for MLSeg
                       models the classes the model selected with their scores;
  <stem>_classes.json  for MLSeg models: the classes the model selected (the union of the
                       windows' top-k) with their image logits and sigmoid scores, best first.
Prediction is the evaluation's: keep-ratio resize to the test scale, sliding windows,
optionally multi-scale + flip (see `runner.py`). Inputs and output may be local or `gs://`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from mlseg_jax import errors
from mlseg_jax.data.datasets import IMAGE_SUFFIXES, image_to_rgb
from mlseg_jax.evaluation import batching as batching_lib
from mlseg_jax.evaluation import geometry
from mlseg_jax.evaluation import runner


def find_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[epath.Path]:
  """Image files named by `paths`: files as given, directories' images sorted by name."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  found = []
  for p in map(epath.Path, paths):
    if p.is_dir():
      found += sorted(f for f in p.iterdir()
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
      found.append(p)
    else:
      raise FileNotFoundError(f"no such image file or directory: {p}")
  if not found:
    raise errors.DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                           f"{', '.join(str(p) for p in paths)}")
  return found


def _resolved(path: str | os.PathLike) -> str:
  text = os.fspath(path)
  return text.rstrip("/") if "://" in text else os.path.realpath(text)


def check_output(paths: str | os.PathLike | Sequence[str | os.PathLike],
                 output_dir: str | os.PathLike) -> None:
  """Refuses an output folder that is an input folder or inside one: the next run over the
  same inputs would segment this run's pictures as images."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = _resolved(output_dir)
  for p in paths:
    if epath.Path(p).is_dir():
      folder = _resolved(p)
      if out == folder or out.startswith(folder + "/"):
        raise errors.UsageError(
            f"--output {output_dir} is inside --images {p}: the pictures written there "
            "would be read as images by the next run; pass another output folder")


# A file that does not decode still goes through the sliding window (every process keeps the
# same batches), as a black image of its header's size, or this one when it has none.
_PLACEHOLDER_HW = (32, 32)


class _ImageFiles:
  """Random-access records {"image", "name"} read from image files on demand; a record read
  stays until `release(i)`, so the pictures are drawn without decoding the file again.

  An image that does not read is recorded in `failed` (index -> reason) and stands in as a
  black placeholder, so the other images are still predicted."""

  def __init__(self, files: Sequence[epath.Path]):
    self.files = list(files)
    self._held: dict[int, dict[str, Any]] = {}
    self.failed: dict[int, str] = {}

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if i not in self._held:
      self._held[i] = self._read(i)
    return self._held[i]

  def release(self, i: int) -> dict[str, Any]:
    return self._held.pop(i, None) or self._read(i)

  def _read(self, i: int) -> dict[str, Any]:
    path = self.files[i]
    hw = _PLACEHOLDER_HW
    try:
      with Image.open(io.BytesIO(path.read_bytes())) as im:
        hw = (im.height, im.width)
        image = image_to_rgb(im, str(path))
    except errors.DataError as e:
      self.failed[i] = str(e)
      image = np.zeros(hw + (3,), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      self.failed[i] = f"{path}: cannot read the image ({e})"
      image = np.zeros(hw + (3,), np.uint8)
    return {"image": image, "name": str(path)}


def _output_stems(files: Sequence[epath.Path]) -> list[str]:
  """File stems, made unique where two inputs share one (a.jpg, a.png -> a_jpg, a_png)."""
  stems = [f.stem for f in files]
  counts = {s: stems.count(s) for s in stems}
  out, used = [], set()
  for f, s in zip(files, stems):
    name = s if counts[s] == 1 else f"{s}_{f.suffix.lstrip('.').lower()}"
    base, k = name, 1
    while name in used:  # Same stem and suffix in two directories.
      name, k = f"{base}_{k}", k + 1
    used.add(name)
    out.append(name)
  return out


def colorize(prediction: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 palette colours."""
  return palette[prediction]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
  """Alpha blend of the colour mask over the image (alpha = weight of the mask)."""
  blend = (1 - alpha) * image.astype(np.float32) + alpha * mask.astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def predict_images(logits_fn: Callable[[jax.Array], Any],
                   paths: str | os.PathLike | Sequence[str | os.PathLike],
                   output_dir: str | os.PathLike, settings: geometry.EvalSettings, *,
                   palette: Sequence[Sequence[int]], class_names: Sequence[str],
                   topk: int | None = None, alpha: float = 0.5, mesh=None,
                   data_axis: str | Sequence[str] = "data",
                   batching: batching_lib.Batching = batching_lib.ONE_IMAGE) -> list[dict[str, str]]:
  """Writes mask, overlay (and MLSeg classes) for each image; returns the written paths.

  `logits_fn` and `settings` are as for `runner.segment`; `topk` (the model's k) is
  needed for MLSeg models, whose `logits_fn` returns image logits. With several processes,
  each writes the pictures of its share of the images. An image that does not read is
  logged and returned as {"image", "error"}, with nothing written for it.
  """
  num_classes = len(class_names)
  palette = _checked_palette(palette, num_classes)
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
  check_output(paths, output_dir)
  files = find_images(paths)
  stems = _output_stems(files)
  output_dir = epath.Path(output_dir)
  with errors.writing(output_dir):
    output_dir.mkdir(parents=True, exist_ok=True)
  records = _ImageFiles(files)
  written = []
  for batch in runner.segment(logits_fn, records, settings, num_classes=num_classes,
                              topk=topk, mesh=mesh, data_axis=data_axis, batching=batching,
                              with_labels=False, keep_predictions=True):
    for result in batch.images:
      image = records.release(result.index)["image"]
      if result.index in records.failed:
        logging.warning("%s; no pictures for it", records.failed[result.index])
        written.append({"image": str(files[result.index]),
                        "error": records.failed[result.index]})
        continue
      stem = stems[result.index]
      mask = colorize(result.prediction, palette)
      out = {"image": str(files[result.index]),
             "mask": str(output_dir / f"{stem}_mask.png"),
             "overlay": str(output_dir / f"{stem}_overlay.png")}
      blended = overlay(image, mask, alpha)
      _write_png(out["mask"], mask)
      _write_png(out["overlay"], blended)
      sections = [("classes (share of pixels)",
                   present_classes(result.prediction, palette, class_names))]
      if result.image_scores is not None:
        selected = _selected_classes(result, class_names, topk, out["image"])
        out["classes"] = str(output_dir / f"{stem}_classes.json")
        with errors.writing(out["classes"]):
          epath.Path(out["classes"]).write_text(json.dumps(selected, indent=2) + "\n")
        # Each window selects its own top-k: the image is segmented among their union,
        # which can hold more than k classes. Selected classes' sigmoid scores mostly read
        # 1.00, so the legend gives the image logit that ranks them.
        sections.append((f"selected: union of the windows' top-{topk}, image logit",
                         [(palette[c["id"]], f"{c['name']}  {c['logit']:.1f}")
                          for c in selected["selected"]]))
      out["overlay_legend"] = str(output_dir / f"{stem}_overlay_legend.png")
      _write_png(out["overlay_legend"], with_legend(blended, sections))
      written.append(out)
  return written


# ---------------------------------------------------------------------------------------------
# Legends: a panel beside a picture, one row per class (a swatch of its colour, a text).

Entry = tuple[Sequence[int], str]  # (RGB colour, text)
MAX_LEGEND_ROWS = 30  # Per section; the rest is counted in one line.


def present_classes(prediction: np.ndarray, palette: np.ndarray, class_names: Sequence[str],
                    ) -> list[Entry]:
  """Legend rows of the classes in a (H, W) class map (negative ids ignored), most pixels
  first: their colour and "name  share%"."""
  ids = prediction[prediction >= 0].ravel()
  counts = np.bincount(ids, minlength=len(class_names)) if ids.size else np.zeros(0, int)
  order = np.flatnonzero(counts)
  order = order[np.argsort(-counts[order], kind="stable")]
  return [(palette[i], f"{class_names[i]}  {100 * counts[i] / ids.size:.1f}%") for i in order]


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: its fixed bitmap font.
    return ImageFont.load_default()


def with_legend(picture: np.ndarray, sections: Sequence[tuple[str, Sequence[Entry]]],
                ) -> np.ndarray:
  """`picture` (H, W, 3) with a white panel on its right listing each section: its title,
  then per entry a square of the entry's exact colour and its text. The panel grows the
  picture's height when it needs more (white below the picture)."""
  h, w = picture.shape[:2]
  size = int(np.clip(round(h / 32), 12, 28))  # Text readable beside a small or large image.
  font, pad, row = _font(size), max(size // 2, 4), round(1.5 * size)
  lines = []  # (colour or None, text)
  for k, (title, entries) in enumerate(sections):
    if k:
      lines.append((None, ""))  # A blank row between sections.
    lines.append((None, title))
    for colour, text in entries[:MAX_LEGEND_ROWS]:
      lines.append((tuple(int(c) for c in colour), text))
    if len(entries) > MAX_LEGEND_ROWS:
      lines.append((None, f"+ {len(entries) - MAX_LEGEND_ROWS} more"))
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_w = max([measure.textlength(text, font=font) for _, text in lines] or [0])
  panel_w = int(3 * pad + size + text_w + pad)
  canvas = Image.new("RGB", (w + panel_w, max(h, 2 * pad + row * len(lines))), "white")
  canvas.paste(Image.fromarray(picture), (0, 0))
  draw = ImageDraw.Draw(canvas)
  y = pad
  for colour, text in lines:
    x = w + pad
    if colour is None:  # A section title, flush left.
      draw.text((x, y), text, fill=(0, 0, 0), font=font)
    else:
      draw.rectangle([x + pad, y, x + pad + size - 1, y + size - 1], fill=colour,
                     outline=(64, 64, 64))
      draw.text((x + 2 * pad + size, y), text, fill=(0, 0, 0), font=font)
    y += row
  return np.asarray(canvas)


def comparison_picture(image: np.ndarray, label: np.ndarray, prediction: np.ndarray,
                       palette: Sequence[Sequence[int]], class_names: Sequence[str],
                       alpha: float = 0.5) -> np.ndarray:
  """The ground truth (left) and the prediction (right) over `image`, with a legend of the
  classes of each; ignored label pixels (negative) show the image alone."""
  palette = np.asarray(palette, np.uint8)
  truth = overlay(image, colorize(np.maximum(label, 0), palette), alpha)
  truth[label < 0] = image[label < 0]
  predicted = overlay(image, colorize(prediction, palette), alpha)
  gap = np.full((image.shape[0], max(image.shape[1] // 50, 2), 3), 255, np.uint8)
  return with_legend(np.concatenate([truth, gap, predicted], 1), [
      ("ground truth (left)", present_classes(label, palette, class_names)),
      ("prediction (right)", present_classes(prediction, palette, class_names))])


def _checked_palette(palette: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
  palette = np.asarray(palette)
  if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) < num_classes:
    raise ValueError(f"palette must hold an RGB colour for each of the {num_classes} classes, "
                     f"got shape {palette.shape}")
  if palette.min() < 0 or palette.max() > 255:
    raise ValueError("palette colours must lie in [0, 255]")
  return palette.astype(np.uint8)


def _write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  with errors.writing(path):  # A full or read-only output folder: one line naming it.
    epath.Path(path).write_bytes(buffer.getvalue())


def _selected_classes(result: runner.ImageResult, class_names: Sequence[str], topk: int | None,
                      image_path: str) -> dict[str, Any]:
  ids = np.flatnonzero(result.selected)
  ids = ids[np.argsort(-result.image_scores[ids], kind="stable")]
  logits = result.image_scores[ids].astype(np.float64)
  return {
      "image": image_path,
      "topk": topk,
      "selected": [{"id": int(i), "name": class_names[i], "logit": float(l),
                    "score": float(1 / (1 + np.exp(-l)))} for i, l in zip(ids, logits)],
  }
