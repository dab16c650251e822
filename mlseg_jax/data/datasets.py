"""Segmentation datasets: where their files are and what their label values mean.

Every dataset here is a random-access source (`len`, `[i]`) that Grain can read, and each record
is `{"image": uint8 (H, W, 3) RGB, "label": int32 (H, W), "name": str}` with labels as train ids
0..num_classes-1 and `IGNORE_LABEL` (-1) for pixels that are not scored, whatever the files
store (0 and 255 in ADE20K's PNGs, 65535 in ADE20K-Full's uint16 TIFFs, ...).

Layouts (root = `config.root`; every path may be local or a GCS-style URL, read with epath):
- ade20k: `[ADEChallengeData2016/]images/{training,validation}/*.jpg`, `annotations/.../*.png`.
- coco_stuff10k: `images/{train2014,test2014}/*.jpg`,
  `annotations/{train2014,test2014}/*_labelTrainIds.png` (made by `prepare coco_stuff10k`).
- pascal_context: `[VOC2010/]JPEGImages/*.jpg`, `SegmentationClassContext/*.png`,
  `ImageSets/SegmentationContext/{train,val}.txt` (made by `prepare pascal_context`).
- ade20k_full: `[ADE20K_2021_17_01/]images_detectron2/{training,validation}/*.jpg`,
  `annotations_detectron2/.../*.tif[f]` (MaskFormer's `prepare_ade20k_full_sem_seg.py`).
- coco_lvis: `images/{train2017,val2017}/*.jpg`, `lvis_mask/{train2017,val2017}/*.png`
  (16-bit PNGs, 0 = unlabeled, 1..1284 = classes; the reference config's layout).
- camvid: `images/{train,val}/*.jpg`, `labels/{train,val}/*.png` (uint8, 255 = void).
- folder: `images/` + `labels/` with matching file stems, either flat or with one
  sub-folder per split (`images/<split>/`, `labels/<split>/`).
- tfds: a TFDS dataset prepared in ArrayRecord format, read through `tfds.data_source`.
Images may be in any format of IMAGE_SUFFIXES in every layout (`*.jpg` above is what the
releases ship); a file without its partner is an error naming the file names looked for.
Any of them packed by `prepare pack` is read with `config.format = "array_record"` and
`config.root` = the pack folder.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any, Sequence

from etils import epath
import ml_collections
import numpy as np
import PIL.Image

from mlseg_jax import IGNORE_LABEL
from mlseg_jax import errors
from mlseg_jax.data import classes

# Normalisation constants (RGB, 0..255 scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HALF_MEAN = (127.5, 127.5, 127.5)
HALF_STD = (127.5, 127.5, 127.5)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff")

# A LUT entry for label values that are neither a class nor the ignore value.
_INVALID = np.iinfo(np.int32).min

# What `data.on_error` may say a bad training record does: stop the run, or be left out.
ON_ERROR = ("raise", "skip")
# What reading a bad record raises: the readers' DataError (a ValueError) naming the file,
# or an I/O error from below them (ArrayRecord, TFDS).
RECORD_ERRORS = (ValueError, OSError)


# The CamVid subset shipped inside the package (data/camvid_subset in a checkout links to
# it), so the quickstart runs from a clone and from an installed wheel alike.
QUICKSTART_DATA = epath.Path(__file__).parents[1] / "assets" / "camvid_subset"


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` fields the trainer and evaluator read, with usable defaults."""
  c = ml_collections.ConfigDict()
  c.name = "camvid"  # ade20k|coco_stuff10k|pascal_context|ade20k_full|coco_lvis|camvid|folder|tfds
  c.root = str(QUICKSTART_DATA)
  c.format = "files"  # or "array_record": root is a folder written by `prepare pack`.
  c.train_split = ""  # "" = the dataset's own name for it (ADE20K: "training", ...).
  c.val_split = ""
  # Training augmentation (mmseg's pipeline; REFERENCE.md §5).
  c.crop_size = (512, 512)  # (h, w)
  c.img_scale = (2048, 512)  # (long, short) before the ratio.
  c.ratio_range = (0.5, 2.0)
  c.cat_max_ratio = 0.75
  # The label id cat_max_ratio's test leaves out: -1, the ignored pixels; the ADE20K-Full and
  # COCO+LVIS rows set 255, the reference's RandomCrop default on labels that ignore -1.
  c.crop_ignore_label = -1
  c.flip_prob = 0.5
  c.photometric = True
  # Evaluation: whole images, keep-ratio resize to this (long, short) scale.
  c.test_scale = (2048, 512)
  # Reading.
  c.num_workers = 0  # Worker processes (mp_prefetch); 0 = in the training process.
  c.read_threads = 2  # Threads per process.
  c.prefetch_buffer = 2  # Batches each worker (or the in-process reader) keeps ready.
  c.shuffle_seed = 0  # Data order; the seed given to make_train_iterator drives augmentation.
  # A training record that does not read (or a file without its partner): "raise" stops the
  # run naming the file; "skip" logs it once, counts it and trains on the next good record.
  c.on_error = "raise"
  # `folder` and `tfds` only: the label conventions the files use.
  c.num_classes = 0
  c.ignore_value = 255
  c.reduce_zero_label = False
  c.label_int16 = False  # 16-bit labels read as int16 (65535 = -1), as the reference does.
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD
  c.class_names = ()
  # `tfds` only.
  c.tfds_name = ""
  c.tfds_data_dir = ""
  c.tfds_image_key = "image"
  c.tfds_label_key = "segmentation_mask"
  return c


def on_error_mode(config: ml_collections.ConfigDict) -> str:
  """`config.on_error`, refused unless it is one of ON_ERROR."""
  mode = config.get("on_error", "raise")
  if mode not in ON_ERROR:
    raise errors.ConfigError(f"data.on_error={mode!r} must be one of "
                             f"{', '.join(repr(m) for m in ON_ERROR)}")
  return mode


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How the values stored in a dataset's label files become train ids."""
  num_classes: int
  reduce_zero_label: bool  # 0 -> ignore, v -> v - 1 (ADE20K's 0 = "other").
  ignore_value: int  # Stored value that means "not scored" (after the int16 reading).
  int16: bool = False  # 16-bit files read as int16, so 65535 is -1.

  def describe(self) -> str:
    lo, hi = (1, self.num_classes) if self.reduce_zero_label else (0, self.num_classes - 1)
    extra = ", 0 (ignored)" if self.reduce_zero_label else ""
    return f"{lo}..{hi}{extra} or the ignore value {self.ignore_value}"


@functools.lru_cache(maxsize=32)
def _train_id_table(spec: LabelSpec) -> np.ndarray:
  """(65536,) int32: train id of every 16-bit pattern a label file can store."""
  stored = np.arange(65536, dtype=np.int64)
  if spec.int16:
    stored = np.where(stored > 32767, stored - 65536, stored)
  ids = stored - 1 if spec.reduce_zero_label else stored.copy()
  table = np.where((ids >= 0) & (ids < spec.num_classes), ids, _INVALID)
  table[stored == spec.ignore_value] = IGNORE_LABEL
  if spec.reduce_zero_label:
    table[stored == 0] = IGNORE_LABEL
  return table.astype(np.int32)


def to_train_ids(stored: np.ndarray, spec: LabelSpec, source: str) -> np.ndarray:
  """Stored label values -> int32 train ids with IGNORE_LABEL; raises naming `source`."""
  if stored.ndim == 3 and stored.shape[-1] == 1:
    stored = stored[..., 0]
  if stored.ndim != 2:
    raise errors.DataError(
        f"{source}: a label map must have one channel, got shape {stored.shape} "
        "(colour-coded label images are not supported)")
  if stored.dtype == np.bool_:
    stored = stored.astype(np.uint8)
  if stored.dtype in (np.uint8, np.uint16):
    bits = stored
  elif stored.dtype == np.int16:
    bits = stored.view(np.uint16)
  elif np.issubdtype(stored.dtype, np.integer):  # PIL's mode "I" for 16-bit PNGs.
    if stored.size and (stored.min() < -32768 or stored.max() > 65535):
      raise errors.DataError(f"{source}: label values {stored.min()}..{stored.max()} do not "
                             "fit in 16 bits")
    bits = stored.astype(np.uint16)
  else:
    raise errors.DataError(f"{source}: label map has dtype {stored.dtype}; expected integer "
                           "values")
  ids = _train_id_table(spec)[bits]
  bad = ids == _INVALID
  if bad.any():
    values = np.unique(stored[bad])
    raise errors.DataError(
        f"{source}: label values {values[:10].tolist()}{'...' if len(values) > 10 else ''} are "
        f"out of range; this dataset stores {spec.describe()} ({spec.num_classes} classes)")
  return ids


def _decode_error(e: Exception, data: bytes) -> str:
  """What PIL found wrong, without the BytesIO repr it names when it knows no format."""
  if isinstance(e, PIL.UnidentifiedImageError):
    return f"not a format PIL reads; the file starts with {data[:16]!r}"
  return str(e)


# Modes of 16-bit samples: OpenCV (the reference reads with mmcv.imread, cv2.IMREAD_COLOR)
# keeps their high byte, where PIL's convert("RGB") would saturate them to 255.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit integer and float samples: OpenCV's reader refuses them, so does the reference.
_REFUSED = {"I": "32-bit integer", "F": "32-bit float"}


def image_to_rgb(im: PIL.Image.Image, source: str) -> np.ndarray:
  """uint8 (H, W, 3) RGB of a PIL image, as the reference's reader gives its file: grey
  repeated, alpha dropped, palettes looked up, 16-bit samples shifted right by 8 (16-bit RGB
  PNGs already open as their high bytes); 32-bit images refused."""
  if im.mode in _SIXTEEN_BIT:
    grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
  if im.mode in _REFUSED:
    raise errors.DataError(
        f"{source}: {_REFUSED[im.mode]} samples (PIL mode {im.mode}) are not an image the "
        "reference reads (OpenCV refuses them); save it with 8- or 16-bit samples")
  return np.asarray(im.convert("RGB"), np.uint8)


def decode_image(data: bytes, source: str) -> np.ndarray:
  """Encoded image bytes -> uint8 (H, W, 3) RGB (`image_to_rgb`). EXIF orientation is not
  applied: labels are drawn on the stored pixels."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      return image_to_rgb(im, source)
  except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files.
    raise errors.DataError(f"{source}: cannot read the image ({_decode_error(e, data)})") from e


def decode_label(data: bytes, source: str) -> np.ndarray:
  """Encoded label bytes (PNG, palette PNG, 8/16-bit TIFF) -> stored values (H, W)."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        raise ValueError(f"a label map must have one channel, got mode {im.mode}")
      return np.asarray(im)  # "P" gives the palette indices, which are the labels.
  except (OSError, SyntaxError, ValueError) as e:
    raise errors.DataError(
        f"{source}: cannot read the label map ({_decode_error(e, data)})") from e


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Class names, palette, label conventions and normalisation of one dataset."""
  name: str
  class_names: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  labels: LabelSpec
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def num_classes(self) -> int:
    return self.labels.num_classes


INFOS = {
    "ade20k": DatasetInfo("ade20k", classes.ADE20K_CLASSES, classes.ADE20K_PALETTE,
                          LabelSpec(150, True, 255), HALF_MEAN, HALF_STD),
    "coco_stuff10k": DatasetInfo("coco_stuff10k", classes.COCO_STUFF_CLASSES,
                                 classes.COCO_STUFF_PALETTE, LabelSpec(171, True, 255),
                                 IMAGENET_MEAN, IMAGENET_STD),
    "pascal_context": DatasetInfo("pascal_context", classes.PASCAL_CONTEXT_CLASSES,
                                  classes.PASCAL_CONTEXT_PALETTE, LabelSpec(60, False, 255),
                                  HALF_MEAN, HALF_STD),
    "ade20k_full": DatasetInfo("ade20k_full", classes.ADE20K_FULL_CLASSES,
                               classes.ADE20K_FULL_PALETTE, LabelSpec(847, False, -1, True),
                               IMAGENET_MEAN, IMAGENET_STD),
    "coco_lvis": DatasetInfo("coco_lvis", classes.COCO_LVIS_CLASSES, classes.COCO_LVIS_PALETTE,
                             LabelSpec(1284, True, -1, True), IMAGENET_MEAN, IMAGENET_STD),
    "camvid": DatasetInfo("camvid", classes.CAMVID_CLASSES, classes.CAMVID_PALETTE,
                          LabelSpec(11, False, 255), IMAGENET_MEAN, IMAGENET_STD),
}
DATASET_NAMES = tuple(INFOS) + ("folder", "tfds")


def user_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """DatasetInfo of a `folder` or `tfds` dataset, from the config's label fields."""
  n = int(config.num_classes)
  if n <= 0:
    raise errors.ConfigError(f"data.num_classes must be set (> 0) for a {config.name} dataset")
  names = tuple(config.class_names) or tuple(f"class_{i}" for i in range(n))
  if len(names) != n:
    raise errors.ConfigError(f"data.class_names has {len(names)} names for {n} classes")
  return DatasetInfo(
      config.name, names, classes.voc_colormap(n),
      LabelSpec(n, bool(config.reduce_zero_label), int(config.ignore_value),
                bool(config.get("label_int16", False))),
      tuple(float(v) for v in config.mean), tuple(float(v) for v in config.std))


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Class names, palette, label conventions and normalisation of `config.name` (no files read)."""
  if config.name in INFOS:
    return INFOS[config.name]
  if config.name not in DATASET_NAMES:
    raise errors.ConfigError(f"unknown dataset {config.name!r}; known: "
                             f"{', '.join(DATASET_NAMES)}")
  return user_info(config)


class Dataset:
  """Random-access segmentation records; subclasses say where the bytes come from."""

  # (file, why) of the files left out for want of a partner (`get_dataset(skip_unpaired=)`).
  unpaired: Sequence[tuple[str, str]] = ()

  def __init__(self, info: DatasetInfo, split: str):
    self.info = info
    self.split = split

  num_classes = property(lambda self: self.info.num_classes)
  class_names = property(lambda self: self.info.class_names)
  palette = property(lambda self: self.info.palette)
  mean = property(lambda self: self.info.mean)
  std = property(lambda self: self.info.std)

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def _record(self, image: np.ndarray, stored: np.ndarray, name: str, image_source: str,
              label_source: str) -> dict[str, Any]:
    label = to_train_ids(stored, self.info.labels, label_source)
    if image.shape[:2] != label.shape:
      raise errors.DataError(
          f"{image_source} is {image.shape[1]}x{image.shape[0]} (WxH) but its label map "
          f"{label_source} is {label.shape[1]}x{label.shape[0]}")
    return {"image": image, "label": label, "name": name}


class FileDataset(Dataset):
  """Image and label files side by side; `pairs` = [(image path, label path, name)]."""

  def __init__(self, info: DatasetInfo, split: str, pairs: Sequence[tuple[str, str, str]],
               unpaired: Sequence[tuple[str, str]] = ()):
    super().__init__(info, split)
    self.pairs = list(pairs)
    self.unpaired = list(unpaired)

  def __len__(self) -> int:
    return len(self.pairs)

  def read_bytes(self, index: int) -> tuple[bytes, bytes]:
    image_path, label_path, _ = self.pairs[index]
    return _read(image_path), _read(label_path)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_path, label_path, name = self.pairs[index]
    image_bytes, label_bytes = self.read_bytes(index)
    return self._record(decode_image(image_bytes, image_path),
                        decode_label(label_bytes, label_path), name, image_path, label_path)


def _read(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except (OSError, IOError) as e:
    raise errors.DataError(f"{path}: cannot read the file ({e})") from e


class PackedDataset(Dataset):
  """Records packed by `prepare pack`: one ArrayRecord file set per split, each record the
  msgpack of {"name", "image", "label", "image_file", "label_file"} (the files' own bytes)."""

  def __init__(self, info: DatasetInfo, split: str, root: epath.Path):
    super().__init__(info, split)
    meta_path = root / f"{split}.json"
    if not meta_path.exists():
      raise errors.DataError(f"{meta_path}: no packed split {split!r} here (written by "
                             "`python -m mlseg_jax.data.prepare pack`)")
    meta = json.loads(meta_path.read_text())
    if meta["dataset"] != info.name:
      raise errors.DataError(f"{meta_path}: packed from dataset {meta['dataset']!r}, but the "
                             f"config names {info.name!r}")
    self.paths = [str(root / f) for f in meta["files"]]
    self._len = int(meta["num_records"])
    self._source = None

  def __len__(self) -> int:
    return self._len

  def __getstate__(self):  # Readers are opened again in each worker process.
    return {**self.__dict__, "_source": None}

  def __getitem__(self, index: int) -> dict[str, Any]:
    import grain  # pylint: disable=g-import-not-at-top
    import msgpack  # pylint: disable=g-import-not-at-top
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
      if len(self._source) != self._len:
        raise errors.DataError(f"{self.paths[0]}...: {len(self._source)} records, the metadata "
                               f"says {self._len}")
    rec = msgpack.unpackb(self._source[index])
    where = f"{rec['name']} (packed from {rec['image_file']})"
    return self._record(decode_image(rec["image"], where),
                        decode_label(rec["label"], rec["label_file"]), rec["name"],
                        rec["image_file"], rec["label_file"])


class TfdsDataset(Dataset):
  """A TFDS dataset prepared in ArrayRecord format (`file_format="array_record"`), read
  through `tfds.data_source` (no TensorFlow needed)."""

  def __init__(self, info: DatasetInfo, split: str, tfds_name: str, data_dir: str | None,
               image_key: str, label_key: str):
    super().__init__(info, split)
    if tfds_name.split("/")[0].split(":")[0] == "scene_parse150":
      raise errors.ConfigError(
          "TFDS scene_parse150 stores the Places Challenge 2017 *instance* masks (RGB PNGs whose "
          "red channel is one of 100 instance categories), not ADE20K's 150-class semantic "
          "labels: use name='ade20k' on ADEChallengeData2016 (optionally packed with "
          "`prepare pack`) instead")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.tfds_name, self.data_dir = tfds_name, data_dir
    self.image_key, self.label_key = image_key, label_key
    try:
      self._source = tfds.data_source(tfds_name, split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # TFDS raises many types; all mean "not there".
      raise errors.DataError(f"TFDS dataset {tfds_name!r} split {split!r} in "
                             f"{data_dir or 'the default data_dir'}: cannot open it ({e})"
                             ) from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[index]
    source = f"tfds:{self.tfds_name}/{self.split}[{index}]"
    for key in (self.image_key, self.label_key):
      if key not in ex:
        raise errors.DataError(f"{source}: no feature {key!r}; it has {sorted(ex)}")
    name = ex.get("file_name", ex.get("image/filename", source))
    name = name.decode() if isinstance(name, bytes) else str(name)
    image = np.asarray(ex[self.image_key])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return self._record(image[..., :3].astype(np.uint8), np.asarray(ex[self.label_key]), name,
                        source, source)


def _find_root(root: epath.Path, inner: str) -> epath.Path:
  """`root`, or `root/inner` when the user pointed at the folder above the dataset's own."""
  return root / inner if (root / inner).is_dir() else root


def _files_by_stem(folder: epath.Path, suffixes: Sequence[str], what: str
                   ) -> tuple[dict[str, str], list[tuple[str, str]]]:
  """({stem: path}, [(path, why it is left out)]) of the files in `folder` ending in one of
  `suffixes` (case-insensitive); a second file with a stem already taken is left out."""
  if not folder.is_dir():
    raise errors.DataError(f"{folder}: the {what} folder does not exist")
  found, doubles = {}, []
  for p in sorted(folder.iterdir()):
    suffix = next((s for s in suffixes if p.name.lower().endswith(s.lower())), None)
    if suffix is not None:
      stem = p.name[: -len(suffix)]
      if stem in found:
        doubles.append((str(p), f"{p}: a second {what} file for {stem!r} (the first is "
                                 f"{found[stem]}); it is left out"))
      else:
        found[stem] = str(p)
  return found, doubles


def _some(items: Sequence[Any], n: int = 5) -> str:
  return f"{list(items[:n])}{' ...' if len(items) > n else ''}"


def _looked_for(folder: epath.Path, stem: str, suffixes: Sequence[str]) -> str:
  """The file names a partner was looked for under, shell-style: `dir/x{.jpg,.png}`."""
  ends = suffixes[0] if len(suffixes) == 1 else "{" + ",".join(suffixes) + "}"
  return f"{folder / stem}{ends}"


@dataclasses.dataclass(frozen=True)
class Pairing:
  """Image and label files matched by stem, and the files that found no partner."""
  pairs: list[tuple[str, str, str]]  # (image, label, name)
  unpaired: list[tuple[str, str]]  # (file, one line naming it and what is missing)
  error: str  # What a strict reader raises about the unpaired files; "" when there are none.


def match_files(image_dir: epath.Path, label_dir: epath.Path, *,
                image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
                label_suffixes: Sequence[str] = (".png",),
                names: Sequence[str] | None = None) -> Pairing:
  """Pairs image and label files by stem and lists every file left without a partner.

  A label file's stem is its name less the matching entry of `label_suffixes`, so
  COCO-Stuff's `X_labelTrainIds.png` pairs with `X.jpg`. `names` (a split list) restricts
  and orders the pairs; without it, every image and every label must have a partner.
  """
  images, image_doubles = _files_by_stem(image_dir, image_suffixes, "image")
  labels, label_doubles = _files_by_stem(label_dir, label_suffixes, "label")
  stems = list(names) if names is not None else sorted(images)
  no_image = [s for s in stems if s not in images]
  no_label = [s for s in stems if s in images and s not in labels]
  orphans = sorted(set(labels) - set(images)) if names is None else []
  # (message about them all, [(file, its line)]) for each kind of problem.
  problems = [
      (f"{image_dir}: no image file for {len(no_image)} names of the split list",
       [(_looked_for(image_dir, s, image_suffixes),
         f"{_looked_for(image_dir, s, image_suffixes)}: named in the split list, but no "
         "such image file") for s in no_image]),
      (f"{label_dir}: no label map for {len(no_label)} images",
       [(images[s], f"{images[s]}: no label map "
                    f"{_looked_for(label_dir, s, label_suffixes)}") for s in no_label]),
      (f"{label_dir}: {len(orphans)} label maps without an image in {image_dir}",
       [(labels[s], f"{labels[s]}: no image {_looked_for(image_dir, s, image_suffixes)}")
        for s in orphans]),
      (f"{image_dir}: {len(image_doubles)} image files share a name with another",
       image_doubles),
      (f"{label_dir}: {len(label_doubles)} label files share a name with another",
       label_doubles),
  ]
  unpaired = [item for _, items in problems for item in items]
  error = next((f"{message}, e.g. {items[0][1]}"
                + (f"; also {_some([f for f, _ in items[1:]], 4)}" if len(items) > 1 else "")
                for message, items in problems if items), "")
  pairs = [(images[s], labels[s], s) for s in stems if s in images and s in labels]
  return Pairing(pairs, unpaired, error)


# Split names each layout uses, and the usual aliases for them.
_SPLIT_ALIASES = {
    "ade20k": {"train": "training", "val": "validation"},
    "ade20k_full": {"train": "training", "val": "validation"},
    "coco_stuff10k": {"train": "train2014", "val": "test2014", "test": "test2014"},
    "coco_lvis": {"train": "train2017", "val": "val2017"},
    "pascal_context": {"training": "train", "validation": "val"},
    "camvid": {"training": "train", "validation": "val"},
}


def _layout_pairs(name: str, root: epath.Path, split: str) -> Pairing:
  # Images in any format PIL reads wherever the layout does not fix one; label suffixes
  # are part of each layout (COCO-Stuff's "_labelTrainIds.png" says which PNGs are labels).
  if name == "ade20k":
    root = _find_root(root, "ADEChallengeData2016")
    return match_files(root / "images" / split, root / "annotations" / split)
  if name == "coco_stuff10k":
    return match_files(root / "images" / split, root / "annotations" / split,
                       label_suffixes=("_labelTrainIds.png",))
  if name == "pascal_context":
    root = _find_root(root, "VOC2010")
    split_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    if not split_file.exists():
      raise errors.DataError(f"{split_file}: split list not found (written by "
                             "`python -m mlseg_jax.data.prepare pascal_context`)")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    return match_files(root / "JPEGImages", root / "SegmentationClassContext", names=names)
  if name == "ade20k_full":
    root = _find_root(root, "ADE20K_2021_17_01")
    return match_files(root / "images_detectron2" / split,
                       root / "annotations_detectron2" / split,
                       label_suffixes=(".tif", ".tiff"))
  if name == "coco_lvis":
    return match_files(root / "images" / split, root / "lvis_mask" / split)
  if name == "camvid":
    return match_files(root / "images" / split, root / "labels" / split)
  if name == "folder":
    images, labels = root / "images", root / "labels"
    if split and (images / split).is_dir():
      images, labels = images / split, labels / split
    return match_files(images, labels, label_suffixes=LABEL_SUFFIXES)
  raise errors.ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")


def resolve_split(config: ml_collections.ConfigDict, split: str) -> str:
  """"train"/"val" mean the config's train_split/val_split when set; then per-layout aliases."""
  if split in ("train", "val") and config.get(f"{split}_split"):
    split = config.get(f"{split}_split")
  return _SPLIT_ALIASES.get(config.name, {}).get(split, split)


def get_dataset(config: ml_collections.ConfigDict, split: str, *,
                skip_unpaired: bool = False) -> Dataset:
  """The dataset `config.name` at `config.root`, split `split` ("train", "val" or its own name).

  An image without its label map (or a label map without its image) is an error naming it;
  with `skip_unpaired` it is left out and listed in the dataset's `unpaired`.
  """
  name = config.name
  info = dataset_info(config)  # Refuses unknown names.
  split = resolve_split(config, split)
  fmt = config.get("format", "files")
  if name == "tfds":
    if not config.tfds_name:
      raise errors.ConfigError("data.tfds_name must name the TFDS dataset for name='tfds'")
    ds = TfdsDataset(info, split, config.tfds_name, config.tfds_data_dir,
                     config.tfds_image_key, config.tfds_label_key)
  elif fmt == "array_record":
    ds = PackedDataset(info, split, epath.Path(config.root))
  elif fmt == "files":
    pairing = _layout_pairs(name, epath.Path(config.root), split)
    if pairing.error and not skip_unpaired:
      raise errors.DataError(pairing.error)
    ds = FileDataset(info, split, pairing.pairs, pairing.unpaired)
  else:
    raise errors.ConfigError(f"data.format must be 'files' or 'array_record', got {fmt!r}")
  if len(ds) == 0 and not ds.unpaired:
    raise errors.DataError(f"{config.root}: split {split!r} of {name} is empty")
  return ds
