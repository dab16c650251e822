r"""Dataset preparation: the conversions the reference does with mmseg's tools, and packing.

  # COCO-Stuff 10k (cocostuff-10k-v1.1: images/, annotations/*.mat, imageLists/) -> mmseg layout
  python -m mlseg_jax.data.prepare coco_stuff10k --src cocostuff-10k-v1.1 --dst coco_stuff10k

  # Pascal-Context 60 from PASCAL in Detail's trainval_merged.json, into VOC2010/
  python -m mlseg_jax.data.prepare pascal_context --src trainval_merged.json \
      --dst VOCdevkit/VOC2010

  # Any dataset the readers know -> ArrayRecord files (one read per record instead of two
  # small files; then config.format = "array_record", config.root = the --dst folder)
  python -m mlseg_jax.data.prepare pack --dataset ade20k --src ADEChallengeData2016 \
      --dst ade20k_packed [--splits training,validation]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import sys
from typing import Iterable, Sequence

from etils import epath
import numpy as np
import PIL.Image

from mlseg_jax import errors
from mlseg_jax.data import datasets

# ---------------------------------------------------------------------------------------------
# COCO-Stuff 10k: .mat annotations with COCO ids (0 = unlabeled, 1..182) -> *_labelTrainIds.png
# with 0 = unlabeled and 1..171 = the 171 ids in use, in order (reduce_zero_label then makes
# them 0..170). mmseg's coco_stuff10k.py does the same with a 182-entry table.

# COCO ids that no COCO-Stuff image uses (11 of the 91 thing ids never got annotations).
COCO_STUFF_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
NUM_COCO_IDS = 182


def coco_stuff_train_ids() -> np.ndarray:
  """(65536,) int32: COCO id -> stored train id (0 unlabeled, 1..171); -1 for ids not in use."""
  table = np.full(65536, -1, np.int32)
  used = [i for i in range(1, NUM_COCO_IDS + 1) if i not in COCO_STUFF_UNUSED_IDS]
  table[0] = 0
  table[used] = np.arange(1, len(used) + 1)
  return table


def convert_coco_stuff_mat(mat_path: epath.Path) -> np.ndarray:
  """One official .mat annotation (field `S`: COCO ids) -> uint8 stored train ids."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    with mat_path.open("rb") as f:
      mat = scipy.io.loadmat(f)
  except Exception as e:  # scipy raises several types for unreadable files.
    raise errors.DataError(f"{mat_path}: cannot read the .mat file ({e})") from e
  if "S" not in mat:
    raise errors.DataError(f"{mat_path}: no field 'S' (the label map); fields: "
                     f"{sorted(k for k in mat if not k.startswith('__'))}")
  ids = np.asarray(mat["S"])
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
    raise errors.DataError(f"{mat_path}: 'S' must be a 2-D map of non-negative integer COCO ids, got "
                     f"{ids.dtype} {ids.shape}")
  stored = coco_stuff_train_ids()[np.minimum(ids, 65535)]
  if (stored < 0).any():
    bad = np.unique(ids[stored < 0])
    raise errors.DataError(f"{mat_path}: COCO ids {bad[:10].tolist()} are not COCO-Stuff classes "
                     f"(0 = unlabeled, 1..{NUM_COCO_IDS} except {COCO_STUFF_UNUSED_IDS})")
  return stored.astype(np.uint8)


def _read_list(path: epath.Path) -> list[str]:
  if not path.exists():
    raise errors.DataError(f"{path}: image list not found")
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _save_png(array: np.ndarray, path: epath.Path) -> None:
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG")
  path.write_bytes(buf.getvalue())


def prepare_coco_stuff10k(src: epath.Path, dst: epath.Path) -> dict[str, int]:
  """cocostuff-10k-v1.1 -> dst/images/{train2014,test2014}/*.jpg and
  dst/annotations/{...}/*_labelTrainIds.png, split by imageLists/{train,test}.txt."""
  counts = {}
  for list_name, split in (("train", "train2014"), ("test", "test2014")):
    names = _read_list(src / "imageLists" / f"{list_name}.txt")
    (dst / "images" / split).mkdir(parents=True, exist_ok=True)
    (dst / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for name in names:
      image = src / "images" / f"{name}.jpg"
      if not image.exists():
        raise errors.DataError(f"{image}: listed in imageLists/{list_name}.txt but missing")
      stored = convert_coco_stuff_mat(src / "annotations" / f"{name}.mat")
      (dst / "images" / split / image.name).write_bytes(image.read_bytes())
      _save_png(stored, dst / "annotations" / split / f"{name}_labelTrainIds.png")
    counts[split] = len(names)
  return counts


# ---------------------------------------------------------------------------------------------
# Pascal-Context: trainval_merged.json (PASCAL in Detail) -> SegmentationClassContext/*.png with
# 0..59. Each image's class mask is its segmentation annotations painted in file order (later
# ones on top), as the Detail API's getMask draws it; then the 59 classes of Pascal-Context 60
# become 1..59 by their rank among these ids, and everything else is 0, background (mmseg's
# tool asserts instead that no other id occurs; on data it accepts, the two agree). Ids in COCO
# -Stuff that are not among the 171 raise here, where mmseg would leave them unchanged.

PASCAL_CONTEXT_IDS = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454,
    458,
)


def decode_rle(segmentation: dict, source: str) -> np.ndarray:
  """COCO run-length encoding ({"size": [h, w], "counts": str or list}) -> bool (h, w).

  Runs alternate 0s and 1s over the column-major pixels, starting with 0s. A string holds
  each run as 5-bit groups (6th bit: more follow; 5th bit of the last: negative), offset by
  48, and from the third run on, as the difference to the run two before.
  """
  if not isinstance(segmentation, dict) or "counts" not in segmentation:
    raise errors.DataError(f"{source}: segmentation is not run-length encoded: "
                     f"{str(segmentation)[:80]}")
  h, w = segmentation["size"]
  counts = segmentation["counts"]
  if isinstance(counts, str):
    runs, i = [], 0
    while i < len(counts):
      value, shift, more = 0, 0, True
      while more:
        c = ord(counts[i]) - 48
        value |= (c & 0x1f) << shift
        more = bool(c & 0x20)
        i += 1
        shift += 5
        if not more and c & 0x10:
          value -= 1 << shift
      if len(runs) > 2:
        value += runs[-2]
      runs.append(value)
    counts = runs
  if sum(counts) != h * w:
    raise errors.DataError(f"{source}: run lengths add up to {sum(counts)}, not {h}x{w}")
  bits = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
  return bits.reshape(w, h).T


def pascal_context_masks(annotation: dict, phase: str) -> Iterable[tuple[str, np.ndarray]]:
  """(image stem, uint8 0..59 label map) for every image of `phase` in the Detail json."""
  to_index = np.zeros(max(PASCAL_CONTEXT_IDS) + 1, np.uint8)
  to_index[list(PASCAL_CONTEXT_IDS)] = np.arange(len(PASCAL_CONTEXT_IDS))
  by_image = collections.defaultdict(list)
  for ann in annotation["annos_segmentation"]:
    by_image[ann["image_id"]].append(ann)
  for img in annotation["images"]:
    if img["phase"] != phase:
      continue
    mask = np.zeros((img["height"], img["width"]), np.int64)
    for ann in by_image[img["image_id"]]:
      pixels = decode_rle(ann["segmentation"], f"annotation {ann.get('id')} of {img['file_name']}")
      if pixels.shape != mask.shape:
        raise errors.DataError(f"annotation {ann.get('id')} of {img['file_name']} is "
                         f"{pixels.shape}, the image {mask.shape}")
      mask[pixels] = ann["category_id"]
    in_table = mask < len(to_index)
    label = np.where(in_table, to_index[np.where(in_table, mask, 0)], 0).astype(np.uint8)
    yield img["file_name"].rsplit(".", 1)[0], label


def prepare_pascal_context(json_path: epath.Path, dst: epath.Path) -> dict[str, int]:
  """trainval_merged.json -> dst/SegmentationClassContext/*.png and
  dst/ImageSets/SegmentationContext/{train,val}.txt (dst = VOCdevkit/VOC2010)."""
  try:
    annotation = json.loads(json_path.read_text())
  except (OSError, ValueError) as e:
    raise errors.DataError(f"{json_path}: cannot read the json ({e})") from e
  for key in ("images", "annos_segmentation"):
    if key not in annotation:
      raise errors.DataError(f"{json_path}: no {key!r} key; is this PASCAL in Detail's "
                       "trainval_merged.json?")
  (dst / "SegmentationClassContext").mkdir(parents=True, exist_ok=True)
  (dst / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
  counts = {}
  for phase in ("train", "val"):
    stems = []
    for stem, label in pascal_context_masks(annotation, phase):
      _save_png(label, dst / "SegmentationClassContext" / f"{stem}.png")
      stems.append(stem)
    (dst / "ImageSets" / "SegmentationContext" / f"{phase}.txt").write_text(
        "".join(s + "\n" for s in sorted(stems)))
    counts[phase] = len(stems)
  return counts


# ---------------------------------------------------------------------------------------------
# Packing: a split's files -> ArrayRecord, each record the msgpack of the two files' own bytes.

def pack(dataset: datasets.FileDataset, dst: epath.Path, records_per_file: int = 1000,
         check: bool = True) -> int:
  """Writes dst/{split}-NNNNN-of-NNNNN.array_record and dst/{split}.json; returns the count.

  With `check`, every record is decoded and its labels converted first, so a bad file
  fails here, named, rather than hours into training.
  """
  import msgpack  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  dst.mkdir(parents=True, exist_ok=True)
  n = len(dataset)
  num_files = max(1, math.ceil(n / records_per_file))
  files = [f"{dataset.split}-{i:05d}-of-{num_files:05d}.array_record" for i in range(num_files)]
  for f, name in enumerate(files):
    writer = array_record_module.ArrayRecordWriter(str(dst / name), "group_size:1")
    for i in range(f * records_per_file, min(n, (f + 1) * records_per_file)):
      if check:
        dataset[i]
      image_path, label_path, stem = dataset.pairs[i]
      image_bytes, label_bytes = dataset.read_bytes(i)
      writer.write(msgpack.packb({"name": stem, "image": image_bytes, "label": label_bytes,
                                  "image_file": image_path, "label_file": label_path}))
    writer.close()
  (dst / f"{dataset.split}.json").write_text(json.dumps(
      {"dataset": dataset.info.name, "split": dataset.split, "num_records": n, "files": files},
      indent=1))
  return n


_DEFAULT_SPLITS = {
    "ade20k": "training,validation", "ade20k_full": "training,validation",
    "coco_stuff10k": "train2014,test2014", "coco_lvis": "train2017,val2017",
    "pascal_context": "train,val", "camvid": "train,val", "folder": "train,val",
}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mlseg_jax.data.prepare",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("coco_stuff10k", help="official .mat annotations -> mmseg layout")
  p.add_argument("--src", required=True, help="cocostuff-10k-v1.1 folder")
  p.add_argument("--dst", required=True, help="output root (images/, annotations/)")
  p = sub.add_parser("pascal_context", help="trainval_merged.json -> 60-class label PNGs")
  p.add_argument("--src", required=True, help="PASCAL in Detail trainval_merged.json")
  p.add_argument("--dst", required=True, help="VOCdevkit/VOC2010 (with JPEGImages/)")
  p = sub.add_parser("pack", help="a dataset's splits -> ArrayRecord files")
  p.add_argument("--dataset", required=True, choices=sorted(set(datasets.DATASET_NAMES) - {"tfds"}))
  p.add_argument("--src", required=True, help="the dataset root, as config.root")
  p.add_argument("--dst", required=True, help="output folder (then config.root)")
  p.add_argument("--splits", default=None, help="comma-separated; default: both standard ones")
  p.add_argument("--records_per_file", type=int, default=1000)
  p.add_argument("--no_check", action="store_true", help="skip decoding every record first")
  p.add_argument("--num_classes", type=int, default=0, help="folder datasets")
  p.add_argument("--ignore_value", type=int, default=255, help="folder datasets")
  p.add_argument("--reduce_zero_label", action="store_true", help="folder datasets")
  args = parser.parse_args(argv)

  src, dst = epath.Path(args.src), epath.Path(args.dst)
  if not src.exists():
    raise errors.DataError(f"--src {src} does not exist")
  if args.command == "coco_stuff10k":
    print(prepare_coco_stuff10k(src, dst))
  elif args.command == "pascal_context":
    print(prepare_pascal_context(src, dst))
  else:
    config = datasets.default_config()
    config.name, config.root = args.dataset, str(src)
    config.num_classes, config.ignore_value = args.num_classes, args.ignore_value
    config.reduce_zero_label = args.reduce_zero_label
    for split in (args.splits or _DEFAULT_SPLITS[args.dataset]).split(","):
      ds = datasets.get_dataset(config, split)
      n = pack(ds, dst, args.records_per_file, check=not args.no_check)
      print(f"{args.dataset} {ds.split}: {n} records -> {dst}")


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (errors.UserError, *errors.PATH_ERRORS) as e:
    if errors.TRACEBACK_ENV in os.environ:
      raise
    errors.fail(str(e))
